"""CLIP-Adapter: a small bottleneck MLP on CLIP's image feature, mixed back into it by a residual
ratio.

Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters", IJCV 2023,
https://arxiv.org/abs/2110.04544. Official code: github.com/gaopengcuhk/CLIP-Adapter
(clip_adapter.py).

No prompt: both towers run unchanged. The image feature f goes through a two-layer MLP that narrows
it by 4 (no biases, a ReLU after each layer), and the result is mixed with f itself,
ratio * adapter(f) + (1 - ratio) * f, before the usual cosine against the text features of the
dataset's hand-crafted template. The small ratio keeps most of CLIP's zero-shot knowledge; the
adapter learns what the few shots add.

- Learned: `adapter` (E -> E/4 -> E, no biases): 2 E^2 / 4 = 524,288 on RN50.
- Injected where: on the image tower's output, before the normalisation.
- Frozen: all of CLIP; the text features (encoded once, at build).
- Loss: cross-entropy over the C classes (the paper's, and the official code's only term).
- Deviations:
  - The adapter's width follows the backbone (the official code fixes 1024, RN50's).
  - The schedule: the official repository has no configs and says to run CoOp's; these are CoOp's
    RN50 settings.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

@dataclass
class Config:
    backbone: str = "RN50"              # the official code's (its adapter width is RN50's 1024)
    # train.py sets the dataset's (CoOp's hand-crafted prompt, ImageNet too)
    template: str = "a photo of a {}."
    # the adapter's bottleneck: E -> E / reduction -> E (the official code's 4)
    reduction: int = 4
    # residual ratio: ratio * adapter(f) + (1 - ratio) * f (the official code's)
    ratio: float = 0.2
    # 0: CoOp's schedule by shots, 50 (1 shot), 100 (2-4), 200 (8+)
    epochs: int = 0
    batch_size: int = 32
    lr: float = 0.002
    warmup_epochs: int = 1              # at constant lr 1e-5, then cosine (train.py)

VARIANTS = {"clip-adapter": dict()}  # --method name -> the Config changes that make it
ABOUT = {  # --method name -> what it is, for python train.py --list
    "clip-adapter": "CLIP-Adapter (Gao et al., IJCV 2023): a bottleneck MLP on the image feature, "
                    "ratio 0.2",
}

class CLIPAdapter(nn.Module):
    """CLIP with an adapted image feature: logits (B, C)."""

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        E, device = clip.text_projection.shape[1], clip.token_embedding.weight.device
        self.adapter = nn.Sequential(nn.Linear(E, E // cfg.reduction, bias=False), nn.ReLU(),
                                     nn.Linear(E // cfg.reduction, E, bias=False),
                                     nn.ReLU()).to(device)
        tokens = clip_model.tokenize([cfg.template.format(c.replace("_", " ")) for c in classnames])
        with torch.no_grad():
            text = F.normalize(clip.encode_text(tokens), dim=-1)  # (C, E)
        self.register_buffer("text", text, persistent=False)

    # the image tower is frozen: train.py may cache these (--cache-features)
    def frozen_features(self, images):
        # (B, E) f, not normalised: the adapter reads it as it is
        return self.clip.encode_image(images)

    def forward(self, images=None, features=None):  # features: frozen_features(images)
        f = self.frozen_features(images) if features is None else features
        x = self.cfg.ratio * self.adapter(f) + (1 - self.cfg.ratio) * f  # (B, E)
        return self.clip.logit_scale.exp() * F.normalize(x, dim=-1) @ self.text.t()

    def loss(self, logits, labels, epoch):
        """CLIP-Adapter's loss: the cross-entropy of the softmax over the C classes' logits."""
        # fp32 logits: an exact softmax under any autocast
        return F.cross_entropy(logits.float(), labels)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP: BatchNorm statistics stay as they were trained
        return self

def check_config(cfg):
    """ValueError for a Config no model can be built from
    (train.py calls it before loading CLIP)."""
    for name, ok, rule in [("reduction", cfg.reduction >= 1, "1 or more"),
                           ("ratio", 0 <= cfg.ratio <= 1, "in [0, 1]")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")

def build(clip, classnames, cfg):
    check_config(cfg)
    clip.requires_grad_(False)
    return CLIPAdapter(clip, classnames, cfg)
