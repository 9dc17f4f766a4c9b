"""ProDA: K learned prompts whose text features, per class, are modelled as a Gaussian.

Lu et al., "Prompt Distribution Learning", CVPR 2022, https://arxiv.org/abs/2205.03340. The authors
released no code.

One learned context describes every class from one angle. ProDA learns K contexts, with the class
name at the front, in the middle or at the end of the sentence, and reads each class's K text
features as samples of a Gaussian N(mu_c, Sigma_c). Training minimises an upper bound of the
expected cross-entropy over that distribution: each class j's logit is raised by half the variance
of its difference to the true class y, 1/2 s^2 f^T (Sigma_jj + Sigma_yy - 2 Sigma_jy) f, so the
prompts must separate the classes however they describe them. A regulariser keeps the K contexts
apart (their features without a class name orthogonal). At test the mean feature mu_c is each
class's classifier.

- Learned: `ctx` (K, n_ctx, D), K = 32 contexts.
- Injected where: around the class name in "[SOT] ... [EOT]": K/4 prompts name first, K/4 name in
  the middle of the context, the rest name last.
- Frozen: all of CLIP.
- Loss: an upper bound of the expected cross-entropy over the classes' Gaussians + 0.1 x
  orthogonality (`loss`).
- Deviations: the paper's text could not be read where this file was written; its abstract and the
  public re-implementations (e.g. ml-stat-Sustech/CLIP_Calibration,
  trainers/classification/proda.py) decide, and "ours" marks what none of them does:
  - 4 of the K prompts per training step (the re-implementations), drawn afresh each step (ours:
    they cycle through a permutation).
  - Sigma diagonal over the feature dimensions and full over the classes, estimated with
    1 / (P + 1), P the prompts of the step; mu_c not re-normalised (the re-implementations).
  - Orthogonality: weight 0.1 on the mean |cos| between different contexts' features (the
    re-implementations).
  - Schedule: CoOp's on RN50 (SGD, lr 0.002, batch 32, 50/100/200 epochs by shots), the protocol
    DUAL-PT compares it in (ours).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

@dataclass
class Config:
    backbone: str = "RN50"          # CoOp's few-shot protocol (ours)
    n_prompts: int = 32             # K (the paper)
    n_ctx: int = 16                 # context tokens per prompt (the re-implementations)
    prompt_batch: int = 4           # prompts per training step (the re-implementations); at most K
    # the orthogonality regulariser's weight (the re-implementations)
    ortho_weight: float = 0.1
    # activation checkpointing in the text tower for training passes of at least this many prompts
    # (exact); 0 = never
    checkpoint_prompts: int = 1000
    # 0: CoOp's schedule by shots, 50 (1 shot), 100 (2-4), 200 (8+) (ours)
    epochs: int = 0
    batch_size: int = 32
    lr: float = 0.002
    warmup_epochs: int = 1          # at constant lr 1e-5, then cosine (train.py)

VARIANTS = {"proda": dict()}  # --method name -> the Config changes that make it
ABOUT = {  # --method name -> what it is, for python train.py --list
    "proda": "ProDA (Lu et al., CVPR 2022): 32 prompts, their text features a Gaussian per class",
}
POSITIONS = ("front", "middle", "end")  # where a prompt puts the class name

def positions(K):
    """The class-name position (an index into POSITIONS) of each of K prompts, split as the
    re-implementations (CLIP_Calibration's PromptLearner: K//4 front, K//4 middle, K//2 end): the
    first K/4 front, the next K/4 middle, the rest end (K/2 when 4 divides K; ours otherwise)."""
    return [0] * (K // 4) + [1] * (K // 4) + [2] * (K - 2 * (K // 4))

class PromptLearner(nn.Module):
    """K contexts -> prompt embeddings (P, C, L, D) for any P of them, each with its class-name
    position."""

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        C, D, n = len(classnames), clip.ln_final.weight.shape[0], cfg.n_ctx
        device = clip.token_embedding.weight.device
        self.ctx = nn.Parameter(torch.randn(cfg.n_prompts, n, D, device=device) * 0.02)  # (K, n, D)
        self.register_buffer("position", torch.tensor(positions(cfg.n_prompts), device=device),
                             persistent=False)
        names = [name.replace("_", " ") for name in classnames]
        tokens = clip_model.tokenize([" ".join(["X"] * n + [name]) + "."
                                      for name in names])  # (C, 77)
        eot = tokens.argmax(-1)  # (C,): the same in every layout
        self.register_buffer("eot", eot.to(device), persistent=False)
        L = int(eot.max()) + 1
        with torch.no_grad():
            embedded = clip.embed_text(tokens[:, :L])  # (C, L, D), the name last
        self.register_buffer("prefix", embedded[:, :1], persistent=False)  # SOT
        # name, ".", EOT, padding
        self.register_buffer("suffix", embedded[:, 1 + n:], persistent=False)
        # (3, C, L): each layout as rows of the "end" one
        order = torch.arange(L).repeat(len(POSITIONS), C, 1)
        for c, name in enumerate(names):
            n_name = int(clip_model.tokenize(name).argmax()) - 1  # the class name's tokens
            ctx_rows, name_rows = list(range(1, 1 + n)), list(range(1 + n, 1 + n + n_name))
            order[0, c, 1:1 + n + n_name] = torch.tensor(name_rows + ctx_rows)  # front
            # middle
            order[1, c, 1:1 + n + n_name] = torch.tensor(ctx_rows[:n // 2] + name_rows
                                                         + ctx_rows[n // 2:])
        self.register_buffer("order", order.to(device), persistent=False)
        # a context without a name: "X ... X." then EOT
        dot = clip_model.tokenize(" ".join(["X"] * n) + ".")
        with torch.no_grad():
            self.register_buffer("dot_eot", clip.embed_text(dot)[:, n + 1:n + 3],  # (1, 2, D)
                                 persistent=False)

    def forward(self, index):
        """index (P,) of the contexts -> (P, C, L, D) prompts."""
        ctx = self.ctx[index]  # (P, n, D)
        P, n, D = ctx.shape
        C = len(self.prefix)
        x = torch.cat([self.prefix.expand(P, C, 1, D), ctx[:, None].expand(P, C, n, D),
                       self.suffix.expand(P, C, -1, D)], dim=2)  # (P, C, L, D), the name last
        order = self.order[self.position[index]]  # (P, C, L)
        return x.gather(2, order[..., None].expand(x.shape))

    def context_only(self):
        """(K, n + 3, D): "[SOT] ctx_k . [EOT]", the contexts without a class name (for the
        regulariser)."""
        K, n, D = self.ctx.shape
        return torch.cat([self.prefix[:1].expand(K, 1, D), self.ctx, self.dot_eot.expand(K, 2, D)],
                         dim=1)

def parameter_versions(module):
    """Changes whenever a parameter of `module` is replaced, moved or changed in place (an optimiser
    step, load_state_dict): cached text features are reused only while it stays the same."""
    return [(p.data_ptr(), p._version) for p in module.parameters()]

class ProDA(nn.Module):
    """CLIP scored by the mean of K prompts' text features; during training, the Gaussian
    upper-bound loss."""

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        self.prompt_learner = PromptLearner(clip, classnames, cfg)
        # (parameter_versions, (C, E) mean text features), reused while evaluating
        self.cached = None
        # kept by a training forward for loss(): (P, C, E) and (B, E)
        self.text = self.image = None

    def encode_prompts(self, index):
        """index (P,) -> (P, C, E) normalised text features, in one EOT-cut pass."""
        prompts = self.prompt_learner(index)  # (P, C, L, D)
        flat = prompts.flatten(0, 1)  # (P C, L, D)
        checkpoint = 0 < self.cfg.checkpoint_prompts <= len(flat)
        x = self.clip.encode_text_embeddings(flat, self.prompt_learner.eot.repeat(len(index)),
                                             checkpoint)
        return F.normalize(x, dim=-1).view(*prompts.shape[:2], -1)

    def mean_text(self):
        """(C, E): mu_c over all K prompts, one prompt per text pass (not re-normalised)."""
        K = len(self.prompt_learner.ctx)
        index = torch.arange(K, device=self.prompt_learner.ctx.device)
        return torch.stack([self.encode_prompts(i[None])[0] for i in index]).mean(0)

    def text_features(self):
        """(C, E) mu_c of all K prompts; without gradients in eval mode computed once, until a
        parameter changes."""
        if self.training or torch.is_grad_enabled():
            return self.mean_text()
        key = parameter_versions(self)
        if self.cached is None or self.cached[0] != key:
            self.cached = key, self.mean_text()
        return self.cached[1]

    # the image tower is frozen: train.py may cache these (--cache-features)
    def frozen_features(self, images):
        return F.normalize(self.clip.encode_image(images), dim=-1)  # (B, E) f

    def forward(self, images=None, features=None):  # features: frozen_features(images)
        image = self.frozen_features(images) if features is None else features
        if self.training:  # a random P of the K prompts: mu_c and, for loss(), their spread
            K = len(self.prompt_learner.ctx)
            index = torch.randperm(K, device=image.device)[:self.cfg.prompt_batch]
            self.text, self.image = self.encode_prompts(index), image  # (P, C, E)
            mean = self.text.mean(0)
        else:
            mean = self.text_features()  # (C, E)
        return self.clip.logit_scale.exp() * image @ mean.t()  # (B, C)

    def loss(self, logits, labels, epoch):
        """L_upper + ortho_weight L_orth: CE over logits raised by 1/2 s^2 (R_jj + R_yy - 2 R_yj),
        where R_ij = sum_d f_d^2 Sigma^d_ij and Sigma^d_ij = 1/(P+1) sum_k delta_kid delta_kjd,
        delta = w - mu."""
        text, f = self.text.float(), self.image.float()  # (P, C, E), (B, E)
        P = len(text)
        # fp32: s^2 = 10^4 would magnify bf16 rounding
        with torch.autocast(f.device.type, enabled=False):
            delta = text - text.mean(0)  # (P, C, E)
            f2 = f ** 2  # (B, E)
            r_jj = torch.einsum("pce,be->bc", delta ** 2, f2) / (P + 1)  # (B, C)
            delta_y = delta[:, labels]  # (P, B, E): the true class's deviations, per image
            r_yj = torch.einsum("pbe,pce,be->bc", delta_y, delta, f2) / (P + 1)  # (B, C)
            r_yy = r_jj.gather(1, labels[:, None])  # (B, 1)
            s = self.clip.logit_scale.exp().float()
            upper = F.cross_entropy(logits.float() + 0.5 * s ** 2 * (r_jj + r_yy - 2 * r_yj),
                                    labels)
        if not self.cfg.ortho_weight:
            return upper
        return upper + self.cfg.ortho_weight * self.orthogonality()

    def orthogonality(self):
        """Mean |cos| between the features of different contexts (no class name): 0 when all are
        orthogonal."""
        x = self.prompt_learner.context_only()  # (K, n + 3, D)
        eot = torch.full((len(x),), x.shape[1] - 1, device=x.device)
        g = F.normalize(self.clip.encode_text_embeddings(x, eot), dim=-1).float()  # (K, E)
        K = len(g)
        cos = (g @ g.t()).abs()
        return (cos.sum() - cos.diagonal().sum()) / max(K * (K - 1), 1)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP: BatchNorm statistics stay as they were trained
        self.cached = self.text = self.image = None
        return self

def check_config(cfg):
    """ValueError for a Config no model can be built from (train.py calls it before loading
    CLIP)."""
    K = cfg.n_prompts
    for name, ok, rule in [("n_prompts", K >= 1, "1 or more"),
                           ("n_ctx", cfg.n_ctx >= 1, "1 or more"),
                           ("prompt_batch", 1 <= cfg.prompt_batch <= K, f"in [1, {K}] (n_prompts)"),
                           ("ortho_weight", cfg.ortho_weight >= 0, "0 (none) or more"),
                           ("checkpoint_prompts", cfg.checkpoint_prompts >= 0,
                            "0 (never) or more")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")

def build(clip, classnames, cfg):
    check_config(cfg)
    clip.requires_grad_(False)
    return ProDA(clip, classnames, cfg)
