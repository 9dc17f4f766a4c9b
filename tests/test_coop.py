"""Zero-shot CLIP, CoOp and CoCoOp on a tiny random CLIP: identity at init, parameter counts, gradients, learning."""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import clip_model
import coop
from conftest import assert_learns, random_images, train_steps

NAMES = ["red circle", "blue_stripes", "green checkerboard", "sea lion", "x!y"]


def config(variant="coop", **changes):
    return replace(coop.Config(), **{**coop.VARIANTS[variant], **changes})


@torch.no_grad()
def test_zeroshot_is_clip_with_the_template(clip):
    model = coop.build(clip, NAMES, config("zeroshot", template="a photo of a {}."))
    tokens = clip_model.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    expected = clip(random_images(6), tokens)
    torch.testing.assert_close(model(random_images(6)), expected, rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


@torch.no_grad()
def test_coop_initialised_from_phrase_equals_zeroshot(clip):
    zeroshot = coop.build(clip, NAMES, config("zeroshot", template="a photo of a {}."))
    for csc in (False, True):
        model = coop.build(clip, NAMES, config(ctx_init="a photo of a", csc=csc)).eval()
        torch.testing.assert_close(model(random_images(6)), zeroshot(random_images(6)), rtol=0, atol=1e-5)


def test_csc_with_an_init_phrase_is_one_context_per_class_and_a_listed_deviation(clip):
    """The official CoOp ignores csc when given an init phrase (one shared context); ours keeps one context per
    class, each starting as the phrase, and says so under Deviations (issue 17)."""
    model = coop.build(clip, NAMES, config(ctx_init="a_photo_of_a", csc=True))
    phrase = clip.embed_text(clip_model.tokenize("a photo of a"))[0, 1:5]  # (4, D)
    assert model.prompt_learner.ctx.shape == (len(NAMES), 4, phrase.shape[-1])
    assert all(torch.equal(ctx, phrase) for ctx in model.prompt_learner.ctx)
    deviations = coop.__doc__.split("- Deviations")[1]
    assert "`csc` with an init phrase: one context per class, each starting as the phrase" in " ".join(
        deviations.split())


def test_ensemble_averages_templates(clip):
    one = coop.build(clip, NAMES, config("zeroshot", template="a photo of a {}."))
    many = coop.build(clip, NAMES, config("zeroshot", template="a photo of a {}.", ensemble=True))
    with torch.no_grad():
        features = [F.normalize(clip.encode_text(clip_model.tokenize([t.format(n.replace("_", " ")) for n in NAMES])),
                                dim=-1) for t in ["a photo of a {}."] + coop.IMAGENET_TEMPLATES]
    torch.testing.assert_close(many.text_features(), F.normalize(torch.stack(features).mean(0), dim=-1))
    assert (many.text_features() - one.text_features()).abs().max() > 1e-3


def learned_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_counts(clip):
    D, E, C = 128, 64, len(NAMES)
    assert learned_count(coop.build(clip, NAMES, config())) == 16 * D
    assert learned_count(coop.build(clip, NAMES, config(csc=True))) == C * 16 * D
    assert learned_count(coop.build(clip, NAMES, config(n_ctx=4))) == 4 * D
    meta_net = (E * (E // 16) + E // 16) + (E // 16 * D + D)  # E -> E/16 -> D, with biases
    assert learned_count(coop.build(clip, NAMES, config("cocoop"))) == 4 * D + meta_net


def test_cocoop_count_for_vit_b16():
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["ViT-B/16"])
    model = coop.build(clip, NAMES, config("cocoop"))
    assert learned_count(model) == 35_360  # ctx 4*512 + (512*32 + 32) + (32*512 + 512)


@pytest.mark.parametrize("position", ["middle", "front"])
def test_class_token_position_moves_the_name(clip, position):
    model = coop.build(clip, NAMES, config(n_ctx=4, class_token_position=position))
    prompts = model.prompt_learner()  # (C, L, D)
    ctx, names = model.prompt_learner.ctx, clip_model.tokenize("sea lion")[0, 1:3]  # "sea", "lion"
    row = NAMES.index("sea lion")
    expected_name_rows = {"front": [1, 2], "middle": [3, 4]}[position]
    assert torch.equal(prompts[row, expected_name_rows], clip.embed_text(names[None])[0].detach())
    ctx_rows = {"front": [3, 4, 5, 6], "middle": [1, 2, 5, 6]}[position]
    assert torch.equal(prompts[row, ctx_rows], ctx.detach())
    assert torch.equal(prompts[row, 7], clip.embed_text(torch.tensor([[269]]))[0, 0].detach())  # "." follows


def test_unknown_position_is_an_error(clip):
    with pytest.raises(ValueError, match="end, middle or front"):
        coop.build(clip, NAMES, config(class_token_position="left"))


@torch.no_grad()
def test_cocoop_batched_equals_one_image_at_a_time(clip):
    model = coop.build(clip, NAMES, config("cocoop")).eval()
    for p in model.meta_net.parameters():  # a non-trivial meta-net
        p.normal_(0, 0.3)
    x = random_images(5)
    batched = model(x)
    looped = torch.cat([model(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-5)
    chunked = coop.build(clip, NAMES, config("cocoop", max_prompts=2 * len(NAMES)))
    chunked.load_state_dict(model.state_dict())
    torch.testing.assert_close(chunked.eval()(x), batched, rtol=0, atol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 0  # per-image prompts


@pytest.mark.parametrize("variant,changes,lr", [("coop", {}, 0.001),
                                                ("coop", {"csc": True, "class_token_position": "middle"}, 0.001),
                                                ("cocoop", {"batch_size": 4}, 0.01)])  # CoCoOp: its meta-net
def test_training_moves_only_learned_parameters_and_lowers_loss(clip, variant, changes, lr):
    clip = copy.deepcopy(clip)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    torch.manual_seed(0)
    model = coop.build(clip, NAMES, config(variant, **changes))
    x, y = random_images(10), torch.arange(10) % len(NAMES)
    assert_learns(train_steps(model, x, y, lr=lr), len(NAMES), by=0.1)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())  # CLIP untouched
    assert all(p.grad is None for p in clip.parameters())
    assert not clip.training


def test_text_features_cached_only_while_evaluating(clip):
    model = coop.build(clip, NAMES, config())
    model.eval()
    with torch.no_grad():
        first = model(random_images(6))
        text = model.cached[1]
        assert torch.equal(model(random_images(6)), first) and model.cached[1] is text  # reused, not recomputed
        model.prompt_learner.ctx.add_(1.0)  # changed in place: recomputed (issue 17: it was stale)
        assert not torch.allclose(model(random_images(6)), first) and model.cached[1] is not text
    cached = model.cached
    logits = model(random_images(6))  # with gradients (analyze.py's relevancy maps): computed afresh, cache untouched
    assert logits.requires_grad and model.cached is cached
    model.train()
    assert model.cached is None
