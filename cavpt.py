"""CAVPT and DPT: deep visual prompts plus class-aware visual prompts made from each image's likely
classes.

Xing et al., "Dual Modality Prompt Tuning for Vision-Language Pre-Trained Model", IEEE TMM 2023,
https://arxiv.org/abs/2208.08340. Official code: github.com/fanrena/DPT (`trainers/DPT.py`).

A frozen zero-shot pass of CLIP picks each image's K most likely classes (the paper's K). Before
each class-aware block (by default only the last) their text features, through a meta-net, query a
cross-attention over the block's input tokens; each output is one class-aware prompt for that block,
kept about its class by an auxiliary classifier. Earlier blocks get deep VPT prompts (vpt.py). DPT
(VLP-CLIP-CAVPT) also learns a CoOp text context.

- Learned: `prompts` (b-1, n, W), b = the official BOTTOMLIMIT (first class-aware block, 1-based);
  one `ClassAwarePrompts` generator per class-aware block (J of them); DPT adds CoOp's `ctx`
  (16, D).
- Injected where: appended after the patches before each block, their outputs dropped after it.
- Frozen: all of CLIP, and the zero-shot pass that picks the K classes.
- Loss: Eq. 12, cross-entropy over the C classes + aux_weight x the class-aware prompts' aux
  cross-entropy.
- Deviations (details on the lines they concern):
  - The generator, DPT's queries and the aux loss are the official code's, not Eqs. 9-10 (it made
    the numbers).
  - VPT-CLIP-CAVPT queries with the template's text features (ours; not in the official code).
  - Defaults K 10, aux weight 1, 200 epochs, guidance off (official script: 10, 0.3, 60, 30 guidance
    epochs).
  - On other classes than the training ones, the aux classifiers are not loaded (ours; official:
    deleted).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

@dataclass
class Config:
    backbone: str = "ViT-B/32"          # the paper's backbone for every experiment
    template: str = "a photo of a {}."  # hand-crafted text prompt; train.py sets the dataset's
    # deep VPT prompt tokens per block below the class-aware blocks
    n_tokens: int = 10
    # CoOp context tokens in the text prompt (DPT); 0 = the template
    text_ctx: int = 16
    # K, class-aware prompts per image (official CPN in its script; default 5; Table 1 takes the
    # best K per dataset, e.g. DTD's 68.68 at K = 5)
    top_k: int = 10
    # code's BOTTOMLIMIT b: blocks b.. (1-based) are class-aware; 12 = last
    bottom_limit: int = 12
    key_tokens: int = 10                # learned tokens added to each generator's keys and values
    attn_dim: int = 32                  # the generator's query/key width
    # Eq. 12's weight (official script 0.3); 0 = the paper's "w/o loss"
    aux_weight: float = 1.0
    # official code only (script: 30): "general knowledge guidance", see loss
    guidance_epochs: int = 0
    epochs: int = 200                   # the paper (official script: 60)
    batch_size: int = 32
    lr: float = 0.01                    # VPT prompts and generators (official VPT config)
    # lr 1e-5 for the first 10 epochs, every dataset (official: 1 on ImageNet)
    warmup_epochs: int = 10
    text_lr: float = 0.002              # DPT text context: CoOp's lr ...
    text_warmup_epochs: int = 1         # ... and CoOp's warm-up

VARIANTS = {"vpt-cavpt": dict(text_ctx=0), "cavpt": dict()}
ABOUT = {  # --method name -> what it is, for python train.py --list
    "vpt-cavpt": ("VPT-CLIP-CAVPT: deep visual prompts plus class-aware visual prompts from the "
                  "likely classes"),
    "cavpt": ("DPT (Xing et al., TMM 2023): CoOp's text context plus deep and class-aware visual "
              "prompts"),
}

class ClassAwarePrompts(nn.Module):
    """One class-aware block's generator: K text features + the block's tokens -> K prompts, aux
    logits. As the official code, not Eq. 9: one Linear for the paper's two-layer MLP; keys and
    values are the block's whole input (detached) plus learned tokens, not the class token alone;
    prompt = LN(out + query), not LP(LN(out)) + class token."""

    def __init__(self, E, W, C, cfg):
        super().__init__()
        self.meta_net = nn.Linear(E, W)  # text feature -> query in the image tower's width
        # (10, W) extra keys and values
        self.tokens = nn.Parameter(torch.randn(cfg.key_tokens, W) * 0.02)
        self.q_proj = nn.Linear(W, cfg.attn_dim, bias=False)
        self.k_proj = nn.Linear(W, cfg.attn_dim, bias=False)
        self.v_proj = nn.Linear(W, W, bias=False)
        self.ln_logits = nn.LayerNorm(W)
        self.ln_prompts = nn.LayerNorm(W)
        self.classifier = nn.Linear(W, C, bias=False)  # the aux classifier over all C classes

    def forward(self, x, text):
        """x (B, 1+N, W) the block's input, text (B, K, E) -> prompts (B, K, W), aux logits
        (B, K, C)."""
        query = self.meta_net(text)  # (B, K, W)
        # detached (official code): the generator reads the earlier blocks' output, sends no
        # gradient into it
        # (B, 1+N+key_tokens, W)
        kv = torch.cat([x.detach(), self.tokens.expand(len(x), -1, -1)], dim=1)
        q = self.q_proj(query)  # (B, K, attn_dim)
        k = self.k_proj(kv)  # (B, 1+N+key_tokens, attn_dim)
        # (B, K, 1+N+key_tokens)
        attention = (q @ k.transpose(1, 2) / k.shape[-1] ** 0.5).softmax(-1)
        out = self.v_proj(attention @ kv)  # (B, K, W)

        prompts = self.ln_prompts(out + query)  # (B, K, W)
        aux_logits = self.classifier(self.ln_logits(out))  # (B, K, C)
        return prompts, aux_logits

class VisualPrompts(nn.Module):
    """Deep VPT prompts for blocks 0..b-2, a class-aware prompt generator for each later block (J of
    them)."""

    def __init__(self, clip, C, cfg):
        super().__init__()
        W, blocks = clip.visual.conv1.out_channels, len(clip.visual.transformer.resblocks)
        # index of the first class-aware block (b capped: small models)
        first = min(cfg.bottom_limit, blocks) - 1
        self.prompts = nn.Parameter(torch.randn(first, cfg.n_tokens, W) * 0.02)  # (b-1, n, W)
        self.generators = nn.ModuleList(ClassAwarePrompts(clip.visual.output_dim, W, C, cfg)
                                        for _ in range(blocks - first))  # J

    def forward(self, visual, images, text):
        """text (B, K, E): the top-K classes' features -> image feature (B, E), aux logits
        (B, J, K, C)."""
        x = visual.embed(images)  # (B, 1+N, W): class token, patches, positions, ln_pre
        aux = []
        for i, block in enumerate(visual.transformer.resblocks):
            if i < len(self.prompts):
                prompts = self.prompts[i].expand(len(x), -1, -1)  # (B, n, W)
            else:
                # (B, K, W), (B, K, C)
                prompts, logits = self.generators[i - len(self.prompts)](x, text)
                aux.append(logits)
            # the prompts' outputs are dropped after each block (the readout is the class token)
            x = block(torch.cat([x, prompts], dim=1))[:, :x.shape[1]]  # (B, 1+N, W)
        return visual.head(x), torch.stack(aux, dim=1)

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

class CAVPTCLIP(nn.Module):
    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        self.K = min(cfg.top_k, len(classnames))  # top-K classes per image; K <= C
        self.visual_prompts = VisualPrompts(clip, len(classnames), cfg)
        self.text_context = TextContext(clip, classnames, cfg.text_ctx) if cfg.text_ctx else None
        # the hand-crafted side is frozen: its features are computed once
        with torch.no_grad():
            template = clip.encode_text(clip_model.tokenize(
                [cfg.template.format(c.replace("_", " ")) for c in classnames]))
        # (C, E) unnormalised: vpt-cavpt's queries
        self.register_buffer("template_text", template, persistent=False)
        self.register_buffer("template_features", F.normalize(template, dim=-1), persistent=False)
        # (parameter_versions, DPT's (C, E) text features), reused while evaluating
        self.cached = None
        self.topk = self.aux_logits = self.guidance = None  # kept by a training forward for loss()

    def text_features(self):
        """(C, E) before normalisation: the template's, or the learned context's (without gradients
        in eval mode computed once, until a parameter changes)."""
        if self.text_context is None:
            return self.template_text
        if self.training or torch.is_grad_enabled():
            return self.text_context(self.clip)
        key = parameter_versions(self)
        if self.cached is None or self.cached[0] != key:
            self.cached = key, self.text_context(self.clip)
        return self.cached[1]

    def forward(self, images):
        text = self.text_features()  # (C, E)
        # plain frozen CLIP picks each image's K likely classes; nothing trains it
        with torch.no_grad():
            zeroshot = F.normalize(self.clip.encode_image(images), dim=-1)  # (B, E)
            # (B, K)
            self.topk = (zeroshot @ self.template_features.t()).topk(self.K, dim=-1).indices
        # queries: the K classes' text features before normalisation, DPT's learned ones (official
        # code; the paper says the template's), VPT-CLIP-CAVPT's from the template (ours)
        queries = text[self.topk]  # (B, K, E)
        # (B, E), (B, J, K, C)
        image, self.aux_logits = self.visual_prompts(self.clip.visual, images, queries)

        image = F.normalize(image, dim=-1)
        text = F.normalize(text, dim=-1)
        scale = self.clip.logit_scale.exp()
        logits = scale * image @ text.t()  # (B, C)
        # the official guidance: each side against frozen CLIP's
        if self.training and self.cfg.guidance_epochs:
            self.guidance = (scale * zeroshot @ text.t(),
                             scale * image @ self.template_features.t())  # (B, C) each
        return logits

    def loss(self, logits, labels, epoch):
        """Eq. 12: CE(logits) + aux_weight x CE of the class-aware prompt at the true class's slot,
        over the images whose label is among their top K (and every class-aware block). In the first
        guidance_epochs the official code's guidance replaces CE(logits) by CE(to learned text) +
        CE(to template) + 0.1 CE(logits)."""
        # fp32 logits: under fp16 autocast the softmax over C classes would lose precision (the aux
        # and guidance terms below too)
        loss = F.cross_entropy(logits.float(), labels)
        if epoch < self.cfg.guidance_epochs:
            to_learned_text, to_template = (F.cross_entropy(z.float(), labels)
                                            for z in self.guidance)
            loss = to_learned_text + to_template + 0.1 * loss
        # the true class's slot only (official code; Eq. 10's uniform targets for the others are
        # computed there and discarded)
        # at most one slot per image
        rows, slots = (self.topk == labels[:, None]).nonzero(as_tuple=True)
        if len(rows) and self.cfg.aux_weight:
            aux = self.aux_logits[rows, :, slots]  # (hits, J, C)
            target = labels[rows, None].expand(-1, aux.shape[1])  # (hits, J)
            loss = loss + self.cfg.aux_weight * F.cross_entropy(aux.float().transpose(1, 2), target)
        return loss

    def param_groups(self, cfg):
        # the official code's three optimisers: ctx_learner, extractor, prompt_learner
        visual = self.visual_prompts
        groups = [{"params": [visual.prompts], "lr": cfg.lr, "warmup_epochs": cfg.warmup_epochs},
                  {"params": list(visual.generators.parameters()), "lr": cfg.lr,
                   "warmup_epochs": cfg.warmup_epochs}]
        if self.text_context is not None:
            groups.append({"params": [self.text_context.ctx], "lr": cfg.text_lr,
                           "warmup_epochs": cfg.text_warmup_epochs})
        return groups

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Aux classifiers sized for other classes keep this model's weights (the official code
        deletes them): they only shape training, so prompts learned on base classes still evaluate
        on new ones."""
        own = self.state_dict()
        state_dict = {k: (own[k] if k.endswith(".classifier.weight") and k in own
                          and v.shape != own[k].shape else v)
                      for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict, assign)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()
        self.cached = None
        return self

def check_config(cfg):
    """ValueError for a Config no model can be built from (train.py calls it before loading
    CLIP)."""
    for name, ok, rule in [("n_tokens", cfg.n_tokens >= 0, "0 or more"),
                           ("text_ctx", cfg.text_ctx >= 0, "0 (the template) or more"),
                           ("top_k", cfg.top_k >= 1, "1 or more"),
                           ("bottom_limit", cfg.bottom_limit >= 1, "1 or more"),
                           ("key_tokens", cfg.key_tokens >= 0, "0 or more"),
                           ("attn_dim", cfg.attn_dim >= 1, "1 or more"),
                           ("aux_weight", cfg.aux_weight >= 0, "0 (no aux loss) or more")]:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be {rule}")

def build(clip, classnames, cfg):
    check_config(cfg)
    if not isinstance(clip.visual, clip_model.VisionTransformer):
        raise ValueError("class-aware visual prompts need a transformer image tower: use a ViT "
                         "backbone (ViT-B/32, ViT-B/16, ViT-L/14, tiny)")
    clip.requires_grad_(False)
    return CAVPTCLIP(clip, classnames, cfg)
