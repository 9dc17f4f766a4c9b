"""What prompts do inside CLIP: attention statistics and relevancy maps,
a tuned run beside zero-shot CLIP.

    python analyze.py runs/dtd/mudpt/ViT-B-16/shots16/seed1            # a finished run of train.py
    python analyze.py --method zeroshot --data ./data/dtd --backbone ViT-B/16 --out analysis/

On N test images (fixed seed) it records every attention map of both towers (the
explicit-probability path of clip_model's blocks, kept in the autograd graph) and computes, per
block and head, following the probing paper of bias_tuning.py (Ma et al., arXiv 2312.11570,
sections 4.2-4.3):
- attention distance: mean over patch queries of sum_j A_ij |c_i - c_j| in pixels, over patch keys
  only, renormalised ("w/o prompt") and not ("w/ prompt": cls and prompt keys count 0);
- attention entropy of the patch queries over all keys (nats; uniform over L keys = ln L);
- prompt share: attention mass the cls and the patch queries put on prompt tokens (rows after the
  patches, where every method here appends its image prompts);
- text: what the EOT query attends to: SOT, the context (learned or hand-written words), the
  class name;
- relevancy (Chefer et al.): R = I, R <- R + mean_h(clamp(dy/dA * A, 0)) R per block, for the target
  logit y; image relevancy = R[cls, patches] on the g x g grid, text relevancy = R[EOT, :EOT];
- nearest words (CoOp, Sec. 4.4): the vocabulary tokens nearest each learned word-position vector.
It writes RUN_DIR/analysis/stats.json, relevancy_<i>.png (the image, zero-shot's and the method's
maps, each titled with its prediction, a colour bar, the method's text tokens shaded and named) and,
with matplotlib installed, one plot per statistic (method against zero-shot CLIP, per layer). Shapes
as clip_model.py's legend, plus S, the length of a tower's token sequence, and Chefer et al.'s
relevancy matrix R (S, S)."""
import argparse
import functools
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import clip_model
import coop
import data
import maple
import methods
import mudpt
import other_weights
import runs

class Recorder:
    """While active, every block of `clip` runs the explicit attention path and its maps are
    kept."""

    def __init__(self, clip):
        self.clip, self.maps = clip, {"image": [], "text": []}
        self.blocks = [("text", b.attn) for b in clip.transformer.resblocks]
        if isinstance(clip.visual, clip_model.VisionTransformer):
            self.blocks += [("image", b.attn) for b in clip.visual.transformer.resblocks]

    def __enter__(self):
        for tower, attn in self.blocks:
            def forward(x, mask=None, return_attn=False, run=attn.forward, tower=tower):
                out, probs = run(x, mask, True)
                self.maps[tower].append(probs)  # (B, H, S, S), in the graph
                return out, probs
            attn.forward = forward  # an instance attribute shadows the class's method
        # position embeddings need gradients so that every map is in the graph, whatever the
        # method learns
        self.clip.positional_embedding.requires_grad_(True)
        # a ResNet's maps are not recorded
        if isinstance(self.clip.visual, clip_model.VisionTransformer):
            self.clip.visual.positional_embedding.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for _, attn in self.blocks:
            del attn.forward
        self.clip.requires_grad_(False)

def attention_distance(A, grid, patch):
    """A (B, H, S, S) with patches at rows 1..g² -> (H,) distances: renormalised over patch keys,
    and not."""
    G = grid * grid
    centres = (torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid),
                                          indexing="ij"), -1)
               .reshape(G, 2).float() + 0.5) * patch
    d = torch.cdist(centres, centres)  # (G, G) pixels
    patches = A[:, :, 1:1 + G, 1:1 + G]  # patch queries, patch keys
    without = (patches / patches.sum(-1, keepdim=True) * d).sum(-1).mean((0, 2))
    return without, (patches * d).sum(-1).mean((0, 2))

def entropy(A, queries):
    """Mean over the query rows of -sum_j A_ij ln A_ij -> (H,)."""
    A = A[:, :, queries]
    return -(A * A.clamp_min(1e-12).log()).sum(-1).mean((0, 2))

