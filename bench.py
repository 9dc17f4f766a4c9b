"""Speed and memory, measured side by side in one run:
python bench.py [--quick | --full] [--smoke] [--device D]

Every row is a ratio of two timings taken in this run on the same inputs (best of a few repeats), so
it holds on any machine: our CLIP against OpenAI's code with identical random weights, the
EOT-truncated text path against all 77 positions, CoCoOp batched against one image at a time, each
method's training step against the frozen CLIP forward it adds to, evaluation with text features
computed once against per batch, train.py's epoch against bare SGD steps, the frozen image forward's
FLOP/s against the GPU's peak, and two real train.py runs per scaling row: CoOp from 10 cached views
against images every epoch, and torchrun DDP with 2 processes against 1 at the same global batch;
and sweep.py running demo runs two at a time against one after another. Models have random weights
(no download). --quick (default) fits a 2-core CPU in a few minutes; --full trains on ViT-B/16 at
each method's paper batch size, in the precision train.py picks, and adds the 1,000-class memory
rows of CoCoOp and CoDUAL-PT, text checkpointing on against off (for a GPU); --memory measures one
1,000-class step for every method (each in its own process); --smoke runs every row on `tiny` in
seconds (the test suite does). The rows against OpenAI's code need the dev requirements
(clip-anytorch); without it they are skipped.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
import types
import warnings

import torch
import torch.nn.functional as F
import torch.utils.flop_counter

import clip_model
import methods
import train

DTD = ("banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline "
       "dotted fibrous flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted "
       "lacelike lined marbled matted meshed paisley perforated pitted pleated polka-dotted porous "
       "potholed scaly smeared spiralled sprinkled stained stratified striped studded swirly "
       "veined waffled woven wrinkled zigzagged").split()


def timed(fn, repeats, device):
    """Best wall time of `repeats` calls after one warm-up call, and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def peak_memory_mib(fn, device):
    """Peak memory fn() adds: CUDA max allocated, or the CPU's peak RSS (Linux VmHWM, reset
    first)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def status(key):  # a "VmHWM:  1234 kB" line of /proc/self/status -> 1234
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1])

    try:
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = status("VmRSS:")
    fn()
    return (status("VmHWM:") - base) / 1024


def randomized(args):
    """The reference CLIP (clip-anytorch) and ours with the same random weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
        import clip.model  # a test-only dependency: the reference
    torch.manual_seed(0)
    reference = clip.model.CLIP(*args).float().eval()
    for p in reference.parameters():  # the reference init zeroes bn3: give every tensor a value
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.uniform_(0.9, 1.1)
    return reference, clip_model.build_model(reference.state_dict())


def encoder_rows(name, args, batch, repeats, device):
    try:
        reference, ours = (m.to(device) for m in randomized(args))
    except ImportError:  # a GPU machine with the runtime requirements only
        print(f"(skipped: {name} against OpenAI's code needs clip-anytorch, "
              "from requirements-dev.txt)")
        return []
    images = torch.randn(batch, 3, args[1], args[1], device=device)
    tokens = clip_model.tokenize([f"a photo of a {c}." for c in DTD]).to(device)
    rows = []
    with torch.no_grad():
        for what, inputs in [("encode_image", images), ("encode_text", tokens)]:
            theirs, mine = (functools.partial(getattr(m, what), inputs) for m in (reference, ours))
            (t_ref, a), (t_ours, b) = timed(theirs, repeats, device), timed(mine, repeats, device)
            rows.append((f"{name} {what} vs OpenAI's code", t_ours, t_ref, t_ref / t_ours,
                         (a - b).abs().max().item()))
    return rows


