"""DUAL-PT, CoDUAL-PT and PLOT: M learned prompts matched to local image features by optimal
transport.

Hu et al., "Context-Aware Prompt Tuning for Vision-Language Model with Dual-Alignment", 2023,
https://arxiv.org/abs/2309.04158. No official code; the transport is written as PLOT's official code
(Chen et al., ICLR 2023, github.com/CHENGY12/PLOT). `python describe.py` asks an LLM for the class
descriptions.

CoOp learns one context, scored against the image's global feature. DUAL-PT learns M contexts and
scores their M text features per class against the image's N local features: a transport plan T
(N x M), solved by Sinkhorn from node costs (1 - cos of region and prompt: Wasserstein) and edge
costs (the regions' similarities among themselves against the prompts': Gromov-Wasserstein), weights
the region-prompt similarities into the logit (Eq. 8). A distillation loss pulls the prompts toward
an LLM's short descriptions of each class (Eq. 5). CoDUAL-PT adds CoCoOp's meta-net: the global
image feature shifts every context. PLOT (Chen et al., ICLR 2023) is the transport alone: alpha 0
(node costs only), beta 0 (no descriptions), its own schedule and stopping rule, and on ImageNet a
second logit, the global image feature against the mean of the M prompts (`global_logit`).

- Learned: `ctx` (M, n_ctx, D), M = 4 unified contexts; CoDUAL-PT adds `meta_net` E -> E/16 -> D.
- Injected where: rows 1..n_ctx of "[SOT] X ... X {class}. [EOT]", one prompt per class and context.
- Frozen: all of CLIP; the plan (no gradient); the descriptions' text features (encoded once, at
  build).
- Loss: Eq. 9, beta L_LLM + (1 - beta) cross-entropy over the C classes; PLOT (beta 0) the
  cross-entropy alone.
- Deviations (ours where the paper is silent, PLOT's where it is about transport; details on their
  lines):
  - Marginals p = 1/N over regions, q = 1/M over prompts (the paper's text swaps them).
  - Sinkhorn stops on the plan's row sums (PLOT: on the change of a; `sinkhorn_stop=plot`, the plot
    variant's).
  - Eq. 5's cosine of an M x E and an e x E matrix is the cosine of their means.
  - CoDUAL-PT's settings (see `VARIANTS`) and its meta-net's zero init.
  - PLOT: the official rn50.yaml's batch 128 on every dataset (its comment: 32 for small ones such
    as FGVC Aircraft; pass --batch-size 32 there); Sinkhorn in the log domain (the official: the
    plain kernel; equal up to rounding).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

@dataclass
class Config:
    # the paper's backbone (local features: the attention pool's 7x7 grid)
    backbone: str = "RN50"
    # train.py sets the dataset's; each class's description without a file
    template: str = "a photo of a {}."
    # JSON {class name: [description, ...]}; "" = the template sentence
    descriptions: str = ""
    n_prompts: int = 4                  # M learned prompts (paper: 4)
    # context tokens per prompt; an init phrase sets it to its tokens
    n_ctx: int = 16
    # e.g. "a photo of a" ("_" = space): prompt 0 starts as its embeddings
    ctx_init: str = ""
    # CoDUAL-PT: CoCoOp's meta-net shifts every context per image
    conditional: bool = False
    # edge (GW) weight in the graph cost; 0 = node (WD) only, 1 = edge only
    alpha: float = 0.2
    beta: float = 0.2                   # L_LLM weight in Eq. 9; 0 = no descriptions
    # cosine (Eq. 5) | wd (the ablation's Wasserstein distillation)
    distill: str = "cosine"
    ot_lambda: float = 0.1              # entropic regularisation: kernel exp(-cost / lambda) (PLOT)
    # outer iterations of Algorithm 1 (GW linearisation; ours: the paper's count is open)
    gw_iters: int = 5
    sinkhorn_iters: int = 100           # at most, per Sinkhorn (PLOT)
    # stop when the plan's row sums are this close (L1; ours; PLOT: when a's mean change is below
    # 0.01); 0 = always sinkhorn_iters
    sinkhorn_tol: float = 1e-4
    # rows: the rule above (each plan's row sums, ours) | plot: PLOT's, the mean change of the
    # scaling a over all plans below sinkhorn_tol, checked from the first step
    sinkhorn_stop: str = "rows"
    # PLOT's extra logit, scale * cos(global image feature, mean of the M prompt features): never |
    # imagenet (on when the dataset is ImageNet, as PLOT's code) | always
    global_logit: str = "never"
    # train.py sets the dataset's name (global_logit=imagenet reads it)
    dataset: str = ""
    # CoDUAL-PT: images x classes x prompts per text-encoder pass
    max_prompts: int = 32768
    # activation checkpointing in the text tower for training passes of at least this many
    # prompts (ImageNet: 4,000; exact); 0 = never
    checkpoint_prompts: int = 1000
    # 0: CoOp's schedule by shots, 50 (1 shot), 100 (2-4), 200 (8+); base2new 10
    epochs: int = 0
    batch_size: int = 32
    lr: float = 0.002
    warmup_epochs: int = 1              # at constant lr 1e-5, then cosine (train.py)

# --method name -> the Config changes that make it
VARIANTS = {"dualpt": dict(),
            # CoDUAL-PT (ours; the paper gives none): CoCoOp's 4 context tokens from "a photo of a"
            # (prompt 0), 10 epochs and batch 1
            "codualpt": dict(conditional=True, n_ctx=4, ctx_init="a photo of a", epochs=10,
                             batch_size=1),
            # PLOT: the Wasserstein transport alone, with the official plot-coop's rn50.yaml and
            # trainer: M = 4, 16 tokens, lambda (its eps) 0.1, at most 100 Sinkhorn steps stopped by
            # its rule, 50 epochs at every shot count, batch 128, lr 0.002, and the global logit
            # added on ImageNet
            "plot": dict(alpha=0.0, beta=0.0, sinkhorn_stop="plot", sinkhorn_tol=0.01,
                         global_logit="imagenet", epochs=50, batch_size=128)}
ABOUT = {  # --method name -> what it is, for python train.py --list
    "dualpt": ("DUAL-PT (Hu et al., 2023): 4 prompts graph-matched to local image features, "
               "LLM descriptions"),
    "codualpt": "CoDUAL-PT: DUAL-PT's prompts shifted per image by CoCoOp's meta-net",
    "plot": ("PLOT (Chen et al., ICLR 2023): 4 prompts matched to local image features by optimal "
             "transport"),
}

def region_prompt(local, text):
    """Every region against every prompt: local (B, N, E), text (C, M, E) or (B, C, M, E) ->
    (B, C, N, M) dot products. An einsum, so neither side is copied B or C times (a broadcast matmul
    would materialise (B, C, N, E): 25 GB for PLOT's batch of 128 on ImageNet)."""
    return torch.einsum("bne,cme->bcnm" if text.dim() == 3 else "bne,bcme->bcnm", local, text)

def sinkhorn(log_kernel, log_p, log_q, iters=100, tol=1e-4, stop="rows"):
    """Entropic OT in the log domain: log kernel (..., R, S) = -cost / lambda (Algorithm 1's K),
    marginals log p (..., R) and log q (..., S) (-inf = no mass) -> T = diag(a) K diag(b)
    (..., R, S), rows summing to p and columns to q. Stops after `iters` steps, or earlier by the
    `stop` rule (Config.sinkhorn_stop) at `tol`."""
    u = torch.zeros_like(log_kernel[..., 0])  # log a: a = 1 at the start (PLOT)
    v = torch.zeros_like(log_kernel[..., 0, :])  # log b: b = 1
    for i in range(iters):
        previous = u
        u = log_p - torch.logsumexp(log_kernel + v[..., None, :], dim=-1)  # a = p / K b
        v = log_q - torch.logsumexp(log_kernel + u[..., None], dim=-2)  # b = q / K^T a
        # PLOT's rule: the mean change of a, over every plan at once, from the first step
        if stop == "plot":
            if float((u.exp() - previous.exp()).abs().mean()) < tol:
                break
        # the previous plan's row sums were p exp(previous - u): stop once they are close to p
        elif i and tol:
            # (...,) L1 error of each plan
            row_error = (log_p.exp() * (previous - u).expm1().abs()).sum(-1)
            if float(row_error.max()) < tol:  # the worst plan decides: one host sync per step
                break
    return (u[..., None] + log_kernel + v[..., None, :]).exp()

@torch.no_grad()
def graph_plan(local, text, cfg):
    """Algorithm 1 for every image and class at once: local (B, N, E), text (C, M, E) or
    (B, C, M, E), both normalised -> plan T (B, C, N, M), each summing to 1. Z and P are the paper's
    Z and W (the local features and the prompts' text features; W is the image width everywhere else
    in this repository)."""
    # fp32: cost / lambda magnifies bf16 rounding
    with torch.autocast(local.device.type, enabled=False):
        Z = local.float()  # (B, N, E)
        P = text.float()  # (C, M, E) or (B, C, M, E)
        cost_wd = 1 - region_prompt(Z, P)  # (B, C, N, M) node cost C_WD
        N, M = cost_wd.shape[-2:]
        # p = 1/N over the regions (the paper's text swaps p, q)
        log_p = cost_wd.new_full((N,), -math.log(N))
        log_q = cost_wd.new_full((M,), -math.log(M))  # q = 1/M over the prompts
        plan = torch.full_like(cost_wd, 1 / (N * M))  # T = p q^T, where the GW linearisation starts
        cost = cost_wd  # with alpha 0: Wasserstein only
        if cfg.alpha:  # edges: each graph's cosine similarities among its own nodes
            C_z = (Z @ Z.transpose(-1, -2))[:, None]  # (B, 1, N, N)
            C_w = P @ P.transpose(-1, -2)  # (C, M, M) or (B, C, M, M)
            # GW linearised at the plan:
            # L(C_z, C_w) ⊗ T = C_z² p 1ᵀ + 1 qᵀ (C_w²)ᵀ − 2 C_z T C_wᵀ
            # the first two terms
            C_zw = (C_z ** 2).mean(-1, keepdim=True) + (C_w ** 2).mean(-1)[..., None, :]
        for _ in range(cfg.gw_iters if cfg.alpha else 1):
            if cfg.alpha:
                # C_z T, C_z not copied C times
                C_z_plan = torch.einsum("bij,bcjm->bcim", C_z[:, 0], plan)
                # (B, C, N, M) C_GWD at this plan
                cost_gw = C_zw - 2 * C_z_plan @ C_w.transpose(-1, -2)
                cost = cfg.alpha * cost_gw + (1 - cfg.alpha) * cost_wd  # C_graph
            plan = sinkhorn(-cost / cfg.ot_lambda, log_p, log_q, cfg.sinkhorn_iters,
                            cfg.sinkhorn_tol, cfg.sinkhorn_stop)
    assert not plan.isnan().any(), "NaN in the transport plan"
    return plan

def load_json(path, kind, what):
    """A JSON file's content if it is of type `kind`, else a ValueError that says what the file
    should hold."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror}): expected {what}") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}): expected {what}") from None
    if not isinstance(content, kind):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}: expected {what}")
    return content

def descriptions_file(path):
    """A relative path is looked up from the working directory, then from this file's folder."""
    here = Path(__file__).resolve().parent
    return here / path if not Path(path).is_file() and (here / path).is_file() else Path(path)

def read_descriptions(path, classnames):
    """[[description, ...] per class] from a JSON file {class name: [str, ...]}, covering every
    class the model is built for (base2new: the new ones too, though unused); names compared
    lower-case, "_" as a space. A relative path is looked up from the working directory, then from
    this file's folder."""
    def name(c):
        return c.replace("_", " ").strip().lower()

    file = descriptions_file(path)
    table = load_json(file, dict, "descriptions {class: [description, ...]} (python describe.py "
                                  "writes them; descriptions= uses the template)")
    table = {name(k): [d.strip() for d in v if isinstance(d, str) and d.strip()]
             for k, v in table.items() if isinstance(v, list)}
    missing = [c for c in classnames if not table.get(name(c))]
    if missing:
        raise ValueError(f"descriptions file {file} has none for {len(missing)} of "
                         f"{len(classnames)} classes: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}; add them (python describe.py "
                         f"--classes FILE --out {path} adds only what is missing)")
    return [table[name(c)] for c in classnames]

class PromptLearner(nn.Module):
    """M unified contexts -> (..., C, M, L, D) prompt embeddings [SOT, ctx_m, class name, ".", EOT],
    cut after the last EOT; with a shift (B, D) from the meta-net, one set per image."""

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        D, device = clip.ln_final.weight.shape[0], clip.token_embedding.weight.device
        init = clip_model.tokenize(cfg.ctx_init.replace("_", " "))
        n_ctx = int(init.argmax()) - 1 if cfg.ctx_init else cfg.n_ctx  # the phrase's tokens
        # independent draws: prompts differ
        ctx = torch.randn(cfg.n_prompts, n_ctx, D, device=device) * 0.02
        if cfg.ctx_init:
            ctx[0] = clip.embed_text(init.to(device))[0, 1:1 + n_ctx].detach()
        self.ctx = nn.Parameter(ctx)  # (M, n_ctx, D)
        tokens = clip_model.tokenize([" ".join(["X"] * n_ctx + [c.replace("_", " ")]) + "."
                                      for c in classnames])
        self.register_buffer("eot", tokens.argmax(-1), persistent=False)  # (C,)
        with torch.no_grad():
            embedded = clip.embed_text(
                tokens[:, :int(self.eot.max()) + 1].to(device))  # (C, L, D)
        self.register_buffer("prefix", embedded[:, None, :1],
                             persistent=False)  # (C, 1, 1, D) SOT
        # name, ".", EOT, padding
        self.register_buffer("suffix", embedded[:, None, 1 + n_ctx:], persistent=False)

    def forward(self, shift=None):
        # (M, n, D), or (B, M, n, D)
        ctx = self.ctx if shift is None else self.ctx + shift[:, None, None]
        batch = ctx.shape[:-3]  # () for shared prompts, (B,) for per-image ones
        C = len(self.prefix)
        M, _, D = ctx.shape[-3:]
        prefix = self.prefix.expand(*batch, C, M, 1, D)  # SOT
        # every class reads the same M contexts
        ctx = ctx.unsqueeze(-4).expand(*batch, C, M, -1, D)
        suffix = self.suffix.expand(*batch, C, M, -1, D)  # class name, ".", EOT
        return torch.cat([prefix, ctx, suffix], dim=-2)  # (..., C, M, L, D)

def parameter_versions(module):
    """Changes whenever a parameter of `module` is replaced, moved or changed in place (an optimiser
    step, load_state_dict): cached text features are reused only while it stays the same."""
    return [(p.data_ptr(), p._version) for p in module.parameters()]

class DualPT(nn.Module):
    """CLIP scored by the graph-matched prompts (Eq. 8); with cfg.conditional, CoDUAL-PT's per-image
    prompts."""

    def __init__(self, clip, classnames, cfg, descriptions):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        self.prompt_learner = PromptLearner(clip, classnames, cfg)
        E, D = clip.text_projection.shape[1], clip.ln_final.weight.shape[0]
        device = clip.token_embedding.weight.device
        # CoDUAL-PT: normalised global image feature -> shift of every context, E -> E/16 -> D
        self.meta_net = None
        if cfg.conditional:
            self.meta_net = nn.Sequential(nn.Linear(E, E // 16), nn.ReLU(), nn.Linear(E // 16, D))
            # zero shift at init, so CoDUAL-PT starts as DUAL-PT (ours; CoCoOp's random init made
            # the M prompts identical)
            for p in self.meta_net[2].parameters():
                nn.init.zeros_(p)
        self.cached = None  # (parameter_versions, (C, M, E) text features), reused while evaluating
        # kept by a forward: the text features for loss(), the plan for analysis
        self.text = self.plan = None
        # PLOT's extra logit: the official code adds it when its dataset is ImageNet
        self.global_logit = (cfg.global_logit == "always"
                             or (cfg.global_logit == "imagenet" and cfg.dataset == "ImageNet"))
        # the descriptions' features, for L_LLM only
        self.register_buffer("desc", None, persistent=False)
        # the file is gone: the model still evaluates; training needs it (llm_loss)
        if descriptions is None:
            return
        # as written, cut at 77
        tokens = clip_model.tokenize([d for ds in descriptions for d in ds], truncate=True)
        with torch.no_grad():
            features = torch.cat([clip.encode_text_embeddings(clip.embed_text(t.to(device)),
                                                              t.argmax(-1))
                                  for t in tokens.split(1000)])  # (sum of e_k, E), 1,000 per pass
        features = F.normalize(features, dim=-1).split([len(ds) for ds in descriptions])
        self.register_buffer("desc", nn.utils.rnn.pad_sequence(features, True),
                             persistent=False)  # (C, e, E)
        self.register_buffer("desc_mean", torch.stack([f.mean(0) for f in features]),
                             persistent=False)  # (C, E) h_k
        # 1/e_k per class
        log_q = [torch.full((len(f),), -math.log(len(f)), device=device) for f in features]
        log_q = nn.utils.rnn.pad_sequence(log_q, True, -math.inf)  # (C, e); -inf: padding, no mass
        # wd's marginal over the descriptions
        self.register_buffer("desc_log_q", log_q, persistent=False)

    def encode_prompts(self, prompts):
        """(..., C, M, L, D) -> (..., C, M, E) text features (not normalised), all prompts in one
        EOT-cut pass."""
        eot = self.prompt_learner.eot[:, None].expand(prompts.shape[:-2])
        flat = prompts.flatten(0, -3)  # (P, L, D), P prompts
        # memory for compute, when the pass is large
        checkpoint = 0 < self.cfg.checkpoint_prompts <= len(flat)
        x = self.clip.encode_text_embeddings(flat, eot.flatten(), checkpoint)
        return x.view(*prompts.shape[:-2], -1)

    def text_features(self):
        """(C, M, E) as encoded (not normalised); without gradients in eval mode computed once,
        until a parameter changes."""
        if self.training or torch.is_grad_enabled():
            return self.encode_prompts(self.prompt_learner())
        key = parameter_versions(self)
        if self.cached is None or self.cached[0] != key:
            self.cached = key, self.encode_prompts(self.prompt_learner())
        return self.cached[1]

    # the image tower is frozen: train.py may cache these (--cache-features)
    def frozen_features(self, images):
        # (B, 1+N, E): global, then N local
        return F.normalize(self.clip.visual.dense(images), dim=-1)

    def forward(self, images=None, features=None):  # features: frozen_features(images)
        dense = self.frozen_features(images) if features is None else features
        local = dense[:, 1:]  # (B, N, E)
        # CoDUAL-PT: images x classes x prompts, max_prompts per text pass
        if self.meta_net is not None:
            per_pass = max(1, self.cfg.max_prompts // self.prompt_learner.eot.numel()
                           // self.cfg.n_prompts)
            text = []
            for image in dense[:, 0].split(per_pass):  # (b, E) global features
                shift = self.meta_net(image)  # (b, D)
                text.append(self.encode_prompts(self.prompt_learner(shift)))  # (b, C, M, E)
            text = torch.cat(text)  # (B, C, M, E)
        else:
            text = self.text_features()  # (C, M, E)
        # (..., C, M, E): as encoded, and normalised
        features, text = text, F.normalize(text, dim=-1)
        self.plan = graph_plan(local, text, self.cfg)  # (B, C, N, M), no gradient
        similarity = region_prompt(local, text)  # (B, C, N, M): region i against prompt j, Z P_c^T
        # (B, C), Eq. 8
        logits = self.clip.logit_scale.exp() * (self.plan * similarity).sum((-2, -1))
        # PLOT: + the global image feature against the mean of the M prompts' features
        if self.global_logit:
            # (C, E) or (B, C, E), averaged before normalising
            pooled = F.normalize(features.mean(-2), dim=-1)
            logits = logits + (self.clip.logit_scale.exp()
                               * (pooled @ dense[:, 0, :, None]).squeeze(-1))  # (B, C)
        if self.training:  # for loss()
            self.text = text
        return logits

    def llm_loss(self, text):
        """L_LLM over the classes (and images, for per-image prompts): text (..., C, M, E)
        normalised."""
        if self.desc is None:
            raise ValueError(f"descriptions={self.cfg.descriptions}: no such file, and L_LLM needs "
                             "it to train: restore it, or write it with python describe.py")
        # Eq. 5's cosine of an M x E and an e x E matrix, read (ours) as the cosine of their means:
        # 1 - cos(mean of the M prompts, mean of the e descriptions)
        if self.cfg.distill == "cosine":
            return (1 - F.cosine_similarity(text.mean(-2), self.desc_mean, dim=-1)).mean()
        # (..., C, M, e) wd: prompts -> descriptions
        cost = 1 - text @ self.desc.transpose(-1, -2)
        # the plan in fp32, as graph_plan
        with torch.no_grad(), torch.autocast(cost.device.type, enabled=False):
            log_p = cost.new_full(cost.shape[-2:-1], -math.log(cost.shape[-2]),
                                  dtype=torch.float)  # (M,) uniform
            # -C / lambda
            log_kernel = (text.float() @ self.desc.transpose(-1, -2) - 1) / self.cfg.ot_lambda
            plan = sinkhorn(log_kernel, log_p, self.desc_log_q, self.cfg.sinkhorn_iters,
                            self.cfg.sinkhorn_tol, self.cfg.sinkhorn_stop)
        return (plan * cost).sum((-2, -1)).mean()

    def loss(self, logits, labels, epoch):
        """Eq. 9: beta L_LLM + (1 - beta) L_img, L_img = CE(logits), L_LLM of the last forward's
        prompts."""
        # fp32 logits: exact softmax under any autocast
        image_loss = F.cross_entropy(logits.float(), labels)
        if not self.cfg.beta:
            return image_loss
        return self.cfg.beta * self.llm_loss(self.text) + (1 - self.cfg.beta) * image_loss

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP: BatchNorm statistics stay as they were trained
        self.cached = self.text = None
        return self

def check_config(cfg):
    """ValueError for a Config no model can be trained with (train.py calls it before loading CLIP):
    its values, and its descriptions file, which only training reads (a model built without it still
    evaluates)."""
    check_values(cfg)
    if cfg.beta and cfg.descriptions and not descriptions_file(cfg.descriptions).exists():
        raise ValueError(f"descriptions={cfg.descriptions}: no such file (python describe.py "
                         "writes one; descriptions= uses the template)")

def check_values(cfg):
    """ValueError for a Config value no model can be built with."""
    if cfg.distill not in ("cosine", "wd"):
        raise ValueError(f"distill={cfg.distill!r}: use cosine or wd")
    if cfg.sinkhorn_stop not in ("rows", "plot"):
        raise ValueError(f"sinkhorn_stop={cfg.sinkhorn_stop!r}: use rows or plot")
    if cfg.global_logit not in ("never", "imagenet", "always"):
        raise ValueError(f"global_logit={cfg.global_logit!r}: use never, imagenet or always")
    for name, ok, rule in [("n_prompts", cfg.n_prompts >= 1, "1 or more"),
                           ("n_ctx", cfg.n_ctx >= 0, "0 or more"),
                           ("alpha", 0 <= cfg.alpha <= 1, "in [0, 1]"),
                           ("beta", 0 <= cfg.beta < 1, "in [0, 1)"),
                           ("ot_lambda", cfg.ot_lambda > 0, "above 0"),
                           ("gw_iters", cfg.gw_iters >= 1, "1 or more"),
                           ("sinkhorn_iters", cfg.sinkhorn_iters >= 1, "1 or more"),
                           ("sinkhorn_tol", cfg.sinkhorn_tol >= 0, "0 (a fixed count) or more"),
                           ("max_prompts", cfg.max_prompts >= 1, "1 or more"),
                           ("checkpoint_prompts", cfg.checkpoint_prompts >= 0,
                            "0 (never) or more")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")

def build(clip, classnames, cfg):
    check_values(cfg)
    clip.requires_grad_(False)
    if cfg.beta and cfg.descriptions and not descriptions_file(cfg.descriptions).exists():
        descriptions = None  # moved since training: evaluation does not need them
    elif cfg.beta and cfg.descriptions:
        descriptions = read_descriptions(cfg.descriptions, classnames)
    else:
        # beta = 0 reads nothing; without a file each class's description is its template sentence
        descriptions = [[cfg.template.format(c.replace("_", " "))] for c in classnames]
    return DualPT(clip, classnames, cfg, descriptions)