def share(A, queries, keys):
    """Mean over the query rows of the attention mass on the key rows -> (H,)."""
    return A[:, :, queries][..., keys].sum(-1).mean((0, 2))

def rollout(maps, grads):
    """Chefer et al.'s relevancy: maps and grads lists of (B, H, S, S) -> R (B, S, S)."""
    B, _, S, _ = maps[0].shape
    R = torch.eye(S).expand(B, S, S)
    for A, g in zip(maps, grads):
        R = R + (g * A).clamp(min=0).mean(1) @ R
    return R

def load_model(args):
    """(method name, model, its Config, its classes, CLIP, preprocess, data path, output folder): a
    run rebuilt by runs.load_run, or, without one, --method as initialised on --data."""
    if args.run:
        results, _, cfg, _ = runs.read_run(args.run)
        model, preprocess, classnames = runs.load_run(args.run)
        return (results["method"], model, cfg, classnames, model.clip, preprocess, results["data"],
                Path(args.run) / "analysis")
    if not (args.method and args.data):
        raise methods.UserError("pass a run folder, or --method zeroshot --data D [--backbone B]")
    if args.method not in methods.METHODS:
        raise methods.UserError(f"unknown method {args.method!r}; choose one of: "
                                f"{' '.join(methods.METHODS)}")
    module, changes = methods.METHODS[args.method]
    cfg = replace(module.Config(), **changes,
                  **({"backbone": args.backbone} if args.backbone else {}))
    ds = data.load_dataset(args.data)
    cfg = methods.for_data(cfg, ds.template, ds.name)
    clip, preprocess = other_weights.load_backbone(cfg.backbone,
                                                   pretrained=args.init == "pretrained", seed=1)
    torch.manual_seed(1)
    model = module.build(clip, ds.classnames, cfg)
    return args.method, model, cfg, ds.classnames, clip, preprocess, args.data, Path("analysis")

def word_context(model):
    """The learned vectors a model puts where words go, at the text tower's input:
    {parameter name: (n, D)}, every `...ctx` parameter (CoOp, CoCoOp, VLP, DPT, MaPLe, DUAL-PT,
    PLOT, ProDA; several contexts: one row each) and the first block's `text_prompts` (MuDPT, IVLP:
    deeper blocks' prompts are not in the embedding space)."""
    found = {}
    for name, p in model.named_parameters():
        if name.split(".")[-1] == "ctx":
            found[name] = p.detach().reshape(-1, p.shape[-1])
        elif name == "text_prompts":
            found[f"{name}[0]"] = p.detach()[0]
    return found

def nearest_words(clip, vectors, k=3):
    """CoOp's reading of learned context (Zhou et al., IJCV 2022, Sec. 4.4): for each of the (n, D)
    vectors, the k vocabulary tokens nearest in Euclidean distance in the token-embedding space ->
    [[(token, distance)] * k] * n."""
    table = clip.token_embedding.weight.detach().float()  # (vocabulary, D)
    # exact, not via mm
    distances = torch.cdist(vectors.float(), table, compute_mode="donot_use_mm_for_euclid_dist")
    distance, index = distances.topk(k, largest=False)  # (n, k)
    decode = clip_model._tokenizer().decode
    return [[(decode([i]), round(d, 4)) for i, d in zip(row_i, row_d)]
            for row_i, row_d in zip(index.tolist(), distance.tolist())]

