"""ProDA on tiny random CLIPs: the three class-name positions, the Gaussian upper bound against a by-hand sum,
the orthogonality term, evaluation by the mean of all K prompts, counts, gradients and learning."""
import copy

import pytest
import torch
import torch.nn.functional as F

import clip_model
import methods
import proda
import train
from conftest import NAMES, assert_learns, random_images, train_steps


def test_positions_split_the_prompts_by_quarters():
    assert proda.positions(32) == [0] * 8 + [1] * 8 + [2] * 16
    assert proda.positions(6) == [0, 1, 2, 2, 2, 2] and proda.positions(1) == [2]


@torch.no_grad()
def test_prompts_put_the_name_front_middle_and_end(clip):
    """With the contexts set to the words "a photo", prompt k's text features are CLIP's own of "{name} a photo.",
    "a {name} photo." and "a photo {name}."."""
    model = proda.build(clip, NAMES, proda.Config(n_prompts=4, n_ctx=2))  # positions: front, middle, end, end
    words = clip.embed_text(clip_model.tokenize("a photo"))[0, 1:3]
    model.prompt_learner.ctx.copy_(words.expand(4, -1, -1))
    features = model.encode_prompts(torch.arange(4))  # (4, C, E)
    for k, sentence in enumerate(["{} a photo.", "a {} photo.", "a photo {}.", "a photo {}."]):
        tokens = clip_model.tokenize([sentence.format(n.replace("_", " ")) for n in NAMES])
        torch.testing.assert_close(features[k], F.normalize(clip.encode_text(tokens), dim=-1), rtol=0, atol=1e-5)


def test_loss_is_the_upper_bound_summed_by_hand(clip):
    torch.manual_seed(0)
    model = proda.build(clip, NAMES, proda.Config(n_prompts=8, n_ctx=4, prompt_batch=3)).train()
    y = torch.tensor([0, 3, 1, 2, 1, 0])
    logits = model(random_images(6))
    text, f, s = model.text, model.image, clip.logit_scale.exp()
    assert text.shape == (3, 4, clip.text_projection.shape[1])
    torch.testing.assert_close(logits, s * f @ text.mean(0).t())  # mu of the step's 3 prompts
    delta = text - text.mean(0)
    raised = logits.clone()
    for b in range(len(y)):  # 1/2 s^2 sum_d f_d^2 sum_k (delta_kjd - delta_kyd)^2 / (P + 1), class by class
        for j in range(len(NAMES)):
            spread = ((delta[:, j] - delta[:, y[b]]) ** 2 * f[b] ** 2).sum() / (3 + 1)
            raised[b, j] = raised[b, j] + 0.5 * s ** 2 * spread
    expected = F.cross_entropy(raised, y) + 0.1 * model.orthogonality()
    torch.testing.assert_close(model.loss(logits, y, epoch=0), expected, rtol=1e-5, atol=1e-6)
    assert model.loss(logits, y, 0) > F.cross_entropy(logits, y) + 0.1 * model.orthogonality()  # the bound is above


@torch.no_grad()
def test_orthogonality_is_the_mean_abs_cosine_of_the_contexts(clip):
    model = proda.build(clip, NAMES, proda.Config(n_prompts=3, n_ctx=2, prompt_batch=3))
    g = []
    for k in range(3):  # "[SOT] ctx_k . [EOT]" through CLIP's own text path
        tokens = clip_model.tokenize("X X.")
        embedded = clip.embed_text(tokens)
        embedded[:, 1:3] = model.prompt_learner.ctx[k]
        g.append(F.normalize(clip.encode_text_embeddings(embedded, tokens.argmax(-1)), dim=-1)[0])
    cos = torch.stack(g) @ torch.stack(g).t()
    expected = (cos[0, 1].abs() + cos[0, 2].abs() + cos[1, 2].abs()) / 3
    torch.testing.assert_close(model.orthogonality(), expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_evaluation_scores_with_the_mean_of_all_prompts(clip):
    torch.manual_seed(0)
    model = proda.build(clip, NAMES, proda.Config(n_prompts=5, n_ctx=3)).eval()
    x = random_images(6)
    mean = model.encode_prompts(torch.arange(5)).mean(0)  # (C, E), not re-normalised
    torch.testing.assert_close(model(x), clip.logit_scale.exp() * model.frozen_features(x) @ mean.t(),
                               rtol=0, atol=1e-5)
    assert model(x) is not None and model.cached is not None and model.train().cached is None


@pytest.mark.usefixtures("random_weights_once")  # a paper backbone, built once per process
@pytest.mark.slow
def test_parameter_count_at_the_default_backbone(tmp_path):
    r = train.run(methods.parse_args(["--method", "proda", "--data", "demo", "--init", "random", "--dry-run",
                                      "--output", str(tmp_path)]))
    assert r["backbone"] == "RN50" and r["learned_params"] == 32 * 16 * 512  # K n_ctx D = 262,144
    assert (r["config"]["n_prompts"], r["config"]["prompt_batch"], r["config"]["ortho_weight"]) == (32, 4, 0.1)


def test_training_reaches_every_context_and_learns(clip):
    clip = copy.deepcopy(clip)
    before = copy.deepcopy(clip.state_dict())
    torch.manual_seed(0)
    model = proda.build(clip, NAMES, proda.Config(n_prompts=8, n_ctx=4))
    x, y = random_images(8, seed=1), torch.arange(8) % len(NAMES)
    model.train()
    model.loss(model(x), y, 0).backward()
    grad = model.prompt_learner.ctx.grad.abs().sum((1, 2))  # (K,): every context, sampled or not (orthogonality)
    assert (grad > 0).all()
    model.zero_grad()
    assert_learns(train_steps(model, x, y, lr=0.003), len(NAMES))
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
