"""Bias tuning: one learned vector added to every token after each block of both CLIP towers.

Ma et al., "Understanding the Multi-modal Prompts of the Pre-trained Vision-Language Model", 2023,
https://arxiv.org/abs/2312.11570, section 4.4 and Table 1. No official code.

Probing what learned prompts do, the paper finds that they act mostly as a dataset bias: the class
token and the EOT token attend to them, but what they carry hardly depends on the input. Bias tuning
tests that reading directly: instead of prompt tokens, every transformer block of both towers gets
one learned vector, added to all tokens of its output. With as many parameters as a few prompt
tokens it matches or beats prompt tuning (the paper's Table 1: 79.5 vs IVLP's 77.8 at 16 shots,
averaged over 11 datasets).

- Learned: `text_bias` (text blocks, D) and `image_bias` (image blocks, W), one vector per block.
- Injected where: after block i, x <- block_i(x) + b_i, broadcast over the batch and every token.
- Frozen: all of CLIP; the text input is the dataset's hand-crafted template.
- Loss: cross-entropy over the C classes (the paper trains it as its IVLP baseline, section 4.1).
- Deviations (ours where the paper is silent): zero initialisation (the untrained model is zero-shot
  CLIP); `text=false` / `visual=false` ablations, the latter for ResNets, which have no image token
  blocks.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

@dataclass
class Config:
    backbone: str = "ViT-B/16"          # the paper's backbone (its IVLP settings, section 4.1)
    template: str = "a photo of a {}."  # hand-crafted prompt; train.py sets the dataset's
    text: bool = True                   # biases in the text tower
    visual: bool = True                 # biases in the image tower
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.0025
    warmup_epochs: int = 1              # at constant 1e-5, then cosine

VARIANTS = {"bias_tuning": dict()}
ABOUT = {  # --method name -> what it is, for python train.py --list
    "bias_tuning": "bias tuning (Ma et al., 2023): one learned vector added after every block of "
                   "both towers",
}

def parameter_versions(module):
    """Changes whenever a parameter of `module` is replaced, moved or changed in place (an optimiser
    step, load_state_dict): cached text features are reused only while it stays the same."""
    return [(p.data_ptr(), p._version) for p in module.parameters()]

class BiasTuning(nn.Module):
    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip = clip
        device = clip.token_embedding.weight.device
        # zero at start (ours: the paper gives no init): the model starts as zero-shot CLIP
        self.text_bias = None
        if cfg.text:
            D = clip.ln_final.weight.shape[0]
            text_blocks = len(clip.transformer.resblocks)
            self.text_bias = nn.Parameter(torch.zeros(text_blocks, D, device=device))
        self.image_bias = None
        if cfg.visual:
            W = clip.visual.conv1.out_channels
            image_blocks = len(clip.visual.transformer.resblocks)
            self.image_bias = nn.Parameter(torch.zeros(image_blocks, W, device=device))
        # (C, 77)
        tokens = clip_model.tokenize([cfg.template.format(c.replace("_", " ")) for c in classnames])
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot", tokens.argmax(-1), persistent=False)  # (C,)
        # L: positions after the last EOT are never read (causal mask)
        self.length = int(self.eot.max()) + 1
        self.cached = None  # (parameter_versions, (C, E) text features), reused while evaluating

    def encode_text(self):
        # known at build: reading it from the tokens here would make every step wait for a GPU
        L = self.length
        # (C, L, D)
        x = self.clip.embed_text(self.tokens[:, :L]) + self.clip.positional_embedding[:L]
        mask = clip_model.causal_mask(L, x.device)
        for i, block in enumerate(self.clip.transformer.resblocks):
            x = block(x, mask)  # (C, L, D)
            if self.text_bias is not None:
                x = x + self.text_bias[i]
        return self.clip.text_head(x, self.eot)

    def encode_image(self, images):
        visual = self.clip.visual
        if self.image_bias is None:
            return visual(images)
        x = visual.embed(images)  # (B, 1+N, W)
        for i, block in enumerate(visual.transformer.resblocks):
            x = block(x) + self.image_bias[i]  # (B, 1+N, W)
        return visual.head(x)

    def text_features(self):
        """(C, E) normalised; without gradients in eval mode computed once,
        until a parameter changes."""
        if self.training or torch.is_grad_enabled():
            return F.normalize(self.encode_text(), dim=-1)
        key = parameter_versions(self)
        if self.cached is None or self.cached[0] != key:
            self.cached = key, F.normalize(self.encode_text(), dim=-1)
        return self.cached[1]

    def forward(self, images):
        image = F.normalize(self.encode_image(images), dim=-1)  # (B, E)
        text = self.text_features()  # (C, E)
        return self.clip.logit_scale.exp() * image @ text.t()  # (B, C)

    def loss(self, logits, labels, epoch):
        """Bias tuning's loss: the cross-entropy of the softmax over the C classes' logits."""
        # fp32 logits: an exact softmax under any autocast
        return F.cross_entropy(logits.float(), labels)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP (ResNet BatchNorm statistics stay as trained)
        self.cached = None
        return self

def build(clip, classnames, cfg):
    if cfg.visual and not isinstance(clip.visual, clip_model.VisionTransformer):
        raise ValueError("a ResNet image tower has no token blocks for biases: use a ViT backbone "
                         "(ViT-B/16, ViT-B/32, ViT-L/14, tiny), or --set visual=false for text "
                         "biases only")
    clip.requires_grad_(False)
    return BiasTuning(clip, classnames, cfg)
