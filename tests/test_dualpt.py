"""DUAL-PT and CoDUAL-PT on tiny random CLIPs: the graph-matching plan against a slow reference, counts, Eq. 8
and Eq. 9, gradients, learning, descriptions (file, errors, the `describe` command against a fake server), demo."""
import copy
import http.server
import json
import math
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_model
import data
import describe
import dualpt
import methods
import train
from conftest import NAMES, assert_learns, random_images, train_steps

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTIONS = {"Red_Circle": ["a round red disc", "smooth edge"], "blue stripes": ["blue bands"],
                "green checkerboard": ["green squares", "a grid", "alternating tiles"],
                "sea lion": ["flippers", "wet fur"]}


@pytest.fixture(scope="module")
def clip_rn():
    return clip_model.load("tiny-rn")[0]


def config(variant="dualpt", **changes):
    return replace(dualpt.Config(), **{**dualpt.VARIANTS[variant], **changes})


def images(clip, n=6, seed=0):
    return random_images(n, seed, clip.visual.input_resolution)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def learned(model):
    return [p for p in model.parameters() if p.requires_grad]


def describe_file(tmp_path, table=DESCRIPTIONS):
    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps(table))
    return str(path)


# ---- the graph-matching plan (Algorithm 1) ----

def reference_plan(Z, W, alpha, lam=0.1, outer=5, inner=2000):
    """Algorithm 1 for one image and one class, float64, the plain kernel K = exp(-C / lambda), fixed counts."""
    Z, W = Z.double().numpy(), W.double().numpy()
    N, M = len(Z), len(W)
    p, q = np.full(N, 1 / N), np.full(M, 1 / M)
    C_wd, C_z, C_w = 1 - Z @ W.T, Z @ Z.T, W @ W.T
    C_zw = (C_z ** 2) @ p[:, None] @ np.ones((1, M)) + np.ones((N, 1)) @ ((C_w ** 2) @ q)[None]
    T = np.outer(p, q)
    for _ in range(outer):
        C = alpha * (C_zw - 2 * C_z @ T @ C_w.T) + (1 - alpha) * C_wd
        K, b = np.exp(-C / lam), np.ones(M)
        for _ in range(inner):
            a = p / (K @ b)
            b = q / (K.T @ a)
        T = np.diag(a) @ K @ np.diag(b)
    return T


def gw_cost(Z, W, T):
    """The GW objective sum T * (C_zw - 2 C_z T C_w^T) for one pair, uniform marginals."""
    C_z, C_w = Z @ Z.T, W @ W.T
    C_zw = (C_z ** 2).mean(1, keepdim=True) + (C_w ** 2).mean(1)[None]
    return (T * (C_zw - 2 * C_z @ T @ C_w.T)).sum().item()


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_plan_meets_the_marginals(alpha):
    local, text = unit(3, 7, 8, seed=1), unit(5, 4, 8, seed=2)  # 8 dims: varied cosines, a sharp kernel
    plan = dualpt.graph_plan(local, text, config(alpha=alpha))
    assert plan.shape == (3, 5, 7, 4) and not plan.requires_grad
    torch.testing.assert_close(plan.sum(-1), torch.full((3, 5, 7), 1 / 7), rtol=0, atol=1e-4)
    torch.testing.assert_close(plan.sum(-2), torch.full((3, 5, 4), 1 / 4), rtol=0, atol=1e-4)
    assert plan.max() > 3 / 28  # far from the uniform start p q^T: the costs moved it


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
@pytest.mark.slow
def test_plan_matches_a_slow_reference(alpha):
    local, text = unit(2, 6, 8, seed=3), unit(3, 4, 8, seed=4)
    expected = torch.tensor(np.stack([np.stack([reference_plan(local[b], text[k], alpha) for k in range(3)])
                                      for b in range(2)]), dtype=torch.float32)
    exact = dualpt.graph_plan(local, text, config(alpha=alpha, sinkhorn_tol=0, sinkhorn_iters=2000))
    torch.testing.assert_close(exact, expected, rtol=0, atol=1e-6)
    default = dualpt.graph_plan(local, text, config(alpha=alpha))  # stopped early: within sinkhorn_tol = 1e-4
    torch.testing.assert_close(default, expected, rtol=0, atol=1e-4)
    per_image = dualpt.graph_plan(local, text.expand(2, -1, -1, -1), config(alpha=alpha))  # CoDUAL-PT's shapes
    torch.testing.assert_close(per_image, default, rtol=0, atol=1e-6)