def other_format_rows(smoke, batch, repeats, device):
    """Our CLIP against transformers' CLIPModel and open_clip's CLIP (GELU, as LAION's ViT-B/16)
    holding the same random weights, converted as --backbone converts them (other_weights.py):
    ViT-B/16's shape, tiny's in smoke mode."""
    try:
        import open_clip  # test-only dependencies: the references
        import transformers
    except ImportError:
        print("(skipped: our CLIP against transformers' and open_clip's needs both, "
              "from requirements-dev.txt)")
        return []
    import other_weights
    text = dict(width=128, heads=2, layers=2) if smoke else dict(width=512, heads=8, layers=12)
    vision = dict(width=128, heads=2, layers=2, size=32, patch=8) if smoke else \
        dict(width=768, heads=12, layers=12, size=224, patch=16)
    embed = 64 if smoke else 512
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=text["width"], intermediate_size=4 * text["width"],
                         num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
                         hidden_act="gelu"),
        vision_config=dict(hidden_size=vision["width"], intermediate_size=4 * vision["width"],
                           num_hidden_layers=vision["layers"], num_attention_heads=vision["heads"],
                           image_size=vision["size"], patch_size=vision["patch"],
                           hidden_act="gelu"),
        projection_dim=embed)).eval()
    args, options, sd = other_weights.convert_hf(hf.config.to_dict(), hf.state_dict())
    from_hf = clip_model.build_model(sd, args, **options)
    reference = open_clip.model.CLIP(
        embed, open_clip.model.CLIPVisionCfg(layers=vision["layers"], width=vision["width"],
                                             head_width=64, image_size=vision["size"],
                                             patch_size=vision["patch"]),
        open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408,
                                    width=text["width"], heads=text["heads"],
                                    layers=text["layers"])).eval()  # quick_gelu=False: GELU
    sd = {k: v for k, v in reference.state_dict().items() if k != "attn_mask"}
    from_openclip = clip_model.build_model(sd, args, vision_heads=vision["heads"],
                                           activation="gelu")
    for model in (hf, from_hf, reference, from_openclip):
        model.to(device)
    images = torch.randn(batch, 3, vision["size"], vision["size"], device=device)
    tokens = clip_model.tokenize([f"a photo of a {c}." for c in DTD]).to(device)
    name = "tiny" if smoke else "ViT-B/16"

    def hf_image():
        out = hf.get_image_features(pixel_values=images)
        # a tensor, or in transformers 5 an output with it
        return getattr(out, "pooler_output", out)

    def hf_text():
        out = hf.get_text_features(input_ids=tokens)
        return getattr(out, "pooler_output", out)
    pairs = [("transformers' CLIPModel", from_hf, hf_image, hf_text),
             ("open_clip's CLIP", from_openclip, functools.partial(reference.encode_image, images),
              functools.partial(reference.encode_text, tokens))]
    rows = []
    with torch.no_grad():
        for library, ours, image, text in pairs:
            for what, theirs, mine in [("encode_image", image,
                                        functools.partial(ours.encode_image, images)),
                                       ("encode_text", text,
                                        functools.partial(ours.encode_text, tokens))]:
                (t_ref, a), (t_ours, b) = (timed(theirs, repeats, device),
                                           timed(mine, repeats, device))
                rows.append((f"{name} {what} vs {library} (GELU, same weights)", t_ours, t_ref,
                             t_ref / t_ours, (a - b).abs().max().item()))
    return rows


def full_length(clip, tokens):
    """The reference's way: all 77 positions through every block."""
    x = clip.embed_text(tokens) + clip.positional_embedding
    x = clip.transformer(x, clip_model.causal_mask(x.shape[1], x.device))
    return clip.text_head(x, tokens.argmax(-1))


def text_rows(clip, repeats, device):
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError:
        IMAGENET_CLASSNAMES = DTD
    rows = []
    for name, texts in [("DTD, '{} texture.'", [f"{c} texture." for c in DTD]),
                        ("ImageNet[:100], 'a photo of a {}.'",
                         [f"a photo of a {c}." for c in IMAGENET_CLASSNAMES[:100]]),
                        ("DTD, CoOp's 16-token context",
                         [" ".join(["X"] * 16 + [c]) + "." for c in DTD])]:
        tokens = clip_model.tokenize(texts).to(device)
        with torch.no_grad():
            (t_cut, a), (t_full, b) = \
                timed(functools.partial(clip.encode_text, tokens), repeats, device), \
                timed(functools.partial(full_length, clip, tokens), repeats, device)
        rows.append((f"text, EOT cut vs 77 tokens: {name}", t_cut, t_full, t_full / t_cut,
                     (a - b).abs().max().item()))
    return rows


