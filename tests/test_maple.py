"""MaPLe against the official forward on OpenAI's reference CLIP (clip-anytorch, identical random weights), the
official learned-parameter count, its initialisation, gradients and learning."""
import copy

import pytest
import torch
import torch.nn.functional as F

import clip_model
import maple
import methods
import train
from conftest import NAMES, TINY_VIT, assert_learns, random_images, reference_clip, train_steps

DEEP_VIT = TINY_VIT[:2] + (4,) + TINY_VIT[3:9] + (4,)  # 4 blocks per tower: depth 3 leaves the last unprompted


@pytest.fixture(scope="module")
def clips():
    """The reference CLIP and ours, with the same random weights."""
    reference, state_dict = reference_clip(DEEP_VIT)
    return reference, clip_model.build_model(state_dict)


def official_logits(reference, model, x):
    """The official MaPLe forward (trainers/maple.py and its clip/model.py's MaPLe blocks) on the reference CLIP
    (sequence-first, full 77 tokens): the prompts are the model's own parameters."""
    ctx, deep, couple = model.ctx, model.deep_text, model.couple
    n = len(ctx)
    tokens = clip_model.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in NAMES])
    t = reference.token_embedding(tokens)
    t = torch.cat([t[:, :1], ctx.expand(len(t), -1, -1), t[:, 1 + n:]], dim=1) + reference.positional_embedding
    t = t.permute(1, 0, 2)  # (77, C, D)
    for i, block in enumerate(reference.transformer.resblocks):
        if 1 <= i <= len(deep):  # the block's counter: compound prompt i - 1 replaces rows 1..n
            t = torch.cat([t[:1], deep[i - 1][:, None].expand(-1, t.shape[1], -1), t[1 + n:]])
        t = block(t)
    t = reference.ln_final(t.permute(1, 0, 2))
    text = t[torch.arange(len(t)), tokens.argmax(-1)] @ reference.text_projection

    v = reference.visual
    x = v.conv1(x).flatten(2).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], dim=1) + v.positional_embedding
    x = torch.cat([x, couple[0](ctx).expand(len(x), -1, -1)], dim=1)  # proj(ctx) after the positions
    x = v.ln_pre(x).permute(1, 0, 2)  # (1 + N + n, B, W)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= len(deep):  # the last n tokens replaced by the coupled compound prompt
            x = torch.cat([x[:-n], couple[i](deep[i - 1])[:, None].expand(-1, x.shape[1], -1)])
        x = block(x)
    image = v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj
    return reference.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


@torch.no_grad()
@pytest.mark.parametrize("depth", [1, 3, 9])
def test_logits_match_the_official_forward(clips, depth):
    reference, ours = clips
    torch.manual_seed(0)
    model = maple.build(ours, NAMES, maple.Config(depth=depth)).eval()
    for p in model.parameters():  # away from the start: the deep prompts and every map matter
        if p.requires_grad:
            p.add_(0.05 * torch.randn_like(p))
    assert len(model.deep_text) == min(depth, 4) - 1
    x = random_images(3)
    torch.testing.assert_close(model(x), official_logits(reference, model, x), rtol=0, atol=1e-5)


def test_parameter_count_for_vit_b16():
    """The official count: ctx 2·512 + F_0 (512·768 + 768) + 8 deep prompts 2·512 + 8 maps (512·768 + 768)."""
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["ViT-B/16"])
    model = maple.build(clip, NAMES, maple.Config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_024 + 393_984 + 8_192 + 3_151_872
    assert 1_024 + 393_984 + 8_192 + 3_151_872 == 3_555_072


@pytest.mark.usefixtures("random_weights_once")  # a paper backbone, built once per process
@pytest.mark.slow
def test_dry_run_reports_the_official_count(tmp_path):
    r = train.run(methods.parse_args(["--method", "maple", "--data", "demo", "--init", "random", "--dry-run",
                                      "--output", str(tmp_path)]))
    assert r["backbone"] == "ViT-B/16" and r["learned_params"] == 3_555_072
    cfg = r["config"]
    assert (cfg["n_ctx"], cfg["depth"], cfg["ctx_init"]) == (2, 9, "a photo of a")
    assert (r["epochs"], cfg["batch_size"], cfg["lr"], cfg["warmup_epochs"]) == (5, 4, 0.0035, 1)


@torch.no_grad()
def test_starts_from_the_init_phrase_and_cloned_maps(clips):
    """ctx = "a photo", "of a" stays fixed text: at depth 1 the text features are zero-shot CLIP's of "a photo of
    a {class}."; F_1..F_{depth-1} start identical (the official deep copies), F_0 differs."""
    _, ours = clips
    torch.manual_seed(0)
    shallow = maple.build(ours, NAMES, maple.Config(depth=1))
    sentences = clip_model.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in NAMES])
    torch.testing.assert_close(shallow.encode_text(shallow.prompts()[0]), ours.encode_text(sentences),
                               rtol=0, atol=1e-5)
    deep = maple.build(ours, NAMES, maple.Config(depth=4))
    maps = [torch.cat([m.weight.flatten(), m.bias]) for m in deep.couple]
    assert all(torch.equal(maps[1], m) for m in maps[2:]) and not torch.equal(maps[0], maps[1])
    random = maple.build(ours, NAMES, maple.Config(n_ctx=6))  # over 4 tokens: random, "X" placeholders
    assert random.ctx.std() < 0.05 and len(random.ctx) == 6


def test_gradients_reach_every_learned_parameter_and_it_learns(clips):
    _, ours = clips
    clip = copy.deepcopy(ours)
    before = copy.deepcopy(clip.state_dict())
    torch.manual_seed(0)
    model = maple.build(clip, NAMES, maple.Config(depth=3))
    x, y = random_images(8, seed=1), torch.arange(8) % len(NAMES)
    F.cross_entropy(model.train()(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    assert_learns(train_steps(model, x, y, lr=0.001), len(NAMES))
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("backbone,setting,message", [
    ("tiny-rn", [], "MaPLe prompts the image transformer: use a ViT backbone"),
    ("tiny", ["--set", "ctx_init=a", "n_ctx=2"], "ctx_init='a' has 1 tokens, fewer than n_ctx=2"),
    ("tiny", ["--set", "depth=0"], "depth=0: must be 1 or more")])
def test_configs_it_cannot_use(tmp_path, capsys, backbone, setting, message):
    argv = ["--method", "maple", "--data", "demo", "--backbone", backbone, *setting, "--output", str(tmp_path / "o")]
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()