def test_plan_follows_permutations_of_prompts_and_regions():
    local, text = unit(2, 6, 8, seed=5), unit(3, 4, 8, seed=6)
    plan = dualpt.graph_plan(local, text, config())
    prompts, regions = torch.tensor([2, 0, 3, 1]), torch.tensor([5, 3, 1, 0, 2, 4])
    torch.testing.assert_close(dualpt.graph_plan(local, text[:, prompts], config()), plan[..., prompts],
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(dualpt.graph_plan(local[:, regions], text, config()), plan[:, :, regions],
                               rtol=0, atol=1e-6)


def test_gromov_wasserstein_prefers_the_same_graph():
    Z = unit(6, 8, seed=7)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    shuffled = F.normalize(Z.flatten()[order].view(6, 8), dim=-1)  # the same numbers, the edges scrambled

    def cost(W):
        return gw_cost(Z, W, dualpt.graph_plan(Z[None], W[None], config(alpha=1.0))[0, 0])
    same, relabelled, other = cost(Z), cost(Z[torch.tensor([3, 1, 5, 0, 2, 4])]), cost(shuffled)
    assert same < other - 0.01, (same, other)
    assert relabelled == pytest.approx(same, abs=1e-5)  # GW sees edges only: renaming nodes changes nothing
    plan = dualpt.graph_plan(Z[None], Z[None], config(alpha=1.0))[0, 0]
    assert plan.diagonal().sum() > 0.5  # the same graph: most mass on node i -> node i


def test_sinkhorn_is_safe_where_the_plain_kernel_underflows():
    cost = torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(0)) * 4  # exp(-4 / 0.01) = 0 in fp32
    plan = dualpt.sinkhorn(-cost / 0.01, torch.full((5,), -math.log(5)), torch.full((3,), -math.log(3)), 500, 1e-6)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(-1), torch.full((2, 5), 0.2), rtol=0, atol=1e-4)


# ---- parameters ----

@pytest.mark.parametrize("variant,changes,count", [
    ("dualpt", {}, 4 * 16 * 512),  # M * n_ctx * D = 32,768
    ("codualpt", {}, 4 * 4 * 512 + (1024 * 64 + 64) + (64 * 512 + 512)),  # 8,192 + 65,600 + 33,280 = 107,072
    ("dualpt", {"n_prompts": 2, "n_ctx": 8}, 2 * 8 * 512)])
def test_parameter_counts_for_rn50(variant, changes, count):
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["RN50"])
    model = dualpt.build(clip, NAMES, config(variant, **changes))
    assert sum(p.numel() for p in learned(model)) == count
    assert count in (32_768, 107_072, 8_192)


@pytest.mark.usefixtures("random_weights_once")  # a paper backbone, built once per process
@pytest.mark.parametrize("variant,count", [("dualpt", 32_768), ("codualpt", 107_072), ("plot", 32_768)])
@pytest.mark.slow
def test_dry_run_reports_the_counts(tmp_path, variant, count):
    r = train.run(methods.parse_args(["--method", variant, "--data", "demo", "--init", "random", "--dry-run",
                                      "--output", str(tmp_path)]))
    assert r["backbone"] == "RN50" and r["learned_params"] == count and r["config"]["n_prompts"] == 4


@pytest.mark.usefixtures("random_weights_once")  # a paper backbone, built once per process
@pytest.mark.slow
def test_plot_is_the_official_configuration(tmp_path):
    """PLOT's plot-coop: rn50.yaml (50 epochs at every shot count, batch 128, lr 0.002), main.sh (N = 4, 16 tokens),
    the trainer (eps 0.1, at most 100 Sinkhorn steps, threshold 1e-2 on a's mean change, ImageNet's extra logit)."""
    r = train.run(methods.parse_args(["--method", "plot", "--data", "demo", "--shots", "1", "--init", "random",
                                      "--dry-run", "--output", str(tmp_path)]))
    cfg = r["config"]
    assert (r["epochs"], cfg["batch_size"], cfg["lr"], cfg["warmup_epochs"]) == (50, 128, 0.002, 1)
    assert (cfg["n_prompts"], cfg["n_ctx"], cfg["ctx_init"], cfg["ot_lambda"]) == (4, 16, "", 0.1)
    assert (cfg["alpha"], cfg["beta"], cfg["conditional"]) == (0.0, 0.0, False)
    assert (cfg["sinkhorn_iters"], cfg["sinkhorn_stop"], cfg["sinkhorn_tol"]) == (100, "plot", 0.01)
    assert cfg["global_logit"] == "imagenet"


