"""Weights in other formats, loaded into clip_model.CLIP: Hugging Face (transformers' CLIPModel folders, hf:<org>/<name>
from the Hugging Face cache) and OpenCLIP (MODEL:TAG from the cache, MODEL:<file>). Parity with each library's own
forward on the same random weights, the activation the weights cannot tell, the errors a user can cause, and a run of
train.py on such a backbone. Nothing is downloaded."""
import json
import sys

import huggingface_hub
import open_clip
import pytest
import torch
import transformers

import clip_model
import methods
import other_weights
import runs
import train

TEXTS = ["a photo of a dog.", "", "X X X X banded texture.",
         "a very long description of an unusual bird with a red crest, white belly and grey wings, sitting"]
OPENAI_PREPROCESS = {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
                     "image_mean": list(clip_model.MEAN), "image_std": list(clip_model.STD)}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Every test here is offline: huggingface_hub's network calls fail as they do without internet."""

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
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
    by_id, preprocess = clip_model.load("hf:someone/tiny-clip")
    by_path, _ = clip_model.load(str(folder))
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
    (None, {"image_mean": [0.5, 0.5, 0.5]}, r"image_mean is \[0.5, 0.5, 0.5\], not OpenAI's \(0.481"),
    (None, {"image_std": [0.5, 0.5, 0.5]}, r"image_std is \[0.5, 0.5, 0.5\], not OpenAI's"),
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
        clip_model.load(str(edited(tmp_path, tiny_hf, config, preprocess)))


def test_not_cached_says_what_to_install_or_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    where = str(tmp_path / "hub" / "models--someone--absent" / "snapshots")
    with pytest.raises(clip_model.LoadError, match="could not download hf:someone/absent .*network is unreachable"
                       ".*without internet, put the model's config.json") as error:
        clip_model.load("hf:someone/absent")  # offline (see no_downloads)
    assert where in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(clip_model.LoadError, match="not in the Hugging Face cache: pip install huggingface_hub"):
        clip_model.load("hf:someone/absent")


def test_folder_errors(tmp_path, tiny_hf):
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(clip_model.LoadError, match="not a file, nor a Hugging Face model folder"):
        clip_model.load(str(bare))
    (bare / "config.json").write_text((tiny_hf / "config.json").read_text())
    with pytest.raises(clip_model.LoadError, match="has a config.json but no weights: put model.safetensors"):
        clip_model.load(str(bare))


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
    expected = features(clip_model.load(str(tiny_hf))[0], images, tokens)
    for want, got in zip(expected, features(clip_model.load(str(folder))[0], images, tokens)):
        assert torch.equal(want, got)


