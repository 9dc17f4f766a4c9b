"""The authors' released checkpoints, evaluated here: a Dassl file (model.pth.tar-N) read as ours.

    python train.py --method coop --data ./data/imagenet --protocol dg --eval-only \\
        --checkpoint rn50_ep50_16shots/nctx16_cscFalse_ctpend/seed1/prompt_learner/model.pth.tar-50

CoOp's ImageNet models and the MaPLe repository's Model Zoo are Dassl checkpoints: a dict of
"state_dict" (the parameters and buffers of the module the trainer registered), "epoch" (the
epochs done), "optimizer" and "scheduler" (and, in Dassl's files from August 2022 on, "result"
or "val_result"). Dassl's scheduler state holds pickled torch.optim objects, so
torch.load(weights_only=True) refuses the file. `read` unpickles it with an allowlist instead
(tensors and plain containers; a torch.optim object becomes an inert stand-in): a downloaded file
still runs no code of its own.

FORMATS names the official trainer of each format; `identify` tells the formats apart by their
keys, and CONVERTERS map their keys onto our method's learned tensors and Config. What the
tensors cannot tell, the backbone of a CoOp file and its class-token position, comes from the
released folder's name (`rn50_ep50_16shots/nctx16_cscFalse_ctpend`) or from --backbone and --set.
`check` then compares what the file recorded of the frozen model (its prompts' token embeddings:
the backbone's and each class name's; the frozen CLIP weights it holds) with the model built
here: another backbone, other class names, another class order or another prompt text is one
line, not a wrong number.
"""
import importlib
import pickle
import re
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import clip_model
from methods import UserError

# format -> (the official trainer that saves it, our method that holds it exactly)
FORMATS = {
    "CoOp": ("KaiyangZhou/CoOp trainers/coop.py", "coop"),
    "CoCoOp": ("KaiyangZhou/CoOp trainers/cocoop.py", "cocoop"),
    "MaPLe": ("muzairkhattak/multimodal-prompt-learning trainers/maple.py", "maple"),
    "IVLP": ("muzairkhattak/multimodal-prompt-learning trainers/independentVL.py", "ivlp"),
    "deep vision prompting": ("muzairkhattak/multimodal-prompt-learning trainers/vpt.py", "vpt"),
    "deep language prompting": (
        "muzairkhattak/multimodal-prompt-learning trainers/independentVL.py", "ivlp"),
}
VPT_TEMPLATE = "a photo of a {}."  # the MaPLe repository's VPT: this prompt on every dataset
FOLDER_BACKBONES = {  # the start of CoOp's folder names (its config files' names)
    "rn50": "RN50", "rn101": "RN101", "vit_b32": "ViT-B/32", "vit_b16": "ViT-B/16",
}

class _Ignored:
    """Stands in for a pickled torch.optim object (Dassl's scheduler state keeps the scheduler it
    wraps, and that its optimizer): built from nothing, its state dropped."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

ALLOWED = {  # (module, name) a Dassl checkpoint may name: tensors, parameters, plain containers
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch", "Size"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("collections", "Counter"),  # MultiStepLR's milestones (Dassl's multi_step scheduler)
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "set"), ("builtins", "tuple"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"), ("builtins", "str"),
}

class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # torch.save's pickle protocol 2 spells builtins so
        module = {"__builtin__": "builtins"}.get(module, module)
        if module.startswith("torch.optim"):  # the optimizer and schedulers: not needed, not built
            return _Ignored
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint")
        return getattr(importlib.import_module(module), name)

def _load(file, **kwargs):
    return _Unpickler(file, **kwargs).load()

_restricted = types.ModuleType("restricted_pickle")  # what torch.load takes as its pickle_module
_restricted.Unpickler, _restricted.load = _Unpickler, _load

def read(path):
    """A Dassl checkpoint's (state_dict, epoch), read without running code; None for another
    file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted)
    except Exception:  # not a torch file, truncated, or naming code: not a Dassl checkpoint
        return None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)):
        return None
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return state, ckpt.get("epoch")

