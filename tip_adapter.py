"""Tip-Adapter and Tip-Adapter-F: a cache of the few-shot images' features, read like attention
beside zero-shot CLIP.

Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification", ECCV 2022,
https://arxiv.org/abs/2207.09519. Official code: github.com/gaopengcuhk/Tip-Adapter (main.py,
utils.py, configs/).

No prompt and, for Tip-Adapter, no training: the K training images of every class are encoded
(averaged over 10 augmented passes) into cache keys, with their one-hot labels as values. An image's
feature f scores each key by exp(-beta (1 - cos)), and those affinities, times the values, vote for
classes; alpha weighs the vote against zero-shot CLIP's logits. alpha and beta are searched on the
validation split. Tip-Adapter-F learns the keys (starting from the cache) for 20 epochs with AdamW,
then searches alpha and beta again.

- Learned: Tip-Adapter nothing (fitted: `keys` (K C, E), `values` (K C, C), `alpha`, `beta`);
  Tip-Adapter-F the keys, K C E parameters (32,768 for 4 shots x 8 classes on RN50).
- Injected where: after both towers, beside the zero-shot logits.
- Frozen: all of CLIP; the zero-shot classifier (encoded once, at build).
- Loss: Tip-Adapter-F's cross-entropy over the C classes (the paper's, and the official code's only
  term); Tip-Adapter has none (fitted, not trained).
- Deviations:
  - The cache's augmented passes are this repository's training augmentation (CoOp's crop scale
    0.08-1; the official: 0.5-1), view v drawn as epoch v's.
  - Searched on the validation split for every dataset (the official code searches ImageNet on its
    test split), and Tip-Adapter-F keeps its last epoch (the official keeps the epoch best on the
    test split).
  - Tip-Adapter-F's cosine schedule steps once per epoch, as every method here (the official: per
    iteration).
  - Logits scaled by CLIP's logit scale (the official: 100, the same for OpenAI's weights).
  - The per-dataset search ranges and initial alpha are read from the dataset's name (SETTINGS); the
    official 100 epochs on EuroSAT are not (pass --epochs 100 there; docs/reproducing.md's commands
    do).
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

# ImageNet's classifier
IMAGENET_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                      "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                      "a photo of the small {}."]
# ImageNet and its test sets
IMAGENET = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

class Setting(NamedTuple):
    """One dataset's values in the official configs/<dataset>.yaml."""
    init_alpha: float  # the vote's weight before the search (init_alpha)
    beta_max: float    # the search's largest beta (search_scale[0])
    alpha_max: float   # the search's largest alpha (search_scale[1])

SETTINGS = {  # dataset -> its official setting; another dataset gets ImageNet's
    "ImageNet": Setting(init_alpha=1.17, beta_max=7, alpha_max=3),
    "OxfordPets": Setting(init_alpha=1.17, beta_max=7, alpha_max=3),
    "UCF101": Setting(init_alpha=3, beta_max=7, alpha_max=3),
    "Caltech101": Setting(init_alpha=3, beta_max=12, alpha_max=5),
    "DescribableTextures": Setting(init_alpha=2, beta_max=13, alpha_max=13),
    "EuroSAT": Setting(init_alpha=2, beta_max=12, alpha_max=10),
    "SUN397": Setting(init_alpha=1.17, beta_max=12, alpha_max=10),
    "FGVCAircraft": Setting(init_alpha=5, beta_max=30, alpha_max=30),
    "Food101": Setting(init_alpha=1.17, beta_max=10, alpha_max=10),
    "OxfordFlowers": Setting(init_alpha=10, beta_max=50, alpha_max=50),
    "StanfordCars": Setting(init_alpha=3, beta_max=20, alpha_max=10),
}

