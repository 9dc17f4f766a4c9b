"""TaskRes: a learned task residual added to CLIP's frozen zero-shot text classifier.

Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023,
https://arxiv.org/abs/2211.10277; official code: github.com/geekyutao/TaskRes. No prompt: the
zero-shot classifier (each class's text feature of the dataset's hand-crafted template; on ImageNet
the mean over 7 more templates) is kept as the frozen base t, and a residual x of the same shape,
starting at zero, is learned beside it. The classifier is normalise(t + alpha x), so training starts
exactly at zero-shot CLIP and alpha sets how far the residual can move it.

- Learned: `residual` (C, E), one row per class, zeros at the start.
- Injected where: on the text classifier, after both towers (no prompt, no token enters a tower).
- Frozen: all of CLIP; the base t (encoded once, at build; not normalised, as the official base).
- Loss: cross-entropy over the C classes (the paper's, and the official code's only term).
- Deviations:
  - Class names with "_" read as spaces (the official code tokenizes them as written).
  - The base is encoded in fp32 (the official code encodes it in fp16, its default precision: up to
    3.7e-3 from ours).
  - The "enhanced base" (`enhanced_base=FILE`): the official text projections, fitted offline by
    code that is not released, are read from its files; this repository cannot make them.
  - The official per-dataset settings are not automatic: its scripts use lr 2e-4 on ImageNet and
    alpha 1.0 on Flowers102 (pass --lr / --set alpha there; docs/reproducing.md's commands do),
    everything else is the default below. Its configs for other backbones (RN101, RN50x16, ViT-B/32,
    ViT-B/16; ImageNet only) use lr 2e-4, 200 epochs.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

IMAGENET_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                      "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                      "a photo of the small {}."]  # added on ImageNet
# ImageNet and its test sets: the official DG evaluation scores those with the base trained on
# ImageNet
IMAGENET = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

@dataclass
class Config:
    backbone: str = "RN50"              # the official scripts' backbone
    template: str = "a photo of a {}."  # train.py sets the dataset's (CoOp's hand-crafted prompt)
    # train.py sets the dataset's name: on IMAGENET the base adds IMAGENET_TEMPLATES
    dataset: str = ""
    alpha: float = 0.5                  # residual scale (the official scripts: 0.5; Flowers102 1.0)
    # "" = the regular base; else an official strong_base/<Dataset>/rn50_<K>shots/model.pth.tar:
    # its text projection replaces CLIP's to encode the base
    enhanced_base: str = ""
    # the official configs' Adam (train.py: betas 0.9, 0.999, weight decay 5e-4)
    optimizer: str = "adam"
    # 0: the official schedule by shots (SCHEDULE: 100 up to 4 shots, else 200)
    epochs: int = 0
    batch_size: int = 256
    lr: float = 0.002                   # the official scripts: 2e-3; ImageNet 2e-4
    warmup_epochs: int = 1              # at constant lr 1e-5, then cosine (train.py)

VARIANTS = {"taskres": dict()}  # --method name -> the Config changes that make it
ABOUT = {  # --method name -> what it is, for python train.py --list
    "taskres": "TaskRes (Yu et al., CVPR 2023): a learned residual on the zero-shot text "
               "classifier",
}
# epochs by shots when Config.epochs is 0; other shot counts: 200 (train.py)
SCHEDULE = {1: 100, 2: 100, 4: 100}

def read_projection(path):
    """The (D, E) text projection of an official enhanced-base file: its state_dict's "weight", an
    (E, D) linear layer's (a ValueError that says what the file should hold, otherwise)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        weight = checkpoint["state_dict"]["weight"]
        assert isinstance(weight, torch.Tensor) and weight.ndim == 2
    except FileNotFoundError:
        raise ValueError(f"enhanced_base={path}: no such file") from None
    except Exception:
        raise ValueError(f"enhanced_base={path} is not an official TaskRes enhanced base (a "
                         "checkpoint whose state_dict holds the (E, D) 'weight' of a text "
                         "projection)") from None
    return weight.t()

def encode_text(clip, tokens, projection):
    """(C, 77) tokens -> (C, E) CLIP text features, projected by `projection` (D, E): CLIP's own or
    an enhanced base's."""
    x = clip.embed_text(tokens) + clip.positional_embedding
    x = clip.transformer(x, clip_model.causal_mask(x.shape[1], x.device))
    return clip.ln_final(x[torch.arange(len(x)), tokens.argmax(-1)]) @ projection

class TaskRes(nn.Module):
    """CLIP's image features against normalise(base + alpha residual): logits (B, C)."""

    class_specific = True  # one residual row per training class

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        device = clip.token_embedding.weight.device
        templates = [cfg.template] + (IMAGENET_TEMPLATES if cfg.dataset in IMAGENET else [])
        projection = clip.text_projection  # (D, E)
        if cfg.enhanced_base:
            projection = read_projection(cfg.enhanced_base).to(device, projection.dtype)
            if projection.shape != clip.text_projection.shape:
                raise ValueError(f"enhanced_base={cfg.enhanced_base} projects "
                                 f"{tuple(projection.shape)}, {cfg.backbone} needs "
                                 f"{tuple(clip.text_projection.shape)}: another backbone's")
        base = []
        with torch.no_grad():
            for template in templates:
                tokens = clip_model.tokenize([template.format(c.replace("_", " "))
                                              for c in classnames]).to(device)
                base.append(encode_text(clip, tokens, projection))  # (C, E)
        # (C, E) t, not normalised
        self.register_buffer("base", torch.stack(base).mean(0), persistent=False)
        self.residual = nn.Parameter(torch.zeros_like(self.base))  # (C, E) x

    # the image tower is frozen: train.py may cache these (--cache-features)
    def frozen_features(self, images):
        return F.normalize(self.clip.encode_image(images), dim=-1)  # (B, E)

    def forward(self, images=None, features=None):  # features: frozen_features(images)
        image = self.frozen_features(images) if features is None else features
        # (C, E) t + alpha x
        classifier = F.normalize(self.base + self.cfg.alpha * self.residual, dim=-1)
        return self.clip.logit_scale.exp() * image @ classifier.t()

    def loss(self, logits, labels, epoch):
        """TaskRes's loss: the cross-entropy of the softmax over the C classes' logits."""
        # fp32 logits: an exact softmax under any autocast
        return F.cross_entropy(logits.float(), labels)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP: BatchNorm statistics stay as they were trained
        return self

def check_config(cfg):
    """ValueError for a Config no model can be built from
    (train.py calls it before loading CLIP)."""
    if cfg.optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer={cfg.optimizer!r}: use adam (the official) or sgd")

def build(clip, classnames, cfg):
    check_config(cfg)
    clip.requires_grad_(False)
    return TaskRes(clip, classnames, cfg)