def cocoop_row(clip, batch, repeats, device):
    module, changes = methods.METHODS["cocoop"]
    model = module.build(clip, DTD,
                         dataclasses.replace(module.Config(), **changes)).to(device).eval()
    images = torch.randn(batch, 3, clip.visual.input_resolution, clip.visual.input_resolution,
                         device=device)
    with torch.no_grad():
        (t_batch, a), (t_loop, b) = timed(lambda: model(images), repeats, device), \
            timed(lambda: torch.cat([model(images[i:i + 1]) for i in range(batch)]), repeats,
                  device)
    return [("CoCoOp: batched vs one image at a time", t_batch, t_loop, t_loop / t_batch,
             (a - b).abs().max().item())]


def method_rows(backbone, batch, repeats, device):
    """Per method: one training step (forward, loss, backward, SGD) against the frozen CLIP forward.
    batch None: each method's own batch size (the papers')."""
    rows = []
    for name in methods.TRAINED:  # the fitted-only methods take no SGD steps
        module, changes = methods.METHODS[name]
        cfg = dataclasses.replace(module.Config(), **changes)
        clip = clip_model.load(backbone, device=device, pretrained=False)[0]
        try:
            model = module.build(clip, DTD, cfg).to(device)
        except ValueError:  # e.g. visual prompts on a ResNet backbone
            continue
        rows.append(method_row(name, model, cfg, clip, backbone, batch, repeats, device))
    return rows


def training_step(model, images, labels, device):
    """One SGD step as train.py takes it (the precision it picks, fp16's scaler, the method's
    objective), as a function to time; and that precision."""
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(learned, lr=1e-6, momentum=0.9) if learned else None
    precision = train.resolve_precision("auto", device)  # fp32 on a CPU, bf16 or fp16 on a GPU
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")

    def step():
        model.train()
        with train.autocast(precision, device):
            logits = model(images)
        if optimizer:  # zero-shot CLIP learns nothing: its forward alone
            with train.autocast(precision, device):
                loss = model.loss(logits, labels, 0)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return step, precision


def method_row(name, model, cfg, clip, backbone, batch, repeats, device):
    R = clip.visual.input_resolution
    B = batch or cfg.batch_size
    images = torch.randn(B, 3, R, R, device=device)
    labels = torch.arange(B, device=device) % len(DTD)
    template = getattr(cfg, "template", "a photo of a {}.")
    tokens = clip_model.tokenize([template.format(c) for c in DTD]).to(device)
    step, precision = training_step(model, images, labels, device)

    def frozen():
        with torch.no_grad(), train.autocast(precision, device):
            return clip(images, tokens)
    peak = peak_memory_mib(step, device)  # the first step: it also allocates what later steps reuse
    t_frozen, _ = timed(frozen, repeats, device)
    t_step, _ = timed(step, repeats, device)
    return (f"train step / frozen forward: {name} ({backbone}, batch {B}, {precision}, "
            f"{B / t_step:.0f} img/s), peak +{peak:.0f} MiB",
            t_step, t_frozen, t_step / t_frozen, None)


