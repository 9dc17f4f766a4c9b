"""CoOp and CoCoOp: learned context words in CLIP's text prompt, and zero-shot CLIP, their baseline.

Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022,
https://arxiv.org/abs/2109.01134
Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022,
https://arxiv.org/abs/2203.05557

Zero-shot CLIP scores an image against the text feature of a hand-written prompt per class,
"a photo of a {class}.". CoOp replaces the words before the class name by n_ctx vectors in the
token-embedding space, learned with cross-entropy on a few labelled images: shared by all classes
(unified) or one set per class (`csc`), with the class name at the end, in the middle or at the
front. CoCoOp adds a meta-net that turns each image's feature into a shift of the context vectors,
so every image gets its own prompts; it transfers better to classes unseen in training.

- Learned: `ctx` (n_ctx, D), or (C, n_ctx, D) with csc; CoCoOp adds `meta_net` E -> E/16 -> D.
- Injected where: the prompt's token embeddings, rows 1..n_ctx (next to the class name's rows).
- Frozen: all of CLIP.
- Loss: cross-entropy over the C classes (both papers); zero-shot CLIP learns nothing and is not
  trained.
- Deviations from the official code (github.com/KaiyangZhou/CoOp):
  - CoCoOp encodes all images x classes in one batched pass (the official code loops over the
    images).
  - An init phrase sets n_ctx to its token count (the official code counts words: the same for
    "a photo of a").
  - `csc` with an init phrase: one context per class, each starting as the phrase (the official
    code then ignores `csc` and learns one shared context).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

# CoOp's zero-shot ensemble (ZeroshotCLIP2): seven ImageNet templates picked by the CLIP authors
IMAGENET_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                      "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                      "a photo of the small {}."]

@dataclass
class Config:
    backbone: str = "RN50"             # CoOp's paper backbone; CoCoOp uses ViT-B/16
    # hand-crafted prompt; train.py sets the dataset's (CoOp's templates)
    template: str = "a photo of a {}."
    # zero-shot: average the template with CoOp's 7 ImageNet templates
    ensemble: bool = False
    n_ctx: int = 16                    # learned context tokens; 0 = nothing learned: zero-shot CLIP
    # e.g. "a photo of a" ("_" = space): ctx = its embeddings, n_ctx = its tokens
    ctx_init: str = ""
    csc: bool = False                  # class-specific context: one set of n_ctx vectors per class
    class_token_position: str = "end"  # end | middle | front
    conditional: bool = False          # CoCoOp: the meta-net shifts the context per image
    # CoCoOp: images x classes per text-encoder pass (bounds memory)
    max_prompts: int = 32768
    # activation checkpointing in the text tower for training passes of at least this many prompts
    # (ImageNet's 1,000 classes; exact); 0 = never
    checkpoint_prompts: int = 1000
    # 0: CoOp's schedule by shots, 50 (1 shot), 100 (2-4), 200 (8+)
    epochs: int = 0
    batch_size: int = 32
    lr: float = 0.002
    warmup_epochs: int = 1             # at constant lr 1e-5, then cosine (train.py)

VARIANTS = {  # --method name -> the Config changes that make it
    "zeroshot": dict(n_ctx=0),
    "coop": dict(),
    "cocoop": dict(conditional=True, n_ctx=4, ctx_init="a photo of a", backbone="ViT-B/16",
                   epochs=10, batch_size=1),
}
ABOUT = {  # --method name -> what it is, for python train.py --list
    "zeroshot": "zero-shot CLIP: the dataset's hand-crafted prompt, nothing learned "
                "(CoOp's baseline)",
    "coop": "CoOp (Zhou et al., IJCV 2022): 16 learned context words before the class name",
    "cocoop": "CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted per image by a small "
              "meta-net",
}

class PromptLearner(nn.Module):
    """The (C, L, D) prompt embeddings [SOT, ctx_1..ctx_n, class name, ".", EOT],
    cut after the last EOT."""

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        C, D = len(classnames), clip.ln_final.weight.shape[0]
        if cfg.ctx_init:
            # "_" is a space (official code)
            init = clip_model.tokenize(cfg.ctx_init.replace("_", " "))
            n_ctx = int(init.argmax()) - 1  # tokens between SOT and EOT
            ctx = clip.embed_text(init)[0, 1:1 + n_ctx].detach().clone()  # (n_ctx, D)
            ctx = ctx.repeat(C, 1, 1) if cfg.csc else ctx
        else:
            n_ctx = cfg.n_ctx
            shape = (C, n_ctx, D) if cfg.csc else (n_ctx, D)
            ctx = torch.randn(shape) * 0.02
        self.ctx = nn.Parameter(ctx)
        names = [name.replace("_", " ") for name in classnames]
        # (C, 77)
        tokens = clip_model.tokenize([" ".join(["X"] * n_ctx + [name]) + "." for name in names])
        self.register_buffer("eot", tokens.argmax(-1), persistent=False)  # (C,)
        L = int(self.eot.max()) + 1  # positions after the last EOT are never read (causal mask)
        with torch.no_grad():
            embedded = clip.embed_text(tokens[:, :L])  # (C, L, D)
        self.register_buffer("prefix", embedded[:, :1], persistent=False)  # SOT
        # name, ".", EOT, padding
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:], persistent=False)
        # middle/front: a fixed permutation of the "end" layout's rows, per class (names differ in
        # length)
        order = torch.arange(L).repeat(C, 1)
        for c, name in enumerate(names):
            n_name = int(clip_model.tokenize(name).argmax()) - 1  # the class name's tokens
            ctx_rows = list(range(1, 1 + n_ctx))
            name_rows = list(range(1 + n_ctx, 1 + n_ctx + n_name))
            if cfg.class_token_position == "front":
                rows = name_rows + ctx_rows
            elif cfg.class_token_position == "middle":  # the name between the context's two halves
                rows = ctx_rows[:n_ctx // 2] + name_rows + ctx_rows[n_ctx // 2:]
            else:
                rows = ctx_rows + name_rows
            order[c, 1:1 + len(rows)] = torch.tensor(rows)
        self.register_buffer("order", None if cfg.class_token_position == "end" else order,
                             persistent=False)

    def forward(self, shift=None):
        """shift (B, D) from CoCoOp's meta-net, or None -> prompts (C, L, D),
        or (B, C, L, D) with a shift."""
        C = self.prefix.shape[0]
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(C, -1, -1)  # (C, n_ctx, D)
        if shift is None:
            x = torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (C, L, D)
        else:
            B = shift.shape[0]
            # (B, C, n_ctx, D): each image shifts every class's context
            ctx = ctx + shift[:, None, None]
            prefix = self.prefix.expand(B, -1, -1, -1)  # (B, C, 1, D)
            suffix = self.suffix.expand(B, -1, -1, -1)
            x = torch.cat([prefix, ctx, suffix], dim=2)  # (B, C, L, D)
        if self.order is None:
            return x
        # class name moved to its position
        return x.gather(-2, self.order[..., None].expand(x.shape))

def parameter_versions(module):
    """Changes whenever a parameter of `module` is replaced, moved or changed in place (an optimiser
    step, load_state_dict): cached text features are reused only while it stays the same."""
    return [(p.data_ptr(), p._version) for p in module.parameters()]

class ZeroShotCLIP(nn.Module):
    """Fixed text features of the hand-crafted template(s); nothing is learned."""

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip = clip
        names = [name.replace("_", " ") for name in classnames]
        templates = [cfg.template] + (IMAGENET_TEMPLATES if cfg.ensemble else [])
        features = []
        with torch.no_grad():
            for template in templates:
                # (C, E)
                text = clip.encode_text(clip_model.tokenize([template.format(n) for n in names]))
                features.append(F.normalize(text, dim=-1))
        # (C, E): the ensemble's average, one template = itself
        mean = torch.stack(features).mean(0)
        self.register_buffer("template_features", F.normalize(mean, dim=-1), persistent=False)

    def text_features(self):
        """(C, E) normalised, encoded once at build."""
        return self.template_features

    def frozen_features(self, images):
        """(B, E) normalised image features; the image tower is frozen,
        so train.py may cache them."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def forward(self, images=None, features=None):
        image = self.frozen_features(images) if features is None else features  # (B, E)
        return self.clip.logit_scale.exp() * image @ self.text_features().t()  # (B, C)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP: BatchNorm statistics stay as they were trained
        return self

