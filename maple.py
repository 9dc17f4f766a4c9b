"""MaPLe: deep language prompts, each coupled into the image tower by a learned linear map.

Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023, https://arxiv.org/abs/2210.03117.
Official code: github.com/muzairkhattak/multimodal-prompt-learning (trainers/maple.py).

Prompting one tower alone leaves the other unaware of it. MaPLe learns prompts in the text tower
only, in the first `depth` blocks, and derives the image tower's prompts from them: block i's image
prompts are a linear "coupling function" `couple[i]` (the paper's F_i) of block i's text prompts, so
the two towers are prompted by one set of parameters. The first text prompts start as "a photo"
inside "a photo of a {class}.", so training starts at zero-shot CLIP's text (the image prompts,
couple[0] of them, are new tokens from the start).

- Learned: text prompts (depth, n, D): block 0's `ctx` and the deeper `deep_text`; the coupling
  functions `couple` (depth linear maps D -> W; couple[1:] identical at the start, as the official
  clones).
- Injected where: text rows 1..n (block 0: with positions; deeper: replacing the previous block's
  outputs); image prompts appended after the patches (block 0: through ln_pre, no positions),
  replaced before blocks 1..depth-1.
- Frozen: all of CLIP.
- Loss: cross-entropy over the C classes (the paper's, and the official code's only term).
- Deviations:
  - Learned parameters stay fp32 under autocast (the official fp16 run keeps ctx and couple[0] in
    fp16).
  - Injected prompts keep the run's precision (the official code rounds every injected prompt to
    fp16, even in an fp32 run, and cannot run its fp32 setting as written).
  - A ctx_init phrase with fewer tokens than n_ctx is refused (the official code starts the extra
    rows at the EOT and padding tokens' embeddings).
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

@dataclass
class Config:
    backbone: str = "ViT-B/16"      # the paper's backbone
    n_ctx: int = 2                  # prompt tokens per block, both towers
    depth: int = 9                  # prompted blocks 0..depth-1 (1 = the input only), at most all
    # ("_" = space) the text; its first n_ctx tokens are learned (needs n_ctx <= 4)
    ctx_init: str = "a photo of a"
    epochs: int = 5
    batch_size: int = 4
    lr: float = 0.0035
    warmup_epochs: int = 1          # at constant lr 1e-5, then cosine (train.py)

VARIANTS = {"maple": dict()}  # --method name -> the Config changes that make it
ABOUT = {  # --method name -> what it is, for python train.py --list
    "maple": "MaPLe (Khattak et al., CVPR 2023): deep text prompts coupled into the image tower by "
             "linear maps",
}

def parameter_versions(module):
    """Changes whenever a parameter of `module` is replaced, moved or changed in place (an optimiser
    step, load_state_dict): cached text features are reused only while it stays the same."""
    return [(p.data_ptr(), p._version) for p in module.parameters()]

class MaPLe(nn.Module):
    def __init__(self, clip, classnames, cfg):
        super().__init__()
        blocks = min(len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
        self.clip, n = clip, cfg.n_ctx
        depth = min(cfg.depth, blocks)  # a small model has fewer blocks
        D, W = clip.ln_final.weight.shape[0], clip.visual.conv1.out_channels
        device = clip.token_embedding.weight.device
        phrase = cfg.ctx_init.replace("_", " ")
        if phrase and n <= 4:  # the official rule: an init phrase for short contexts only
            init = clip_model.tokenize(phrase)
            ctx = clip.embed_text(init)[0, 1:1 + n].detach().clone()  # the phrase's first n tokens
        else:  # random, and "X" placeholders in the text
            ctx = torch.randn(n, D, device=device) * 0.02
            phrase = " ".join(["X"] * n)
        self.ctx = nn.Parameter(ctx)  # (n, D) block 0's text prompts
        first = nn.Linear(D, W, device=device)  # couple[0]: block 0's image prompts from ctx
        # blocks 1..depth-1
        self.deep_text = nn.Parameter(torch.randn(depth - 1, n, D, device=device) * 0.02)
        deep = nn.Linear(D, W, device=device)  # couple[1:]: copies of one map (the official clones)
        self.couple = nn.ModuleList([first] + [copy.deepcopy(deep) for _ in range(depth - 1)])
        # (C, 77)
        tokens = clip_model.tokenize([f"{phrase} {c.replace('_', ' ')}." for c in classnames])
        self.register_buffer("eot", tokens.argmax(-1), persistent=False)  # (C,)
        with torch.no_grad():
            self.register_buffer("embedded", clip.embed_text(tokens[:, :int(self.eot.max()) + 1]),
                                 persistent=False)
        # (parameter_versions, (C, E) text features), reused while evaluating: they do not depend
        # on the image
        self.cached = None

    def prompts(self):
        """-> text prompts (depth, n, D) and the image prompts coupled from them (depth, n, W)."""
        text = torch.cat([self.ctx[None], self.deep_text])
        # (depth, n, W)
        image = torch.stack([coupling(t) for coupling, t in zip(self.couple, text)])
        return text, image

    def encode_text(self, prompts):
        """Text prompts (depth, n, D) -> (C, E): rows 1..n replaced before each of the
        first depth blocks."""
        x = self.embedded  # (C, L, D), cut after the last EOT
        n, L = prompts.shape[1], x.shape[1]
        # block 0's prompts
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
        """Image prompts (depth, n, W) -> (B, E): appended before block 0, replaced before
        blocks < depth."""
        visual = self.clip.visual
        n = prompts.shape[1]
        x = visual.embed(images)  # (B, 1+N, W)
        for i, block in enumerate(visual.transformer.resblocks):
            if i == 0:
                # appended after the positions were added, then through ln_pre with the patches
                # (B, 1+N+n, W)
                x = torch.cat([x, visual.ln_pre(prompts[0]).expand(len(x), -1, -1)], dim=1)
            elif i < len(prompts):
                # the previous block's prompt outputs dropped, this block's appended
                x = torch.cat([x[:, :-n], prompts[i].expand(len(x), -1, -1)], dim=1)
            x = block(x)  # (B, 1+N+n, W)
        return visual.head(x)

    def text_features(self, prompts):
        """Text prompts (depth, n, D) -> (C, E) normalised; without gradients in eval mode computed
        once, until a parameter changes (they do not depend on the image)."""
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
        """MaPLe's loss: the cross-entropy of the softmax over the C classes' logits."""
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
    for name, ok, rule in [("n_ctx", cfg.n_ctx >= 1, "1 or more"),
                           ("depth", cfg.depth >= 1, "1 or more")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")
    phrase = cfg.ctx_init.replace("_", " ")
    words = int(clip_model.tokenize(phrase).argmax()) - 1 if phrase else 0
    if phrase and cfg.n_ctx <= 4 and words < cfg.n_ctx:
        raise ValueError(f"ctx_init={cfg.ctx_init!r} has {words} tokens, fewer than "
                         f"n_ctx={cfg.n_ctx}: use a longer phrase or ctx_init=\"\" (random)")

def build(clip, classnames, cfg):
    check_config(cfg)
    if not isinstance(clip.visual, clip_model.VisionTransformer):
        raise ValueError("MaPLe prompts the image transformer: use a ViT backbone (ViT-B/16, "
                         "ViT-B/32, ViT-L/14, tiny)")
    clip.requires_grad_(False)
    return MaPLe(clip, classnames, cfg)