# dense tensor-core peak FLOP/s in bf16 (fp16 where the GPU has no bf16), from the vendors' data
# sheets; the first name found in torch.cuda.get_device_name() counts
PEAK_FLOPS = [("B200", 2250e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
              ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def utilisation_row(backbone, batch, repeats, device):
    """The frozen image forward's model FLOPs utilisation: FLOPs counted by torch's FlopCounterMode,
    divided by the time, against the GPU's peak. The reference column is the time the forward would
    take at that peak."""
    clip = clip_model.load(backbone, device=device, pretrained=False)[0]
    R = clip.visual.input_resolution
    images = torch.randn(batch, 3, R, R, device=device)
    precision = train.resolve_precision("auto", device)

    def forward():
        with torch.no_grad(), train.autocast(precision, device):
            return clip.encode_image(images)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        forward()
    flops = counter.get_total_flops()
    seconds, _ = timed(forward, repeats, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = next((p for key, p in PEAK_FLOPS if key in name), None) if device == "cuda" else None
    at_peak = flops / peak if peak else float("nan")
    share = f"{100 * at_peak / seconds:.1f} % of {name}'s {peak / 1e12:.0f} TFLOP/s" if peak else \
        f"peak of {name} unknown"
    return [(f"frozen image forward, {backbone} batch {batch} {precision}: "
             f"{flops / seconds / 1e12:.2f} TFLOP/s achieved ({flops / batch / 1e9:.3g} GFLOP per "
             f"image), {share}", seconds, at_peak, at_peak / seconds, None)]


def loop_row(clip, batch, steps, repeats, device):
    """train.py's epoch (Runner.train_epoch: the method's loss, the scaler, the running sums and the
    finiteness check) against bare SGD steps on the same batches: what the loop's bookkeeping costs.
    CoOp on cached image features, the cheapest step, shows it most."""
    module, changes = methods.METHODS["coop"]
    model = module.build(clip, DTD, dataclasses.replace(module.Config(), **changes)).to(device)
    E = clip.text_projection.shape[1]
    data = [(dict(features=F.normalize(torch.randn(batch, E, device=device), dim=-1)),
             torch.randint(0, len(DTD), (batch,), device=device)) for _ in range(steps)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                momentum=0.9)
    runner = types.SimpleNamespace(model=model, device=torch.device(device),
                                   autocast=contextlib.nullcontext,
                                   scaler=torch.amp.GradScaler(device, enabled=False))

    runner.check_finite = functools.partial(train.Runner.check_finite, runner)

    def loop():
        return train.Runner.train_epoch(runner, model, optimizer, data, 0)

    def bare():
        model.train()
        for inputs, labels in data:
            loss = F.cross_entropy(model(**inputs).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    t_loop, _ = timed(loop, repeats, device)
    t_bare, _ = timed(bare, repeats, device)
    return [(f"train.py's epoch vs bare SGD steps (CoOp on features, {steps} steps of {batch})",
             t_loop, t_bare, t_bare / t_loop, None)]


def random_names(n, seed=0):
    """n distinct made-up class names of one to three words, 3-9 letters each (ImageNet-like token
    counts)."""
    rng = random.Random(seed)
    names = set()
    while len(names) < n:
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
                 for _ in range(rng.randint(1, 3))]
        names.add(" ".join(words))
    return sorted(names)


def memory_child(method, backbone, classes, checkpoint, device):
    """In a fresh process: one training step of `method` on `classes` made-up classes at its paper's
    batch size, with or without activation checkpointing in the text tower -> prints
    {"peak_mib", "seconds"}."""
    module, changes = methods.METHODS[method]
    cfg = dataclasses.replace(module.Config(), **changes)
    if not checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint_prompts=0)
    clip = clip_model.load(backbone, device=device, pretrained=False)[0]
    model = module.build(clip, random_names(classes), cfg).to(device)
    R = clip.visual.input_resolution
    images = torch.randn(cfg.batch_size, 3, R, R, device=device)
    labels = torch.arange(cfg.batch_size, device=device) % classes
    step, precision = training_step(model, images, labels, device)
    start = time.perf_counter()
    peak = peak_memory_mib(step, device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps(dict(peak_mib=peak, seconds=seconds, precision=precision,
                          batch=cfg.batch_size)))


def cap_memory():
    """In a CPU child: address space capped at the memory now available, so that a step too large
    for this machine fails with an allocation error (reported in its row) instead of waking the
    out-of-memory killer."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1])
                         for line in f if line.startswith("MemAvailable:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (available, available))


# per-image prompts: images x classes (x M) texts
MEMORY_CASES = [("cocoop", "ViT-B/16"), ("codualpt", "RN50")]


def memory_rows(cases, classes, device, compare=True):
    """Peak memory of one training step on `classes` classes at each method's paper batch size, each
    measured in its own process (CPU: peak RSS; CUDA: max allocated). compare: text-tower
    checkpointing on against off; else the method's defaults only."""
    rows = []
    for method, backbone in cases:
        measured = {}
        for checkpoint in (True, False) if compare else (True,):
            spec = json.dumps([method, backbone, classes, checkpoint, device])
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child",
                                   spec], capture_output=True, text=True,
                                  preexec_fn=cap_memory if device == "cpu" else None)
            if done.returncode:  # e.g. out of memory: the row says so instead of a number
                error = (done.stderr.strip().splitlines() or ["killed"])[-1]
                measured[checkpoint] = dict(peak_mib=float("nan"), seconds=float("nan"),
                                            error=error[:100])
            else:
                measured[checkpoint] = json.loads(done.stdout.strip().splitlines()[-1])
        first = next((m for m in measured.values() if "error" not in m), {})
        settings = f"{backbone}, batch {first.get('batch', '?')}, {first.get('precision', '?')}"
        peaks = {k: f"+{m['peak_mib']:,.0f} MiB" if "error" not in m else f"failed ({m['error']})"
                 for k, m in measured.items()}
        head = f"one training step, {classes:,} classes: {method} ({settings}), peak"
        if compare:
            on, off = measured[True], measured[False]
            rows.append((f"{head} {peaks[True]} with text checkpointing vs {peaks[False]} without",
                         on["seconds"], off["seconds"], off["seconds"] / on["seconds"], None))
        else:
            rows.append((f"{head} {peaks[True]} (defaults)", measured[True]["seconds"],
                         measured[True]["seconds"], 1.0, None))
    return rows


