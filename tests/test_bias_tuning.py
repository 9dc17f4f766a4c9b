"""Bias tuning on a tiny random CLIP: zero-shot at init, where the biases go, counts, gradients, learning."""
import copy

import pytest
import torch

import bias_tuning
import clip_model
from conftest import NAMES, assert_learns, random_images, train_steps


@torch.no_grad()
def test_zero_biases_are_zeroshot_clip(clip):
    model = bias_tuning.build(clip, NAMES, bias_tuning.Config(template="a photo of a {}."))
    expected = clip(random_images(5), clip_model.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    torch.testing.assert_close(model(random_images(5)), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_bias_is_added_to_every_token_after_every_block(clip):
    model = bias_tuning.build(clip, NAMES, bias_tuning.Config())
    model.image_bias.normal_(0, 1)
    model.text_bias.normal_(0, 1)
    x = clip.visual.embed(random_images(5))
    for block, b in zip(clip.visual.transformer.resblocks, model.image_bias):
        x = block(x) + b
    torch.testing.assert_close(model.encode_image(random_images(5)), clip.visual.head(x), rtol=0, atol=1e-5)
    tokens = model.tokens
    x = clip.embed_text(tokens) + clip.positional_embedding  # all 77 positions, by hand
    for block, b in zip(clip.transformer.resblocks, model.text_bias):
        x = block(x, clip_model.causal_mask(77)) + b
    torch.testing.assert_close(model.encode_text(), clip.text_head(x, tokens.argmax(-1)), rtol=0, atol=1e-5)


def test_parameter_count_for_vit_b16():
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["ViT-B/16"])

    def count(**changes):
        model = bias_tuning.build(clip, NAMES, bias_tuning.Config(**changes))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert count() == 12 * 768 + 12 * 512 == 15_360
    assert count(visual=False) == 12 * 512 and count(text=False) == 12 * 768


def test_resnet_needs_visual_false(clip):
    rn = clip_model.load("tiny-rn")[0]
    with pytest.raises(ValueError, match="--set visual=false"):
        bias_tuning.build(rn, NAMES, bias_tuning.Config())
    model = bias_tuning.build(rn, NAMES, bias_tuning.Config(visual=False))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_only_biases_learn(clip):
    clip = copy.deepcopy(clip)
    before = copy.deepcopy(clip.state_dict())
    model = bias_tuning.build(clip, NAMES, bias_tuning.Config())
    x, y = random_images(8), torch.arange(8) % len(NAMES)
    assert_learns(train_steps(model, x, y, lr=0.03), len(NAMES))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"text_bias", "image_bias"}
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in clip.parameters())