# ---- the model ----

@torch.no_grad()
def test_logits_are_eq8_over_local_features(clip, clip_rn):
    for backbone in (clip, clip_rn):
        model = dualpt.build(backbone, NAMES, config()).eval()
        x = images(backbone, 3)
        logits = model(x)
        local = F.normalize(backbone.visual.dense(x)[:, 1:], dim=-1)  # (B, N, E)
        ctx = model.prompt_learner.ctx
        text = []
        for m in range(len(ctx)):  # prompt m for every class, one at a time, through CLIP's own text path
            tokens = clip_model.tokenize([" ".join(["X"] * 16 + [n.replace("_", " ")]) + "." for n in NAMES])
            embedded = backbone.embed_text(tokens)
            embedded[:, 1:17] = ctx[m]
            text.append(F.normalize(backbone.encode_text_embeddings(embedded, tokens.argmax(-1)), dim=-1))
        text = torch.stack(text, 1)  # (K, M, E)
        plan = dualpt.graph_plan(local, text, config())
        expected = backbone.logit_scale.exp() * torch.einsum("bknm,bne,kme->bk", plan, local, text)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        assert local.shape[1] == {32: 16, 64: 4}[backbone.visual.input_resolution]  # 4x4 patches, 2x2 pool grid


def official_plot_logits(backbone, model, x, imagenet):
    """PLOT's CustomCLIP.forward (plot-coop's trainer), in float64 from our towers' features: the plain kernel
    exp(-(1 - sim) / 0.1), a = b = 1 at the start, stop once a's mean change over every (image, class) pair is
    below 1e-2 (at most 100 steps); on ImageNet + scale * cos(global feature, the mean of the N prompts' features)."""
    dense = backbone.visual.dense(x).double()
    pool, local = F.normalize(dense[:, 0], dim=-1), F.normalize(dense[:, 1:], dim=-1)  # (B, E), (B, N, E)
    raw = []
    for m in range(len(model.prompt_learner.ctx)):  # prompt m for every class, through CLIP's own text path
        tokens = clip_model.tokenize([" ".join(["X"] * 16 + [n.replace("_", " ")]) + "." for n in NAMES])
        embedded = backbone.embed_text(tokens)
        embedded[:, 1:17] = model.prompt_learner.ctx[m]
        raw.append(backbone.encode_text_embeddings(embedded, tokens.argmax(-1)).double())
    raw = torch.stack(raw)  # (M, K, E), the official code's (N, n_cls, d)
    text = F.normalize(raw, dim=-1)
    sim = torch.einsum("bne,mke->bknm", local, text).flatten(0, 1)  # (B K, N, M)
    kernel = torch.exp(-(1 - sim) / 0.1)
    p = torch.full(sim.shape[:2], 1 / sim.shape[1], dtype=sim.dtype)  # 1/N over the regions
    q = torch.full(sim.shape[::2], 1 / sim.shape[2], dtype=sim.dtype)  # 1/M over the prompts
    a, b = torch.ones_like(p), torch.ones_like(q)
    for _ in range(100):
        previous = a
        a = p / (kernel @ b[..., None])[..., 0]
        b = q / (kernel.transpose(1, 2) @ a[..., None])[..., 0]
        if (a - previous).abs().mean() < 1e-2:
            break
    plan = a[..., None] * kernel * b[:, None]
    scale = backbone.logit_scale.exp().double()
    logits = scale * (plan * sim).sum((1, 2)).view(len(x), len(NAMES))
    if imagenet:
        logits = logits + scale * pool @ F.normalize(raw.mean(0), dim=-1).T
    return logits