def prompt_text(cfg, classname, template_only=False):
    """(text, n, learned): the text prompt a model ran for one class, its n context tokens after SOT
    (the words before the class name) and how many of those, from the first, are learned vectors.
    Learned context is written "X X ... X {class}." (the Config's context count), a hand-crafted
    template as its words (none learned), and MaPLe's init phrase (ivlp's with keep_phrase) as its
    words, of which the first n_ctx are learned ("a photo" of "a photo of a")."""
    name = classname.replace("_", " ")
    n = 0 if template_only else getattr(cfg, "text_ctx", 0)  # VLP's (its n_tokens are visual)
    # n_ctx prompts, whether a phrase starts them or not
    if not template_only and isinstance(cfg, mudpt.Config):
        n = cfg.n_ctx
        phrase = cfg.ctx_init.replace("_", " ")
        if phrase and getattr(cfg, "keep_phrase", False):  # as maple.py's rule below
            return f"{phrase} {name}.", int(clip_model.tokenize(phrase).argmax()) - 1, n
    if not template_only and isinstance(cfg, maple.Config):
        phrase = cfg.ctx_init.replace("_", " ")
        # maple.py's rule: the whole phrase is in the text, its first n_ctx learned
        if phrase and cfg.n_ctx <= 4:
            return f"{phrase} {name}.", int(clip_model.tokenize(phrase).argmax()) - 1, cfg.n_ctx
        n = cfg.n_ctx  # else random, n_ctx of them
    # CoOp: an init phrase sets the count
    if not n and not template_only and getattr(cfg, "n_ctx", 0):
        n = (int(clip_model.tokenize(cfg.ctx_init.replace("_", " ")).argmax()) - 1 if cfg.ctx_init
             else cfg.n_ctx)
    if n:
        return " ".join(["X"] * n + [name]) + ".", n, n
    # the context is the words before the class name
    template = getattr(cfg, "fixed_template", "") or getattr(cfg, "template", "a photo of a {}.")
    return template.format(name), int(clip_model.tokenize(template.split("{}")[0]).argmax()) - 1, 0

def text_rows(cfg, classname, template_only=False):
    """(context rows, class-name rows, EOT row) of the text prompt a model ran for one class; SOT is
    row 0."""
    text, n, _ = prompt_text(cfg, classname, template_only)
    k = int(clip_model.tokenize(classname.replace("_", " ")).argmax()) - 1
    return (list(range(1, 1 + n)), list(range(1 + n, 1 + n + k)),
            int(clip_model.tokenize(text).argmax()))

def prompt_tokens(cfg, classname, template_only=False):
    """The prompt's tokens before EOT, as words: SOT, the context (learned vectors as CoOp writes
    them, [V1]..[Vn]), the class name's tokens and the rest."""
    text, _, learned = prompt_text(cfg, classname, template_only)
    ids = clip_model.tokenize(text)[0]
    decode = clip_model._tokenizer().decode
    words = ["SOT"] + [decode([i]).strip() for i in ids[1:int(ids.argmax())].tolist()]
    words[1:1 + learned] = [f"[V{i}]" for i in range(1, learned + 1)]
    return words