@dataclass
class Config:
    backbone: str = "RN50"              # the official configs'
    template: str = "a photo of a {}."  # train.py sets the dataset's (CoOp's hand-crafted prompt)
    # train.py sets the dataset's name: SETTINGS, and ImageNet's templates; copied alone, set it
    # yourself (e.g. "DescribableTextures"): a name not in SETTINGS gets ImageNet's ranges
    dataset: str = ""
    # train.py sets --shots: the cache holds shots x classes images
    shots: int = 16
    train_keys: bool = False            # Tip-Adapter-F: the keys are learned
    # augmented passes averaged into the keys (the official augment_epoch)
    augment_views: int = 10
    # the vote's weight before the search; None = the dataset's (SETTINGS)
    alpha: float | None = None
    # the affinity's sharpness before the search (the official init_beta)
    beta: float = 1.0
    # search alpha and beta on the validation split (the official)
    search: bool = True
    # search grid: beta in 0.1 + i (beta_max - 0.1) / beta_steps, i < beta_steps
    beta_steps: int = 200
    alpha_steps: int = 20               # and alpha likewise; the maxima from SETTINGS
    # Tip-Adapter-F: the official AdamW (train.py: eps 1e-4, weight decay 0.01)
    optimizer: str = "adamw"
    epochs: int = 20                    # Tip-Adapter-F (the official; EuroSAT 100)
    batch_size: int = 256
    lr: float = 0.001
    warmup_epochs: int = 0              # the official cosine starts at lr, without warm-up

# --method name -> Config changes; None: fitted only, no epochs
VARIANTS = {"tip-adapter": dict(epochs=None),
            "tip-adapter-f": dict(train_keys=True)}
ABOUT = {  # --method name -> what it is, for python train.py --list
    "tip-adapter": ("Tip-Adapter (Zhang et al., ECCV 2022): a cache of the few-shot features, "
                    "no training"),
    "tip-adapter-f": "Tip-Adapter-F: Tip-Adapter's cache keys learned (AdamW, 20 epochs)",
}

def search_grid(largest, steps):
    """The official search values: steps values from 0.1, evenly spaced, stopping one step short of
    `largest`."""
    return [0.1 + i * (largest - 0.1) / steps for i in range(steps)]

