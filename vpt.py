"""VPT on CLIP: learned visual prompt tokens in the image tower (shallow or deep), optionally with
CoOp text context.

Jia et al., "Visual Prompt Tuning", ECCV 2022, https://arxiv.org/abs/2203.12119, applied to CLIP as
the baselines of the CAVPT paper (Xing et al., https://arxiv.org/abs/2208.08340; official code
github.com/fanrena/DPT, `trainers/VPT.py` and `VLP.py`): VPT-CLIP-Shallow, VPT-CLIP-Deep and
VLP-CLIP-Deep.

The image tower's token sequence gets n extra learned vectors. Shallow VPT inserts them once, before
the first block, and they travel through the whole ViT. Deep VPT gives every block its own n
vectors, which replace the previous block's prompt outputs. The class token attends to the prompts
in every block, so they steer the image feature without touching a weight of CLIP. The text side is
the hand-crafted prompt (frozen), or for VLP a CoOp context of 16 learned word vectors, trained at
CoOp's own learning rate.

- Learned: `prompts` (layers, n, W), layers = 1 (shallow) or every block (deep); VLP adds `ctx`
  (16, D).
- Injected where: after the patch tokens (as the official code; see `VisualPrompts.forward`); VLP's
  context at the rows of "X X ... X" in "X X ... X {class}.".
- Frozen: all of CLIP.
- Loss: cross-entropy over the C classes; with guidance_epochs, the official VLP code's guidance
  first (`loss`).
- Deviations (details in `Config`): 200 epochs, as the paper (official VPT configs: 100); a 10-epoch
  visual warm-up everywhere (official VLP: 1 on ImageNet); the official VLP code's guidance loss is
  off.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

@dataclass
class Config:
    backbone: str = "ViT-B/32"          # the CAVPT paper's backbone for every experiment
    template: str = "a photo of a {}."  # hand-crafted text prompt; train.py sets the dataset's
    # "" = `template`; else this text on every dataset, as the MaPLe repository's VPT ("a photo of
    # a {}.")
    fixed_template: str = ""
    n_tokens: int = 10                  # visual prompt tokens (per block when deep)
    # fresh prompts before every block; False = shallow (input only)
    deep: bool = True
    # VLP: learned CoOp context tokens in the text prompt (0 = template)
    text_ctx: int = 0
    # official VLP code only (not in the paper; its script: 30), see loss
    guidance_epochs: int = 0
    epochs: int = 200                   # the paper (official VPT configs: 100)
    batch_size: int = 32
    # visual prompts (official vit_b32_deep.yaml; shallow: 0.001)
    lr: float = 0.01
    # visual prompts: lr 1e-5 for 10 epochs, every dataset (official VLP: 1 on ImageNet)
    warmup_epochs: int = 10
    text_lr: float = 0.002              # VLP text context: CoOp's lr ...
    text_warmup_epochs: int = 1         # ... and CoOp's warm-up

# lr: official configs
VARIANTS = {"vpt-shallow": dict(deep=False, lr=0.001), "vpt": dict(), "vlp": dict(text_ctx=16)}
ABOUT = {  # --method name -> what it is, for python train.py --list
    "vpt-shallow": "VPT-CLIP-Shallow: learned visual prompt tokens at the image tower's input",
    "vpt": "VPT-CLIP-Deep: fresh learned visual prompt tokens before every image block",
    "vlp": "VLP-CLIP-Deep: deep visual prompts plus CoOp's text context",
}

class VisualPrompts(nn.Module):
    """Prompt tokens in the ViT: (layers, n, W), layers = 1 for shallow, every block for deep."""

    def __init__(self, clip, cfg):
        super().__init__()
        W = clip.visual.conv1.out_channels
        layers = len(clip.visual.transformer.resblocks) if cfg.deep else 1
        self.prompts = nn.Parameter(torch.randn(layers, cfg.n_tokens, W) * 0.02)  # (layers, n, W)

    def forward(self, visual, images):
        # the ViT has no attention mask and the positions are added before the prompts join, so
        # appending them after the patches gives the same numbers as inserting them after the class
        # token (tested)
        x = visual.embed(images)  # (B, 1+N, W): class token, patches, positions, ln_pre
        n = self.prompts.shape[1]
        for i, block in enumerate(visual.transformer.resblocks):
            if i < len(self.prompts):  # deep: every block; shallow: block 0 only, then they stay
                if i > 0:  # drop the previous block's prompt outputs
                    x = x[:, :x.shape[1] - n]  # (B, 1+N, W)
                prompts = self.prompts[i].expand(len(x), -1, -1)  # (B, n, W)
                x = torch.cat([x, prompts], dim=1)  # (B, 1+N+n, W)
            x = block(x)
        return visual.head(x)  # (B, E): the class token

class TextContext(nn.Module):
    """CoOp's unified context: "X X ... X {class}." with the X rows learned, N(0, 0.02) at init."""

    def __init__(self, clip, classnames, n_ctx):
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(n_ctx, clip.ln_final.weight.shape[0]) * 0.02)  # (n, D)
        tokens = clip_model.tokenize([" ".join(["X"] * n_ctx + [c.replace("_", " ")]) + "."
                                      for c in classnames])
        self.register_buffer("eot", tokens.argmax(-1), persistent=False)
        with torch.no_grad():
            # cut after the last EOT
            embedded = clip.embed_text(tokens[:, :int(self.eot.max()) + 1])
        self.register_buffer("prefix", embedded[:, :1], persistent=False)  # SOT
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:], persistent=False)  # class, ".", EOT

    def forward(self, clip):
        """(C, E) text features, before normalisation."""
        # (C, n, D): every class reads the same context
        ctx = self.ctx.expand(len(self.prefix), -1, -1)
        prompts = torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (C, L, D)
        return clip.encode_text_embeddings(prompts, self.eot)

