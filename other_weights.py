"""Every --backbone as a clip_model.CLIP: Hugging Face's and OpenCLIP's formats converted to
OpenAI's layout.

`load_backbone` turns any backbone string into a CLIP and its preprocess: OpenAI's names and files
through clip_model.load, and here `hf:<org>/<name>` (a transformers CLIPModel from the Hugging Face
cache, else downloaded with huggingface_hub, an optional dependency), a transformers CLIPModel
folder, open_clip's `hf-hub:<org>/<name>`, and OpenCLIP's MODEL:TAG or MODEL:<file>. Only models of
OpenAI's architecture are taken; what this CLIP cannot represent (another pooling, tokenizer, MLP
width or image tower) is refused in one line naming the difference. What weights cannot tell comes
from the Hugging Face config or the OpenCLIP name: the activation, and the preprocessing (mean, std,
resize rule, interpolation) the model was trained with, which the model carries
(`model.preprocessing`). Parity with transformers' and open_clip's forward and preprocess:
tests/test_other_weights.py.
"""
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch

import clip_model
from clip_model import LoadError, Preprocessing, build_model, random_model, read_state_dict

# Hugging Face (transformers' CLIPModel folders: config.json + weights). The defaults of
# transformers' CLIPTextConfig and CLIPVisionConfig, for config.json files that leave a field out.
HF_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
               vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
               layer_norm_eps=1e-5, eos_token_id=49407)
HF_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5)
# "resample"
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
# one encoder layer's modules, theirs -> ours (q/k/v are concatenated)
HF_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
            "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
HF_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
          "text_model.embeddings.position_embedding.weight": "positional_embedding",
          "text_model.final_layer_norm.weight": "ln_final.weight",
          "text_model.final_layer_norm.bias": "ln_final.bias",
          "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
          "vision_model.embeddings.class_embedding": "visual.class_embedding",
          "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
          "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: transformers' spelling
          "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
          "vision_model.post_layernorm.weight": "visual.ln_post.weight",
          "vision_model.post_layernorm.bias": "visual.ln_post.bias", "logit_scale": "logit_scale"}

def hf_cache():
    """The Hugging Face hub cache, found as huggingface_hub finds it."""
    # the second: its older name
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))

def hf_snapshot(repo, weights=HF_WEIGHTS, required=("config.json",),
                optional=("preprocessor_config.json",)):
    """The folder of hub model `repo` ("org/name") with the first of `weights` that it has: its
    cached snapshot (refs/main's, else the only one), else downloaded into the cache by
    huggingface_hub (an optional dependency, imported only here)."""
    models = hf_cache() / f"models--{repo.replace('/', '--')}"
    ref, snapshots = models / "refs" / "main", sorted((models / "snapshots").glob("*"))
    folder = snapshots[0] if len(snapshots) == 1 else None
    if ref.is_file():
        folder = models / "snapshots" / ref.read_text().strip()
    if folder and all((folder / name).is_file() for name in required) and any(
            (folder / name).is_file() for name in weights):
        return folder
    offline = (f"put the model's {', '.join([*required, *optional, weights[0]])} into "
               f"{models}/snapshots/<revision>/ (or pass the file's or folder's path)")
    try:
        import huggingface_hub
    except ImportError:
        raise LoadError(f"hf:{repo} is not in the Hugging Face cache: pip install huggingface_hub "
                        "to download it, or " + offline) from None
    # before huggingface_hub, which retries for 25 s and logs each retry
    if reason := hub_unreachable(repo):
        raise LoadError(f"could not download hf:{repo} ({reason}): check the name; without "
                        "internet, " + offline)
    try:
        files = huggingface_hub.list_repo_files(repo)
        name = next((name for name in weights if name in files), weights[0])  # safetensors first
        stem, _, suffix = name.removesuffix(".index.json").rpartition(".")
        # model-00001-of-00002.safetensors
        shards = [f"{stem}-*.{suffix}"] if name.endswith(".index.json") else []
        return Path(huggingface_hub.snapshot_download(repo, cache_dir=hf_cache(), allow_patterns=[
            *required, *optional, name, *shards]))
    except Exception as e:
        # huggingface_hub's errors (no network, no such repo, offline mode) share no base class
        reason = str(e).strip().split("\n")[0]
        raise LoadError(f"could not download hf:{repo} ({type(e).__name__}: {reason}): check the "
                        "name; without internet, " + offline) from None