class TipAdapter(nn.Module):
    """Zero-shot CLIP plus alpha times the cache's vote: logits (B, C)."""

    class_specific = True  # the cache's values are the training classes

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        E, C = clip.text_projection.shape[1], len(classnames)
        device = clip.token_embedding.weight.device
        templates = IMAGENET_TEMPLATES if cfg.dataset in IMAGENET else [cfg.template]
        text = []
        with torch.no_grad():
            for template in templates:
                tokens = clip_model.tokenize([template.format(c.replace("_", " "))
                                              for c in classnames])
                text.append(F.normalize(clip.encode_text(tokens), dim=-1))
        self.register_buffer("text", F.normalize(torch.stack(text).mean(0), dim=-1),
                             persistent=False)  # (C, E)
        # set by fit(); persistent: the checkpoint keeps them
        keys = torch.zeros(cfg.shots * C, E, device=device)
        if cfg.train_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        # one-hot labels
        self.register_buffer("values", torch.zeros(cfg.shots * C, C, device=device))
        setting = SETTINGS.get(cfg.dataset, SETTINGS["ImageNet"])
        self.beta_max, self.alpha_max = setting.beta_max, setting.alpha_max
        # 0: zero-shot CLIP; a float buffer
        alpha = float(setting.init_alpha if cfg.alpha is None else cfg.alpha)
        self.register_buffer("alpha", torch.tensor(alpha, device=device))
        self.register_buffer("beta", torch.tensor(cfg.beta, device=device))

    # the image tower is frozen: train.py may cache these (--cache-features)
    def frozen_features(self, images):
        # (B, E), not normalised: the cache averages them as they are
        return self.clip.encode_image(images)

    def logits(self, f, alpha, beta):
        """f (B, E) normalised; alpha, beta scalars or (A, 1, 1) / (A, 1, 1) grids -> (B, C) or
        (A, B, C)."""
        zero_shot = self.clip.logit_scale.exp() * f @ self.text.t()  # (B, C)
        # (B, K C): cosines, while the keys are the cache's unit vectors
        affinity = f @ self.keys.t()
        vote = torch.exp(-beta * (1 - affinity)) @ self.values  # (B, C)
        return zero_shot + alpha * vote

    def forward(self, images=None, features=None):  # features: frozen_features(images)
        f = self.frozen_features(images) if features is None else features
        return self.logits(F.normalize(f, dim=-1), self.alpha, self.beta)

    def loss(self, logits, labels, epoch):
        """Tip-Adapter-F's loss: the cross-entropy of the softmax over the C classes' logits."""
        # fp32 logits: an exact softmax under any autocast
        return F.cross_entropy(logits.float(), labels)

    @torch.no_grad()
    def search(self, f, labels):
        """The official search on (f, labels): beta the outer loop, alpha the inner, a later value
        kept only when strictly better -> (alpha, beta, accuracy %); the current pair when no value
        scores above 0."""
        best = (self.alpha.item(), self.beta.item(), 0.0)
        alphas = torch.tensor(search_grid(self.alpha_max, self.cfg.alpha_steps), device=f.device)
        for beta in search_grid(self.beta_max, self.cfg.beta_steps):
            # (A, B) every alpha at once
            predictions = self.logits(f, alphas[:, None, None], beta).argmax(-1)
            accuracy = 100 * (predictions == labels).double().mean(-1)  # (A,)
            i = int(accuracy.argmax())  # the first of the best alphas
            if accuracy[i] > best[2]:
                best = (alphas[i].item(), beta, accuracy[i].item())
        return best

    @torch.no_grad()
    def fit(self, encode, trained=False):
        """train.py's fit hook. Before training: the cache from `augment_views` augmented passes
        over the training images (keys: the mean feature, normalised; values: one-hot labels), then
        Tip-Adapter's search. After Tip-Adapter-F's epochs (trained): the search again, with the
        learned keys."""
        if not trained:
            views, labels = encode("train", views=self.cfg.augment_views)  # (V, K C, E)
            if len(labels) != len(self.keys):
                raise ValueError(f"the cache holds shots x classes = {len(self.keys)} images and "
                                 f"the training split has {len(labels)}: every class needs --shots "
                                 "images (and --shots 0 has no cache)")
            self.keys.copy_(F.normalize(views.float().mean(0), dim=-1))
            self.values.copy_(F.one_hot(labels, self.values.shape[1]).float())
        chosen = {"alpha": self.alpha.item(), "beta": self.beta.item()}
        no_val = ("the search for alpha and beta needs validation images and this dataset has "
                  "none: --set search=false keeps alpha and beta")
        # Tip-Adapter-F trains at the initial pair, searches after
        search_now = trained or not self.cfg.train_keys
        if self.cfg.search and not search_now and not len(encode("val")[1]):
            raise ValueError(no_val)  # Tip-Adapter-F: said before its epochs rather than after them
        if self.cfg.search and search_now:
            f, labels = encode("val")
            if not len(labels):
                raise ValueError(no_val)
            alpha, beta, accuracy = self.search(F.normalize(f.float(), dim=-1), labels)
            self.alpha.fill_(alpha)
            self.beta.fill_(beta)
            chosen = {"alpha": alpha, "beta": beta, "val_accuracy": accuracy}
        return chosen

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP: BatchNorm statistics stay as they were trained
        return self

def check_config(cfg):
    """ValueError for a Config no model can be built from (train.py calls it before loading
    CLIP)."""
    # below 0 once meant None
    if cfg.alpha is not None and not (math.isfinite(cfg.alpha) and cfg.alpha >= 0):
        raise ValueError(f"alpha={cfg.alpha}: must be a finite number, 0 or more, or none "
                         "(the dataset's)")
    for name, ok, rule in [("shots", cfg.shots >= 1,
                            "1 or more: the cache holds shots x classes images"),
                           ("augment_views", cfg.augment_views >= 1, "1 or more"),
                           ("beta", cfg.beta > 0, "above 0"),
                           ("beta_steps", cfg.beta_steps >= 1, "1 or more"),
                           ("alpha_steps", cfg.alpha_steps >= 1, "1 or more")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")

def build(clip, classnames, cfg):
    check_config(cfg)
    clip.requires_grad_(False)
    return TipAdapter(clip, classnames, cfg)