def analyse(model, clip, cfg, images, classnames, target):
    """One model on the images -> (stats, image relevancy (B, g, g) or None, text relevancy per
    image, the class each relevancy explains (B,), the model's probabilities (B, C)). target None:
    the predicted classes."""
    with torch.no_grad():
        # for a frozen text side, below
        plain_image = F.normalize(clip.encode_image(images), dim=-1)
    # also drops cached text features, so a learned text side runs and is recorded
    model.train(False)
    with Recorder(clip) as rec, torch.enable_grad():
        logits = model(images)
        target = logits.argmax(-1) if target is None else target
        y = logits.gather(1, target[:, None])[:, 0]  # (B,)
        image_maps = rec.maps["image"]
        text_side = "learned" if rec.maps["text"] else "frozen"
        # the method's text features were computed at build: rerun the template
        if text_side == "frozen":
            template = getattr(cfg, "fixed_template", "")  # vpt's, when it has one
            template = template or getattr(cfg, "template", "a photo of a {}.")
            text = clip.encode_text(clip_model.tokenize([template.format(c.replace("_", " "))
                                                         for c in classnames]))
            text_y = (clip.logit_scale.exp()
                      * (plain_image * F.normalize(text, dim=-1)[target]).sum(-1))
        else:
            text_y = y
        text_maps = rec.maps["text"]
        stats = {"text_side": text_side}
        image_relevancy = None
        if image_maps:
            grid = int((clip.visual.positional_embedding.shape[0] - 1) ** 0.5)
            patch = clip.visual.conv1.kernel_size[0]  # pixels
            G = grid * grid  # N, the patches
            S = image_maps[0].shape[-1]  # 1 + N + the prompts, if any
            patches = list(range(1, 1 + G))
            prompts = list(range(1 + G, S))
            d = [attention_distance(A.detach(), grid, patch) for A in image_maps]
            stats["image"] = {
                "distance": [x[0].tolist() for x in d],
                "distance_with_prompts": [x[1].tolist() for x in d],
                "entropy": [entropy(A.detach(), patches).tolist() for A in image_maps],
                "prompt_share_cls": [share(A.detach(), [0], prompts).tolist() for A in image_maps],
                "prompt_share_patches": [share(A.detach(), patches, prompts).tolist()
                                         for A in image_maps]}
            # images do not interact
            grads = torch.autograd.grad(y.sum(), image_maps, retain_graph=True)
            R = rollout([A.detach() for A in image_maps], grads)
            image_relevancy = R[:, 0, 1:1 + G].reshape(-1, grid, grid)
        layouts = [text_rows(cfg, c, template_only=text_side == "frozen") for c in classnames]
        eots = [e for _, _, e in layouts]
        shares = {"sot": [], "context": [], "class": []}
        # (C, H, L, L): what each class's EOT query attends to, averaged over heads
        for A in text_maps:
            # C x (L,); CoCoOp: image 0
            rows = [A[c, :, e].detach().mean(0) for c, e in enumerate(eots)]
            shares["sot"].append(sum(r[0].item() for r in rows) / len(rows))
            shares["context"].append(sum(r[ctx].sum().item()
                                         for r, (ctx, _, _) in zip(rows, layouts)) / len(rows))
            shares["class"].append(sum(r[name].sum().item()
                                       for r, (_, name, _) in zip(rows, layouts)) / len(rows))
        stats["text_eot"] = shares
        text_relevancy = []
        for b in range(len(images)):
            grads = torch.autograd.grad(text_y[b], text_maps, retain_graph=True)
            c = int(target[b])
            # CoCoOp: per image
            k = c + (b * len(classnames) if len(text_maps[0]) > len(classnames) else 0)
            R = rollout([A[k:k + 1].detach() for A in text_maps], [g[k:k + 1] for g in grads])
            text_relevancy.append(R[0, eots[c], :eots[c]].tolist())
    return stats, image_relevancy, text_relevancy, target, logits.detach().softmax(-1)

