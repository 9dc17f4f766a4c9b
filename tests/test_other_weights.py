"""Weights in other formats, loaded into clip_model.CLIP: Hugging Face (transformers' CLIPModel folders, hf:<org>/<name>
from the Hugging Face cache) and OpenCLIP (MODEL:TAG from the cache, MODEL:<file>). Parity with each library's own
forward on the same random weights, the activation the weights cannot tell, the errors a user can cause, and a run of
train.py on such a backbone. Nothing is downloaded."""
import json
import logging
import shutil
import socket
import sys
import time

import huggingface_hub
import open_clip
import pytest
import torch
import transformers
from PIL import Image

import clip_model
import methods
import other_weights
import runs
import train

TEXTS = ["a photo of a dog.", "", "X X X X banded texture.",
         "a very long description of an unusual bird with a red crest, white belly and grey wings, sitting"]
OPENAI_PREPROCESS = {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
                     "image_mean": list(clip_model.MEAN), "image_std": list(clip_model.STD)}


REAL_HUB = huggingface_hub.list_repo_files, huggingface_hub.snapshot_download


def closed_port():
    """A loopback port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Every test here is offline: the hub's address refuses connections, and huggingface_hub's network calls fail
    as they do without internet."""

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)


def randomize(model, seed=0):
    """Every weight random (std 1/sqrt(fan-in); LayerNorms not identities; biases not zero), logit_scale kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key == "logit_scale" or not value.is_floating_point():
                continue
            if value.ndim >= 2:
                value.copy_(torch.randn(value.shape, generator=g) * value[0].numel() ** -0.5)
            elif "norm" in key and key.endswith(".weight"):  # layer_norm1, pre_layrnorm, final_layer_norm, ...
                value.copy_(1 + 0.1 * torch.randn(value.shape, generator=g))
            else:  # biases, the class embedding
                value.copy_(0.1 * torch.randn(value.shape, generator=g))
    return model.eval()


def hf_clip(activation, seed=0):
    """A tiny random transformers CLIPModel. Its vision heads are 96 wide (192 / 2), not OpenAI's 64 (as
    ViT-H-14's 80), so the head count must come from the config."""
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                         hidden_act=activation),
        vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=activation),
        projection_dim=64)
    torch.manual_seed(seed)
    return randomize(transformers.CLIPModel(config), seed)


def save_in_cache(model, cache, repo, preprocess=OPENAI_PREPROCESS):
    """`model` saved as huggingface_hub lays out a download: models--org--name/snapshots/<rev>/, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    folder = root / "snapshots" / ("0123abcd" * 5)
    model.save_pretrained(folder)
    if preprocess is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocess))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd" * 5)
    return folder


def features(model, images, tokens):
    """(image features, text features, logits) of our CLIP or of transformers' CLIPModel."""
    with torch.no_grad():
        if isinstance(model, clip_model.CLIP):
            return model.encode_image(images), model.encode_text(tokens), model(images, tokens)
        image, text = model.get_image_features(pixel_values=images), model.get_text_features(input_ids=tokens)
        image, text = getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)
        return image, text, model(input_ids=tokens, pixel_values=images).logits_per_image


def inputs():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return clip_model.noise_images(3, 32), clip_model.tokenize(TEXTS)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_hugging_face_parity(tmp_path, monkeypatch, activation):
    """hf:<org>/<name> from the cache and the folder's path give one model, equal to transformers' forward within
    1e-5; the other activation on the same weights is off by far more, so a wrong choice fails here."""
    reference = hf_clip(activation)
    folder = save_in_cache(reference, tmp_path / "hub", "someone/tiny-clip")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id, preprocess = other_weights.load_backbone("hf:someone/tiny-clip")
    by_path, _ = other_weights.load_backbone(str(folder))
    assert by_id.activation == activation and by_id.visual.transformer.resblocks[0].attn.heads == 2
    images, tokens = inputs()
    expected = features(reference, images, tokens)
    for model in (by_id, by_path):
        for what, want, got in zip(["image", "text", "logits"], expected, features(model, images, tokens)):
            diff = (want - got).abs().max().item()
            print(f"{activation} {what}: max abs diff {diff:.2e}")
            assert diff < 1e-5, (what, diff)
    assert expected[2].std() > 0.1  # the logits vary: the comparison means something

    config = json.loads((folder / "config.json").read_text())
    args, options, sd = other_weights.convert_hf(config, other_weights.read_hf_weights(folder), OPENAI_PREPROCESS)
    other = "gelu" if activation == "quick_gelu" else "quick_gelu"
    wrong = clip_model.build_model(sd, args, **{**options, "activation": other})
    for what, want, got in zip(["image", "text", "logits"], expected, features(wrong, images, tokens)):
        diff = (want - got).abs().max().item()
        print(f"{activation} loaded as {other}, {what}: max abs diff {diff:.2e}")
        assert diff > 1e-3, (what, diff)
    assert preprocess.transforms[1].size == (32, 32)