def paper_cases():
    """(method, its paper's backbone) for every method that learns, but those of MEMORY_CASES."""
    cases = []
    for name in methods.TRAINED:
        module, changes = methods.METHODS[name]
        if name != "zeroshot" and name not in dict(MEMORY_CASES):
            cases.append((name, dataclasses.replace(module.Config(), **changes).backbone))
    return cases


def eval_row(clip, batch, repeats, device):
    module, changes = methods.METHODS["coop"]
    model = module.build(clip, DTD,
                         dataclasses.replace(module.Config(), **changes)).to(device).eval()
    R = clip.visual.input_resolution
    batches = [torch.randn(batch, 3, R, R, device=device) for _ in range(4)]

    def once():
        # a fresh evaluation: features computed at the first batch, then reused
        model.train().eval()
        with torch.no_grad():
            return torch.cat([model(x) for x in batches])

    def per_batch():
        with torch.no_grad():
            # cache dropped before every batch
            return torch.cat([model.train().eval()(x) for x in batches])
    (t_once, a), (t_each, b) = timed(once, repeats, device), timed(per_batch, repeats, device)
    return [("eval, 4 batches: text features once vs per batch (CoOp)", t_once, t_each,
             t_each / t_once, (a - b).abs().max().item())]


def train_run(args, out, processes=1):
    """train.py in a fresh process (or `torchrun --nproc_per_node 2`): its results.json and the mean
    time of the epochs after the first (steady state)."""
    launch = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
              if processes > 1 else [])
    subprocess.run([sys.executable, *launch,
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                    *args, "--output", out], check=True, capture_output=True)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    epochs = [h["seconds"] for h in results["history"][1:]]
    return results, sum(epochs) / len(epochs)


def scaling_rows(backbone, shots, device):
    """CoOp from cached image features against images every epoch, and DDP with 2 processes against
    1 at the same global batch (gloo on a CPU, NCCL on 2 GPUs), each a real train.py run on the demo
    data."""
    args = ["--method", "coop", "--data", "demo", "--backbone", backbone, "--init", "random",
            "--shots", str(shots), "--epochs", "3", "--batch-size", "32", "--device", device]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain, t_plain = train_run(args, os.path.join(tmp, "plain"))
        cached, t_cached = train_run(args + ["--cache-features", "10"], os.path.join(tmp, "cached"))
        n = 8 * shots
        # the 10 views, before epoch 1
        encode = cached["time_s"] - sum(h["seconds"] for h in cached["history"])
        rows.append((f"CoOp epoch: 10 cached views vs images ({backbone}, {n} images)", t_cached,
                     t_plain, t_plain / t_cached, None))
        rows.append((f"CoOp 200 epochs incl. encoding the views once ({encode:.1f} s), from the "
                     "epoch times", encode + 200 * t_cached, 200 * t_plain,
                     200 * t_plain / (encode + 200 * t_cached), None))
        if device == "cuda" and torch.cuda.device_count() < 2:
            return rows  # DDP needs 2 GPUs
        _, t_two = train_run(args, os.path.join(tmp, "two"), processes=2)
        rows.append((f"DDP, 2 processes vs 1, global batch 32 ({backbone}, {n / t_two:.0f} vs "
                     f"{n / t_plain:.0f} img/s)", t_two, t_plain, t_plain / t_two, None))
    return rows