def font(size):
    """Pillow's own font at `size` pixels (Pillow >= 10.1, with FreeType), else its small bitmap
    font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):
        return ImageFont.load_default()

def colours(r):
    """Relevancy scaled to [0, 1], (...) -> RGB bytes (..., 3): dark blue (0) to yellow (1), as the
    colour bar."""
    return torch.stack([r * 255, r * 220, (1 - r) * 160], -1).round().byte()

def heat(image, relevancy, size):
    """The image blended with the relevancy (g, g), upsampled and scaled to its own
    minimum..maximum."""
    r = F.interpolate(relevancy[None, None], size=(size, size), mode="bilinear",
                      align_corners=False)[0, 0]
    r = (r - r.min()) / (r.max() - r.min() + 1e-12)
    return Image.blend(image.resize((size, size)).convert("RGB"),
                       Image.fromarray(colours(r).numpy(), "RGB"), 0.6)

def figure(image, label, panels, tokens, captions, cell=256):
    """The relevancy figure, 3 x 256 px panels and a colour bar wide (914 px): the image titled with
    its label, then one panel per model (`panels`: [(title, predicted class, its probability,
    correct, relevancy (g, g) or None)]) with its prediction in green (right) or red (wrong); under
    them the text prompt's tokens (`tokens`: [(word, relevancy)], SOT first), each a cell shaded by
    its relevancy with the word written beneath, after the lines of `captions`."""
    margin, gap, header, bar = 16, 12, 50, 18
    big, small = font(16), font(13)
    width = 2 * margin + (1 + len(panels)) * (cell + gap) + bar + 60
    top = max((r for _, r in tokens), default=0) or 1
    box = (width - 2 * margin) / max(len(tokens), 1)  # one cell per token, across the figure
    longest = max((small.getlength(w) for w, _ in tokens), default=0)
    upright = longest + 4 <= box  # words that do not fit across their cell are written downwards
    words_height = 18 if upright else int(longest) + 6
    text_top = margin + header + cell + 12 + 18 * len(captions)
    canvas = Image.new("RGB", (width, text_top + 26 + words_height + margin), "white")
    draw = ImageDraw.Draw(canvas)

    columns = [("image", f"label: {label}", "black", None)] + [
        (title, f"predicts: {predicted} ({p:.2f})", (0, 130, 0) if correct else (200, 0, 0),
         relevancy)
        for title, predicted, p, correct, relevancy in panels]
    for k, (title, line, colour, relevancy) in enumerate(columns):
        x, y = margin + k * (cell + gap), margin + header
        draw.text((x, margin), title, fill="black", font=big)
        draw.text((x, margin + 24), line, fill=colour, font=small)
        if k == 0:
            canvas.paste(image.resize((cell, cell)).convert("RGB"), (x, y))
        elif relevancy is None:  # a ResNet image tower: no attention maps to explain
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline=(160, 160, 160))
            draw.text((x + 8, y + cell // 2), "no attention maps (ResNet)", fill=(100, 100, 100),
                      font=small)
        else:
            canvas.paste(heat(image, relevancy, cell), (x, y))
    # the colour bar: high at the top
    x, y = margin + (1 + len(panels)) * (cell + gap), margin + header
    ramp = colours(torch.linspace(1, 0, cell))[:, None].expand(cell, bar, 3).contiguous()
    canvas.paste(Image.fromarray(ramp.numpy(), "RGB"), (x, y))
    draw.text((x + bar + 4, y), "high", fill="black", font=small)
    draw.text((x + bar + 4, y + cell - 14), "low", fill="black", font=small)
    draw.text((x - 4, margin + 24), "relevancy", fill="black", font=small)

    for i, line in enumerate(captions):
        draw.text((margin, text_top - 18 * (len(captions) - i)), line, fill="black", font=small)
    for i, (word, relevancy) in enumerate(tokens):
        left = margin + i * box
        draw.rectangle((left, text_top, left + box - 2, text_top + 22),
                       fill=tuple(colours(torch.tensor(max(relevancy, 0) / top)).tolist()))
        if upright:
            draw.text((left + (box - small.getlength(word)) / 2, text_top + 26), word, fill="black",
                      font=small)
        else:  # rotated a quarter turn: read from the cell downwards
            label_image = Image.new("RGB", (int(small.getlength(word)) + 2, 16), "white")
            ImageDraw.Draw(label_image).text((0, 0), word, fill="black", font=small)
            canvas.paste(label_image.rotate(-90, expand=True),
                         (int(left + box / 2 - 8), text_top + 26))
    return canvas

def plots(stats, folder):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: pip install matplotlib"
    curves = {"attention_distance": ("image", "distance", "patch queries, pixels"),
              "attention_entropy": ("image", "entropy", "patch queries, nats"),
              "prompt_share": ("image", "prompt_share_patches", "patch attention on prompts"),
              "text_eot_attention": ("text_eot", "sot", "EOT attention on SOT")}
    for name, (part, key, label) in curves.items():
        fig, ax = plt.subplots(figsize=(4, 3))
        for who in ("zeroshot", "method"):
            values = (stats[who].get(part) or {}).get(key)
            if values:
                per_layer = [sum(v) / len(v) if isinstance(v, list) else v for v in values]
                ax.plot(range(1, len(per_layer) + 1), per_layer, marker="o",
                        label=stats[who]["name"])
                ax.set_xticks(range(1, len(per_layer) + 1))
        ax.set(xlabel="block", ylabel=label, title=f"{name.replace('_', ' ')} (mean over heads)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
    return "plots written"

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="a run folder of train.py (results.json + checkpoint.pt)")
    p.add_argument("--images", type=int, default=8, help="test images to analyse (fixed seed)")
    p.add_argument("--target", choices=["pred", "label"], default="pred",
                   help="the logit relevancy explains")
    p.add_argument("--method", help="without a run: a method, e.g. zeroshot")
    p.add_argument("--data", help="without a run: the dataset")
    p.add_argument("--backbone", help="without a run: the backbone")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    p.add_argument("--out", help="output folder (default RUN/analysis)")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images {args.images}: must be 1 or more (the test images to analyse)")
    try:
        return analyse_run(args)
    except methods.UserError as e:  # a file that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130

def analyse_run(args):
    """main() after its flags: the analysis, its figures and stats.json; exit status 0, or 2 after
    one line."""
    try:
        name, model, model_cfg, classnames, clip, preprocess, data_path, out = load_model(args)
        out = Path(args.out) if args.out else out
        ds = data.load_dataset(data_path)
        # the run's classes (base-to-new: the base half)
        index = {name: i for i, name in enumerate(classnames)}
        test = [(path, index[ds.classnames[y]]) for path, y in ds.test if ds.classnames[y] in index]
        items = random.Random(0).sample(test, min(args.images, len(test)))
        if not items:
            raise data.DataError(f"{ds.name} has no test images of the run's classes to analyse")
        pil = [data.open_image(path).convert("RGB") for path, _ in items]
        images = torch.stack([preprocess(im) for im in pil])
        labels = torch.tensor([y for _, y in items])  # indices into classnames
        zero_cfg = coop.Config(n_ctx=0, template=ds.template)
        zeroshot = coop.build(clip, classnames, zero_cfg)
    except (methods.UserError, data.DataError, clip_model.LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = labels if args.target == "label" else None
    zero_stats, zero_image, _, _, zero_p = analyse(zeroshot, clip, zero_cfg, images, classnames,
                                                   target)
    stats, image_rel, text_rel, explained, p = analyse(model, clip, model_cfg, images, classnames,
                                                       target)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot make the output folder {out} ({e.strerror}): pass another --out",
              file=sys.stderr)
        return 2
    explains = "the label" if args.target == "label" else "each model's predicted class"
    for i, im in enumerate(pil):
        label, c = int(labels[i]), int(explained[i])
        panels = [("zero-shot CLIP", zero_p[i], None if zero_image is None else zero_image[i]),
                  (name, p[i], None if image_rel is None else image_rel[i])]
        panels = [(title, classnames[int(q.argmax())], q.max().item(), int(q.argmax()) == label,
                   relevancy)
                  for title, q, relevancy in panels]
        words = prompt_tokens(model_cfg, classnames[c],
                              template_only=stats["text_side"] == "frozen")
        side = ("its learned prompt" if stats["text_side"] == "learned"
                else "the template (its text side is frozen)")
        captions = [f"maps: relevancy of {explains} (Chefer et al.), "
                    "each map scaled to its own range",
                    f"text: relevancy (0 to the row's maximum) of each token of {name}'s text for "
                    f"'{classnames[c]}', {side}"]
        panel = figure(im, classnames[label], panels, list(zip(words, text_rel[i])), captions)
        runs.save_atomic(functools.partial(panel.save, format="PNG"), out / f"relevancy_{i}.png")
    result = {"zeroshot": {"name": "zero-shot CLIP", **zero_stats},
              "method": {"name": name, **stats},
              "images": [path for path, _ in items], "labels": labels.tolist(),
              "targets": explained.tolist(),
              "backbone": model_cfg.backbone, "dataset": ds.name,
              "nearest_words": {name: nearest_words(clip, vectors)
                                for name, vectors in word_context(model).items()}}
    # every file written before the printing, which a `| head` can end
    runs.write_json(result, out / "stats.json")
    plotted = plots(result, out)
    try:
        # a small table: each learned vector, its nearest tokens
        for name, rows in result["nearest_words"].items():
            print(f"{name}: the 3 nearest vocabulary tokens of each learned vector "
                  "(Euclidean distance)")
            for i, row in enumerate(rows):
                print(f"  {i:3d}  "
                      + "   ".join(f"{token} {distance:.3f}" for token, distance in row))
        print(f"{plotted}; wrote {out / 'stats.json'} and {len(pil)} relevancy_<i>.png", flush=True)
    except BrokenPipeError:  # the reader took what it wanted; the files are all written
        methods.output_closed()
    return 0

if __name__ == "__main__":
    sys.exit(main())
