"""OpenAI CLIP, self-contained: both towers, BPE tokenizer, preprocess, verified download and
loading.

Radford et al., ICML 2021, https://arxiv.org/abs/2103.00020. Names and state-dict keys are
openai/CLIP's, so its checkpoints load unchanged and outputs match it in fp32
(tests/test_clip_model.py). Unlike it: batch-first with `F.scaled_dot_product_attention`; text cut
after the batch's last EOT (exact under the causal mask); fp32 weights (train.py picks precision
once, by autocast). What methods build on (no method code lives here): images
`visual.embed -> visual.transformer.resblocks -> visual.head`, or `visual.dense` (global + local
features); text `embed_text -> encode_text_embeddings`, or its parts `positional_embedding`,
`causal_mask`, `transformer.resblocks`, `text_head`; attention maps from
`block(x, mask, return_attn=True)`. `load` reads OpenAI's names and files; other_weights.py converts
Hugging Face (transformers CLIPModel) and OpenCLIP weights of OpenAI's architecture into this CLIP,
with each model's own preprocessing.

Shape letters, one meaning in every file of the repository (a method file adds its paper's own
symbols and says so): B images in a batch, C classes, L tokens of a text prompt, N image tokens
after the class token (patches, or a ResNet's positions), D text width, W image width, E joint
embedding width (both towers' output), H attention heads, R image resolution, n learned prompt
tokens per block.
"""
import gzip
import hashlib
import html
import math
import os
import re
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import ftfy
import regex
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torchvision import transforms as T