def parameter_versions(module):
    """Changes whenever a parameter of `module` is replaced, moved or changed in place (an optimiser
    step, load_state_dict): cached text features are reused only while it stays the same."""
    return [(p.data_ptr(), p._version) for p in module.parameters()]

class VPTCLIP(nn.Module):
    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        self.visual_prompts = VisualPrompts(clip, cfg)
        self.text_context = TextContext(clip, classnames, cfg.text_ctx) if cfg.text_ctx else None
        text = cfg.fixed_template or cfg.template
        tokens = clip_model.tokenize([text.format(c.replace("_", " ")) for c in classnames])
        with torch.no_grad():  # the hand-crafted side is frozen: its features are computed once
            template = F.normalize(clip.encode_text(tokens), dim=-1)  # (C, E)
        self.register_buffer("template_features", template, persistent=False)
        # (parameter_versions, VLP's (C, E) text features), reused while evaluating
        self.cached = None
        self.guidance = None  # kept by a training forward for loss()

    def text_features(self):
        """(C, E) normalised; VLP's without gradients in eval mode computed once,
        until a parameter changes."""
        if self.text_context is None:
            return self.template_features
        if self.training or torch.is_grad_enabled():
            return F.normalize(self.text_context(self.clip), dim=-1)
        key = parameter_versions(self)
        if self.cached is None or self.cached[0] != key:
            self.cached = key, F.normalize(self.text_context(self.clip), dim=-1)
        return self.cached[1]

    def forward(self, images):
        image = F.normalize(self.visual_prompts(self.clip.visual, images), dim=-1)  # (B, E)
        text = self.text_features()  # (C, E)
        logits = self.clip.logit_scale.exp() * image @ text.t()  # (B, C)
        if self.training and self.cfg.guidance_epochs:  # for loss()
            self.guidance = images, image, text
        return logits

    def loss(self, logits, labels, epoch):
        """CE(logits); in the first guidance_epochs the official VLP code's guidance, each side
        against frozen CLIP's:
        CE(frozen image, learned text) + CE(prompted image, template text) + 0.1 CE(logits)."""
        # fp32 logits: exact softmax under any autocast
        loss = F.cross_entropy(logits.float(), labels)
        if epoch >= self.cfg.guidance_epochs:
            return loss
        images, image, text = self.guidance
        with torch.no_grad():  # frozen CLIP's own image feature: the learned text must still fit it
            zeroshot = F.normalize(self.clip.encode_image(images), dim=-1)  # (B, E)
        scale = self.clip.logit_scale.exp()
        to_learned_text = F.cross_entropy((scale * zeroshot @ text.t()).float(), labels)
        to_template = F.cross_entropy((scale * image @ self.template_features.t()).float(), labels)
        return to_learned_text + to_template + 0.1 * loss

    def param_groups(self, cfg):
        groups = [{"params": [self.visual_prompts.prompts], "lr": cfg.lr,
                   "warmup_epochs": cfg.warmup_epochs}]
        if self.text_context is not None:
            groups.append({"params": [self.text_context.ctx], "lr": cfg.text_lr,
                           "warmup_epochs": cfg.text_warmup_epochs})
        return groups

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()
        self.cached = None
        return self

def check_config(cfg):
    """ValueError for a Config no model can be built from
    (train.py calls it before loading CLIP)."""
    for name, ok, rule in [("n_tokens", cfg.n_tokens >= 0, "0 (no visual prompts) or more"),
                           ("text_ctx", cfg.text_ctx >= 0, "0 (the template) or more")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")
    if cfg.fixed_template and cfg.fixed_template.count("{}") != 1:
        raise ValueError(f"fixed_template={cfg.fixed_template!r}: it needs one {{}} for the class "
                         "name")

def build(clip, classnames, cfg):
    check_config(cfg)
    if not isinstance(clip.visual, clip_model.VisionTransformer):
        raise ValueError("visual prompts need a transformer image tower: use a ViT backbone "
                         "(ViT-B/32, ViT-B/16, ViT-L/14, tiny)")
    clip.requires_grad_(False)
    return VPTCLIP(clip, classnames, cfg)