def identify(state):
    """The format of a Dassl state dict (a key of FORMATS), or None."""
    if "ctx" in state and "token_prefix" in state:
        return "CoCoOp" if "meta_net.linear1.weight" in state else "CoOp"
    if "prompt_learner.proj.weight" in state:
        return "MaPLe"
    if "prompt_learner.ctx" in state:
        return "IVLP" if "image_encoder.VPT" in state else "deep language prompting"
    if "image_encoder.VPT" in state:
        return "deep vision prompting"
    return None

def load(path, method):
    """The authors' checkpoint at `path` as one of ours, for `method`: {"method", "learned",
    "config", "epoch", "released"}, "released" keeping the format and what `check` compares; None
    when the file is not a Dassl checkpoint. A UserError when no method here holds it, or not
    `method`."""
    read_back = read(path)
    if read_back is None:
        return None
    state, epoch = read_back
    name = identify(state)
    if name is None:
        raise UserError(f"{path} is a Dassl checkpoint of no format known here (keys "
                        f"{sorted(state)[:4]}): see docs/reproducing.md for the released files")
    trainer, holder = FORMATS[name]
    if holder != method:
        raise UserError(f"{path} is a {name} checkpoint ({trainer}), not {method}: pass --method "
                        f"{holder}")
    try:
        config, learned, recorded = CONVERTERS[name](state)
        config.update(from_folder(path, name, state))
    except KeyError as e:  # a file cut down, or saved by another version of the trainer
        raise UserError(f"{path} looks like a {name} checkpoint ({trainer}) but lacks {e}: it is "
                        "incomplete, or not of that trainer") from None
    except RuntimeError as e:  # torch.stack: deep prompts of different shapes
        raise UserError(f"{path}: the {name} checkpoint's prompts do not fit together "
                        f"({str(e).splitlines()[0]})") from None
    released = dict(format=name, trainer=trainer, **recorded)
    return dict(method=method, learned=learned, config=config, epoch=epoch, released=released)

def from_folder(path, name, state):
    """Config fields the tensors cannot tell, from the released folder's name: the backbone
    (`rn50_ep50_16shots`; a file holding CLIP's weights names it itself) and CoOp's class-token
    position (`ctpend`)."""
    config = {}
    for folder in Path(path).parts:
        prefix = re.match(r"(rn50|rn101|vit_b32|vit_b16)_", folder)
        if prefix:
            config["backbone"] = FOLDER_BACKBONES[prefix.group(1)]
        position = re.search(r"_ctp(end|middle|front)\b", folder)
        if position and name in ("CoOp", "CoCoOp"):
            config["class_token_position"] = position.group(1)
    if "image_encoder.conv1.weight" in state:  # the whole CLIP: its shapes name the backbone
        config["backbone"] = backbone_of(state)
    return config

def backbone_of(state):
    """The name of the OpenAI CLIP whose shapes a whole-model Dassl state dict has."""
    clip = {}
    for key, value in state.items():  # the official CustomCLIP's names -> clip_model's
        if key.startswith("image_encoder."):
            clip["visual." + key.removeprefix("image_encoder.")] = value
        elif key.startswith("text_encoder."):
            clip[key.removeprefix("text_encoder.")] = value
    D = clip["ln_final.weight"].shape[0]
    # the official TextEncoder holds no token embedding: its shape, for config_from_state_dict
    clip["token_embedding.weight"] = torch.empty(49408, D, device="meta")
    config = clip_model.config_from_state_dict(clip)
    names = [name for name, known in clip_model.CONFIGS.items() if known == config]
    if not names:
        raise UserError(f"the checkpoint's CLIP has the shapes {config}, which are no OpenAI "
                        "model's")
    return names[0]

def from_coop(state):
    """CoOp's and CoCoOp's PromptLearner, registered alone: `ctx` (n, D), or (C, n, D) when
    class-specific; CoCoOp's `meta_net.linear1/linear2`; the token buffers `token_prefix`
    (C, 1, D), the start-of-text embedding, and `token_suffix` (C, 76-n, D): the class name, "."
    and end-of-text."""
    ctx = state["ctx"].float()
    # the text is "X X ... X {class}." whether or not an init phrase started the context
    config = dict(n_ctx=ctx.shape[-2], csc=ctx.dim() == 3, ctx_init="")
    learned = {"prompt_learner.ctx": ctx}
    # CoCoOp's meta-net, if there is one: our Sequential's layers 0 and 2 are its linear1, linear2
    for ours, theirs in (("0", "linear1"), ("2", "linear2")):
        for kind in ("weight", "bias"):
            if f"meta_net.{theirs}.{kind}" in state:
                learned[f"meta_net.{ours}.{kind}"] = state[f"meta_net.{theirs}.{kind}"].float()
    recorded = dict(prefix=state["token_prefix"], suffix=state["token_suffix"])
    return config, learned, recorded

