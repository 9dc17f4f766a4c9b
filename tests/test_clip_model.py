"""Parity of our CLIP with OpenAI's reference code on identical random weights, and the pieces methods use."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import data
from conftest import B32_SHAPED, RANDOM_MODELS, RN50_SHAPED, TINY_RN, TINY_VIT, reference_clip

clip = pytest.importorskip("clip")

TEXTS = ["a photo of a dog.", "", "X X X X banded texture.",
         "a very long description of an unusual bird with a red crest, white belly and grey wings, sitting"]
PARITY = {"tiny-vit": TINY_VIT, "vit-b32-shaped": B32_SHAPED, "tiny-rn": TINY_RN, "rn50-shaped": RN50_SHAPED}


def _inputs(args, batch=3, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = clip_model.noise_images(batch, args[1])  # image-like noise (white noise is a poor probe)
    return images, clip_model.tokenize(TEXTS)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name.endswith("shaped") else name
                                  for name in PARITY])  # full widths take seconds: the quick tier compares tiny ones
def test_parity_with_reference(name):
    ref, state_dict = reference_clip(PARITY[name])
    ours = clip_model.build_model(state_dict)
    images, tokens = _inputs(PARITY[name])
    with torch.no_grad():
        pairs = {"encode_image": (ref.encode_image(images), ours.encode_image(images)),
                 "encode_text": (ref.encode_text(tokens), ours.encode_text(tokens)),
                 "logits": (ref(images, tokens)[0], ours(images, tokens))}
    for what, (expected, got) in pairs.items():
        print(f"{name} {what}: max abs diff {(expected - got).abs().max().item():.2e}")
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"{name} {what}")
    assert pairs["logits"][1].std() > 0.01  # features are not collapsed: the comparison means something
    with torch.no_grad():
        local = ours.visual.dense(images)[:, 1:]  # (B, N, E) patches or positions
    got_image, local_cosine = pairs["encode_image"][1], sum(mean_cosine(x) for x in local) / len(local)
    print(f"{name} mean cosine: images {mean_cosine(got_image):.3f}, positions {local_cosine:.3f}")
    assert mean_cosine(got_image) < 0.95  # the images' features differ (a random ResNet's did not, issue 17)
    assert local_cosine < 0.95  # and so do the positions' within an image


def mean_cosine(features):
    """Mean cosine similarity over the distinct pairs of rows of (n, E) features."""
    f = F.normalize(features, dim=-1)
    n = len(f)
    return ((f @ f.t()).sum() - n).item() / (n * (n - 1))


@pytest.mark.slow
def test_torchscript_archive_loads_like_the_reference(tmp_path):
    """OpenAI ships traced TorchScript archives; build one the same way and load it through load(path)."""
    ref, _ = reference_clip(TINY_VIT)
    images, tokens = _inputs(TINY_VIT)
    with torch.no_grad():
        expected = ref.encode_image(images), ref.encode_text(tokens), ref(images, tokens)[0]
    del ref.context_length, ref.vocab_size  # the official archives hold these as 0-dim int64 buffers
    for key, value in [("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)]:
        ref.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(ref, {"forward": (images, tokens), "encode_image": (images,),
                                              "encode_text": (tokens,)})
        torch.jit.save(traced, tmp_path / "tiny.pt")
    model, preprocess = clip_model.load(str(tmp_path / "tiny.pt"))
    with torch.no_grad():
        got = model.encode_image(images), model.encode_text(tokens), model(images, tokens)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_fp16_file_equals_reference_loader(tmp_path):
    """A state dict saved in fp16 loads as fp32 parameters and matches clip.load(jit=False) exactly."""
    ref, state_dict = reference_clip(TINY_RN)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}, tmp_path / "rn.pt")
    theirs, _ = clip.load(str(tmp_path / "rn.pt"), device="cpu", jit=False)
    ours, _ = clip_model.load(str(tmp_path / "rn.pt"))
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    images, tokens = _inputs(TINY_RN)
    with torch.no_grad():
        expected = theirs.float()(images, tokens)[0]
        got = ours(images, tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", clip_model.available_models())
@pytest.mark.slow
def test_nine_architectures_match_reference_on_meta(name):
    """Keys, shapes and parameter totals of every OpenAI model, built without memory on the meta device."""
    import clip.model
    args = clip_model.CONFIGS[name]
    with torch.device("meta"):
        theirs, ours = clip.model.CLIP(*args).state_dict(), clip_model.CLIP(*args)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    assert clip_model.config_from_state_dict(theirs) == args
    totals = {"RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
              "RN50x64": 623_258_305, "ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737,
              "ViT-L/14": 427_616_513, "ViT-L/14@336px": 427_944_193}  # from open_clip's model configs
    assert sum(p.numel() for p in ours.parameters()) == totals[name]


@pytest.fixture(scope="module")
def tiny():
    _, state_dict = reference_clip(TINY_VIT)
    return clip_model.build_model(state_dict)


@pytest.fixture(scope="module")
def tiny_rn():
    _, state_dict = reference_clip(TINY_RN)
    return clip_model.build_model(state_dict)


@torch.no_grad()
def test_image_pieces_compose_to_encode_image(tiny, tiny_rn):
    images, _ = _inputs(TINY_VIT)
    x = tiny.visual.embed(images)
    assert x.shape == (3, 1 + 16, 128)
    for block in tiny.visual.transformer.resblocks:
        x = block(x)
    assert torch.equal(tiny.visual.head(x), tiny.encode_image(images))
    dense = tiny.visual.dense(images)
    assert dense.shape == (3, 17, 64)
    torch.testing.assert_close(dense[:, 0], tiny.encode_image(images), rtol=0, atol=1e-6)
    images, _ = _inputs(TINY_RN)
    features = tiny_rn.visual.features(images)
    assert features.shape == (3, 256, 2, 2)
    dense = tiny_rn.visual.dense(images)
    assert dense.shape == (3, 1 + 4, 64)
    torch.testing.assert_close(dense[:, 0], tiny_rn.encode_image(images), rtol=0, atol=1e-6)
    # every token as a query, as the reference's multi-head attention computes it (sequence-first)
    pool = tiny_rn.visual.attnpool
    x = features.flatten(2).permute(2, 0, 1)
    x = torch.cat([x.mean(0, keepdim=True), x]) + pool.positional_embedding[:, None]
    expected, _ = F.multi_head_attention_forward(
        x, x, x, 256, pool.heads, None, torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        None, None, False, 0.0, pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight)
    torch.testing.assert_close(dense, expected.transpose(0, 1), rtol=0, atol=1e-5)


@torch.no_grad()
def test_eot_truncation_equals_full_length(tiny):
    tokens = clip_model.tokenize(TEXTS)
    eot = tokens.argmax(-1)
    x = tiny.embed_text(tokens) + tiny.positional_embedding  # all 77 positions, by hand
    for block in tiny.transformer.resblocks:
        x = block(x, clip_model.causal_mask(77))
    full = tiny.text_head(x, eot)
    assert int(eot.max()) + 1 < 77  # the cut really happens
    torch.testing.assert_close(tiny.encode_text(tokens), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_attention_probabilities_path(tiny):
    x = torch.randn(2, 9, 128)
    block = tiny.transformer.resblocks[0]
    mask = clip_model.causal_mask(9)
    out, probs = block(x, mask, return_attn=True)
    assert probs.shape == (2, 2, 9, 9)
    torch.testing.assert_close(out, block(x, mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 9))
    assert probs.triu(1).abs().max() == 0  # causal: nothing above the diagonal
    out, probs = block(x, None, return_attn=True)
    torch.testing.assert_close(out, block(x), rtol=0, atol=1e-5)
    assert probs.triu(1).abs().max() > 0


@torch.no_grad()
def test_wrong_image_size_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="this model takes 32x32"):
        tiny.encode_image(torch.zeros(1, 3, 64, 64))


def test_bf16_autocast_on_cpu_keeps_features(tiny):
    images, tokens = _inputs(TINY_VIT)
    with torch.no_grad():
        fp32 = tiny.encode_image(images), tiny.encode_text(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = tiny.encode_image(images), tiny.encode_text(tokens)
    for a, b in zip(fp32, bf16):
        assert F.cosine_similarity(a, b.float(), dim=-1).min() > 0.999


@pytest.mark.parametrize("mode,size", [("RGB", (37, 53)), ("L", (61, 29)), ("RGBA", (45, 45)), ("P", (70, 33))])
def test_preprocess_matches_reference(mode, size):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size[1], size[0], 4), generator=g, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    expected = clip.clip._transform(32)(image)
    assert torch.equal(clip_model.transform(32)(image), expected)


@pytest.mark.slow
def test_random_init_is_seeded_and_downloads_nothing(tmp_path):
    a, _ = clip_model.load("tiny", pretrained=False)
    b, _ = clip_model.load("tiny")
    c, _ = clip_model.load("tiny", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)
    model, preprocess = clip_model.load("ViT-B/32", pretrained=False, download_root=str(tmp_path))
    assert sum(p.numel() for p in model.parameters()) == 151_277_313
    assert list(tmp_path.iterdir()) == [] and not model.training


def test_random_weights_once_hands_out_fresh_equal_copies(random_weights_once):
    """The dry-run tests' shortcut (conftest.random_weights_once) gives what a fresh build gives, buffers included
    (tiny-rn: its measured BatchNorm statistics), and a change to one copy reaches no later one."""
    first, _ = clip_model.load("tiny-rn")
    with torch.no_grad():
        first.visual.conv1.weight.zero_()
        first.visual.bn1.running_mean.fill_(7)
    second, _ = clip_model.load("tiny-rn")
    assert (clip_model.CONFIGS["tiny-rn"], 0, ()) in RANDOM_MODELS  # built once, then copied
    expected = random_weights_once(clip_model.CONFIGS["tiny-rn"], 0).state_dict()  # the real random_model
    assert second.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in second.state_dict().items())
    assert not second.training and second is not first


@pytest.mark.parametrize("name", ["tiny-rn", "RN50"])
@pytest.mark.slow
def test_random_resnets_tell_images_and_positions_apart(name):
    """Random ResNets had one feature for every image and position (issue 17): BatchNorm at its untrained
    statistics let the signal fade under the attention pool's positional embedding."""
    model, preprocess = clip_model.load(name, pretrained=False)
    images = torch.stack([preprocess(Image.open(next((data.demo_folder() / c).iterdir())))
                          for c in sorted(os.listdir(data.demo_folder()))])  # one demo image per class
    with torch.no_grad():
        dense = model.visual.dense(images)  # (8, 1+g², E)
        if name == "tiny-rn":  # seeded: the same model every time
            assert torch.equal(clip_model.load(name, pretrained=False)[0].visual.dense(images), dense)
    assert mean_cosine(dense[:, 0]) < 0.8
    assert sum(mean_cosine(x) for x in dense[:, 1:]) / len(dense) < 0.95
    batchnorm = model.visual.layer4[0].bn3
    assert batchnorm.momentum == 0.1 and not batchnorm.training and batchnorm.num_batches_tracked == 1


def test_available_models_are_the_nine_openai_names():
    assert clip_model.available_models() == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32",
                                             "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    assert clip_model.available_models() == clip.available_models()
    for name, url in clip_model.MODELS.items():
        assert url == clip.clip._MODELS[name]
