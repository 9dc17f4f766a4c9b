"""MuDPT and IVLP on a tiny random CLIP: the fusion path is the only difference, counts, gradients, learning."""
import copy
from dataclasses import replace

import pytest
import torch

import clip_model
import mudpt
from conftest import NAMES, assert_learns, random_images, train_steps


def config(variant, **changes):
    return replace(mudpt.Config(), **{**mudpt.VARIANTS[variant], **changes})


def learned(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("depth,ivlp,shared,per_layer", [(9, 46_080, 1_227_776, 6_347_776),
                                                          (12, 61_440, 1_243_136, 8_726_272)])
def test_parameter_counts_for_vit_b16(depth, ivlp, shared, per_layer):
    """ivlp and per_layer: counted by hand from the shapes; shared: the official code's trainable count (its
    MuDPTPromptLearner + visual_ctx* parameters: 2,048 + 16,384 + 393,984 + 393,984 + 3,072 + 24,576 +
    393,728 = 1,227,776 at depth 9)."""
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["ViT-B/16"])
    assert learned(mudpt.build(clip, NAMES, config("ivlp", depth=depth))) == ivlp
    assert learned(mudpt.build(clip, NAMES, config("mudpt", depth=depth))) == shared
    assert learned(mudpt.build(clip, NAMES, config("mudpt", depth=depth, injection="per_layer"))) == per_layer


@torch.no_grad()
@pytest.mark.parametrize("injection", ["shared", "per_layer"])
def test_zero_injection_is_ivlp(clip, injection):
    torch.manual_seed(0)
    model = mudpt.build(clip, NAMES, config("mudpt", depth=2, injection=injection)).eval()
    independent = mudpt.build(clip, NAMES, config("ivlp", depth=2)).eval()
    independent.load_state_dict(model.state_dict(), strict=False)  # the same prompts
    for p in model.injection.parameters():
        p.normal_(0, 0.5)
    x = random_images(5)
    assert (model(x) - independent(x)).abs().max() > 1e-3  # the fusion path changes logits
    for p in model.injection.parameters():
        p.zero_()
    torch.testing.assert_close(model(random_images(5)), independent(random_images(5)), rtol=0, atol=1e-6)


@torch.no_grad()
def test_per_layer_injection_at_every_depth(clip):
    """depth 1 has no deep block, so no maps: MuDPT is IVLP there (it crashed, issue 18); depth 2: block 1's pair."""
    torch.manual_seed(0)
    one = mudpt.build(clip, NAMES, config("mudpt", depth=1, injection="per_layer")).eval()
    independent = mudpt.build(clip, NAMES, config("ivlp", depth=1)).eval()
    independent.load_state_dict(one.state_dict(), strict=False)
    assert len(one.injection.text_to_image) == 0
    torch.testing.assert_close(one(random_images(5)), independent(random_images(5)), rtol=0, atol=0)
    two = mudpt.build(clip, NAMES, config("mudpt", depth=2, injection="per_layer"))
    for p in two.injection.parameters():
        p.normal_(0, 0.5)
    text, image = two.prompts()
    A, B = two.injection.text_to_image[0], two.injection.image_to_text[0]
    t, v = two.text_prompts, two.image_prompts
    torch.testing.assert_close(text, torch.stack([t[0], t[1] + B(v[1])]))
    torch.testing.assert_close(image, torch.stack([v[0], v[1] + A(t[1])]))


@torch.no_grad()
def test_prompts_replace_rows_as_described(clip):
    """Text: rows 1..n hold block i's prompts before block i < depth; image: appended after the patches."""
    model = mudpt.build(clip, NAMES, config("ivlp", depth=2))
    model.text_prompts.normal_(0, 1)
    text = model.text_prompts
    x, L = model.embedded, model.embedded.shape[1]
    mask = clip_model.causal_mask(L)
    x = torch.cat([x[:, :1], text[0].expand(4, -1, -1), x[:, 5:]], 1) + clip.positional_embedding[:L]
    x = clip.transformer.resblocks[0](x, mask)
    x = clip.transformer.resblocks[1](torch.cat([x[:, :1], text[1].expand(4, -1, -1), x[:, 5:]], 1), mask)
    torch.testing.assert_close(model.encode_text(text), clip.text_head(x, model.eot), rtol=0, atol=1e-5)
    depth1 = mudpt.build(clip, NAMES, config("ivlp", depth=1, n_ctx=4))
    depth1.text_prompts.copy_(text[:1])  # prompts at the input only = CoOp with 4 tokens
    tokens = clip_model.tokenize([f"X X X X {n.replace('_', ' ')}." for n in NAMES])
    x = clip.embed_text(tokens)
    x[:, 1:5] = text[0]
    torch.testing.assert_close(depth1.encode_text(depth1.text_prompts),
                               clip.encode_text_embeddings(x, tokens.argmax(-1)),
                               rtol=0, atol=1e-5)


@torch.no_grad()
def test_first_text_prompts_start_as_a_photo_of_a(clip):
    model = mudpt.build(clip, NAMES, config("mudpt"))
    words = clip.embed_text(clip_model.tokenize("a photo of a"))[0, 1:5]
    assert torch.equal(model.text_prompts[0], words)
    assert model.text_prompts.shape == (2, 4, 128)  # depth 9 capped at tiny's 2 blocks


def test_only_prompts_and_injection_learn(clip):
    clip = copy.deepcopy(clip)
    before = copy.deepcopy(clip.state_dict())
    for variant in mudpt.VARIANTS:
        torch.manual_seed(0)
        model = mudpt.build(clip, NAMES, config(variant))
        x, y = random_images(8), torch.arange(8) % len(NAMES)
        assert_learns(train_steps(model, x, y, lr=0.001), len(NAMES))
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names == {"text_prompts", "image_prompts"} | (
            {n for n, _ in model.named_parameters() if n.startswith("injection.")} if variant == "mudpt" else set())
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in clip.parameters())


@torch.no_grad()
def test_images_do_not_interact_and_text_is_cached(clip):
    model = mudpt.build(clip, NAMES, config("mudpt")).eval()
    x = random_images(4)
    torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(4)]), rtol=0, atol=1e-5)
    assert model.cached is not None and model.train().cached is None


def test_bad_config_and_resnet(clip):
    with pytest.raises(ValueError, match="use shared, per_layer or off"):
        mudpt.build(clip, NAMES, config("mudpt", injection="attention"))
    with pytest.raises(ValueError, match="use a ViT backbone"):
        mudpt.build(clip_model.load("tiny-rn")[0], NAMES, config("mudpt"))


@torch.no_grad()
def test_image_prompts_follow_the_code(clip):
    """Block 0: the prompts are concatenated after the patches before ln_pre (so they pass through it, with
    no position); before block 1 the previous outputs at those rows are replaced."""
    model = mudpt.build(clip, NAMES, config("ivlp", depth=2))
    model.image_prompts.normal_(0, 1)
    v, visual = model.image_prompts, clip.visual
    x = visual.conv1(random_images(5)).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(5, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(torch.cat([x, v[0].expand(5, -1, -1)], 1))
    x = visual.transformer.resblocks[0](x)
    x = visual.transformer.resblocks[1](torch.cat([x[:, :-4], v[1].expand(5, -1, -1)], 1))
    torch.testing.assert_close(model.encode_image(random_images(5), v), visual.head(x), rtol=0, atol=1e-5)