def deep(state, key):
    """The tensors `key.format(i)` for i = 1, 2, ... while present: a deep prompt per block."""
    found = []
    while key.format(len(found) + 1) in state:
        found.append(state[key.format(len(found) + 1)].float())
    return found

def frozen(state):
    """A few of the frozen CLIP weights a whole-model file holds, under clip_model's names: `check`
    compares them with the CLIP loaded here."""
    return {"visual.class_embedding": state["image_encoder.class_embedding"],
            "positional_embedding": state["text_encoder.positional_embedding"]}

def from_maple(state):
    """MaPLe's whole CustomCLIP: `prompt_learner.ctx` (n, D) and `proj` (its image prompts), the
    deeper blocks' `compound_prompts_text.{i}` and `compound_prompt_projections.{i}`, the token
    buffers."""
    p = "prompt_learner."
    ctx = state[p + "ctx"].float()
    deeper = sum(k.startswith(p + "compound_prompts_text.") for k in state)
    texts = [state[f"{p}compound_prompts_text.{i}"].float() for i in range(deeper)]
    deep_text = torch.stack(texts) if texts else ctx.new_zeros(0, *ctx.shape)
    learned = {"ctx": ctx, "deep_text": deep_text}
    # ours: couple[0] = proj, couple[i + 1] = compound_prompt_projections[i]
    projections = [p + "proj"] + [f"{p}compound_prompt_projections.{i}" for i in range(deeper)]
    for i, theirs in enumerate(projections):
        learned[f"couple.{i}.weight"] = state[f"{theirs}.weight"].float()
        learned[f"couple.{i}.bias"] = state[f"{theirs}.bias"].float()
    config = dict(n_ctx=ctx.shape[0], depth=len(texts) + 1)
    recorded = dict(prefix=state[p + "token_prefix"], suffix=state[p + "token_suffix"],
                    frozen=frozen(state))
    return config, learned, recorded

def from_ivlp(state):
    """IVLP's whole CustomCLIP: text prompts `prompt_learner.ctx` and each deeper text block's
    `VPT_shallow`; image prompts `image_encoder.VPT` (before ln_pre, as ours) and each deeper
    image block's `VPT_shallow`, or none (deep language prompting). Ours has one n and one depth
    for both towers."""
    text = [state["prompt_learner.ctx"].float()]
    text += deep(state, "text_encoder.transformer.resblocks.{}.VPT_shallow")
    n = text[0].shape[0]
    # its text: "{CTX_INIT} {class}." with the first n tokens learned, when n <= 4 (else "X X ...")
    config = dict(n_ctx=n, depth=len(text), keep_phrase=n <= 4)
    learned = {"text_prompts": torch.stack(text)}
    recorded = dict(prefix=state["prompt_learner.token_prefix"],
                    suffix=state["prompt_learner.token_suffix"], frozen=frozen(state))
    if "image_encoder.VPT" not in state:  # deep language prompting
        return {**config, "text_only": True}, learned, recorded
    image = [state["image_encoder.VPT"].float()]
    image += deep(state, "image_encoder.transformer.resblocks.{}.VPT_shallow")
    if (len(text), n) != (len(image), image[0].shape[0]):
        raise UserError(f"this IVLP model has {n} text prompts in {len(text)} blocks and "
                        f"{image[0].shape[0]} image prompts in {len(image)}: ivlp here has one "
                        "n_ctx and one depth for both towers, so it cannot hold it")
    learned["image_prompts"] = torch.stack(image)
    return config, learned, recorded