def test_tokenizer_matches_transformers():
    """Our BPE against transformers' CLIPTokenizer built from the same vocabulary and merges (no download)."""
    ours = clip_model.Tokenizer()
    theirs = transformers.CLIPTokenizer(vocab=dict(ours.ids), merges=list(ours.ranks))
    texts = TEXTS + ["Hello, World! It's 3.14 o'clock... naïve café", "sea_lion  tabs\tand  CAPS", "a photo of 2 dogs"]
    for text in texts:
        assert theirs(text)["input_ids"] == [clip_model.SOT] + ours.encode(text) + [clip_model.EOT], text


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A transformers CLIPModel folder (GELU), as saved by save_pretrained with OpenAI's preprocess."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    hf_clip("gelu").save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(OPENAI_PREPROCESS))
    return folder


def edited(tmp_path, folder, config=None, preprocess=None):
    """A copy of `folder` with config.json's and preprocessor_config.json's fields changed."""
    copy = tmp_path / folder.name
    copy.mkdir()
    (copy / "model.safetensors").symlink_to(folder / "model.safetensors")
    for name, changes in [("config.json", config), ("preprocessor_config.json", preprocess)]:
        content = json.loads((folder / name).read_text())
        for key, value in (changes or {}).items():  # "text_config.hidden_act": a nested field
            *parents, last = key.split(".")
            node = content
            for parent in parents:
                node = node[parent]
            node[last] = value
        (copy / name).write_text(json.dumps(content))
    return copy


@pytest.mark.parametrize("config,preprocess,message", [
    (None, {"do_center_crop": False}, r"do_center_crop, do_rescale, do_normalize is \(True, False, True, True\)"),
    (None, {"resample": 7}, "resample is 7, not one of PIL's"),
    (None, {"rescale_factor": 1.0}, "rescale_factor is 1.0, not 1/255"),
    (None, {"image_mean": [0.5]}, "image_mean, image_std is"),
    (None, {"size": {"height": 32, "width": 48}}, r"size is \(32, 48\), not image_size 32"),
    (None, {"crop_size": {"height": 40, "width": 40}}, "crop_size is 40, not image_size 32"),
    (None, {"size": {"shortest_edge": 36}}, "size is 36, not image_size 32"),
    ({"model_type": "siglip"}, None, "model_type is siglip, not clip"),
    ({"vision_config.hidden_act": "quick_gelu"}, None, r"hidden_act \(text, vision\) is \('gelu', 'quick_gelu'\)"),
    ({"text_config.hidden_act": "gelu_new", "vision_config.hidden_act": "gelu_new"}, None, "hidden_act"),
    ({"text_config.eos_token_id": 3}, None, "eos_token_id is 3"),
    ({"text_config.vocab_size": 32000}, None, "vocab_size is 32000"),
])
def test_what_this_clip_cannot_represent_is_refused(tmp_path, tiny_hf, config, preprocess, message):
    with pytest.raises(clip_model.LoadError, match="this CLIP cannot represent the model: .*" + message):
        other_weights.load_backbone(str(edited(tmp_path, tiny_hf, config, preprocess)))


def test_not_cached_says_what_to_install_or_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    where = str(tmp_path / "hub" / "models--someone--absent" / "snapshots")
    with pytest.raises(clip_model.LoadError, match="could not download hf:someone/absent .*127.0.0.1.* unreachable"
                       ".*without internet, put the model's config.json") as error:
        other_weights.load_backbone("hf:someone/absent")  # offline (see no_downloads)
    assert where in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(clip_model.LoadError, match="not in the Hugging Face cache: pip install huggingface_hub"):
        other_weights.load_backbone("hf:someone/absent")


def test_folder_errors(tmp_path, tiny_hf):
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(clip_model.LoadError, match="not a file, nor a Hugging Face model folder"):
        other_weights.load_backbone(str(bare))
    (bare / "config.json").write_text((tiny_hf / "config.json").read_text())
    with pytest.raises(clip_model.LoadError, match="has a config.json but no weights: put model.safetensors"):
        other_weights.load_backbone(str(bare))