@torch.no_grad()
@pytest.mark.parametrize("dataset", ["ImageNet", "DescribableTextures"])
def test_plot_logits_match_the_official_forward(clip_rn, dataset):
    torch.manual_seed(0)
    model = dualpt.build(clip_rn, NAMES, config("plot", dataset=dataset)).eval()
    x = images(clip_rn, 3)
    expected = official_plot_logits(clip_rn, model, x, imagenet=dataset == "ImageNet")
    torch.testing.assert_close(model(x).double(), expected, rtol=0, atol=1e-4)
    assert model.global_logit == (dataset == "ImageNet")
    always = dualpt.build(clip_rn, NAMES, config("plot", global_logit="always")).eval()
    always.load_state_dict(model.state_dict())
    torch.testing.assert_close(always(x).double(), official_plot_logits(clip_rn, model, x, imagenet=True),
                               rtol=0, atol=1e-4)


def test_plot_stopping_rule_is_the_official_one():
    """Sinkhorn with stop=plot ends at the step where a's mean change over all plans first drops below tol, the
    step before (and the converged plan) measurably different, so the rule is what the test sees."""
    cost = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    log_p, log_q = torch.full((6,), -math.log(6), dtype=torch.float64), torch.full((4,), -math.log(4),
                                                                                    dtype=torch.float64)
    kernel, a, b = torch.exp(-cost / 0.5), torch.ones(3, 6, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    plans = []
    for _ in range(100):
        previous = a
        a = (1 / 6) / (kernel @ b[..., None])[..., 0]
        b = (1 / 4) / (kernel.transpose(1, 2) @ a[..., None])[..., 0]
        plans.append(a[..., None] * kernel * b[:, None])
        if (a - previous).abs().mean() < 1e-2:
            break
    assert 2 <= len(plans) < 100
    ours = dualpt.sinkhorn(-cost / 0.5, log_p, log_q, 100, 1e-2, stop="plot")
    torch.testing.assert_close(ours, plans[-1], rtol=0, atol=1e-12)
    converged = dualpt.sinkhorn(-cost / 0.5, log_p, log_q, 2000, 0.0)
    assert (plans[-1] - plans[-2]).abs().max() > 1e-6 and (ours - converged).abs().max() > 1e-6


@pytest.mark.slow
def test_train_gives_plot_the_dataset_name(tmp_path):
    """train.py fills Config.dataset: PLOT's extra logit is on for ImageNet, off for a DG target (the official
    code keys it on the dataset being evaluated), which gets its own model with the learned prompts."""
    from test_data import WNIDS, make_imagenet, make_variant
    make_imagenet(tmp_path)
    make_variant(tmp_path, "imagenetv2", WNIDS[:3])
    args = methods.parse_args(["--method", "plot", "--data", str(tmp_path / "imagenet"), "--protocol", "dg",
                               "--backbone", "tiny-rn", "--init", "random", "--shots", "1"])
    module, cfg = methods.make_config(args)
    task = data.make_task(args.data, args.protocol, 1, 1)
    runner = train.Runner(args, module, cfg, task)
    assert runner.model.cfg.dataset == "ImageNet" and runner.model.global_logit
    assert runner.model_for(task.evals[0]) is runner.model
    target = runner.model_for(task.evals[1])
    assert target.cfg.dataset == "ImageNetV2" and not target.global_logit
    assert torch.equal(target.prompt_learner.ctx, runner.model.prompt_learner.ctx)


@torch.no_grad()
def test_prompts_start_different_and_codualpt_starts_as_dualpt(clip):
    torch.manual_seed(0)
    co = dualpt.build(clip, NAMES, config("codualpt")).eval()
    ctx = co.prompt_learner.ctx
    phrase = clip.embed_text(clip_model.tokenize("a photo of a"))[0, 1:5]
    assert torch.equal(ctx[0], phrase) and (ctx[1] - ctx[2]).abs().min() > 0
    plain = dualpt.build(clip, NAMES, config("codualpt", conditional=False)).eval()
    plain.load_state_dict(co.state_dict(), strict=False)
    x = images(clip, 4)
    torch.testing.assert_close(co(x), plain(x), rtol=0, atol=1e-5)  # the meta-net's shift starts at zero
    for p in co.meta_net.parameters():
        p.normal_(0, 0.3)
    logits = co(x)
    assert (logits - plain(x)).abs().max() > 1e-3
    torch.testing.assert_close(torch.cat([co(x[i:i + 1]) for i in range(4)]), logits, rtol=0, atol=1e-5)
    chunked = dualpt.build(clip, NAMES, config("codualpt", max_prompts=2 * 4 * len(NAMES))).eval()
    chunked.load_state_dict(co.state_dict())
    torch.testing.assert_close(chunked(x), logits, rtol=0, atol=1e-5)


def by_hand_llm_loss(clip, text, table, distill):
    """L_LLM from the descriptions encoded here, text (..., K, M, E): cosine of means, or the OT cost."""
    losses = []
    for k, name in enumerate(NAMES):
        descs = next(v for key, v in table.items() if key.lower().replace("_", " ") == name.replace("_", " "))
        h = F.normalize(clip.encode_text(clip_model.tokenize(descs)), dim=-1)  # (e, E)
        w = text[..., k, :, :]  # (..., M, E)
        if distill == "cosine":
            losses.append(1 - F.cosine_similarity(w.mean(-2), h.mean(0), dim=-1))
        else:
            cost = 1 - w @ h.t()  # (..., M, e)
            T = torch.tensor(np.stack([_sinkhorn64(c) for c in cost.detach().reshape(-1, *cost.shape[-2:])]))
            losses.append((T.view(cost.shape).float() * cost).sum((-2, -1)))
    return torch.stack(losses, -1).mean()


def _sinkhorn64(cost, lam=0.1, iters=2000):
    K = np.exp(-cost.double().numpy() / lam)
    p, q, b = np.full(K.shape[0], 1 / K.shape[0]), np.full(K.shape[1], 1 / K.shape[1]), np.ones(K.shape[1])
    for _ in range(iters):
        a = p / (K @ b)
        b = q / (K.T @ a)
    return np.diag(a) @ K @ np.diag(b)


@pytest.mark.parametrize("variant", ["dualpt", "codualpt"])  # PLOT has no descriptions: beta 0
@pytest.mark.parametrize("distill", ["cosine", "wd"])
def test_total_loss_is_eq9(clip, tmp_path, variant, distill):
    """loss() = beta L_LLM + (1 - beta) CE, with L_LLM from descriptions of unequal counts (1, 2, 3 per class:
    the padding must not count)."""
    model = dualpt.build(clip, NAMES, config(variant, distill=distill, descriptions=describe_file(tmp_path)))
    model.train()
    x, y = images(clip, 3), torch.tensor([0, 3, 1])
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    llm = by_hand_llm_loss(clip, model.text, DESCRIPTIONS, distill)
    assert llm > 0.05
    torch.testing.assert_close(model.loss(logits, y, epoch=0), 0.2 * llm + 0.8 * ce, rtol=1e-5, atol=1e-5)
    model.cfg = replace(model.cfg, beta=0.5)
    torch.testing.assert_close(model.loss(logits, y, epoch=0), 0.5 * llm + 0.5 * ce, rtol=1e-5, atol=1e-5)


def test_without_a_file_the_description_is_the_template(clip, tmp_path):
    model = dualpt.build(clip, NAMES, config(template="a photo of a {}, a shape."))
    expected = F.normalize(clip.encode_text(clip_model.tokenize([f"a photo of a {n.replace('_', ' ')}, a shape."
                                                                  for n in NAMES])), dim=-1)
    torch.testing.assert_close(model.desc_mean, expected, rtol=0, atol=1e-6)
    off = dualpt.build(clip, NAMES, config(beta=0.0, descriptions=str(tmp_path / "missing.json")))  # nothing read
    logits, y = off.train()(images(clip, 2)), torch.tensor([0, 1])
    assert torch.equal(off.loss(logits, y, epoch=0), F.cross_entropy(logits, y))  # beta = 0: the image loss alone


@pytest.mark.parametrize("variant", list(dualpt.VARIANTS))
def test_gradients_reach_only_learned_parameters(clip, tmp_path, variant):
    clip = copy.deepcopy(clip)
    model = dualpt.build(clip, NAMES, config(variant, descriptions=describe_file(tmp_path))).train()
    x, y = images(clip, 4), torch.tensor([0, 1, 2, 3])
    if model.meta_net is not None:  # away from the zero start, so that every meta-net weight has a gradient
        torch.nn.init.normal_(model.meta_net[2].weight, 0, 0.02)
    model.loss(model(x), y, epoch=0).backward()
    assert not model.plan.requires_grad and model.plan.grad_fn is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned(model))
    assert all(p.grad is None for p in clip.parameters()) and not clip.training