def hub_unreachable(repo, timeout=5):
    """Why the Hugging Face hub cannot be reached (offline mode, no network, no answer in
    `timeout` s), or None: one request for the repo's record, through the proxies the environment
    names, as huggingface_hub's would go. An answer with an HTTP error (a private or unknown repo)
    counts as reachable: huggingface_hub reports it, with the user's token."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(f"{endpoint}/api/models/{repo}", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:
        # URLError (no name resolution, refused), a timeout; a malformed HF_ENDPOINT
        return f"{endpoint} unreachable: {getattr(e, 'reason', e)}"
    return None

def read_hf_weights(folder):
    """A transformers model folder's weights (safetensors or PyTorch, whole or sharded) ->
    {key: tensor}."""
    name = next((name for name in HF_WEIGHTS if (folder / name).is_file()), None)
    if name is None:
        raise LoadError(f"{folder} has a config.json but no weights: put model.safetensors "
                        "(or pytorch_model.bin) next to it")
    files = [folder / name]
    if name.endswith(".index.json"):  # shards, listed by their index
        try:
            files = [folder / shard for shard in sorted(set(
                json.loads(files[0].read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LoadError(f"{files[0]} is not a readable shard index: download the model "
                            "again") from None
        if missing := [path.name for path in files if not path.is_file()]:
            raise LoadError(f"{folder} is missing "
                            f"{missing[0]}{f' and {len(missing) - 1} more' if missing[1:] else ''}"
                            f", a shard of the model's weights that {name} lists: download the "
                            "model again")
    sd = {}
    for path in files:
        sd.update(read_state_dict(path))
    return sd

def hf_config(config, tower):
    """transformers' reading of one tower's config ("text" or "vision"): its defaults, overridden by
    `<tower>_config`, whose every field the legacy `<tower>_config_dict` overrides, when a file has
    one (transformers completes the legacy dict with the defaults first, so a field it lacks is the
    default's, not `<tower>_config`'s).
    """
    defaults, config = {"text": HF_TEXT, "vision": HF_VISION}[tower], config or {}
    legacy, current = config.get(f"{tower}_config_dict"), config.get(f"{tower}_config")
    for key, value in ((f"{tower}_config_dict", legacy), (f"{tower}_config", current)):
        if value is not None and not isinstance(value, dict):
            raise LoadError(f"config.json's {key} is {type(value).__name__}, not a dict: not a "
                            "transformers CLIPModel config; download the model again")
    return {**defaults, **(current or {}), **({**defaults, **legacy} if legacy is not None else {})}

def hf_preprocessing(preprocessor, size):
    """A preprocessor_config.json (transformers' CLIPImageProcessor; None: OpenAI's) ->
    (Preprocessing, checks), the checks being (what, its value, whether the Preprocessing does what
    the processor does, what it can do)."""
    p = preprocessor or {}
    resize, crop = p.get("size", size), p.get("crop_size", size)
    # {"height", "width"}: both sides resized
    squash = isinstance(resize, dict) and "shortest_edge" not in resize
    resize, crop = side(resize), side(crop)
    mean, std = p.get("image_mean", clip_model.MEAN), p.get("image_std", clip_model.STD)
    resample = p.get("resample", 3)
    steps = {step: p.get(f"do_{step}", True)
             for step in ("resize", "center_crop", "rescale", "normalize")}
    checks = [
        ("preprocessor do_resize, do_center_crop, do_rescale, do_normalize", tuple(steps.values()),
         steps["resize"] and steps["rescale"] and steps["normalize"]
         and (steps["center_crop"] or squash),
         "true (a crop may be left out after a resize of both sides)"),
        ("preprocessor size", resize, resize == size, f"image_size {size} (the crop's)"),
        ("preprocessor crop_size", crop, crop == size or not steps["center_crop"],
         f"image_size {size}"),
        ("preprocessor resample", resample, resample in PIL_RESAMPLE,
         f"one of PIL's {sorted(PIL_RESAMPLE)}"),
        ("preprocessor rescale_factor", p.get("rescale_factor", 1 / 255),
         abs(p.get("rescale_factor", 1 / 255) - 1 / 255) < 1e-9, "1/255"),
        ("preprocessor image_mean, image_std", (mean, std), len(mean) == len(std) == 3,
         "3 values each (RGB)"),
    ]
    return Preprocessing(size, tuple(mean), tuple(std), "squash" if squash else "shortest",
                         PIL_RESAMPLE.get(resample, "bicubic")), checks

def side(size):
    """A processor's size, 224, {"shortest_edge": 224} or {"height": 224, "width": 224} -> 224; a
    rectangle -> (height, width)."""
    if not isinstance(size, dict):
        return size
    if "shortest_edge" in size:
        return size["shortest_edge"]
    return (size.get("height") if size.get("height") == size.get("width")
            else (size.get("height"), size.get("width")))

def convert_hf(config, hf, preprocessor=None):
    """A transformers CLIPModel's config.json, weights and preprocessor_config.json -> (the 10 CLIP
    arguments, CLIP's keyword arguments, OpenAI's state dict); LoadError naming what this CLIP
    cannot represent."""
    text, vision = hf_config(config, "text"), hf_config(config, "vision")
    size = vision["image_size"]
    preprocessing, preprocessor_checks = hf_preprocessing(preprocessor, size)
    checks = [  # (what, its value, whether this CLIP builds it, what it builds)
        ("model_type", config.get("model_type"), config.get("model_type") == "clip",
         "clip (a CLIP ViT)"),
        ("hidden_act (text, vision)", (text["hidden_act"], vision["hidden_act"]),
         text["hidden_act"] == vision["hidden_act"] in ("quick_gelu", "gelu"),
         "quick_gelu or gelu in both"),
        ("layer_norm_eps", (text["layer_norm_eps"], vision["layer_norm_eps"]),
         text["layer_norm_eps"] == vision["layer_norm_eps"] == 1e-5, "1e-5"),
        ("intermediate_size", (text["intermediate_size"], vision["intermediate_size"]),
         all(tower["intermediate_size"] == 4 * tower["hidden_size"] for tower in (text, vision)),
         "4 x hidden_size"),
        ("vocab_size", text["vocab_size"], text["vocab_size"] == 49408,
         "49408 (OpenAI's BPE tokenizer)"),
        ("max_position_embeddings", text["max_position_embeddings"],
         text["max_position_embeddings"] == 77, "77"),
        ("eos_token_id", text["eos_token_id"], text["eos_token_id"] in (2, 49407),
         "49407 (or the legacy 2): text pooled at OpenAI's end-of-text token"),
        ("image_size", size, isinstance(size, int), "one int (square images)"),
        ("num_channels", vision["num_channels"], vision["num_channels"] == 3, "3"),
        *preprocessor_checks,
    ]
    bad = [f"{what} is {value}, not {builds}" for what, value, ok, builds in checks if not ok]
    if bad:
        raise LoadError(f"this CLIP cannot represent the model: {'; '.join(bad)}")
    hf, sd = dict(hf), {}
    try:
        for theirs, ours in [("text_model.encoder.layers.", "transformer.resblocks."),
                             ("vision_model.encoder.layers.", "visual.transformer.resblocks.")]:
            for i in sorted({int(k[len(theirs):].split(".")[0])
                             for k in hf if k.startswith(theirs)}):
                # q, k, v stacked in rows, as nn.MultiheadAttention's in_proj
                for kind in ("weight", "bias"):
                    sd[f"{ours}{i}.attn.in_proj_{kind}"] = torch.cat(
                        [hf.pop(f"{theirs}{i}.self_attn.{p}_proj.{kind}") for p in "qkv"])
                    for their_module, our_module in HF_BLOCK.items():
                        sd[f"{ours}{i}.{our_module}.{kind}"] = hf.pop(
                            f"{theirs}{i}.{their_module}.{kind}")
        for theirs, ours in HF_TOP.items():
            sd[ours] = hf.pop(theirs)
        # nn.Linear's (out, in) -> OpenAI's x @ (in, out)
        sd["visual.proj"] = hf.pop("visual_projection.weight").t()
        sd["text_projection"] = hf.pop("text_projection.weight").t()
    except KeyError as e:
        raise LoadError(f"not a transformers CLIPModel's weights (no {e}): pass a CLIPModel "
                        "folder") from None
    for key in ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"):
        hf.pop(key, None)  # aranges, saved by older transformers
    if hf:
        raise LoadError(f"weights this CLIP has no place for: {', '.join(sorted(hf)[:3])}: "
                        "pass a CLIPModel folder")
    args = (config.get("projection_dim", 512), size, vision["num_hidden_layers"],
            vision["hidden_size"], vision["patch_size"], 77, 49408, text["hidden_size"],
            text["num_attention_heads"], text["num_hidden_layers"])
    return args, dict(vision_heads=vision["num_attention_heads"], activation=text["hidden_act"],
                      preprocessing=preprocessing), sd

def load_hf(folder):
    """A CLIP from a transformers CLIPModel folder (config.json, weights, optional
    preprocessor_config.json)."""
    folder = Path(folder)
    preprocessor = folder / "preprocessor_config.json"
    try:
        config = json.loads((folder / "config.json").read_text())
        preprocessor = json.loads(preprocessor.read_text()) if preprocessor.is_file() else None
    except ValueError as e:
        raise LoadError(f"{folder}: a JSON file is unreadable ({e}): download the model "
                        "again") from None
    args, options, sd = convert_hf(config, read_hf_weights(folder), preprocessor)
    try:
        return build_model(sd, args, **options)
    except LoadError as e:  # shapes differ from the config's
        raise LoadError(f"{folder}: the weights do not fit its config.json "
                        f"({str(e).split('(', 1)[-1].split('): ')[0]})"
                        ": download the model again") from None

# OpenCLIP's ViTs whose architecture is OpenAI's (class-token pooling after ln_pre, text pooled at
# the end-of-text token, OpenAI's tokenizer, 4x MLPs). Others (SigLIP, CLIPA, EVA, CoCa, timm
# towers, ViT-g/bigG's wider MLPs) are refused. The activation is a property of the model name, as
# in open_clip: "-quickgelu" names use QuickGELU, the others nn.GELU; the weights cannot tell, and
# the wrong one loses accuracy without an error.
# name (without -quickgelu) -> CLIP's 10 arguments, vision heads (open_clip's model_configs)
OPENCLIP_MODELS = {
    "ViT-B-32": ((512, 224, 12, 768, 32, 77, 49408, 512, 8, 12), 12),
    "ViT-B-32-256": ((512, 256, 12, 768, 32, 77, 49408, 512, 8, 12), 12),
    "ViT-B-16": ((512, 224, 12, 768, 16, 77, 49408, 512, 8, 12), 12),
    "ViT-B-16-plus-240": ((640, 240, 12, 896, 16, 77, 49408, 640, 10, 12), 14),
    "ViT-L-14": ((768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12), 16),
    "ViT-L-14-336": ((768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12), 16),
    "ViT-H-14": ((1024, 224, 32, 1280, 14, 77, 49408, 1024, 16, 24), 16),  # 80-wide heads
    "ViT-H-14-378": ((1024, 378, 32, 1280, 14, 77, 49408, 1024, 16, 24), 16),
}
# MODEL:TAG -> Hugging Face hub repo of its weights (open_clip's pretrained.py, hf_hub)
OPENCLIP_PRETRAINED = {
    "ViT-B-32:laion2b_e16": "timm/vit_base_patch32_clip_224.laion2b_e16",
    "ViT-B-32:laion2b_s34b_b79k": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    "ViT-B-32:datacomp_xl_s13b_b90k": "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
    "ViT-B-32:datacomp_m_s128m_b4k": "laion/CLIP-ViT-B-32-DataComp.M-s128M-b4K",
    "ViT-B-32:commonpool_m_clip_s128m_b4k": "laion/CLIP-ViT-B-32-CommonPool.M.clip-s128M-b4K",
    "ViT-B-32:commonpool_m_laion_s128m_b4k": "laion/CLIP-ViT-B-32-CommonPool.M.laion-s128M-b4K",
    "ViT-B-32:commonpool_m_image_s128m_b4k": "laion/CLIP-ViT-B-32-CommonPool.M.image-s128M-b4K",
    "ViT-B-32:commonpool_m_text_s128m_b4k": "laion/CLIP-ViT-B-32-CommonPool.M.text-s128M-b4K",
    "ViT-B-32:commonpool_m_basic_s128m_b4k": "laion/CLIP-ViT-B-32-CommonPool.M.basic-s128M-b4K",
    "ViT-B-32:commonpool_m_s128m_b4k": "laion/CLIP-ViT-B-32-CommonPool.M-s128M-b4K",
    "ViT-B-32:datacomp_s_s13m_b4k": "laion/CLIP-ViT-B-32-DataComp.S-s13M-b4K",
    "ViT-B-32:commonpool_s_clip_s13m_b4k": "laion/CLIP-ViT-B-32-CommonPool.S.clip-s13M-b4K",
    "ViT-B-32:commonpool_s_laion_s13m_b4k": "laion/CLIP-ViT-B-32-CommonPool.S.laion-s13M-b4K",
    "ViT-B-32:commonpool_s_image_s13m_b4k": "laion/CLIP-ViT-B-32-CommonPool.S.image-s13M-b4K",
    "ViT-B-32:commonpool_s_text_s13m_b4k": "laion/CLIP-ViT-B-32-CommonPool.S.text-s13M-b4K",
    "ViT-B-32:commonpool_s_basic_s13m_b4k": "laion/CLIP-ViT-B-32-CommonPool.S.basic-s13M-b4K",
    "ViT-B-32:commonpool_s_s13m_b4k": "laion/CLIP-ViT-B-32-CommonPool.S-s13M-b4K",
    "ViT-B-32-256:datacomp_s34b_b86k": "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K",
    "ViT-B-16:laion400m_e31": "timm/vit_base_patch16_clip_224.laion400m_e31",
    "ViT-B-16:laion400m_e32": "timm/vit_base_patch16_clip_224.laion400m_e32",
    "ViT-B-16:laion2b_s34b_b88k": "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    "ViT-B-16:datacomp_xl_s13b_b90k": "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K",
    "ViT-B-16:datacomp_l_s1b_b8k": "laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K",
    "ViT-B-16:commonpool_l_clip_s1b_b8k": "laion/CLIP-ViT-B-16-CommonPool.L.clip-s1B-b8K",
    "ViT-B-16:commonpool_l_laion_s1b_b8k": "laion/CLIP-ViT-B-16-CommonPool.L.laion-s1B-b8K",
    "ViT-B-16:commonpool_l_image_s1b_b8k": "laion/CLIP-ViT-B-16-CommonPool.L.image-s1B-b8K",
    "ViT-B-16:commonpool_l_text_s1b_b8k": "laion/CLIP-ViT-B-16-CommonPool.L.text-s1B-b8K",
    "ViT-B-16:commonpool_l_basic_s1b_b8k": "laion/CLIP-ViT-B-16-CommonPool.L.basic-s1B-b8K",
    "ViT-B-16:commonpool_l_s1b_b8k": "laion/CLIP-ViT-B-16-CommonPool.L-s1B-b8K",
    "ViT-B-16-plus-240:laion400m_e31": "timm/vit_base_patch16_plus_clip_240.laion400m_e31",
    "ViT-L-14:laion400m_e31": "timm/vit_large_patch14_clip_224.laion400m_e31",
    "ViT-L-14:laion400m_e32": "timm/vit_large_patch14_clip_224.laion400m_e32",
    "ViT-L-14:datacomp_xl_s13b_b90k": "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K",
    "ViT-L-14:commonpool_xl_clip_s13b_b90k": "laion/CLIP-ViT-L-14-CommonPool.XL.clip-s13B-b90K",
    "ViT-L-14:commonpool_xl_laion_s13b_b90k": "laion/CLIP-ViT-L-14-CommonPool.XL.laion-s13B-b90K",
    "ViT-L-14:commonpool_xl_s13b_b90k": "laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K",
    "ViT-L-14:dfn2b_s39b": "apple/DFN2B-CLIP-ViT-L-14-39B",
    "ViT-L-14:laion2b_s32b_b82k": "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
    "ViT-H-14:laion2b_s32b_b79k": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "ViT-H-14:metaclip_altogether": "timm/vit_huge_patch14_clip_224.metaclip_altogether",
    "ViT-B-32-quickgelu:openai": "timm/vit_base_patch32_clip_224.openai",
    "ViT-B-32-quickgelu:laion400m_e31": "timm/vit_base_patch32_clip_224.laion400m_e31",
    "ViT-B-32-quickgelu:laion400m_e32": "timm/vit_base_patch32_clip_224.laion400m_e32",
    "ViT-B-32-quickgelu:metaclip_400m": "timm/vit_base_patch32_clip_224.metaclip_400m",
    "ViT-B-32-quickgelu:metaclip_fullcc": "timm/vit_base_patch32_clip_224.metaclip_2pt5b",
    "ViT-B-16-quickgelu:openai": "timm/vit_base_patch16_clip_224.openai",
    "ViT-B-16-quickgelu:dfn2b": "apple/DFN2B-CLIP-ViT-B-16",
    "ViT-B-16-quickgelu:metaclip_400m": "timm/vit_base_patch16_clip_224.metaclip_400m",
    "ViT-B-16-quickgelu:metaclip_fullcc": "timm/vit_base_patch16_clip_224.metaclip_2pt5b",
    "ViT-L-14-quickgelu:openai": "timm/vit_large_patch14_clip_224.openai",
    "ViT-L-14-quickgelu:metaclip_400m": "timm/vit_large_patch14_clip_224.metaclip_400m",
    "ViT-L-14-quickgelu:metaclip_fullcc": "timm/vit_large_patch14_clip_224.metaclip_2pt5b",
    "ViT-L-14-quickgelu:dfn2b": "apple/DFN2B-CLIP-ViT-L-14",
    "ViT-L-14-336-quickgelu:openai": "timm/vit_large_patch14_clip_336.openai",
    "ViT-H-14-quickgelu:metaclip_fullcc": "timm/vit_huge_patch14_clip_224.metaclip_2pt5b",
    "ViT-H-14-quickgelu:dfn5b": "apple/DFN5B-CLIP-ViT-H-14",
    "ViT-H-14-378-quickgelu:dfn5b": "apple/DFN5B-CLIP-ViT-H-14-378",
}
# MODEL:TAG -> how its preprocessing differs from OpenAI's (open_clip's pretrained.py)
OPENCLIP_PREPROCESSING = {
    # Inception's normalisation
    "ViT-L-14:laion2b_s32b_b82k": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "ViT-H-14-quickgelu:dfn5b": dict(resize="squash"),
    "ViT-H-14-378-quickgelu:dfn5b": dict(resize="squash"),
}
# in those hub repos
OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

def openclip_preprocessing(name, weights):
    """How open_clip prepares the images of OpenCLIP model `name` with `weights` (a pretrained tag;
    a file: OpenAI's preprocessing, as open_clip gives a model loaded from a file)."""
    size = OPENCLIP_MODELS[name.removesuffix("-quickgelu")][0][1]
    return Preprocessing(size, **OPENCLIP_PREPROCESSING.get(f"{name}:{weights}", {}))

def load_openclip(name, weights, pretrained=True, seed=0):
    """A CLIP from OpenCLIP model `name` ("ViT-B-16", "ViT-B-16-quickgelu", ...) with `weights`: a
    pretrained tag (OPENCLIP_PRETRAINED, from the Hugging Face cache or hub; pretrained=False:
    seeded random weights of its architecture) or the path of an OpenCLIP checkpoint file (OpenAI's
    preprocessing, as open_clip gives it)."""
    quick = name.endswith("-quickgelu")
    base, other = (name.removesuffix("-quickgelu"),
                   name.removesuffix("-quickgelu") + ("" if quick else "-quickgelu"))
    if base not in OPENCLIP_MODELS:
        spelled = {known.lower(): known for known in OPENCLIP_MODELS}.get(
            base.replace("/", "-").replace("@336px", "-336").lower())
        if spelled:  # vit-b-16, or OpenAI's ViT-B/16
            raise LoadError(f"OpenCLIP spells the model {name!r} as {spelled}{name[len(base):]}: "
                            f"pass {spelled}{name[len(base):]}:{weights}")
        raise LoadError(f"OpenCLIP model {name!r} is not one this CLIP can build (another pooling, "
                        "tokenizer, MLP width or image tower); these are: "
                        f"{', '.join(OPENCLIP_MODELS)} (each also -quickgelu)")
    config, vision_heads = OPENCLIP_MODELS[base]
    options = dict(vision_heads=vision_heads, activation="quick_gelu" if quick else "gelu",
                   preprocessing=openclip_preprocessing(name, weights))
    if os.path.isfile(weights):
        path = weights
    elif f"{name}:{weights}" in OPENCLIP_PRETRAINED and not pretrained:
        return random_model(config, seed, **options)
    elif f"{name}:{weights}" in OPENCLIP_PRETRAINED:
        folder = hf_snapshot(OPENCLIP_PRETRAINED[f"{name}:{weights}"], OPENCLIP_FILES, required=(),
                             optional=())
        path = next(folder / file for file in OPENCLIP_FILES if (folder / file).is_file())
    elif f"{other}:{weights}" in OPENCLIP_PRETRAINED:
        # open_clip would load it, with a warning, and lose accuracy
        raise LoadError(f"{name}:{weights} was trained with {'GELU' if quick else 'QuickGELU'}: "
                        f"pass {other}:{weights}")
    else:
        tags = [pair.split(":")[1] for pair in OPENCLIP_PRETRAINED if pair.startswith(name + ":")]
        raise LoadError(f"no OpenCLIP weights {name}:{weights} here, nor a file at {weights!r}: "
                        f"pretrained tags for {name}: "
                        f"{', '.join(tags) or 'none (see its -quickgelu twin)'}; or pass "
                        f"{name}:<file path>")
    sd = read_state_dict(path)
    # the causal mask, a buffer in some open_clip versions; ours is built when used
    sd.pop("attn_mask", None)
    try:
        return build_model(sd, config, **options)
    except LoadError as e:  # shapes or keys differ: most likely another model's file
        raise LoadError(f"{path} is not OpenCLIP's {name}: {str(e).split(': pass')[0]}; pass the "
                        "model name it was trained as (MODEL:<file>)") from None

def load_backbone(backbone, device="cpu", download_root=None, pretrained=True, seed=0):
    """Any backbone string -> (CLIP, its preprocess): OpenAI's names and checkpoint files
    (clip_model.load), a transformers CLIPModel folder, hf:<org>/<name>, open_clip's
    hf-hub:<org>/<name>, OpenCLIP's MODEL:TAG or MODEL:<file>. pretrained=False (names and tags
    only, no download): seeded random weights of the architecture. The same string gives the same
    model again, with the preprocessing it was trained with."""
    if backbone in clip_model.CONFIGS or os.path.isfile(backbone):
        return clip_model.load(backbone, device, download_root, pretrained, seed)
    # open_clip's: a repo of open_clip's files, in the table under its MODEL:TAG
    if backbone.startswith("hf-hub:"):
        repo = backbone[len("hf-hub:"):]
        pair = next((pair for pair, known in OPENCLIP_PRETRAINED.items() if known == repo), None)
        model = (load_openclip(*pair.split(":"), pretrained, seed) if pair
                 else load_hf(hf_snapshot(repo)))
    elif backbone.startswith("hf:"):
        model = load_hf(hf_snapshot(backbone[len("hf:"):]))
    elif os.path.isfile(os.path.join(backbone, "config.json")):
        model = load_hf(backbone)
    elif ":" in backbone and not os.path.exists(backbone):  # OpenCLIP's MODEL:TAG or MODEL:<file>
        model = load_openclip(*backbone.split(":", 1), pretrained, seed)
    elif os.path.exists(backbone):
        raise LoadError(f"{backbone} is not a file, nor a Hugging Face model folder (no "
                        "config.json): pass the path of a CLIP checkpoint file or of a "
                        "transformers CLIPModel folder")
    else:
        raise LoadError(f"Unknown CLIP model {backbone!r} and no file at that path. Available: "
                        f"{', '.join(clip_model.CONFIGS)} - or pass the path of a checkpoint file, "
                        "a Hugging Face CLIPModel folder, hf:<org>/<name>, or OpenCLIP's "
                        "MODEL:TAG (ViT-B-16:laion2b_s34b_b88k)")
    return model.to(device), clip_model.transform(model.preprocessing)