class CoOp(nn.Module):
    """CLIP with learned prompts; with cfg.conditional, CoCoOp's per-image prompts."""

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        self.class_specific = cfg.csc  # then its context cannot be used on other classes
        self.prompt_learner = PromptLearner(clip, classnames, cfg)
        E, D = clip.text_projection.shape[1], clip.ln_final.weight.shape[0]
        self.meta_net = None  # CoCoOp: image feature -> shift of the context, E -> E/16 -> D
        if cfg.conditional:
            self.meta_net = nn.Sequential(nn.Linear(E, E // 16), nn.ReLU(), nn.Linear(E // 16, D))
        self.cached = None  # (parameter_versions, (C, E) text features), reused while evaluating

    def encode_prompts(self, prompts):
        """(..., L, D) prompt embeddings -> (..., E) normalised text features."""
        eot = self.prompt_learner.eot.expand(prompts.shape[:-2])
        flat = prompts.flatten(0, -3)  # (P, L, D), P prompts
        # memory for compute, when the pass is large
        checkpoint = 0 < self.cfg.checkpoint_prompts <= len(flat)
        x = self.clip.encode_text_embeddings(flat, eot.flatten(), checkpoint)
        return F.normalize(x, dim=-1).view(*prompts.shape[:-2], -1)

    def text_features(self):
        """(C, E) normalised; without gradients in eval mode computed once,
        until a parameter changes."""
        if self.training or torch.is_grad_enabled():
            return self.encode_prompts(self.prompt_learner())
        key = parameter_versions(self)
        if self.cached is None or self.cached[0] != key:
            self.cached = key, self.encode_prompts(self.prompt_learner())
        return self.cached[1]

    def frozen_features(self, images):
        """(B, E) normalised image features; the image tower is frozen,
        so train.py may cache them."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def forward(self, images=None, features=None):
        """images (B, 3, R, R), or their frozen_features (B, E) -> logits (B, C)."""
        image = self.frozen_features(images) if features is None else features  # (B, E)
        scale = self.clip.logit_scale.exp()
        if self.meta_net is None:
            return scale * image @ self.text_features().t()  # (B, C)
        # CoCoOp: images x classes prompts, in one batched pass per chunk of images (the official
        # code loops over the images), as many images per pass as max_prompts allows
        per_pass = max(1, self.cfg.max_prompts // self.prompt_learner.prefix.shape[0])
        logits = []
        for chunk in image.split(per_pass):  # (b, E)
            shift = self.meta_net(chunk)  # (b, D)
            text = self.encode_prompts(self.prompt_learner(shift))  # (b, C, E)
            logits.append(scale * torch.einsum("be,bce->bc", chunk, text))
        return torch.cat(logits)  # (B, C)

    def loss(self, logits, labels, epoch):
        """CoOp's and CoCoOp's loss: the cross-entropy of the softmax over the C classes' logits."""
        # fp32 logits: an exact softmax under any autocast
        return F.cross_entropy(logits.float(), labels)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP: BatchNorm statistics stay as they were trained
        self.cached = None
        return self

def check_config(cfg):
    """ValueError for a Config no model can be built from
    (train.py calls it before loading CLIP)."""
    if cfg.class_token_position not in ("end", "middle", "front"):
        raise ValueError(f"class_token_position={cfg.class_token_position!r}: "
                         "use end, middle or front")
    for name, ok, rule in [("n_ctx", cfg.n_ctx >= 0, "0 (zero-shot) or more"),
                           ("max_prompts", cfg.max_prompts >= 1, "1 or more"),
                           ("checkpoint_prompts", cfg.checkpoint_prompts >= 0,
                            "0 (never) or more")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")

def build(clip, classnames, cfg):
    check_config(cfg)
    clip.requires_grad_(False)
    if cfg.n_ctx == 0 and not cfg.ctx_init:
        return ZeroShotCLIP(clip, classnames, cfg)
    return CoOp(clip, classnames, cfg)