_URL = "https://openaipublic.azureedge.net/clip/models/{}/{}"
MODELS = {  # name -> URL; the second-to-last path segment is the file's SHA256
    "RN50": _URL.format(
        "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": _URL.format(
        "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": _URL.format(
        "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": _URL.format(
        "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": _URL.format(
        "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B/32": _URL.format(
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": _URL.format(
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": _URL.format(
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": _URL.format(
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
# CLIP arguments: embed, resolution, vision layers/width/patch, context, vocab,
# text width/heads/layers
CONFIGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
    # tiny models: random weights only, for tests and demos
    "tiny": (64, 32, 2, 128, 8, 77, 49408, 128, 2, 2),
    "tiny-rn": (64, 64, (1, 2, 1, 1), 8, None, 77, 49408, 128, 2, 2),
}
# OpenAI's normalisation, per RGB channel of pixels in [0, 1]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
VOCAB = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = 49406, 49407

class Preprocessing(NamedTuple):
    """How a model's images are prepared, as in its training: resized with `interpolation`
    ("shortest": the short side to `size`, then the centre `size` x `size` crop, as OpenAI's;
    "squash": the whole image to `size` x `size`, its aspect ratio lost, as DFN5B's), then
    normalised with `mean` and `std`. Every CLIP carries its own (`model.preprocessing`): OpenAI's,
    unless the converter of another format (other_weights.py) read another."""
    size: int
    mean: tuple = MEAN
    std: tuple = STD
    resize: str = "shortest"
    interpolation: str = "bicubic"  # a torchvision InterpolationMode's value

class LoadError(RuntimeError):
    """A model name, file or download the user supplied cannot be used; the message says what to
    do."""

class TextTooLong(ValueError):
    """A text longer than the context length (tokenize without truncate)."""

    def __init__(self, text, length, context_length):
        self.length, self.context_length = length, context_length
        super().__init__(f"{text[:50]!r}... is {length} tokens, more than the context length "
                         f"{context_length}: shorten it or pass truncate=True")

def available_models():
    return list(MODELS)

class Tokenizer:
    def __init__(self, vocab_path=VOCAB):
        if not Path(vocab_path).is_file():
            raise LoadError(f"BPE vocabulary {vocab_path} is missing: copy it from this repo "
                            "next to clip_model.py")
        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
        # line 0 is a header
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        # bytes shown as themselves
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        # the others as chr(256 + k); ids follow this order
        rest = [b for b in range(256) if b not in printable]
        self.byte_table = {b: chr(c) for b, c in
                           zip(printable + rest, printable + [256 + k for k in range(len(rest))])}
        symbols = list(self.byte_table.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        self.vocab = vocab + ["<|startoftext|>", "<|endoftext|>"]  # id -> symbol
        self.ids = {s: i for i, s in enumerate(self.vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                                     r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
        self.bpe = lru_cache(maxsize=100_000)(self.merge)  # a cache per tokenizer, freed with it

    def merge(self, piece):
        """One pre-tokenised piece -> its BPE symbols (use the cached self.bpe)."""
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            return [piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:  # merge the best-ranked adjacent pair everywhere, until none is ranked
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                take = 2 if tuple(word[i:i + 2]) == pair else 1
                merged.append("".join(word[i:i + take]))
                i += take
            word = merged
        return word

    def encode(self, text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        # re, not regex: their \s differ (e.g. \x1c)
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in self.pattern.findall(text):
            piece = "".join(self.byte_table[b] for b in piece.encode("utf-8"))
            ids += [self.ids[s] for s in self.bpe(piece)]
        return ids

    def decode(self, ids):
        """Token ids -> text: a space after each word end ("</w>"); encode's inverse up to spacing
        ("dog ." for "dog.") and its clean-up (lower case)."""
        back = {c: b for b, c in self.byte_table.items()}
        words = "".join(self.vocab[i] for i in ids).split("</w>")
        return " ".join(bytes(back[c] for c in word).decode("utf-8", errors="replace")
                        for word in words).strip()

_tokenizer = lru_cache(maxsize=1)(Tokenizer)  # built once, on first use

def tokenize(texts, context_length=77, truncate=False):
    """Texts -> (N, context_length) int64 ids: SOT, BPE ids, EOT, zero padding."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [SOT] + _tokenizer().encode(text) + [EOT]
        if len(ids) > context_length:
            if not truncate:
                raise TextTooLong(text, len(ids), context_length)
            ids = ids[:context_length - 1] + [EOT]
        tokens[i, :len(ids)] = torch.tensor(ids)
    return tokens

def causal_mask(n, device=None):
    """(n, n) bool, True where query i may attend key j (j <= i). Never a buffer: no state-dict
    key."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)  # CLIP was trained with this, not nn.GELU

class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, batch-first."""
    def __init__(self, width, heads):
        super().__init__()
        # W must divide by it: each head owns W/H consecutive columns of q, k and v
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * width ** -0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, mask=None, return_attn=False):
        B, L, W = x.shape
        # (B, L, 3W): q, k, v rows of in_proj
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # (B, H, L, W/H)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if not return_attn:
            out, probs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        else:  # the same attention with its probabilities kept, for analysis
            scores = q @ k.transpose(-2, -1) / math.sqrt(W // self.heads)  # (B, H, L, L)
            probs = (scores if mask is None else scores.masked_fill(~mask, -math.inf)).softmax(-1)
            out = probs @ v
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W)), probs

class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, activation="quick_gelu"):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        # OpenAI's models use QuickGELU, most OpenCLIP and some Hugging Face ones exact GELU: the
        # weights cannot tell which, and the wrong one costs accuracy without an error. "gelu" keeps
        # the key name (no parameters).
        gelu = {"quick_gelu": QuickGELU, "gelu": nn.GELU}[activation]()
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=gelu,
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask=None, return_attn=False):
        attn, probs = self.attn(self.ln_1(x), mask, return_attn)
        x = x + attn
        x = x + self.mlp(self.ln_2(x))
        return (x, probs) if return_attn else x

class Transformer(nn.Module):
    def __init__(self, width, layers, heads, activation="quick_gelu"):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, activation)
                                        for _ in range(layers)])

    def forward(self, x, mask=None, checkpoint=False):
        """checkpoint: keep only each block's input for backward and recompute the rest there
        (activation checkpointing: one more forward of every block for a fraction of the memory;
        exact). Only with gradients."""
        for block in self.resblocks:
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x

class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim,
                 activation="quick_gelu"):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(
            torch.randn((input_resolution // patch_size) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width ** -0.5)

    def embed(self, images):
        """(B, 3, R, R) -> (B, 1+N, W): class token then N patches, with positions, after ln_pre."""
        if images.shape[-2:] != (self.input_resolution,) * 2:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])}, this model takes "
                f"{self.input_resolution}x{self.input_resolution}: use its preprocess")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, W), patches row-major
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)  # (B, 1+N, W)

    def head(self, x):
        # (B, E): the class token, wherever prompts were put
        return self.ln_post(x[:, 0]) @ self.proj

    def forward(self, images):
        return self.head(self.transformer(self.embed(images)))

    def dense(self, images):
        """(B, 1+N, E): every token through ln_post + proj; index 0 = encode_image,
        1.. = patches."""
        return self.ln_post(self.transformer(self.embed(images))) @ self.proj

class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = (nn.Conv2d(planes, planes, 3, padding=1, bias=False),
                                nn.BatchNorm2d(planes))
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()  # anti-aliased stride
        self.conv3, self.bn3 = (nn.Conv2d(planes, planes * 4, 1, bias=False),
                                nn.BatchNorm2d(planes * 4))
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),  # no keys: anti-aliasing
                ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.avgpool(F.relu(self.bn2(self.conv2(out)), inplace=True))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)

class AttentionPool2d(nn.Module):
    def __init__(self, grid, dim, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid ** 2 + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(dim, dim), nn.Linear(dim, dim),
                                                 nn.Linear(dim, dim))
        self.c_proj, self.heads = nn.Linear(dim, output_dim), heads
        # CLIP's init; torch's std is √3 smaller
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(proj.weight, std=dim ** -0.5)

    def forward(self, x, all_tokens=False):
        """(B, C, g, g) -> (B, E) pooled by the mean token; all_tokens: (B, 1+g², E), every token a
        query."""
        x = x.flatten(2).transpose(1, 2)  # (B, g², C) row-major
        # (B, 1+g², C)
        x = torch.cat([x.mean(1, keepdim=True), x], dim=1) + self.positional_embedding
        B, L, C = x.shape

        def split(t):  # (B, ·, C) -> (B, H, ·, C/H)
            return t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)
        q = split(self.q_proj(x if all_tokens else x[:, :1]))
        out = F.scaled_dot_product_attention(q, split(self.k_proj(x)), split(self.v_proj(x)))
        out = self.c_proj(out.transpose(1, 2).reshape(B, -1, C))
        return out if all_tokens else out[:, 0]

class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, anti-aliased (avg-pool) strides and an attention-pool head."""
    def __init__(self, layers, output_dim, heads, input_resolution, width):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1, self.bn1 = (nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False),
                                nn.BatchNorm2d(width // 2))
        self.conv2, self.bn2 = (nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False),
                                nn.BatchNorm2d(width // 2))
        self.conv3, self.bn3 = (nn.Conv2d(width // 2, width, 3, padding=1, bias=False),
                                nn.BatchNorm2d(width))
        self.avgpool = nn.AvgPool2d(2)
        inplanes, stages = width, []
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stages.append(nn.Sequential(*[Bottleneck(inplanes if b == 0 else planes * 4, planes,
                                                     stride=2 if i > 0 and b == 0 else 1)
                                          for b in range(blocks)]))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def features(self, images):
        """(B, 3, R, R) -> (B, 32W, R/32, R/32), the map the attention pool reads."""
        x = F.relu(self.bn1(self.conv1(images)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.avgpool(F.relu(self.bn3(self.conv3(x)), inplace=True))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, images):
        return self.attnpool(self.features(images))

    def dense(self, images):
        """(B, 1+g², E): index 0 = encode_image, 1.. = every spatial position through the pool."""
        return self.attnpool(self.features(images), all_tokens=True)

class CLIP(nn.Module):
    """OpenAI's 10 arguments (CONFIGS), and three that OpenAI's models leave at their defaults:
    `vision_heads` (a ViT's; OpenAI's have 64-wide heads, ViT-H-14's are 80), `activation` of both
    towers' MLPs, "quick_gelu" or "gelu", and `preprocessing`, how its images are prepared (a
    Preprocessing; default OpenAI's)."""
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width,
                 vision_patch_size, context_length, vocab_size, transformer_width,
                 transformer_heads, transformer_layers,
                 vision_heads=None, activation="quick_gelu", preprocessing=None):
        super().__init__()
        self.context_length, self.activation = context_length, activation
        self.preprocessing = preprocessing or Preprocessing(image_resolution)
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64,
                                         image_resolution, vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                            vision_layers, vision_heads or vision_width // 64,
                                            embed_dim, activation)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       activation)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(
            torch.randn(context_length, transformer_width) * 0.01)
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(
            torch.randn(transformer_width, embed_dim) * transformer_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_image(self, images):  # (B, 3, R, R) -> (B, E)
        return self.visual(images)

    def embed_text(self, tokens):
        # (N, 77, D), no positions
        return self.token_embedding(tokens.to(self.token_embedding.weight.device))

    def encode_text_embeddings(self, x, eot_index, checkpoint=False):
        """(N, 77, D) token embeddings -> (N, E). Positions after the batch's last EOT are cut:
        under the causal mask no earlier position can see them, so the result is exact and ~77/L
        cheaper. Embeddings shorter than 77 are taken as they are (methods cut theirs once, at
        build; reading eot_index here would make every training step wait for the GPU). checkpoint:
        see Transformer.forward."""
        L = x.shape[1] if x.shape[1] < self.context_length else int(eot_index.max()) + 1
        x = x[:, :L] + self.positional_embedding[:L]
        x = self.transformer(x, causal_mask(L, x.device), checkpoint)
        return self.text_head(x, eot_index)

    def text_head(self, x, eot_index):
        # indices on x's device: indexing copies nothing
        rows = torch.arange(x.shape[0], device=x.device)
        return self.ln_final(x[rows, eot_index.to(x.device)]) @ self.text_projection  # (N, E)

    def encode_text(self, tokens):
        # EOT is the largest id
        return self.encode_text_embeddings(self.embed_text(tokens), tokens.argmax(-1))

    def forward(self, images, tokens):
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * image @ text.t()  # (B, N)

def config_from_state_dict(sd):
    """The 10 CLIP constructor arguments, read off the shapes of an OpenAI state dict."""
    if "visual.proj" in sd:  # ViT
        width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
        layers = sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in sd)
        resolution = patch * round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    else:  # ModifiedResNet
        width, patch = sd["visual.layer1.0.conv1.weight"].shape[0], None
        layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                       for b in (1, 2, 3, 4))
        rows = sd["visual.attnpool.positional_embedding"].shape[0]
        grid = round((rows - 1) ** 0.5)
        assert grid ** 2 + 1 == rows, rows
        resolution = 32 * grid
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    return (sd["text_projection"].shape[1], resolution, layers, width, patch,
            sd["positional_embedding"].shape[0], sd["token_embedding.weight"].shape[0], text_width,
            text_width // 64, text_layers)

def build_model(state_dict, config=None, **options):
    """A CLIP in eval mode holding `state_dict` (fp32); LoadError if the dict is not a CLIP's.
    `config`: the 10 constructor arguments (default: read off the shapes); `options`: CLIP's keyword
    arguments, which shapes cannot tell (other formats' converters read them from their
    configuration)."""
    sd = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v
          for k, v in state_dict.items()}
    # metadata
    resolution, _, _ = [sd.pop(k, None) for k in ("input_resolution", "context_length",
                                                  "vocab_size")]
    try:
        config = config or config_from_state_dict(sd)
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = CLIP(*config, **options)
    except (KeyError, AssertionError, IndexError, TypeError) as e:
        problems = [f"cannot read the architecture: no key {e}" if isinstance(e, KeyError)
                    else repr(e)]
    else:
        expected = model.state_dict()
        problems = [f"missing {k}" for k in expected if k not in sd]
        problems += [f"unexpected {k}" for k in sd if k not in expected]
        problems += [f"{k} is {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
                     for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if problems:
        raise LoadError(f"not a CLIP state dict ({'; '.join(problems[:3])}"
                        f"{' ...' if len(problems) > 3 else ''}): "
                        "pass an OpenAI CLIP checkpoint or a torch.save'd CLIP state_dict")
    assert resolution is None or int(resolution) == config[1], (int(resolution), config[1])
    model.load_state_dict(sd, assign=True)
    return model.eval()

def read_state_dict(path):
    """An OpenAI TorchScript archive, a torch.save'd state dict or training checkpoint (OpenCLIP's:
    its "state_dict") or a .safetensors file -> {key: tensor} on the CPU; keys saved from
    DistributedDataParallel lose their "module." prefix. A LoadError when the file is damaged
    (truncated by a stopped download, say)."""
    # a Hugging Face cache entry is a link to its blob, the file to delete
    real = os.path.realpath(path)
    damaged = (f"{path} is unreadable or corrupt ({{}}): it is not a complete checkpoint; delete "
               f"{real if real != os.path.abspath(path) else 'it'} and download it again")
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise LoadError(f"{path} is a safetensors file: "
                            "pip install safetensors to read it") from None
        try:
            sd = load_file(path)
        except Exception as e:
            # safetensors' SafetensorError (a header or length that does not add up), OSError
            raise LoadError(damaged.format(f"{type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:80]}")) from None
    else:
        # OpenAI's files are TorchScript archives: zips with a constants.pkl
        # (torch.save zips have none)
        try:
            if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl")
                                                for n in zipfile.ZipFile(path).namelist()):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
                    return torch.jit.load(path, map_location="cpu").state_dict()
            # weights_only: a file cannot run code
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LoadError(damaged.format(type(e).__name__)) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LoadError(f"{path} holds no state dict of tensors: pass an OpenAI CLIP checkpoint")
    # torch.save(ddp_model.state_dict()), wrapped or not
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd

def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

def download(url, root):
    """The verified file for `url` in `root`: reused if its SHA256 matches, else fetched to a temp
    file, checked and renamed into place, so the cache never holds a partial or wrong file."""
    os.makedirs(root, exist_ok=True)
    expected, target = url.split("/")[-2], os.path.join(root, url.split("/")[-1])
    if os.path.exists(target):
        if not os.path.isfile(target):
            raise LoadError(f"{target} exists and is not a regular file: remove it")
        if _sha256(target) == expected:
            return target
        warnings.warn(f"{target} does not match its SHA256; downloading it again", stacklevel=2)
    tmp = tempfile.NamedTemporaryFile(dir=root, prefix=os.path.basename(target), suffix=".part",
                                      delete=False)
    try:
        digest, done = hashlib.sha256(), 0
        with tmp, urllib.request.urlopen(url) as source:
            total = int(source.headers.get("Content-Length") or 0)
            step = total // 10 or 100 << 20
            while chunk := source.read(1 << 20):
                tmp.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if done // step > (done - len(chunk)) // step:  # every ~10 %
                    print(f"downloading {url}: {done >> 20} of {total >> 20 or '?'} MiB",
                          file=sys.stderr)
        if digest.hexdigest() != expected:
            raise LoadError(f"{url} downloaded with SHA256 {digest.hexdigest()}, expected "
                            f"{expected}; the file was discarded: try again, or copy a verified "
                            "file into " + root)
        os.replace(tmp.name, target)
        return target
    except OSError as e:  # urllib.error.URLError is an OSError
        raise LoadError(f"could not download {url} ({e}): without internet, copy "
                        f"{os.path.basename(target)} into {root} or pass its path") from None
    finally:
        if os.path.exists(tmp.name):
            os.remove(tmp.name)

def transform(preprocessing):
    """A model's test-time preprocess (its `preprocessing`, or an int: OpenAI's at that size): PIL
    image -> normalised (3, size, size) tensor."""
    p = Preprocessing(preprocessing) if isinstance(preprocessing, int) else preprocessing
    mode = T.InterpolationMode(p.interpolation)
    if p.resize == "squash":
        resize = [T.Resize((p.size, p.size), interpolation=mode)]
    elif p.resize == "shortest":
        resize = [T.Resize(p.size, interpolation=mode), T.CenterCrop(p.size)]
    else:
        raise ValueError(f"resize {p.resize!r} is neither 'shortest' nor 'squash'")
    return T.Compose([*resize, to_rgb, T.ToTensor(), T.Normalize(p.mean, p.std)])

def to_rgb(image):
    # after the crop, as the reference does (matters for RGBA and palettes)
    return image.convert("RGB")

@torch.no_grad()
def calibrate_batchnorm(tower, images):
    """Set every BatchNorm's running statistics in `tower` to those of `images` (B, 3, R, R). For
    random weights only (trained ones carry their own): at the untrained statistics (mean 0,
    variance 1) BatchNorm normalises nothing, the signal shrinks at every convolution (tiny-rn:
    std 0.35 after the first, 0.0008 after layer4), the attention pool's positional embedding
    outweighs it, and every image and every position gets the same feature."""
    batchnorms = [m for m in tower.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta, training = [bn.momentum for bn in batchnorms], tower.training
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: after one batch, exactly that batch's statistics
    tower.train()
    tower(images)
    tower.train(training)
    for bn, momentum in zip(batchnorms, momenta):
        bn.momentum = momentum

def noise_images(n, resolution):
    """(n, 3, R, R) random images with about the 1/f spectrum of photographs (equal power per
    octave: noise drawn at 4x4, 8x8, 16x16, ... up to R and upsampled), scaled to unit variance like
    CLIP's inputs."""
    sizes = [2 ** k for k in range(2, int(math.log2(resolution)) + 1)]
    x = sum(F.interpolate(torch.randn(n, 3, s, s), size=resolution, mode="bilinear") for s in sizes)
    return x / x.std()

def random_model(config, seed, **options):
    """A CLIP with seeded random weights (a ResNet's BatchNorm statistics measured on noise
    images)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(*config, **options).eval()
        # see calibrate_batchnorm: else every image looks alike
        if isinstance(model.visual, ModifiedResNet):
            calibrate_batchnorm(model.visual, noise_images(16, model.visual.input_resolution))
    return model

def load(name_or_path, device="cpu", download_root=None, pretrained=True, seed=0):
    """(model, preprocess) for one of OpenAI's names (CONFIGS) or the path of a checkpoint file
    (OpenAI's, or a saved CLIP state dict); pretrained=False (names only, no download) or `tiny`:
    seeded random weights (random_model). Hugging Face's and OpenCLIP's formats:
    other_weights.load_backbone, which takes every backbone string."""
    if name_or_path in CONFIGS and (not pretrained or name_or_path not in MODELS):
        model = random_model(CONFIGS[name_or_path], seed)
    elif name_or_path in MODELS:
        path = download(MODELS[name_or_path], download_root or os.path.expanduser("~/.cache/clip"))
        model = build_model(read_state_dict(path))
    elif os.path.isfile(name_or_path):
        model = build_model(read_state_dict(name_or_path))
    elif os.path.exists(name_or_path):
        raise LoadError(f"{name_or_path} is not a file: pass the path of a CLIP checkpoint file")
    else:
        raise LoadError(f"Unknown CLIP model {name_or_path!r} and no file at that path. Available: "
                        f"{', '.join(CONFIGS)} - or pass the path of a checkpoint file")
    return model.to(device), transform(model.preprocessing)