def test_pytorch_bin_with_position_ids_loads(tmp_path, tiny_hf):
    """Older transformers saved pytorch_model.bin with the position-id aranges (dropped), and sizes as plain ints in
    preprocessor_config.json (as openai/clip-vit-base-patch16's still are)."""
    from safetensors.torch import load_file
    sd = load_file(tiny_hf / "model.safetensors")
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text((tiny_hf / "config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 32, "size": 32, "image_mean": clip_model.MEAN, "image_std": clip_model.STD, "resample": 3}))
    images, tokens = inputs()
    expected = features(other_weights.load_backbone(str(tiny_hf))[0], images, tokens)
    for want, got in zip(expected, features(other_weights.load_backbone(str(folder))[0], images, tokens)):
        assert torch.equal(want, got)


@pytest.mark.slow
def test_coop_trains_and_resumes_on_a_hugging_face_folder(tmp_path, monkeypatch, capsys, tiny_hf):
    """train.py on a converted backbone with its own mean and std (Inception's, as
    laion/CLIP-ViT-L-14-laion2B-s32B-b82K's): results.json names it as passed and records its preprocessing, the
    default run folder by its name; a run stopped after epoch 1 resumes to the uninterrupted run; load_run
    rebuilds it from that string alone, with that preprocessing. When the folder's preprocessing changes, a
    resume is refused, and load_run and --eval-only keep the run's, and say so."""
    tiny_hf = edited(tmp_path, tiny_hf, preprocess={"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "coop", "--data", "demo", "--backbone", str(tiny_hf), "--init", "pretrained",
            "--batch-size", "8"]
    args = methods.parse_args(argv)
    assert runs.default_output(args, methods.make_config(args)[1]).parts[3] == "tiny-clip"
    hub = methods.parse_args(argv[:5] + ["hf:someone/tiny-clip"] + argv[6:])
    assert runs.default_output(hub, methods.make_config(hub)[1]).parts[3] == "hf:someone-tiny-clip"
    assert train.main(argv + ["--epochs", "2", "--output", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["backbone"] == str(tiny_hf) and len(result["history"]) == 2
    train.run(methods.parse_args(argv + ["--epochs", "1", "--output", str(tmp_path / "part")]))  # stopped after 1...
    ckpt = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    ckpt["config"]["epochs"] = 2  # ...of 2 epochs, as a killed run's checkpoint says
    torch.save(ckpt, tmp_path / "part" / "checkpoint.pt")
    resumed = train.run(methods.parse_args(argv + ["--epochs", "2", "--output", str(tmp_path / "part"), "--resume"]))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in result["history"]]
    assert resumed["accuracy"] == result["accuracy"]
    assert result["preprocessing"] == dict(size=32, mean=[0.5] * 3, std=[0.5] * 3, resize="shortest",
                                           interpolation="bicubic")
    model, preprocess, classnames = runs.load_run(tmp_path / "run")
    assert any(isinstance(m, torch.nn.GELU) for m in model.modules())  # the activation came back with the string
    learned = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["learned"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in learned.items())
    assert tuple(preprocess.transforms[-1].mean) == (0.5,) * 3 and "preprocessing" not in capsys.readouterr().err

    (tiny_hf / "preprocessor_config.json").write_text(json.dumps(OPENAI_PREPROCESS))  # the folder changes
    with pytest.raises(methods.UserError, match=r"another task or config \(preprocessing: .*0.5.*this run .*0.48"):
        train.run(methods.parse_args(argv + ["--epochs", "3", "--output", str(tmp_path / "run"), "--resume"]))
    _, preprocess, _ = runs.load_run(tmp_path / "run")
    assert tuple(preprocess.transforms[-1].mean) == (0.5,) * 3
    assert "results.json: the run was trained with preprocessing" in capsys.readouterr().err
    evaluated = train.run(methods.parse_args(argv + ["--eval-only", "--checkpoint",
                                                     str(tmp_path / "run" / "checkpoint.pt")]))
    assert evaluated["accuracy"] == result["accuracy"] and evaluated["preprocessing"]["mean"] == [0.5] * 3
    assert "checkpoint.pt: the run was trained with preprocessing" in capsys.readouterr().err


# OpenCLIP: MODEL:TAG from the Hugging Face cache and MODEL:<file>, against open_clip's own forward.

def openclip_clip(quick_gelu, seed=0):
    """A tiny random open_clip CLIP with 96-wide vision heads (not OpenAI's 64, as ViT-H-14's 80) and its
    architecture as an OPENCLIP_MODELS entry."""
    from conftest import randomize as randomize_openai_keys  # open_clip's keys are OpenAI's
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(64, open_clip.model.CLIPVisionCfg(layers=2, width=192, head_width=96, image_size=32,
                                                                   patch_size=8),
                                 open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2,
                                                             layers=2), quick_gelu=quick_gelu)
    model.load_state_dict(randomize_openai_keys(model.state_dict(), seed))
    return model.eval(), ((64, 32, 2, 192, 8, 77, 49408, 128, 2, 2), 2)


def openclip_features(model, images, tokens):
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
        image_n, text_n, scale = model(images, tokens)[:3]
        return image, text, scale * image_n @ text_n.t()


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_openclip_parity(tmp_path, monkeypatch, quick_gelu):
    """MODEL:TAG from the cache and MODEL:<file> equal open_clip's forward within 1e-5; the activation follows the
    model name, and the other name on the same file is off by far more."""
    reference, architecture = openclip_clip(quick_gelu)
    monkeypatch.setitem(other_weights.OPENCLIP_MODELS, "Tiny-ViT", architecture)
    name = "Tiny-ViT-quickgelu" if quick_gelu else "Tiny-ViT"
    monkeypatch.setitem(other_weights.OPENCLIP_PRETRAINED, f"{name}:random", "someone/tiny-open-clip")
    snapshot = tmp_path / "hub" / "models--someone--tiny-open-clip" / "snapshots" / ("89ab" * 10)
    snapshot.mkdir(parents=True)
    torch.save(reference.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # one snapshot and no refs/main: that one
    images, tokens = inputs()
    expected = openclip_features(reference, images, tokens)
    by_tag, preprocess = other_weights.load_backbone(f"{name}:random")
    by_file, _ = other_weights.load_backbone(f"{name}:{snapshot / 'open_clip_pytorch_model.bin'}")
    assert by_tag.activation == ("quick_gelu" if quick_gelu else "gelu")
    for model in (by_tag, by_file):
        for what, want, got in zip(["image", "text", "logits"], expected, features(model, images, tokens)):
            diff = (want - got).abs().max().item()
            print(f"open_clip quick_gelu={quick_gelu} {what}: max abs diff {diff:.2e}")
            assert diff < 1e-5, (what, diff)
    assert expected[2].std() > 0.1
    other = "Tiny-ViT" if quick_gelu else "Tiny-ViT-quickgelu"
    wrong, _ = other_weights.load_backbone(f"{other}:{snapshot / 'open_clip_pytorch_model.bin'}")
    for what, want, got in zip(["image", "text", "logits"], expected, features(wrong, images, tokens)):
        diff = (want - got).abs().max().item()
        print(f"open_clip quick_gelu={quick_gelu} loaded as {other}, {what}: max abs diff {diff:.2e}")
        assert diff > 1e-3, (what, diff)
    with pytest.raises(clip_model.LoadError, match=f"{other}:random was trained with .*: pass {name}:random"):
        other_weights.load_backbone(f"{other}:random")


def test_openclip_training_checkpoint_and_safetensors(tmp_path, monkeypatch):
    """A checkpoint saved by open_clip's training script ({"state_dict": {"module.<key>": ...}}, with its epoch) and
    a safetensors file load as the plain state dict does."""
    from safetensors.torch import save_file
    reference, architecture = openclip_clip(False)
    monkeypatch.setitem(other_weights.OPENCLIP_MODELS, "Tiny-ViT", architecture)
    sd = reference.state_dict()
    torch.save({"epoch": 32, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}},
               tmp_path / "epoch_32.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "open_clip_model.safetensors")
    images, tokens = inputs()
    expected = features(other_weights.load_backbone(f"Tiny-ViT:{tmp_path / 'epoch_32.pt'}")[0], images, tokens)
    safetensors = other_weights.load_backbone(f"Tiny-ViT:{tmp_path / 'open_clip_model.safetensors'}")[0]
    got = features(safetensors, images, tokens)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    with pytest.raises(clip_model.LoadError, match="epoch_32.pt is not OpenCLIP's ViT-B-16: not a CLIP state dict "
                       r"\(missing visual.transformer.resblocks.2.*pass the model name it was trained as"):
        other_weights.load_backbone(f"ViT-B-16:{tmp_path / 'epoch_32.pt'}")


def test_openclip_tokenizer_matches():
    texts = TEXTS + ["Hello, World! It's 3.14 o'clock... naïve café", "sea_lion  tabs\tand  CAPS"]
    assert torch.equal(clip_model.tokenize(texts, truncate=True), open_clip.tokenize(texts))


def test_openclip_table_matches_open_clip():
    """Every architecture is open_clip's config, every pair open_clip's hub repo with the tag's activation."""
    from open_clip.factory import get_model_config
    for name, (args, vision_heads) in other_weights.OPENCLIP_MODELS.items():
        for variant in (name, name + "-quickgelu"):
            cfg = get_model_config(variant)
            if cfg is None:
                continue
            vision, text = cfg["vision_cfg"], cfg["text_cfg"]
            assert args == (cfg["embed_dim"], vision["image_size"], vision["layers"], vision["width"],
                            vision["patch_size"], text["context_length"], text["vocab_size"], text["width"],
                            text["heads"], text["layers"]), variant
            assert vision_heads == vision["width"] // vision.get("head_width", 64), variant
            assert set(vision) <= {"image_size", "layers", "width", "patch_size", "head_width"}, variant
            assert set(text) <= {"context_length", "vocab_size", "width", "heads", "layers"}, variant
            assert cfg.get("quick_gelu", False) == variant.endswith("-quickgelu"), variant
    for pair, repo in other_weights.OPENCLIP_PRETRAINED.items():
        name, tag = pair.split(":")
        pretrained = open_clip.get_pretrained_cfg(name, tag)
        assert pretrained["hf_hub"].rstrip("/") == repo, pair
        assert pretrained.get("quick_gelu", False) == name.endswith("-quickgelu"), pair
        ours = other_weights.openclip_preprocessing(name, tag)
        assert (ours.size, ours.mean, ours.std, ours.resize, ours.interpolation) == (
            open_clip.get_model_config(name)["vision_cfg"]["image_size"], tuple(pretrained["mean"]),
            tuple(pretrained["std"]), pretrained["resize_mode"], pretrained["interpolation"]), pair


@pytest.mark.parametrize("backbone,message", [
    ("ViT-B-32:laion400m_e31", "was trained with QuickGELU: pass ViT-B-32-quickgelu:laion400m_e31"),
    ("ViT-H-14-quickgelu:laion2b_s32b_b79k", "was trained with GELU: pass ViT-H-14:laion2b_s32b_b79k"),
    ("ViT-B-16-SigLIP:webli", "OpenCLIP model 'ViT-B-16-SigLIP' is not one this CLIP can build"),
    ("ViT-bigG-14:laion2b_s39b_b160k", "'ViT-bigG-14' is not one this CLIP can build"),
    ("ViT-B-16:no_such_tag", "no OpenCLIP weights ViT-B-16:no_such_tag.*laion2b_s34b_b88k"),
])
def test_openclip_refusals(backbone, message):
    with pytest.raises(clip_model.LoadError, match=message):
        other_weights.load_backbone(backbone)


def test_openclip_not_cached_offline(tmp_path, monkeypatch):
    """Offline with nothing cached: one line says where to put the file; --init random needs no weights."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setitem(other_weights.OPENCLIP_MODELS, "Tiny-ViT", ((64, 32, 2, 192, 8, 77, 49408, 128, 2, 2), 2))
    monkeypatch.setitem(other_weights.OPENCLIP_PRETRAINED, "Tiny-ViT:random", "someone/tiny-open-clip")
    model, _ = other_weights.load_backbone("Tiny-ViT:random", pretrained=False, seed=3)
    again, _ = other_weights.load_backbone("Tiny-ViT:random", pretrained=False, seed=3)
    assert model.activation == "gelu" and model.visual.transformer.resblocks[0].attn.heads == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(clip_model.LoadError, match="could not download hf:laion/CLIP-ViT-B-16-laion2B-s34B-b88K "
                       ".*open_clip_model.safetensors into"):
        other_weights.load_backbone("ViT-B-16:laion2b_s34b_b88k")


@pytest.mark.slow
def test_coop_runs_on_an_openclip_file_and_reloads(tmp_path, monkeypatch):
    """MODEL:<file> as --backbone: results.json keeps the string, load_run rebuilds the model (GELU) from it."""
    reference, architecture = openclip_clip(False)
    monkeypatch.setitem(other_weights.OPENCLIP_MODELS, "Tiny-ViT", architecture)
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    backbone = f"Tiny-ViT:{tmp_path / 'open_clip_pytorch_model.bin'}"
    args = methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", backbone])
    assert runs.default_output(args, methods.make_config(args)[1]).parts[3] == "Tiny-ViT:open_clip_pytorch_model.bin"
    args = methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", "ViT-B-16:laion2b_s34b_b88k"])
    assert runs.default_output(args, methods.make_config(args)[1]).parts[3] == "ViT-B-16:laion2b_s34b_b88k"
    assert train.main(["--method", "coop", "--data", "demo", "--backbone", backbone, "--epochs", "1", "--batch-size",
                       "8", "--output", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["backbone"] == backbone
    model, _, _ = runs.load_run(tmp_path / "run")
    assert any(isinstance(m, torch.nn.GELU) for m in model.modules())


def test_sharded_safetensors_load(tmp_path, tiny_hf):
    """Large models come in shards listed by model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file
    sd = load_file(tiny_hf / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file, names in shards.items():
        save_file({k: sd[k] for k in names}, folder / file)
    weight_map = {k: file for file, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text((tiny_hf / "config.json").read_text())
    images, tokens = inputs()
    expected = features(other_weights.load_backbone(str(tiny_hf))[0], images, tokens)
    got = features(other_weights.load_backbone(str(folder))[0], images, tokens)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_download_asks_the_hub_for_what_it_reads(tmp_path, monkeypatch, tiny_hf):
    """Online and not cached: huggingface_hub fetches config, preprocessor and the safetensors weights only (not the
    .bin the repo also holds), into the cache that load then reads. The hub is faked: nothing leaves the machine."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    asked = {}

    def snapshot_download(repo, cache_dir, allow_patterns):
        asked.update(repo=repo, cache_dir=cache_dir, patterns=allow_patterns)
        folder = tmp_path / "downloaded"
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            (folder / name).write_bytes((tiny_hf / name).read_bytes())
        return str(folder)
    monkeypatch.setattr(other_weights, "hub_unreachable", lambda repo: None)
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo: ["config.json", "model.safetensors", "pytorch_model.bin"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, _ = other_weights.load_backbone("hf:someone/online")
    assert asked == dict(repo="someone/online", cache_dir=tmp_path / "hub",
                         patterns=["config.json", "preprocessor_config.json", "model.safetensors"])
    assert model.activation == "gelu"


# Preprocessing: each model's own, as open_clip and transformers prepare its images.

def photos():
    """Non-square RGB images with a photograph's smooth structure (640 x 480 as a camera's, portrait and wide
    crops): a resize rule or interpolation that differs shows at once."""
    g = torch.Generator().manual_seed(0)
    images = []
    for width, height in [(640, 480), (333, 517), (500, 375), (224, 300)]:
        coarse = torch.rand(3, height // 16, width // 16, generator=g)
        smooth = torch.nn.functional.interpolate(coarse[None], size=(height, width), mode="bilinear")[0]
        pixels = (smooth * 255).round().byte().permute(1, 2, 0).numpy()
        images.append(Image.fromarray(pixels))
    return images


def test_every_openclip_preprocessing_equals_open_clips():
    """For every distinct preprocessing of OPENCLIP_PRETRAINED (OpenAI's at each size, the Inception mean and std of
    ViT-L-14:laion2b_s32b_b82k, DFN5B's squash), our test transform equals the one open_clip's
    create_model_and_transforms returns for the pair (image_transform_v2 of the model's size with the pair's
    pretrained config) on non-square images, to 1e-5."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    distinct = {other_weights.openclip_preprocessing(*pair.split(":")): pair
                for pair in other_weights.OPENCLIP_PRETRAINED}
    assert {p.resize for p in distinct} == {"shortest", "squash"} and {p.mean for p in distinct} == {
        clip_model.MEAN, (0.5, 0.5, 0.5)} and len({p.size for p in distinct}) == 5
    for preprocessing, pair in distinct.items():
        name, tag = pair.split(":")
        pretrained = open_clip.get_pretrained_cfg(name, tag)
        theirs = image_transform_v2(PreprocessCfg(
            size=open_clip.get_model_config(name)["vision_cfg"]["image_size"], mean=pretrained["mean"],
            std=pretrained["std"], interpolation=pretrained["interpolation"], resize_mode=pretrained["resize_mode"]),
            is_train=False)
        ours = clip_model.transform(preprocessing)
        for image in photos():
            want, got = theirs(image), ours(image)
            assert want.shape == got.shape == (3, preprocessing.size, preprocessing.size), pair
            assert (want - got).abs().max() < 1e-5, pair
    squash, shortest = (clip_model.Preprocessing(224, resize=mode) for mode in ("squash", "shortest"))
    image = photos()[0]
    differ = (clip_model.transform(squash)(image) - clip_model.transform(shortest)(image)).abs()
    assert differ.max() > 0.5  # the resize rule matters: the old shortest-side crop fed DFN5B other pixels


# laion/CLIP-ViT-L-14-laion2B-s32B-b82K's preprocessor_config.json: the fields of the hub's CLIPImageProcessor files
# (as openai/clip-vit-base-patch32's), with the Inception mean and std that open_clip's table gives that model.
INCEPTION_PREPROCESS = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                        "do_normalize": True, "do_rescale": True, "do_resize": True,
                        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.5, 0.5, 0.5],
                        "image_processor_type": "CLIPImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
                        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}


@pytest.mark.parametrize("size", [{"shortest_edge": 224}, {"height": 224, "width": 224}])
def test_hugging_face_preprocessing_equals_clip_image_processor(size):
    """A preprocessor_config.json read as transformers' CLIPImageProcessor (both its backends) prepares images:
    its mean and std, its interpolation, the shortest side or both sides resized. The processor itself differs
    from open_clip's transform on the same image (transformers rounds the resized side and the pixels otherwise):
    measured here, both its backends are up to 0.20 apart (0.048 on average: a crop one pixel over) on a 333 x 517
    image with the shortest side resized, and at most 0.008 on the others; with both sides resized, its torchvision
    backend (the default) is up to 0.016 apart, its PIL backend 0. Ours equals open_clip's, so it is within that of
    the processor, never further, and far from OpenAI's mean and std."""
    config = {**INCEPTION_PREPROCESS, "size": size}
    preprocessing, checks = other_weights.hf_preprocessing(config, 224)
    assert all(ok for _, _, ok, _ in checks)
    mode = "squash" if "height" in size else "shortest"
    assert preprocessing == clip_model.Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), mode, "bicubic")
    ours, openai = clip_model.transform(preprocessing), clip_model.transform(clip_model.Preprocessing(224, resize=mode))
    open_clips = open_clip.image_transform(224, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3,
                                           interpolation="bicubic", resize_mode=mode)
    processors = [transformers.CLIPImageProcessor(**config), transformers.CLIPImageProcessorPil(**config)]
    for image in photos():
        got, reference = ours(image), open_clips(image)
        assert (got - reference).abs().max() < 1e-5
        for processor in processors:
            theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
            apart, mean_apart = (theirs - reference).abs().max().item(), (theirs - reference).abs().mean().item()
            print(f"{mode} {image.size} {type(processor).__name__}: processor vs open_clip, max {apart:.4f}, mean "
                  f"{mean_apart:.5f}")
            assert (openai(image) - theirs).abs().mean() > 3 * mean_apart  # OpenAI's mean and std: much further
            assert (got - theirs).abs().max().item() <= apart + 1e-5
            assert (got - theirs).abs().mean().item() <= mean_apart + 1e-6


def test_a_model_with_its_own_mean_and_std_loads_with_them(tmp_path, tiny_hf):
    """An hf: folder normalised with Inception's mean and std (as laion/CLIP-ViT-L-14-laion2B-s32B-b82K) loads, and
    the model and its preprocess carry them; so does the OpenCLIP tag of the same checkpoint."""
    folder = edited(tmp_path, tiny_hf, preprocess={"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2})
    model, preprocess = other_weights.load_backbone(str(folder))
    assert model.preprocessing == clip_model.Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "shortest", "bilinear")
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == (0.5,) * 3 and preprocess.transforms[0].interpolation.value == "bilinear"
    tagged = other_weights.openclip_preprocessing("ViT-L-14", "laion2b_s32b_b82k")
    assert tagged.mean == (0.5,) * 3 and tagged.size == 224
    dfn = other_weights.openclip_preprocessing("ViT-H-14-378-quickgelu", "dfn5b")
    assert (dfn.size, dfn.resize) == (378, "squash")


# Files as they are on the hub: legacy configs, damaged or missing files, the spellings users type.

def test_legacy_config_dicts_are_read_as_transformers_reads_them(tmp_path):
    """Hub config.json files from 2021 carry text_config_dict / vision_config_dict beside text_config /
    vision_config; transformers completes each _dict with its defaults and lets it override the other. Here they
    disagree on hidden_act (GELU in text_config, QuickGELU in the _dict): transformers runs QuickGELU, and so must
    we, to 1e-5 (GELU instead is off by far more, see test_hugging_face_parity)."""
    reference = hf_clip("quick_gelu")
    folder = tmp_path / "legacy"
    reference.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for tower in ("text", "vision"):
        config[f"{tower}_config_dict"] = dict(config[f"{tower}_config"])
        config[f"{tower}_config"]["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    theirs = transformers.CLIPModel.from_pretrained(folder).eval()
    assert theirs.config.text_config.hidden_act == "quick_gelu"
    ours, _ = other_weights.load_backbone(str(folder))
    assert ours.activation == "quick_gelu"
    images, tokens = inputs()
    for want, got in zip(features(theirs, images, tokens), features(ours, images, tokens)):
        assert (want - got).abs().max() < 1e-5

    config["text_config"] = None  # the legacy dict alone, as in the oldest files
    (folder / "config.json").write_text(json.dumps(config))
    assert other_weights.load_backbone(str(folder))[0].activation == "quick_gelu"
    del config["text_config_dict"]  # neither: transformers' defaults, which these weights do not fit
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(clip_model.LoadError, match="legacy: the weights do not fit its config.json") as error:
        other_weights.load_backbone(str(folder))
    assert "\n" not in str(error.value)
    config["text_config"] = "broken"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(clip_model.LoadError, match="text_config is str, not a dict"):
        other_weights.load_backbone(str(folder))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.unlink()  # a link into the cache's blobs stays intact; this writes a file of its own
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_safetensors_file_is_one_line(tmp_path, monkeypatch, tiny_hf, damage):
    """A stopped download leaves a truncated .safetensors; a corrupt one has a bad header. Each, in a folder, in an
    hf: cache entry (where the message names the blob to delete) and as a cached open_clip_model.safetensors, is
    one LoadError line, not safetensors' traceback."""
    from safetensors.torch import save_file
    folder = tmp_path / "folder"
    shutil.copytree(tiny_hf, folder)
    cache = tmp_path / "hub"
    snapshot = save_in_cache(hf_clip("gelu"), cache, "someone/tiny-clip")
    reference, architecture = openclip_clip(False)
    monkeypatch.setitem(other_weights.OPENCLIP_MODELS, "Tiny-ViT", architecture)
    monkeypatch.setitem(other_weights.OPENCLIP_PRETRAINED, "Tiny-ViT:random", "someone/tiny-open-clip")
    openclip = cache / "models--someone--tiny-open-clip" / "snapshots" / ("89ab" * 10)
    openclip.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, openclip / "open_clip_model.safetensors")
    blob = cache / "models--someone--tiny-clip" / "blobs" / "0f1e2d3c"
    blob.parent.mkdir()
    (snapshot / "model.safetensors").rename(blob)
    (snapshot / "model.safetensors").symlink_to(blob)  # as huggingface_hub lays out a download
    for path in (folder / "model.safetensors", blob, openclip / "open_clip_model.safetensors"):
        if damage == "truncated":
            truncate(path)
        else:
            path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for backbone, names in [(str(folder), "it"), ("hf:someone/tiny-clip", str(blob)), ("Tiny-ViT:random", "it")]:
        with pytest.raises(clip_model.LoadError, match="is unreadable or corrupt .*it is not a complete checkpoint; "
                           f"delete {names} and download it again") as error:
            other_weights.load_backbone(backbone)
        assert "\n" not in str(error.value), backbone


def test_a_missing_shard_is_named(tmp_path, tiny_hf):
    """A sharded folder (model.safetensors.index.json) missing one of its shards: the shard is named."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_hf / "config.json").read_text())
    weight_map = {"logit_scale": "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(tiny_hf / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    with pytest.raises(clip_model.LoadError, match="sharded is missing model-00002-of-00002.safetensors, a shard of "
                       "the model's weights that model.safetensors.index.json lists: download the model again"):
        other_weights.load_backbone(str(folder))
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(clip_model.LoadError, match="is not a readable shard index"):
        other_weights.load_backbone(str(folder))


@pytest.mark.parametrize("typed,meant", [
    ("vit-b-16:laion2b_s34b_b88k", "ViT-B-16:laion2b_s34b_b88k"),
    ("ViT-B/16:laion2b_s34b_b88k", "ViT-B-16:laion2b_s34b_b88k"),
    ("vit-l-14-quickgelu:dfn2b", "ViT-L-14-quickgelu:dfn2b"),
    ("ViT-L/14@336px:openai", "ViT-L-14-336:openai"),
])
def test_openclip_spellings_get_the_right_one(typed, meant):
    with pytest.raises(clip_model.LoadError, match=f"OpenCLIP spells the model .* as .*: pass {meant}$"):
        other_weights.load_backbone(typed)


def test_open_clips_hf_hub_names_and_a_ddp_state_dict(tmp_path, monkeypatch, tiny_hf):
    """open_clip's hf-hub:<repo> loads as that repo's MODEL:TAG (its files are open_clip's; the tag gives the
    activation and preprocessing), and a repo the table lacks as hf: would. A plain DDP state dict ("module."
    keys, no "state_dict" wrapper), which open_clip loads, loads here."""
    reference, architecture = openclip_clip(True)
    monkeypatch.setitem(other_weights.OPENCLIP_MODELS, "Tiny-ViT", architecture)
    monkeypatch.setitem(other_weights.OPENCLIP_PRETRAINED, "Tiny-ViT-quickgelu:random", "someone/tiny-open-clip")
    snapshot = tmp_path / "hub" / "models--someone--tiny-open-clip" / "snapshots" / ("89ab" * 10)
    snapshot.mkdir(parents=True)
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, snapshot / "open_clip_pytorch_model.bin")
    save_in_cache(hf_clip("gelu"), tmp_path / "hub", "someone/tiny-clip")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    images, tokens = inputs()
    model, _ = other_weights.load_backbone("hf-hub:someone/tiny-open-clip")
    assert model.activation == "quick_gelu"
    for want, got in zip(openclip_features(reference, images, tokens), features(model, images, tokens)):
        assert (want - got).abs().max() < 1e-5
    hub, _ = other_weights.load_backbone("hf-hub:someone/tiny-clip")
    same, _ = other_weights.load_backbone("hf:someone/tiny-clip")
    assert all(torch.equal(a, b) for a, b in zip(features(hub, images, tokens), features(same, images, tokens)))


def test_offline_fails_within_seconds_without_the_librarys_logs(tmp_path, monkeypatch, caplog, capfd):
    """No network, HF_HUB_OFFLINE unset: huggingface_hub itself (not faked here) would retry for about 25 s,
    logging each retry. The hub is asked once first, and the answer is one line within seconds, for hf: and for
    MODEL:TAG alike; HF_HUB_OFFLINE=1 answers without asking."""
    monkeypatch.setattr(huggingface_hub, "list_repo_files", REAL_HUB[0])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", REAL_HUB[1])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    caplog.set_level(logging.DEBUG)
    for backbone in ("hf:someone/absent", "ViT-B-16:laion2b_s34b_b88k"):
        start = time.monotonic()
        with pytest.raises(clip_model.LoadError, match="could not download hf:.* unreachable.*without internet"):
            other_weights.load_backbone(backbone)
        assert time.monotonic() - start < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(clip_model.LoadError, match="HF_HUB_OFFLINE is set"):
        other_weights.load_backbone("hf:someone/absent")
    assert "Retry" not in caplog.text + "".join(capfd.readouterr())


def test_a_hub_that_does_not_answer_is_given_up(monkeypatch):
    """A hub that accepts the connection and never answers (a firewall, a dead proxy) is given up after the
    timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # never accepted: the connection opens, no answer comes
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.monotonic()
        assert "timed out" in other_weights.hub_unreachable("someone/absent", timeout=0.5)
        assert time.monotonic() - start < 3


def test_the_hub_cache_is_found_as_huggingface_hub_finds_it(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert other_weights.hf_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert other_weights.hf_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))  # its older name
    assert other_weights.hf_cache() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert other_weights.hf_cache() == tmp_path / "new"