def from_vpt(state):
    """The MaPLe repository's deep vision prompting: `image_encoder.VPT` (n, W) and each deeper
    image block's `VPT_shallow`; the text is VPT_TEMPLATE on every dataset. Its first prompts join
    the patches before ln_pre, ours after: LayerNorm acts per token, so ours are theirs through
    ln_pre."""
    theirs = state["image_encoder.VPT"].float()  # (n, W)
    first = F.layer_norm(theirs, theirs.shape[-1:], state["image_encoder.ln_pre.weight"].float(),
                         state["image_encoder.ln_pre.bias"].float())
    prompts = [first] + deep(state, "image_encoder.transformer.resblocks.{}.VPT_shallow")
    config = dict(n_tokens=first.shape[0], deep=len(prompts) > 1, text_ctx=0,
                  fixed_template=VPT_TEMPLATE)
    recorded = dict(frozen=frozen(state), blocks=len(prompts))
    return config, {"visual_prompts.prompts": torch.stack(prompts)}, recorded

CONVERTERS = {  # format -> (Config fields, learned tensors in our names, what `check` compares)
    "CoOp": from_coop, "CoCoOp": from_coop, "MaPLe": from_maple, "IVLP": from_ivlp,
    "deep language prompting": from_ivlp, "deep vision prompting": from_vpt,
}

def prompt_rows(model):
    """Our model's prompt embeddings around its learned context: the start-of-text rows (C, 1, D)
    and the rows after the context (C, L-1-n, D), as the official token_prefix and token_suffix."""
    if hasattr(model, "prompt_learner"):  # coop.py
        return model.prompt_learner.prefix, model.prompt_learner.suffix
    if hasattr(model, "ctx"):  # maple.py
        n = model.ctx.shape[0]
    else:  # mudpt.py
        n = model.text_prompts.shape[1]
    return model.embedded[:, :1], model.embedded[:, 1 + n:]

def differs(theirs, ours):
    """Whether a tensor the file recorded (fp16 in most) differs from ours beyond fp16 rounding."""
    if theirs.shape != ours.shape:
        return True
    return (theirs.float() - ours.float().cpu()).abs().max() > 1e-3

def check(ckpt, model, backbone, task, where):
    """A UserError unless the model built here (`backbone`, `task`) is the one the authors' file
    was trained as: the same frozen CLIP, the same classes in the same order, the same prompt."""
    released = ckpt["released"]
    method = ckpt["method"]
    clip = model.clip
    weights = clip.state_dict()
    if bad := [k for k, v in released.get("frozen", {}).items() if differs(v, weights[k])]:
        raise UserError(f"{where} holds another CLIP than the {backbone} loaded here ({bad[0]} "
                        "differs): pass the weights it was trained with")
    blocks = 0  # the image transformer's: the files that prompt it are of ViTs
    if hasattr(clip.visual, "transformer"):
        blocks = len(clip.visual.transformer.resblocks)
    if released.get("blocks", 1) not in (1, blocks):
        raise UserError(f"{where} prompts {released['blocks']} image blocks; our {method} prompts "
                        f"the first block or all {blocks}, so it cannot hold it")
    if "prefix" not in released:
        return
    prefix, suffix = prompt_rows(model)
    if len(released["prefix"]) != len(prefix):
        raise UserError(f"{where} was trained on {len(released['prefix'])} classes; this task has "
                        f"{len(prefix)}: evaluate it on the dataset and --protocol it was trained "
                        "on")
    if differs(released["prefix"][:1], prefix[:1]):  # the start-of-text token: the backbone's
        raise UserError(f"{where} was trained with another backbone than {backbone} (its "
                        "start-of-text embedding differs): pass the backbone its folder names, "
                        "rn50_ep50_16shots -> --backbone RN50")
    rows = suffix.shape[1]  # ours are cut after the last end-of-text token; the rest is padding
    gap = released["suffix"][:, :rows].float() - suffix.float().cpu()  # (C, rows, D)
    if bad := (gap.abs().amax(dim=(1, 2)) > 1e-3).nonzero().flatten().tolist():
        raise UserError(f"{where}: the prompt of class {bad[0]} ({task.classnames[bad[0]]!r} here) "
                        f"differs from the one it was trained with, as do {len(bad) - 1} more: "
                        f"other class names, another class order, or another prompt text than "
                        f"{method}'s")