def sweep_row(backbone, n, epochs, device):
    """sweep.py: n demo runs (CoOp, seeds 1..n) two at a time (--jobs 2 on a CPU; --per-gpu 2 on one
    GPU) against the same runs one after another, each sweep a fresh process in its own folder: the
    wall time of the whole."""
    grid = ["--method", "coop", "--data", "demo", "--seed", *map(str, range(1, n + 1)), "--",
            "--backbone", backbone, "--init", "random", "--shots", "4", "--epochs", str(epochs),
            "--batch-size", "8", "--device", device]
    one, two = ((["--jobs", "1"], ["--jobs", "2"]) if device == "cpu"
                else (["--gpus", "0"], ["--gpus", "0", "--per-gpu", "2"]))
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, places in [("serial", one), ("two", two)]:
            os.mkdir(os.path.join(tmp, name))
            start = time.perf_counter()
            subprocess.run([sys.executable,
                            os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep.py"),
                            *places, *grid], cwd=os.path.join(tmp, name), check=True,
                           capture_output=True)
            times.append(time.perf_counter() - start)
    return [(f"sweep.py, {n} CoOp runs ({backbone}, {epochs} epochs): 2 at a time vs one after "
             "another", times[1], times[0], times[0] / times[1], None)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true",
                   help="ViT-B/16 at the papers' batch sizes (for a GPU)")
    p.add_argument("--quick", action="store_true",
                   help="the default: fits a 2-core CPU in a few minutes")
    p.add_argument("--smoke", action="store_true", help="every row on `tiny`, in seconds (tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory", action="store_true",
                   help="only the 1,000-class memory rows, every method")
    # one measurement of memory_rows, in its own process
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(*json.loads(args.memory_child))
    if args.memory:  # long on a CPU (half an hour on 2 cores)
        rows = (memory_rows(MEMORY_CASES, 1000, args.device)
                + memory_rows(paper_cases(), 1000, args.device, False))
        return report(rows, "--memory", args.device)
    torch.manual_seed(0)
    device, repeats = args.device, 1 if args.smoke else 3
    tiny = clip_model.CONFIGS["tiny"]
    vit, rn = ((tiny, clip_model.CONFIGS["tiny-rn"]) if args.smoke
               else (clip_model.CONFIGS["ViT-B/16"], clip_model.CONFIGS["RN50"]))
    batch = 2 if args.smoke else (32 if args.full else 4)
    rows = encoder_rows("ViT-B/16" if not args.smoke else "tiny", vit, batch, repeats, device)
    rows += encoder_rows("RN50" if not args.smoke else "tiny-rn", rn, batch, repeats, device)
    rows += other_format_rows(args.smoke, batch, repeats, device)
    clip = clip_model.load("tiny" if args.smoke else "ViT-B/16", device=device, pretrained=False)[0]
    rows += (text_rows(clip, repeats, device)
             + cocoop_row(clip, 2 if args.smoke else 8, repeats, device))
    rows += method_rows("tiny" if args.smoke else "ViT-B/16" if args.full else "ViT-B/32",
                        None if args.full else batch, repeats, device)
    rows += eval_row(clip, batch, repeats, device)
    rows += utilisation_row("tiny" if args.smoke else "ViT-B/16",
                            2 if args.smoke else 256 if args.full else 8, repeats, device)
    rows += loop_row(clip, batch if args.smoke else 32, 4 if args.smoke else 10, repeats, device)
    rows += scaling_rows("tiny" if args.smoke else "ViT-B/16" if args.full else "ViT-B/32",
                         2 if args.smoke else 16 if args.full else 4, device)
    rows += sweep_row("tiny" if args.smoke or not args.full else "ViT-B/16", 2 if args.smoke else 8,
                      1 if args.smoke else 10, device)
    if args.smoke:
        # each row: two processes of a few seconds
        rows += memory_rows([("cocoop", "tiny")], 20, device)
    elif args.full:
        rows += memory_rows(MEMORY_CASES, 1000, device)
    return report(rows, "--smoke" if args.smoke else "--full" if args.full else "--quick", device)


def report(rows, mode, device):
    where = torch.cuda.get_device_name() if device == "cuda" else \
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"bench.py {mode} on {where}, torch {torch.__version__}\n")
    print("| measurement | ours (s) | reference or naive (s) | ratio | max abs diff |\n"
          "|---|---|---|---|---|")
    for what, ours, other, ratio, diff in rows:
        print(f"| {what} | {ours:.4f} | {other:.4f} | {ratio:.2f}x | "
              f"{'' if diff is None else f'{diff:.1e}'} |")
    return rows


if __name__ == "__main__":
    main()