@pytest.mark.parametrize("backbone", ["tiny", "tiny-rn"])
@pytest.mark.parametrize("variant", list(dualpt.VARIANTS))
@pytest.mark.slow
def test_training_lowers_the_loss_and_moves_only_prompts(clip, clip_rn, tmp_path, backbone, variant):
    clip = copy.deepcopy(clip if backbone == "tiny" else clip_rn)
    before = copy.deepcopy(clip.state_dict())
    torch.manual_seed(0)
    model = dualpt.build(clip, NAMES, config(variant, descriptions=describe_file(tmp_path)))
    x, y = images(clip, 8), torch.arange(8) % len(NAMES)
    assert_learns(train_steps(model, x, y, lr=0.001), len(NAMES))
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())


def test_text_features_cached_only_while_evaluating(clip):
    model = dualpt.build(clip, NAMES, config()).eval()
    with torch.no_grad():
        first = model(images(clip))
        text = model.cached[1]
        assert torch.equal(model(images(clip)), first) and model.cached[1] is text  # reused, not recomputed
        model.prompt_learner.ctx.add_(1.0)  # changed in place: recomputed (issue 17: it was stale)
        assert not torch.allclose(model(images(clip)), first)
    assert model.train().cached is None


# ---- descriptions ----

def test_description_names_are_normalised(clip, tmp_path):
    model = dualpt.build(clip, NAMES, config(descriptions=describe_file(tmp_path)))
    assert model.desc.shape[:2] == (4, 3) and torch.isinf(model.desc_log_q).sum() == 2 + 1 + 0 + 1
    expected = F.normalize(clip.encode_text(clip_model.tokenize(["a round red disc", "smooth edge"])), dim=-1)
    torch.testing.assert_close(model.desc_mean[0], expected.mean(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("content,message", [
    ("", "cannot read"), ("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list"),
    (json.dumps({"red circle": ["x"], "sea lion": []}), "has none for 3 of 4 classes: blue_stripes, green checkerboard"
                                                        ", sea lion;")])
def test_bad_description_files(clip, tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    if not content:
        path.chmod(0o000)  # unreadable (root reads it all the same: a folder in its place, then)
        if os.access(path, os.R_OK):
            path.unlink()
            path.mkdir()
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        dualpt.build(clip, NAMES, config(descriptions=str(path)))


def test_a_missing_description_file_stops_training_not_evaluation(clip, tmp_path):
    """Issue 28: the descriptions feed L_LLM only, so a run whose file has moved still evaluates and predicts."""
    cfg = config(descriptions=str(tmp_path / "moved.json"))
    with pytest.raises(ValueError, match="no such file"):
        dualpt.check_config(cfg)  # train.py's check, before CLIP loads
    model = dualpt.build(clip, NAMES, cfg).eval()
    with_template = dualpt.build(clip, NAMES, config(beta=0.0)).eval()
    with_template.load_state_dict(model.state_dict())
    x = random_images(2)
    torch.testing.assert_close(model(x), with_template(x), rtol=0, atol=0)  # the logits do not read them
    logits = model.train()(x)
    with pytest.raises(ValueError, match="moved.json: no such file, and L_LLM needs it to train"):
        model.loss(logits, torch.tensor([0, 1]), 0)


def test_many_missing_classes_are_listed_up_to_ten(clip, tmp_path):
    names = [f"class {i}" for i in range(15)]
    with pytest.raises(ValueError) as e:
        dualpt.build(clip, names, config(descriptions=describe_file(tmp_path, {"class 0": ["x"]})))
    assert "14 of 15 classes: class 1, class 2" in str(e.value) and "class 10 ...;" in str(e.value)
    assert "class 11" not in str(e.value)


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"red circle": ["a red disc"]}))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--method", "dualpt", "--data", "demo",
                           "--backbone", "tiny", "--set", f"descriptions={tmp_path / 'd.json'}", "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: dualpt: descriptions file" in done.stderr
    assert "has none for 7 of 8 classes: blue triangle" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backbone", ["tiny", "tiny-rn"])