@pytest.mark.slow
def test_coop_trains_and_resumes_on_a_hugging_face_folder(tmp_path, monkeypatch, tiny_hf):
    """train.py on a converted backbone: results.json names it as passed, the default run folder by its name; a
    run stopped after epoch 1 resumes to the uninterrupted run; load_run rebuilds it from that string alone."""
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
    model, preprocess, classnames = runs.load_run(tmp_path / "run")
    assert any(isinstance(m, torch.nn.GELU) for m in model.modules())  # the activation came back with the string
    learned = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["learned"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in learned.items())


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
    by_tag, preprocess = clip_model.load(f"{name}:random")
    by_file, _ = clip_model.load(f"{name}:{snapshot / 'open_clip_pytorch_model.bin'}")
    assert by_tag.activation == ("quick_gelu" if quick_gelu else "gelu")
    for model in (by_tag, by_file):
        for what, want, got in zip(["image", "text", "logits"], expected, features(model, images, tokens)):
            diff = (want - got).abs().max().item()
            print(f"open_clip quick_gelu={quick_gelu} {what}: max abs diff {diff:.2e}")
            assert diff < 1e-5, (what, diff)
    assert expected[2].std() > 0.1
    other = "Tiny-ViT" if quick_gelu else "Tiny-ViT-quickgelu"
    wrong, _ = clip_model.load(f"{other}:{snapshot / 'open_clip_pytorch_model.bin'}")
    for what, want, got in zip(["image", "text", "logits"], expected, features(wrong, images, tokens)):
        diff = (want - got).abs().max().item()
        print(f"open_clip quick_gelu={quick_gelu} loaded as {other}, {what}: max abs diff {diff:.2e}")
        assert diff > 1e-3, (what, diff)
    with pytest.raises(clip_model.LoadError, match=f"{other}:random was trained with .*: pass {name}:random"):
        clip_model.load(f"{other}:random")


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
    expected = features(clip_model.load(f"Tiny-ViT:{tmp_path / 'epoch_32.pt'}")[0], images, tokens)
    got = features(clip_model.load(f"Tiny-ViT:{tmp_path / 'open_clip_model.safetensors'}")[0], images, tokens)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    with pytest.raises(clip_model.LoadError, match="epoch_32.pt is not OpenCLIP's ViT-B-16: not a CLIP state dict "
                       r"\(missing visual.transformer.resblocks.2.*pass the model name it was trained as"):
        clip_model.load(f"ViT-B-16:{tmp_path / 'epoch_32.pt'}")


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
        assert (tuple(pretrained["mean"]), tuple(pretrained["std"])) == (clip_model.MEAN, clip_model.STD), pair


@pytest.mark.parametrize("backbone,message", [
    ("ViT-B-32:laion400m_e31", "was trained with QuickGELU: pass ViT-B-32-quickgelu:laion400m_e31"),
    ("ViT-H-14-quickgelu:laion2b_s32b_b79k", "was trained with GELU: pass ViT-H-14:laion2b_s32b_b79k"),
    ("ViT-B-16-SigLIP:webli", "OpenCLIP model 'ViT-B-16-SigLIP' is not one this CLIP can build"),
    ("ViT-bigG-14:laion2b_s39b_b160k", "'ViT-bigG-14' is not one this CLIP can build"),
    ("ViT-B-16:no_such_tag", "no OpenCLIP weights ViT-B-16:no_such_tag.*laion2b_s34b_b88k"),
])
def test_openclip_refusals(backbone, message):
    with pytest.raises(clip_model.LoadError, match=message):
        clip_model.load(backbone)


def test_openclip_not_cached_offline(tmp_path, monkeypatch):
    """Offline with nothing cached: one line says where to put the file; --init random needs no weights."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setitem(other_weights.OPENCLIP_MODELS, "Tiny-ViT", ((64, 32, 2, 192, 8, 77, 49408, 128, 2, 2), 2))
    monkeypatch.setitem(other_weights.OPENCLIP_PRETRAINED, "Tiny-ViT:random", "someone/tiny-open-clip")
    model, _ = clip_model.load("Tiny-ViT:random", pretrained=False, seed=3)
    again, _ = clip_model.load("Tiny-ViT:random", pretrained=False, seed=3)
    assert model.activation == "gelu" and model.visual.transformer.resblocks[0].attn.heads == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(clip_model.LoadError, match="could not download hf:laion/CLIP-ViT-B-16-laion2B-s34B-b88K "
                       ".*open_clip_model.safetensors into"):
        clip_model.load("ViT-B-16:laion2b_s34b_b88k")


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
    expected = features(clip_model.load(str(tiny_hf))[0], images, tokens)
    assert all(torch.equal(a, b) for a, b in zip(expected, features(clip_model.load(str(folder))[0], images, tokens)))


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
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo: ["config.json", "model.safetensors", "pytorch_model.bin"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, _ = clip_model.load("hf:someone/online")
    assert asked == dict(repo="someone/online", cache_dir=tmp_path / "hub",
                         patterns=["config.json", "preprocessor_config.json", "model.safetensors"])
    assert model.activation == "gelu"
