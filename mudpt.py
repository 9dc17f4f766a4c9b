"""MuDPT: deep prompts in both CLIP towers, fused across the two modalities by an Injection Model.

Miao et al., "MuDPT: Multi-modal Deep-symphysis Prompt Tuning for Large Pre-trained Vision-Language
Models", ICME 2023, https://arxiv.org/abs/2306.11400. Official code: github.com/YzM1a0/MuDPT.

Prompting one tower moves its features away from the other's, and CLIP was trained to keep the two
aligned. MuDPT prompts both, deeply: the first `depth` blocks of each tower get n learned tokens (in
the text, at the rows of "a photo of a" before the class name; in the image, next to the patches).
Before every block the Injection Model adds to each modality's prompts a linear projection of the
other's ("deep-symphysis"), so the two sets are learned as one system. With the Injection Model off
this is IVLP, the baseline MuDPT improves on (with `keep_phrase`, the MaPLe repository's IVLP, whose
text keeps the init phrase's words after the learned ones, as maple.py's does; with `text_only`,
its deep language prompting).

- Learned: text prompts (depth, n, D), image prompts (depth, n, W), the Injection Model's linear
  maps.
- Injected where: text rows 1..n before blocks 0..depth-1; image prompts appended after the patches
  before block 0, replacing the previous block's prompt outputs before blocks 1..depth-1.
- Frozen: all of CLIP.
- Loss: cross-entropy over the C classes (the paper's, and the official code's only term).
- Deviations (the paper leaves the Injection Model open; the official code, which made its numbers,
  decides):
  - `injection="shared"` is the official code's; `per_layer` is ours, another reading of the paper.
  - The image -> text maps end in the text width D (official: E; equal in every OpenAI ViT).
  - depth 9, the official script's (the paper's text: 12).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

@dataclass
class Config:
    backbone: str = "ViT-B/16"     # the paper's backbone
    n_ctx: int = 4                 # prompt tokens per block, both towers (the official N_CTX)
    # prompted blocks (official script; the paper's text: 12), at most all
    depth: int = 9
    # ("_" = space) first text prompts start as its embeddings if its tokens = n
    ctx_init: str = "a photo of a"
    # shared (official code) | per_layer (a pair of maps per block) | off (IVLP)
    injection: str = "shared"
    # the text keeps ctx_init's words after its first n_ctx tokens, fixed: "a photo" learned, "of a"
    # kept (the MaPLe repository's IVLP; needs n_ctx <= the phrase's tokens)
    keep_phrase: bool = False
    # text prompts alone, CLIP's image tower unprompted (the MaPLe repository's deep language
    # prompting; needs injection=off)
    text_only: bool = False
    epochs: int = 10
    batch_size: int = 4
    lr: float = 0.0025
    warmup_epochs: int = 1         # at constant 1e-5, then cosine

VARIANTS = {"mudpt": dict(), "ivlp": dict(injection="off")}
ABOUT = {  # --method name -> what it is, for python train.py --list
    "mudpt": "MuDPT (Miao et al., ICME 2023): deep prompts in both towers fused by an Injection "
             "Model",
    "ivlp": "IVLP: independent deep text and image prompts (MuDPT's baseline)",
}

class InjectionModel(nn.Module):
    """Fuses the two towers' prompts: image_i + A(text_i) and text_i + B(image_i) for blocks i >= 1.
    shared (the official code): one A and one B for all those blocks, and block 0's image prompts
    also get a projection of block 0's text prompts. per_layer (ours): a pair per block, no fusion
    at block 0, 5x the parameters at depth 9."""

    def __init__(self, D, W, depth, per_layer):
        super().__init__()
        self.per_layer = per_layer
        maps = depth - 1 if per_layer else 1
        self.text_to_image = nn.ModuleList(nn.Linear(D, W) for _ in range(maps))  # A
        # B; into D (official code: E)
        self.image_to_text = nn.ModuleList(nn.Linear(W, D) for _ in range(maps))
        # the official code also feeds block-0 text into image
        self.first = None if per_layer else nn.Linear(D, W)

    def forward(self, text, image):
        """text (depth, n, D), image (depth, n, W) -> fused prompts of the same shapes."""
        if self.per_layer:  # block i's own pair of maps, i = 1..depth-1 (none when depth is 1)
            fused_text = [text[0]] + [t + B(v)
                                      for B, t, v in zip(self.image_to_text, text[1:], image[1:])]
            fused_image = [image[0]] + [v + A(t)
                                        for A, t, v in zip(self.text_to_image, text[1:], image[1:])]
            return torch.stack(fused_text), torch.stack(fused_image)
        # (depth-1, n, W): one map for every deep block at once
        to_image = self.text_to_image[0](text[1:])
        to_text = self.image_to_text[0](image[1:])  # (depth-1, n, D)
        # (1, n, W): block 0's image prompts get block 0's text too
        image0 = image[:1] + self.first(text[:1])
        # (depth, n, D): block 0's text stays as it is
        fused_text = torch.cat([text[:1], text[1:] + to_text])
        fused_image = torch.cat([image0, image[1:] + to_image])  # (depth, n, W)
        return fused_text, fused_image

def parameter_versions(module):
    """Changes whenever a parameter of `module` is replaced, moved or changed in place (an optimiser
    step, load_state_dict): cached text features are reused only while it stays the same."""
    return [(p.data_ptr(), p._version) for p in module.parameters()]

class MuDPT(nn.Module):
    def __init__(self, clip, classnames, cfg):
        super().__init__()
        blocks = min(len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
        self.clip = clip
        n = cfg.n_ctx
        depth = min(cfg.depth, blocks)  # a small model has fewer blocks
        D, W = clip.ln_final.weight.shape[0], clip.visual.conv1.out_channels
        device = clip.token_embedding.weight.device
        text = torch.randn(depth, n, D, device=device) * 0.02
        phrase = cfg.ctx_init.replace("_", " ")
        init = clip_model.tokenize(phrase)
        words = int(init.argmax()) - 1  # the phrase's tokens
        if phrase and (words == n or cfg.keep_phrase):  # the first n of them
            text[0] = clip.embed_text(init)[0, 1:1 + n].detach()
        self.text_prompts = nn.Parameter(text)  # (depth, n, D)
        self.image_prompts = None  # text_only: none
        if not cfg.text_only:
            # (depth, n, W)
            self.image_prompts = nn.Parameter(torch.randn(depth, n, W, device=device) * 0.02)
        self.injection = None
        if cfg.injection != "off":
            self.injection = InjectionModel(D, W, depth, per_layer=cfg.injection == "per_layer")
        start = phrase if cfg.keep_phrase else " ".join(["X"] * n)  # its first n rows are learned
        tokens = clip_model.tokenize([f"{start} {c.replace('_', ' ')}." for c in classnames])
        self.register_buffer("eot", tokens.argmax(-1), persistent=False)  # (C,): never moves
        with torch.no_grad():
            self.register_buffer("embedded", clip.embed_text(tokens[:, :int(self.eot.max()) + 1]),
                                 persistent=False)
        # (parameter_versions, (C, E) text features), reused while evaluating: they do not depend
        # on the image
        self.cached = None

    def prompts(self):
        if self.injection is None:
            return self.text_prompts, self.image_prompts
        return self.injection(self.text_prompts, self.image_prompts)

    def encode_text(self, prompts):
        """Deep text prompts (depth, n, D) -> (C, E): rows 1..n replaced before each of the
        first depth blocks."""
        x = self.embedded  # (C, L, D), cut after the last EOT
        n, L = prompts.shape[1], x.shape[1]
        # input prompts
        x = torch.cat([x[:, :1], prompts[0].expand(len(x), -1, -1), x[:, 1 + n:]], dim=1)
        # positions for the input only, as CLIP (and the official code)
        x = x + self.clip.positional_embedding[:L]
        mask = clip_model.causal_mask(L, x.device)
        for i, block in enumerate(self.clip.transformer.resblocks):
            if 0 < i < len(prompts):  # overwrite the previous block's outputs at the prompt rows
                x = torch.cat([x[:, :1], prompts[i].expand(len(x), -1, -1), x[:, 1 + n:]], dim=1)
            x = block(x, mask)
        return self.clip.text_head(x, self.eot)

    def encode_image(self, images, prompts):
        """Deep image prompts (depth, n, W) -> (B, E): appended before block 0, replaced before
        blocks < depth."""
        visual = self.clip.visual
        if prompts is None:  # text_only: CLIP's own image feature
            return visual(images)
        n = prompts.shape[1]
        x = visual.embed(images)  # (B, 1+N, W)
        for i, block in enumerate(visual.transformer.resblocks):
            if i == 0:  # appended; the official code adds them before ln_pre, like the patches
                # (B, 1+N+n, W)
                x = torch.cat([x, visual.ln_pre(prompts[0]).expand(len(x), -1, -1)], dim=1)
            elif i < len(prompts):
                # the previous block's prompt outputs dropped, this block's appended
                x = torch.cat([x[:, :-n], prompts[i].expand(len(x), -1, -1)], dim=1)
            x = block(x)  # (B, 1+N+n, W)
        return visual.head(x)

    def text_features(self, prompts):
        """Deep text prompts (depth, n, D) -> (C, E) normalised; without gradients in eval mode
        computed once, until a parameter changes (they do not depend on the image)."""
        if self.training or torch.is_grad_enabled():
            return F.normalize(self.encode_text(prompts), dim=-1)
        key = parameter_versions(self)
        if self.cached is None or self.cached[0] != key:
            self.cached = key, F.normalize(self.encode_text(prompts), dim=-1)
        return self.cached[1]

    def forward(self, images):
        text_prompts, image_prompts = self.prompts()
        image = F.normalize(self.encode_image(images, image_prompts), dim=-1)  # (B, E)
        text = self.text_features(text_prompts)  # (C, E)
        return self.clip.logit_scale.exp() * image @ text.t()  # (B, C)

    def loss(self, logits, labels, epoch):
        """MuDPT's loss: the cross-entropy of the softmax over the C classes' logits."""
        # fp32 logits: an exact softmax under any autocast
        return F.cross_entropy(logits.float(), labels)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP
        self.cached = None
        return self

def check_config(cfg):
    """ValueError for a Config no model can be built from
    (train.py calls it before loading CLIP)."""
    if cfg.injection not in ("shared", "per_layer", "off"):
        raise ValueError(f"injection={cfg.injection!r}: use shared, per_layer or off")
    for name, ok, rule in [("n_ctx", cfg.n_ctx >= 1, "1 or more"),
                           ("depth", cfg.depth >= 1, "1 or more")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")
    phrase = cfg.ctx_init.replace("_", " ")
    words = int(clip_model.tokenize(phrase).argmax()) - 1 if phrase else 0
    if cfg.text_only and cfg.injection != "off":
        raise ValueError(f"text_only=true leaves no image prompts for injection={cfg.injection}: "
                         "use injection=off (--method ivlp)")
    if cfg.keep_phrase and words < cfg.n_ctx:
        raise ValueError(f"keep_phrase=true learns the first n_ctx={cfg.n_ctx} tokens of ctx_init="
                         f"{cfg.ctx_init!r}, which has {words}: use a longer phrase or a smaller "
                         "n_ctx")

def build(clip, classnames, cfg):
    check_config(cfg)
    if not isinstance(clip.visual, clip_model.VisionTransformer):
        raise ValueError("MuDPT prompts the image transformer: use a ViT backbone (ViT-B/16, "
                         "ViT-B/32, ViT-L/14, tiny)")
    clip.requires_grad_(False)
    return MuDPT(clip, classnames, cfg)