@pytest.mark.parametrize("variant", list(dualpt.VARIANTS))
@pytest.mark.slow
def test_demo_trains_with_the_shipped_descriptions(tmp_path, monkeypatch, backbone, variant):
    monkeypatch.chdir(tmp_path)  # the relative path is found next to dualpt.py
    r = train.run(methods.parse_args(["--method", variant, "--data", "demo", "--backbone", backbone, "--epochs", "2",
                                      "--shots", "2", "--batch-size", "8", "--set",
                                      "descriptions=descriptions/demo.json", "--output", str(tmp_path / "run")]))
    assert r["config"]["descriptions"] == "descriptions/demo.json" and len(r["history"]) == 2
    assert all(math.isfinite(h["loss"]) for h in r["history"]) and 0 <= r["accuracy"]["test"] <= 100
    table = json.loads((ROOT / "descriptions" / "demo.json").read_text())
    assert sorted(table) == sorted(data.DEMO_CLASSES) and all(3 <= len(v) <= 5 for v in table.values())


# ---- python describe.py, against a local fake endpoint ----

class FakeLLM(http.server.BaseHTTPRequestHandler):
    requests, status = [], 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeLLM.requests.append((self.path, self.headers.get("Authorization"), body))
        name = body["messages"][0]["content"].split("distinguishing a ")[1].split(" in a photo")[0]
        answer = f"Here you go:\n- {name} colour\n-  {name} shape \nnot a phrase\n- small"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(FakeLLM.status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_llm():
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()  # fast shutdown
    FakeLLM.requests, FakeLLM.status = [], 200
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_describe_writes_and_resumes(tmp_path, fake_llm, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    classes, out = tmp_path / "classes.txt", tmp_path / "out.json"
    classes.write_text("red circle\nsea_lion\n\n")
    args = ["--classes", str(classes), "--out", str(out), "--api-base", fake_llm, "--model", "m1"]
    assert describe.main(args) == 0
    assert json.loads(out.read_text()) == {"red circle": ["red circle colour", "red circle shape", "small"],
                                           "sea_lion": ["sea lion colour", "sea lion shape", "small"]}
    path, auth, body = FakeLLM.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer test-key"
    assert body == {"model": "m1", "temperature": 0.7, "messages": [{"role": "user", "content": (
        "What are the useful features for distinguishing a red circle in a photo? Please just give me a list of "
        "short phrases.")}]}
    classes.write_text(json.dumps(["red circle", "Sea Lion", "oak tree"]))  # a JSON list; two already done
    assert describe.main(args) == 0
    assert len(FakeLLM.requests) == 3 and "oak tree" in FakeLLM.requests[2][2]["messages"][0]["content"]
    assert list(json.loads(out.read_text())) == ["red circle", "sea_lion", "oak tree"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_describe_errors_keep_the_file(tmp_path, fake_llm, capsys):
    classes, out = tmp_path / "classes.txt", tmp_path / "out.json"
    classes.write_text("red circle\n")
    out.write_text(json.dumps({"sea lion": ["flippers"]}))
    FakeLLM.status = 500
    args = ["--classes", str(classes), "--out", str(out), "--api-base", fake_llm]
    assert describe.main(args) == 2 and "answered HTTP 500 for 'red circle'" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"sea lion": ["flippers"]}
    assert describe.main(["--classes", str(classes), "--out", str(out), "--api-base",
                        "http://127.0.0.1:9/v1"]) == 2 and "cannot reach" in capsys.readouterr().err
    assert describe.main(["--classes", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert "no file at --classes" in capsys.readouterr().err


def test_describe_into_a_closed_pipe_keeps_the_answers(tmp_path, fake_llm, monkeypatch, capsys, closed_stdout):
    """`describe.py ... | head -1`: the reader of its progress lines goes away after the first class. The answer
    it got is in --out, the message says so (not "cannot write --out"), and a rerun asks only for the rest."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    classes, out = tmp_path / "classes.txt", tmp_path / "out.json"
    classes.write_text("red circle\nsea_lion\n")
    args = ["--classes", str(classes), "--out", str(out), "--api-base", fake_llm]
    with closed_stdout:
        assert describe.main(args) == 141
    assert closed_stdout.goes_to_devnull()
    assert "the output was closed; " in capsys.readouterr().err and list(json.loads(out.read_text())) == ["red circle"]
    assert describe.main(args) == 0 and len(FakeLLM.requests) == 2
