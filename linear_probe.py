"""Linear-probe CLIP: L2-regularised logistic regression on the frozen image features, fitted, not
trained by SGD.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021
(its linear probes, Appendix A.3), as CoOp reports it for few-shot learning (Zhou et al., IJCV 2022,
Fig. 3; official code: github.com/KaiyangZhou/CoOp, lpclip/). No prompt and no text: the image tower
encodes the un-augmented training images once, and a multinomial logistic regression on those
features (scikit-learn's LogisticRegression: the mean cross-entropy plus
|weight|^2 / (2 c n_images), the bias unpenalised) is solved by L-BFGS. Its strength c is searched
on the few-shot validation split as the official script does: seven values 1e6 ... 1e-6, then eight
steps that halve the interval (in log10) around the best, keeping the last step's winner.

- Learned: `weight` (C, E) and `bias` (C,), one row per class.
- Injected where: on the image tower's output, not normalised (as the official features).
- Frozen: all of CLIP; the text tower is unused.
- Loss (minimised by L-BFGS in fit(); never trained by SGD, so no `loss()`): the mean cross-entropy
  over the C classes plus the L2 penalty above.
- Deviations:
  - Solved in torch (L-BFGS with a strong Wolfe line search, float64), not scikit-learn's scipy
    L-BFGS-B: the same objective, start (zeros), history (10) and limits (1,000 iterations, gradient
    1e-4), so the same classifier up to the solvers' tolerance.
  - The few-shot training and validation images come from this repository's sampler (Dassl's, as for
    every method here; validation: min(shots, 4) per class, as the official script's table), not the
    script's numpy draw.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# the official script's first values of c, tried in this order
COARSE = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]

@dataclass
class Config:  # no `epochs`: train.py fits this method once (fit()) and runs no SGD epochs
    backbone: str = "RN50"  # the official script's features
    # c, the inverse L2 strength (scikit-learn's C); 0 = search it on the validation split
    c_weight: float = 0.0
    # the search's halving steps after the seven coarse values (the script's --num_step)
    search_steps: int = 8
    max_iter: int = 1000    # L-BFGS iterations per fit (the script's max_iter)
    # stop when every gradient entry of the mean objective is this small (scikit-learn's tol)
    tol: float = 1e-4

VARIANTS = {"linear-probe": dict()}  # --method name -> the Config changes that make it
ABOUT = {  # --method name -> what it is, for python train.py --list
    "linear-probe": "linear-probe CLIP (CoOp's baseline): logistic regression on image features, "
                    "fitted",
}

def logistic_regression(x, y, n_classes, c, max_iter=1000, tol=1e-4):
    """Multinomial logistic regression from zeros: minimise
    mean CE(x weight^T + bias, y) + |weight|^2 / (2 c n_images) by L-BFGS -> weight (n_classes, E),
    bias (n_classes,), in x's dtype."""
    weight = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    # tolerance_change: scikit-learn's ftol for this solver, 64 machine epsilons
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=64 * torch.finfo(x.dtype).eps, history_size=10,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + (weight ** 2).sum() / (2 * c * len(x))
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach(), bias.detach()

def search_c(train, val, n_classes, steps, max_iter=1000, tol=1e-4):
    """The official script's search for c: train and val are (features, labels) ->
    (c, (weight, bias), [(c, val accuracy) for every fit, in order]). The seven coarse values, then
    `steps` steps between peak / 10 and peak * 10: fit at both ends, keep the better end (the left
    one on a tie) as the answer so far, and move the other end to the interval's middle in log10."""
    tried = []

    def fit(c):
        weight, bias = logistic_regression(*train, n_classes, c, max_iter, tol)
        accuracy = ((val[0] @ weight.T + bias).argmax(-1) == val[1]).double().mean().item()
        tried.append((c, accuracy))
        return accuracy, (weight, bias)

    coarse = [fit(c) for c in COARSE]
    # the first of the best (numpy's argmax)
    best = max(range(len(COARSE)), key=lambda i: (coarse[i][0], -i))
    c, classifier = COARSE[best], coarse[best][1]
    left, right = 1e-1 * c, 1e1 * c
    for _ in range(steps):
        (left_accuracy, left_fit), (right_accuracy, right_fit) = fit(left), fit(right)
        middle = 10 ** (0.5 * (math.log10(left) + math.log10(right)))
        if left_accuracy < right_accuracy:
            c, classifier, left = right, right_fit, middle
        else:
            c, classifier, right = left, left_fit, middle
    return c, classifier, tried

class LinearProbe(nn.Module):
    """CLIP's image features -> logits (B, C) of a linear classifier, set by fit()."""

    class_specific = True  # one row per training class: nothing transfers to other classes

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        E, device = clip.text_projection.shape[1], clip.token_embedding.weight.device
        # (C, E), until fit()
        self.weight = nn.Parameter(torch.zeros(len(classnames), E, device=device))
        self.bias = nn.Parameter(torch.zeros(len(classnames), device=device))  # (C,)

    # (B, E): the image tower's output, not normalised (the official features)
    def frozen_features(self, images):
        return self.clip.encode_image(images)

    def forward(self, images=None, features=None):
        x = self.frozen_features(images) if features is None else features
        # the classifier as fitted: fp32, also under autocast
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.weight.T + self.bias

    @torch.no_grad()
    def fit(self, encode, trained=False):
        """train.py's fit hook (a fitted-only method: called once, trained=False): `encode(split)`
        -> (features, labels) of the un-augmented "train" or "val" images. Fits the classifier at
        cfg.c_weight, or at the c the official search picks on the validation split."""
        x, y = encode("train")
        train = (x.double(), y)
        n_classes = len(self.weight)
        if self.cfg.c_weight:
            c = self.cfg.c_weight
            weight, bias = logistic_regression(*train, n_classes, c, self.cfg.max_iter,
                                               self.cfg.tol)
            tried = []
        else:
            val_x, val_y = encode("val")
            if not len(val_y):
                raise ValueError("the search for c_weight needs validation images and this dataset "
                                 "has none: fix it with --set c_weight=VALUE")
            c, (weight, bias), tried = search_c(train, (val_x.double(), val_y), n_classes,
                                                self.cfg.search_steps, self.cfg.max_iter,
                                                self.cfg.tol)
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        accuracy = ((train[0] @ weight.T + bias).argmax(-1) == y).double().mean().item()
        return {"c_weight": c, "train_accuracy": 100 * accuracy,
                "searched": [{"c_weight": value, "val_accuracy": 100 * a} for value, a in tried]}

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP: BatchNorm statistics stay as they were trained
        return self

def check_config(cfg):
    """ValueError for a Config no model can be fitted with
    (train.py calls it before loading CLIP)."""
    for name, ok, rule in [("c_weight", cfg.c_weight >= 0, "0 (search it) or more"),
                           ("search_steps", cfg.search_steps >= 0, "0 or more"),
                           ("max_iter", cfg.max_iter >= 1, "1 or more"),
                           ("tol", cfg.tol > 0, "above 0")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")

def build(clip, classnames, cfg):
    check_config(cfg)
    clip.requires_grad_(False)
    return LinearProbe(clip, classnames, cfg)
