"""The one training loop for every method: python train.py --method coop --data ./data/dtd --shots 16

A method file gives a `Config` (its paper's defaults), `VARIANTS` (CLI name -> Config changes), `ABOUT` (CLI name ->
one line for --list) and `build(clip, classnames, cfg) -> nn.Module` whose forward(images) returns logits (B, C).
Optionally the module has `loss(logits, labels, epoch)` (its whole training loss, with auxiliary terms from the last
forward; default cross-entropy), `param_groups(cfg)` (learned parameters in groups, each with its own "lr" and
"warmup_epochs"; default one group at cfg.lr), `check_config(cfg)` (a ValueError for values it cannot use, raised
before CLIP loads), `class_specific = True` (learned parameters tied to the training classes), and, when its image
tower is frozen, `frozen_features(images)` with `forward(features=...)` (for `--cache-features`). A Config may name
its optimizer (`optimizer`: sgd, the default, adam or adamw; see OPTIMIZERS) and a module its epochs by shots
(`SCHEDULE`, used when Config.epochs is 0; default CoOp's).

A method fitted on frozen features rather than (or before being) trained by SGD has `fit(encode, trained)`: called
before the first epoch (trained=False) and, when it had epochs, after the last (trained=True; Tip-Adapter-F searches
again there), never under --eval-only. It sets its parameters, or persistent buffers (the checkpoint keeps both),
from `encode(split, views=0)` -> (features, labels) of the task's "train" or "val" images through its
`frozen_features`: un-augmented (n, ...), or `views` augmented copies (views, n, ...) where view v is the
augmentation epoch v draws. It returns a dict of what it chose (results.json keeps the last as "fit"). A Config
without `epochs`, or a variant that sets it to None, marks a method fitted only (the linear probe, Tip-Adapter): no
SGD epochs, and --epochs, --batch-size, --lr are refused. A Config's `shots` field, if it has one, is --shots. This
file does the rest, the same for every method: data, SGD with CoOp's warm-up + cosine schedule, precision,
evaluation per protocol, atomic checkpoints and exact resume, results.json and log.txt (and a progress bar on a
terminal), on one device or on N GPUs under torchrun.
"""
import argparse
import dataclasses
import fcntl
import functools
import inspect
import json
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import bias_tuning
import cavpt
import clip_adapter
import clip_model
import coop
import data
import dualpt
import linear_probe
import maple
import mudpt
import proda
import taskres
import tip_adapter
import vpt

# a new method file: add it here
METHOD_FILES = [coop, vpt, cavpt, mudpt, maple, dualpt, proda, bias_tuning, taskres, clip_adapter, tip_adapter,
                linear_probe]
METHODS = {name: (module, changes) for module in METHOD_FILES for name, changes in module.VARIANTS.items()}
TRAINED = [name for name, (module, changes) in METHODS.items()  # by SGD epochs; the rest are fitted only
           if getattr(dataclasses.replace(module.Config(), **changes), "epochs", None) is not None]
BACKBONES = list(clip_model.CONFIGS)
WARMUP_LR = 1e-5  # Dassl's WARMUP_CONS_LR, in every CoOp-family config
COMPILED = (clip_model.ResidualAttentionBlock, clip_model.Bottleneck, clip_model.AttentionPool2d)  # --compile
CACHE_IN_MEMORY = 4 * 2**30  # bytes of cached features kept on the device; more go to a memory-mapped file
RUN_FILES = ("results.json", "checkpoint.pt")  # a folder holding either holds a run

class UserError(Exception):
    """Something the user can fix; printed as one message, without a traceback."""

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", help=" ".join(METHODS))
    p.add_argument("--data", help="dataset folder (CoOp layout, or class-per-subfolder), or 'demo'")
    p.add_argument("--shots", type=int, default=16, help="images per class for training; 0 = all")
    p.add_argument("--backbone", help=f"default: the method's paper backbone; one of {' '.join(BACKBONES)} or a .pt")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="random: build the backbone with random weights, no download (tests, dry runs)")
    p.add_argument("--seed", type=int, nargs="+", default=[1], dest="seeds", help="one run per seed: --seed 1 2 3")
    p.add_argument("--epochs", type=int, help="default: the method's; 0 = no training, evaluate it as initialised")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--protocol", default="fewshot", help=" | ".join(data.PROTOCOLS))
    p.add_argument("--eval-data", nargs="*", default=[], help="target datasets for cross / dg")
    p.add_argument("--output", help="default: runs/<data>/<method>/<backbone>/shots<K>[-<protocol>]/seed<S>")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run the output folder holds (else refused)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint, no training; writes "
                   "eval_<dataset>_<protocol>.json beside it (or in --output)")
    p.add_argument("--checkpoint", help="checkpoint.pt of a finished run, for --eval-only")
    p.add_argument("--dry-run", action="store_true", help="build data and model, write results.json, stop")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast; auto: bf16 on a GPU that has it, else fp16 with a gradient scaler; fp32 on a CPU")
    p.add_argument("--workers", type=int, help="data-loading processes (default 8 on CUDA, 0 on CPU)")
    p.add_argument("--cache-features", type=int, default=0, metavar="V", help="frozen image tower only: encode V "
                   "augmented views of the training images once; epoch e trains on view e mod V")
    p.add_argument("--compile", action="store_true", help="torch.compile the frozen blocks of both towers")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change a field of the method's Config")
    p.add_argument("--list", action="store_true", help="list the methods")
    p.add_argument("--help-config", action="store_true", help="show the method's Config fields and defaults")
    args = p.parse_args(argv)
    return argparse.Namespace(**vars(args), seed=args.seeds[0])  # main() runs each of args.seeds

def must_be(name, value):
    """What a number of the loop must be, if `value` is not: for the flags and every Config's fields alike
    (epochs, batch_size, lr and any *_epochs / *_lr field). None when the value can be used."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if name == "lr" or name.endswith("_lr"):
        return None if value > 0 else "above 0"
    if name == "batch_size":
        return None if value >= 1 else "1 or more"
    if name in ("epochs", "shots", "workers", "cache_features") or name.endswith("_epochs"):
        return None if value >= 0 else "0 or more"
    return None

def check_flags(args):
    """A UserError for a flag no run can use, or that a run would ignore, before anything is loaded or written."""
    for name in ("shots", "epochs", "batch_size", "lr", "workers", "cache_features"):
        value = getattr(args, name)
        rule = None if value is None else must_be(name, value)
        if rule:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be {rule}")
    if bad := [seed for seed in args.seeds if not 0 <= seed < 2**32]:
        raise UserError(f"--seed {bad[0]}: must be 0 to {2**32 - 1} (a 32-bit seed, as numpy's)")
    if args.eval_data and args.protocol not in ("cross", "dg"):
        raise UserError(f"--eval-data names the target datasets of --protocol cross or dg; with --protocol "
                        f"{args.protocol} it would be ignored: add --protocol cross (or dg), or drop --eval-data")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in the output folder, --overwrite replaces it: pass one of them")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False): use "
                        "--device cpu, or a CUDA build of torch on a machine with a GPU")

def check_config(args, module, cfg):
    """The loop's numbers in the method's Config (its paper's defaults and --set), then its own check_config."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        rule = must_be(field.name, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if rule:
            raise UserError(f"{args.method}: {field.name}={value}: must be {rule}")
    if getattr(cfg, "optimizer", "sgd") not in OPTIMIZERS:
        raise UserError(f"{args.method}: optimizer={cfg.optimizer}: use one of {', '.join(OPTIMIZERS)}")
    try:
        if hasattr(module, "check_config"):
            module.check_config(cfg)
    except ValueError as e:
        raise UserError(f"{args.method}: {e}") from None

def make_config(args):
    """The method's Config: paper defaults, then the variant, then --set, then the explicit flags."""
    if args.method not in METHODS:
        raise UserError(f"unknown method {args.method!r}; choose one of: {' '.join(METHODS)}")
    module, changes = METHODS[args.method]
    cfg = dataclasses.replace(module.Config(), **changes)
    for item in args.set:
        key, sep, value = item.partition("=")
        if key == "epochs" and fitted_only(cfg):
            raise UserError(f"--set {item}: {args.method} is fitted on the frozen features, not trained in SGD epochs")
        if not sep or key not in {f.name for f in dataclasses.fields(cfg)}:
            raise UserError(f"--set {item}: {args.method} has no field {key!r}; its fields are "
                            f"{', '.join(f.name for f in dataclasses.fields(cfg))} (see --help-config)")
        cfg = dataclasses.replace(cfg, **{key: parse_value(getattr(cfg, key), value, key)})
    check_config(args, module, cfg)  # before the flags: check_flags has checked those
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "backbone": args.backbone,
             "shots": args.shots if hasattr(cfg, "shots") else None}
    for flag in ("epochs", "batch_size", "lr"):
        if fitted_only(cfg) and flags[flag] is not None:
            raise UserError(f"--{flag.replace('_', '-')}: {args.method} is fitted on the frozen features, not trained "
                            "in SGD epochs; drop the flag (--help-config shows what it has)")
    return module, dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})

def parse_value(default, text, key):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"--set {key}={text}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        return type(default)(text) if default is not None else text
    except ValueError:
        raise UserError(f"--set {key}={text}: expected a {type(default).__name__}") from None

def fitted_only(cfg):
    """A method without SGD epochs: no `epochs` in its Config, or None there (see fit() above)."""
    return getattr(cfg, "epochs", None) is None

def epoch_seed(seed, epoch):
    """The seed of an epoch's data order and augmentation (and of --cache-features' and fit()'s view `epoch`)."""
    return seed * 100_003 + epoch

def epochs_for(cfg, shots, module):
    """cfg.epochs, or 0 = by shots: the module's SCHEDULE, else CoOp's: 50 (1 shot), 100 (2 and 4), 200 (8, 16, all)."""
    return cfg.epochs or getattr(module, "SCHEDULE", {1: 50, 2: 100, 4: 100}).get(shots, 200)

OPTIMIZERS = {  # Config.optimizer -> the optimizer: Dassl's sgd and adam (weight decay 5e-4, L2 added to the
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9, weight_decay=5e-4),  # gradient), Tip-Adapter-F's adamw
    "adam": functools.partial(torch.optim.Adam, betas=(0.9, 0.999), weight_decay=5e-4),
    "adamw": functools.partial(torch.optim.AdamW, eps=1e-4, weight_decay=0.01),
}

def lr_at(epoch, base_lr, epochs, warmup_epochs):
    """Dassl's constant warm-up then cosine (WARMUP_RECOUNT): the cosine restarts at 0 after warm-up, over
    `epochs` steps, so the last epoch's lr is cos at (epochs - 1 - warmup) / epochs, not 0."""
    if epoch < warmup_epochs:
        return WARMUP_LR
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))

def resolve_precision(requested, device):
    """auto: bf16 on a GPU with native bf16 (Ampere and later), fp16 on older GPUs (T4, V100: bf16 only emulated),
    fp32 on a CPU. An explicit choice is kept (bf16 and fp16 autocast also run on a CPU)."""
    if requested != "auto":
        return requested
    if device != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"

def autocast(precision, device):
    """The context every forward runs in: bf16 or fp16 autocast, or none for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)

def objective(model, logits, labels, epoch):
    """The loss a step minimises: the method's own `loss` (auxiliary terms, guidance), else cross-entropy on fp32
    logits (an exact softmax under any autocast)."""
    if hasattr(model, "loss"):
        return model.loss(logits, labels, epoch)
    return F.cross_entropy(logits.float(), labels)

def progress(total, what, rank=0):
    """A bar of the images this process handles (count, img/s, ETA) on a terminal, for process 0; elsewhere (a pipe,
    a log file, pytest, torchrun's other processes) a bar that draws nothing, and the log lines are all there is."""
    return tqdm(total=total, desc=what, unit="img", leave=False, dynamic_ncols=True,
                disable=rank != 0 or not sys.stderr.isatty())

def learned_tensors(model):
    """What a run learned, by name: the parameters it trains, and the persistent buffers of the method a fit() set
    (a method keeps what it computes at build non-persistent; CLIP's own buffers, under `clip.`, are CLIP's)."""
    tensors = {k: v for k, v in model.named_parameters() if v.requires_grad}
    persistent = model.state_dict().keys()
    tensors.update({k: v for k, v in model.named_buffers() if k in persistent and not k.startswith("clip.")})
    return tensors

def learned_state(model):
    """A copy of learned_tensors(model): what a checkpoint holds."""
    return {k: v.detach().clone() for k, v in learned_tensors(model).items()}

def for_data(cfg, template, dataset):
    """cfg with what a method takes from the data it is built for, where its Config has the field: the dataset's
    template (`template`) and name (`dataset`)."""
    fields = {k: v for k, v in dict(template=template, dataset=dataset).items() if hasattr(cfg, k)}
    return dataclasses.replace(cfg, **fields)

def restore(model, learned, where, method, backbone, classes):
    """Copy a checkpoint's learned state into `model` (onto its device): `method` built on `backbone` for `classes`
    classes; a UserError naming `where` the state came from, when they do not fit."""
    try:
        missing, unexpected = model.load_state_dict(learned, strict=False)
    except RuntimeError:  # shapes differ: class-specific parameters, or another backbone
        missing = unexpected = ["(shapes differ)"]
    missing = [k for k in missing if k in learned_tensors(model)]  # frozen weights are not in a checkpoint
    if missing or unexpected:
        raise UserError(f"the parameters from {where} do not fit {method} on {backbone} with {classes} classes "
                        f"(class-specific context on other classes, or another backbone or config): "
                        f"{(missing + unexpected)[:3]}")

def read_run(run_dir):
    """A run folder's results.json -> (results, method module, the Config its model was built with, classnames):
    the classes the run trained on (base-to-new: the base half)."""
    run = Path(run_dir)
    if run.is_file():
        raise UserError(f"{run} is a file: pass the folder of a run of train.py (its --output)")
    try:
        results = json.loads((run / "results.json").read_text())
        method = results["method"]
        module = METHODS[method][0]
        known = {f.name for f in dataclasses.fields(module.Config)}  # the saved config also holds run options
        cfg = module.Config(**{k: v for k, v in results["config"].items() if k in known})
        if missing := [key for key in ("dataset", "seed", "init") if key not in results]:  # load_run reads them
            raise KeyError(missing[0])
        classnames, template = results.get("classnames"), results.get("template")
        if classnames is None:  # a run from before results.json kept its classes: read them from its dataset
            task = data.make_task(results["data"], results["protocol"], 0, results["seed"])
            classnames, template = task.classnames, task.template
    except FileNotFoundError:
        raise UserError(f"no results.json in {run}: pass the folder of a run of train.py (its --output)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, data.DataError):
            raise
        raise UserError(f"{run / 'results.json'} is not the results of a run of this project "
                        f"({type(e).__name__}: {e})") from None
    return results, module, for_data(cfg, template, results["dataset"]), classnames

def load_run(run_dir, device="cpu"):
    """A run of train.py, rebuilt -> (model in eval mode, preprocess, classnames): method, backbone, config and
    classes from its results.json (read_run), what it learned or fitted from its checkpoint.pt, CLIP's weights
    from the download cache (OpenAI's; an --init random run's are made again from its seed)."""
    run = Path(run_dir)
    results, module, cfg, classnames = read_run(run)
    method = results["method"]
    clip, preprocess = clip_model.load(cfg.backbone, device=device, pretrained=results["init"] == "pretrained",
                                       seed=results["seed"])
    torch.manual_seed(results["seed"])
    model = module.build(clip, classnames, cfg).to(device)
    if learned_tensors(model):  # learned or fitted: its checkpoint
        path = run / "checkpoint.pt"
        ckpt = load_checkpoint(path)
        if (ckpt["method"], ckpt.get("backbone", cfg.backbone)) != (method, cfg.backbone):
            raise UserError(f"{path} holds a {ckpt['method']} run on {ckpt.get('backbone')}, and results.json one "
                            f"of {method} on {cfg.backbone}: the folder mixes two runs; train it again")
        if bad := [k for k, v in ckpt["learned"].items() if v.is_floating_point() and not torch.isfinite(v).all()]:
            raise UserError(f"{path} holds nan or inf values ({bad[0]}): the run diverged; train it again with a "
                            "lower --lr")
        restore(model, ckpt["learned"], path, method, cfg.backbone, len(classnames))
    return model.eval(), preprocess, classnames

def save_atomic(write, path):
    """write(tmp) then rename: a crash leaves the previous file, never half a new one. Only torchrun's rank 0 writes."""
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk (torch.save's is a RuntimeError), a read-only folder
        reason = getattr(e, "strerror", None) or "the write failed: is the disk full?"
        raise UserError(f"cannot write {path} ({reason}): free space or fix the folder; the previous "
                        f"{Path(path).name}, if there was one, is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def write_json(obj, path):
    save_atomic(lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)), path)

def load_checkpoint(path, method=None):
    """A checkpoint of this project (of `method`, when given), read without running code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # a downloaded file cannot run code
        assert isinstance(ckpt, dict) and {"method", "learned", "config", "epoch"} <= ckpt.keys()
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}: train first (without --resume), or pass the right path") from None
    except Exception:
        raise UserError(f"{path} is not a readable checkpoint of this project (truncated or another file): "
                        "delete it and train again") from None
    if method and ckpt["method"] != method:
        raise UserError(f"{path} holds a {ckpt['method']} run, not {method}: pass --method {ckpt['method']}")
    return ckpt

def all_sum(values, device):
    """Numbers or device tensors summed over the processes of a torchrun job (in a single process, the values
    themselves), read on the host: one synchronisation for all of them."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()

class Runner:
    """One run: the model built for the task's classes, and the same method rebuilt for other class sets."""

    def __init__(self, args, module, cfg, task):
        self.args, self.module, self.cfg, self.task = args, module, cfg, task
        self.rank, self.world = 0, 1  # this process's rank among `world` (torchrun)
        if dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cpu")
        if args.device == "cuda":
            self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        self.precision = resolve_precision(args.precision, args.device)
        self.autocast = functools.partial(autocast, self.precision, args.device)
        # fp16 gradients of small losses underflow: the scaler multiplies the loss before backward and skips a
        # step whose gradients overflowed (learned parameters stay fp32 in every precision)
        self.scaler = torch.amp.GradScaler(args.device, enabled=self.precision == "fp16")
        self.workers = args.workers
        if self.workers is None:
            self.workers = 8 if args.device == "cuda" else 0
        self.clip, _ = clip_model.load(cfg.backbone, device=self.device, pretrained=args.init == "pretrained",
                                       seed=args.seed)
        self.n_px = self.clip.visual.input_resolution
        if args.compile:  # block by block: methods put prompts between blocks, so every method gains
            for block in self.clip.modules():
                if isinstance(block, COMPILED):
                    block.compile()
        torch.manual_seed(args.seed)  # the method's own initialisation
        self.model = self.build(task.classnames, task.template, task.dataset)

    def build(self, classnames, template, dataset):
        """The method for these classes; a Config's `template` and `dataset` fields take the data's."""
        cfg = for_data(self.cfg, template, dataset)
        try:
            return self.module.build(self.clip, classnames, cfg).to(self.device)
        except clip_model.TextTooLong as e:  # learned context + template + class name over CLIP's 77 tokens
            raise UserError(f"{self.args.method}: a prompt of this config is {e.length} tokens, more than CLIP's "
                            f"{e.context_length}: use a shorter learned context (--set n_ctx=... or text_ctx=...) or "
                            "shorter class names") from None
        except ValueError as e:  # a Config value the method rejects
            raise UserError(f"{self.args.method}: {e}") from None

    def load_learned(self, model, learned, where):
        restore(model, learned, where, self.args.method, self.cfg.backbone, len(self.task.classnames))

    def model_for(self, evalset):
        """The trained model, or the method rebuilt for another class set with the learned parameters."""
        dataset = self.task.dataset if evalset.root == self.task.root else evalset.name  # test, base, new: the task's
        same_dataset = dataset == self.task.dataset or not hasattr(self.cfg, "dataset")  # matters only to a Config
        if (evalset.classnames, evalset.template) == (self.task.classnames, self.task.template) and same_dataset:
            return self.model
        model = self.build(evalset.classnames, evalset.template, dataset)
        self.load_learned(model, learned_tensors(self.model), "training")  # load_state_dict copies them
        return model

    def train_epoch(self, trainer, optimizer, inputs_and_labels, epoch, out, bar=None):
        """One epoch of SGD steps (trainer: the model, or its DDP wrapper) -> images, summed loss and correct
        predictions, over every process. The sums stay on the device and are read once, at the end: a step never
        waits for the host (fp16's scaler aside, which reads its overflow flag every step; `bar`, a progress() drawn
        on a terminal, reads the running loss once a second)."""
        model = self.model
        bar = progress(None, "", rank=-1) if bar is None else bar  # none given: one that draws nothing
        model.train()
        seen = 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        first_bad = torch.full((), -1, device=self.device)  # the first step with a nan or inf loss; -1: none
        shown = time.monotonic()
        for step, (inputs, labels) in enumerate(inputs_and_labels):
            with self.autocast():
                logits = trainer(**inputs)
                loss = objective(model, logits, labels, epoch)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # fp32 and bf16: the scaler is off and passes the loss through
            self.scaler.step(optimizer)
            self.scaler.update()

            seen += len(labels)
            loss_sum += loss.detach().double() * len(labels)
            correct += (logits.argmax(-1) == labels).sum()
            finite = torch.isfinite(loss.detach())
            first_bad = torch.where(finite | (first_bad >= 0), first_bad, step)  # a bad step is kept once found
            bar.update(len(labels))
            if not bar.disable and time.monotonic() - shown > 1:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
                shown = time.monotonic()
        # what the checkpoint will hold: a last step can leave the parameters finite but so large (lr 1e30: 5e29) that
        # the next forward is nan, so they are tried on the epoch's last batch before they are kept
        model.eval()
        with torch.no_grad(), self.autocast():
            ends_bad = ~torch.isfinite(model(**inputs)).all()
        # one read after the epoch; a nan in any process stops all, before this epoch's checkpoint is written
        seen, loss_sum, correct, bad_processes = all_sum([seen, loss_sum, correct, (first_bad >= 0) | ends_bad],
                                                         self.device)
        if bad_processes:
            where = "in another process"
            if first_bad >= 0:
                where = f"first at step {int(first_bad) + 1}"
            elif ends_bad:
                where = "in the parameters it ends with"
            raise UserError(f"the loss is nan or inf at epoch {epoch + 1} ({where}): lower --lr or use --precision "
                            f"fp32 and start again; {out} keeps the checkpoint and results.json of epoch {epoch} "
                            "(the last good one)")
        return seen, loss_sum, correct

    @torch.no_grad()
    def evaluate(self, evalset):
        """Top-1 accuracy (%) on evalset.test: each process scores its share, the counts are summed."""
        model = self.model_for(evalset).eval()
        loader = data.loader(evalset.test, clip_model.transform(self.n_px), 100, train=False, workers=self.workers,
                             device=self.args.device, rank=self.rank, world=self.world)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)  # on the device: no sync per batch
        with progress(len(loader.dataset), f"evaluating {evalset.name}", self.rank) as bar:
            for images, labels in loader:
                with self.autocast():
                    logits = model(images.to(self.device, non_blocking=True))
                if evalset.class_subset is not None:
                    logits = logits[:, evalset.class_subset]
                correct += (logits.argmax(-1) == labels.to(self.device, non_blocking=True)).sum()
                bar.update(len(labels))
        return 100 * all_sum([correct], self.device)[0] / len(evalset.test)

    @torch.no_grad()
    def encode_views(self, items, seeds, folder, transform=None):
        """(V, n, ...) features of the images augmented with each of V epoch seeds (or in `transform`): on the device,
        or memory-mapped."""
        transform = transform or data.train_transform(self.n_px)
        loader = data.loader(items, transform, 100, train=False, workers=self.workers, device=self.args.device)
        model = self.model.eval()
        store = None  # (V, n, ...) once the first batch shows the features' shape
        with progress(len(seeds) * len(items), f"encoding {len(seeds)} x {len(items)} images", self.rank) as bar:
            for v, seed in enumerate(seeds):
                loader.dataset.seed = seed
                for i, (images, _) in enumerate(loader):
                    with self.autocast():
                        x = model.frozen_features(images.to(self.device, non_blocking=True))
                    if store is None:
                        shape = (len(seeds), len(items), *x.shape[1:])
                        if math.prod(shape) * x.element_size() <= CACHE_IN_MEMORY:
                            store = torch.empty(shape, dtype=x.dtype, device=self.device)
                        else:
                            path = folder / f"features.rank{self.rank}.tmp"
                            store = torch.from_file(str(path), True, math.prod(shape), dtype=x.dtype).view(shape)
                            path.unlink()  # the mapping lives until the run ends, and no file outlives it
                    first = i * loader.batch_size  # the loader keeps the items' order (train=False)
                    store[v, first:first + len(x)] = x.to(store.device)
                    bar.update(len(x))
        return store

    def encode_split(self, split, views=0, folder=None):
        """`encode` of a method's fit(): (features, labels) of the task's "train" or "val" images, un-augmented
        (n, ...) or in `views` augmented copies (views, n, ...); each process computes all (the same fit in each)."""
        items = {"train": self.task.train, "val": self.task.val}[split]
        labels = torch.tensor([y for _, y in items], device=self.device, dtype=torch.long)
        if not items:  # an empty split (ImageNet has no val): the method's fit says what it needed it for
            return torch.empty((views, 0) if views else (0,), device=self.device), labels
        if views:
            return self.encode_views(items, [epoch_seed(self.args.seed, v) for v in range(views)], folder), labels
        return self.encode_views(items, [0], folder, clip_model.transform(self.n_px))[0], labels

def batches(loader, cache, epoch, device):
    """This process's (inputs, labels): images, or view epoch % V of the cached features in the loader's order."""
    if cache is None:
        for images, labels in loader:
            yield dict(images=images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        return
    labels = torch.tensor([y for _, y in loader.dataset.items])
    view = cache[epoch % len(cache)]  # (n, ...): every training image's features, augmented by this view's seed
    for idx in torch.utils.data.BatchSampler(loader.sampler, loader.batch_size, loader.drop_last):
        yield dict(features=view[idx].to(device, non_blocking=True)), labels[idx].to(device)

def default_output(args, cfg):
    """runs/<data>/<method>/<backbone>/shots<K>[-<protocol>][,<changes>]/seed<S>, the changes being what sets this
    run apart from the method's defaults: its Config fields that differ (--epochs, --lr, --batch-size, --set; a file
    by its name), --init random and an explicit --precision. Runs with other settings get other folders."""
    module, variant = METHODS[args.method]
    defaults = dataclasses.replace(module.Config(), **variant)
    changes = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name not in ("backbone", "shots") and value != getattr(defaults, field.name):
            changes.append(f"{field.name}={Path(value).name if isinstance(value, str) else value}")
    changes += ["init=random"] * (args.init == "random") + [f"precision={args.precision}"] * (args.precision != "auto")
    protocol = "" if args.protocol == "fewshot" else f"-{args.protocol}"
    folder = f"shots{args.shots}{protocol}" + "".join(f",{c}" for c in changes)
    return Path("runs", Path(args.data).name, args.method, cfg.backbone.replace("/", "-"), folder, f"seed{args.seed}")

def claim_folder(out, args, device):
    """The run folder, created and locked for this run (a lock the system drops when the process ends, even by
    kill -9): a UserError when the folder holds a run that this one would replace without --resume or --overwrite,
    or when another run holds the lock. Returns the lock's file descriptor. Under torchrun process 0 takes the lock
    and every process learns whether it could, so that all stop together."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"cannot make the run folder {out} ({e.strerror}): pass another --output") from None
    first = not dist.is_initialized() or dist.get_rank() == 0
    held = [name for name in RUN_FILES if (out / name).exists()]  # before any process writes: the same for all
    busy = False
    if first and not (held and not args.resume and not args.overwrite):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = True
        except OSError:  # a file system without locks on folders (some NFS mounts): no guard, but the run goes on
            pass
    if dist.is_initialized():
        busy = all_sum([busy], device)[0] > 0
    if held and not args.resume and not args.overwrite:
        os.close(lock)
        raise UserError(f"{out} already holds a run ({' and '.join(held)}): pass --resume to continue it, "
                        "--overwrite to replace it, or another --output")
    if busy:
        os.close(lock)
        raise UserError(f"another run is writing to {out} now: wait for it to end, or pass another --output")
    if args.overwrite and first:
        for name in (*RUN_FILES, "log.txt"):
            (out / name).unlink(missing_ok=True)
    return lock

def checkpoint_config(args, cfg, ckpt):
    """--eval-only: the Config the checkpoint was trained with (its model is rebuilt as it was); a UserError when
    --backbone or --set ask for another value, which could not apply."""
    known = dataclasses.asdict(cfg).keys() - {"template", "dataset"}  # the saved config also holds run options
    saved = {k: v for k, v in ckpt["config"].items() if k in known}
    flagged = [item.partition("=")[0] for item in args.set] + (["backbone"] if args.backbone else [])
    if clash := [k for k in flagged if k in saved and saved[k] != getattr(cfg, k)]:
        raise UserError(f"--eval-only rebuilds the model {args.checkpoint} was trained as, with "
                        f"{', '.join(f'{k}={saved[k]}' for k in clash)}; the flags ask for "
                        f"{', '.join(f'{k}={getattr(cfg, k)}' for k in clash)}: drop them")
    return dataclasses.replace(cfg, **saved)

def check_resume(ckpt, identity, path):
    """A UserError unless the checkpoint at `path` continues this run's task: the same precision, and the same
    `identity` (data, protocol, shots, seed, backbone, init, precision, config), each difference named."""
    if ckpt.get("precision", identity["precision"]) != identity["precision"]:
        raise UserError(f"{path} was trained in {ckpt['precision']}, this run would use {identity['precision']}: "
                        f"pass --precision {ckpt['precision']} to resume it exactly")
    saved = ckpt.get("run", dict(config=ckpt["config"]))  # a checkpoint from before it kept the task
    differences = []
    for key in [key for key in saved if saved[key] != identity[key]]:
        if key == "config":  # the fields that differ
            fields = sorted(k for k in saved[key].keys() | identity[key].keys()
                            if saved[key].get(k) != identity[key].get(k))
            differences += [f"config {k}: {saved[key].get(k)}, this run {identity[key].get(k)}" for k in fields]
        else:
            differences.append(f"{key}: {saved[key]}, this run {identity[key]}")
    if differences:
        raise UserError(f"{path} was trained on another task or config ({'; '.join(differences)}): resume with the "
                        "flags it was trained with, or pass another --output")

def run(args):
    """One run: config, data and model, the run folder, training, evaluation; returns its results. The run folder's
    lock is held until it returns or fails."""
    locks = []
    try:
        return run_in_folder(args, locks)
    finally:
        for lock in locks:
            os.close(lock)

def run_in_folder(args, locks):
    check_flags(args)  # 1. the config and the data; nothing is written before 3
    module, cfg = make_config(args)
    if args.eval_only:
        if not args.checkpoint:
            raise UserError("--eval-only needs --checkpoint PATH (the checkpoint.pt of a finished run)")
        ckpt = load_checkpoint(args.checkpoint, args.method)
        cfg = checkpoint_config(args, cfg, ckpt)
    shots = 0 if args.eval_only else args.shots
    task = data.make_task(args.data, args.protocol, shots, args.seed, args.eval_data)
    if args.eval_only or fitted_only(cfg):
        epochs = 0
    elif args.epochs is not None:
        epochs = args.epochs
    else:
        epochs = epochs_for(cfg, shots, module)
    out = Path(args.output or default_output(args, cfg))
    if args.eval_only:  # an evaluation writes its own file, beside the checkpoint unless --output says elsewhere
        out = Path(args.output or Path(args.checkpoint).parent)

    runner = Runner(args, module, cfg, task)  # 2. CLIP and the method; a bad backbone leaves nothing behind
    model, rank, world = runner.model, runner.rank, runner.world
    if args.eval_only:
        runner.load_learned(model, ckpt["learned"], args.checkpoint)
    elif not task.train:
        raise UserError(f"{task.dataset} has no training split: evaluate on it with --eval-data or --eval-only")
    if getattr(model, "class_specific", False) and any(
            (e.classnames, e.template) != (task.classnames, task.template) for e in task.evals):
        raise UserError(f"{args.method} with this config learns class-specific parameters, which do not transfer "
                        f"to other classes: use --protocol fewshot, or a config without them")
    if args.cache_features and fitted_only(cfg):
        raise UserError(f"--cache-features: {args.method} is fitted once on un-augmented features, with no epochs to "
                        "cache for; drop the flag")
    if args.cache_features and not hasattr(model, "frozen_features"):
        raise UserError(f"--cache-features: {args.method} learns inside the image tower, so its features change as it "
                        "trains; drop the flag (it is for methods with a frozen image tower: README, Scaling up)")
    if not fitted_only(cfg) and cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch; it must split evenly over the {world} "
                        f"processes: use a multiple of {world}")
    learned = [p for p in model.parameters() if p.requires_grad]
    n_learned = sum(p.numel() for p in learned)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    epochs = epochs if learned else 0  # nothing to learn: zero-shot

    if args.eval_only:  # 3. the run folder, its log and results
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make the folder {out} ({e.strerror}): pass another --output") from None
    else:
        locks.append(claim_folder(out, args, runner.device))
    results_file = out / (f"eval_{task.dataset}_{args.protocol}.json" if args.eval_only else "results.json")

    def log(line):
        if rank == 0:  # one process speaks and writes for a torchrun job
            print(line, flush=True)
            with open(out / "log.txt", "a") as f:
                print(line, file=f)

    where = f"{args.device} x{world} (torchrun)" if world > 1 else args.device
    cached = f", cached image features: {args.cache_features} views" if args.cache_features and epochs else ""
    fits = hasattr(model, "fit") and not args.eval_only
    schedule = "fitted, no SGD epochs" if fits and not epochs else f"{'fitted, then ' if fits else ''}{epochs} epochs"
    log(f"{args.method} on {task.dataset} ({args.protocol}, {args.shots} shots, seed {args.seed}): {cfg.backbone}"
        f"{' random init' if args.init == 'random' else ''}, {where}, {runner.precision}, {n_learned:,} learned / "
        f"{n_frozen:,} frozen parameters, {len(task.train)} train images, {schedule}{cached}")
    results = dict(method=args.method, dataset=task.dataset, data=args.data, protocol=args.protocol, shots=args.shots,
                   seed=args.seed, backbone=cfg.backbone, init=args.init, epochs=epochs, learned_params=n_learned,
                   frozen_params=n_frozen, precision=runner.precision, processes=world,
                   config={**dataclasses.asdict(cfg), "cache_features": args.cache_features},
                   classnames=task.classnames, template=task.template)  # what load_run() rebuilds the model for
    if args.dry_run:
        write_json(results, results_file)
        log(f"dry run: wrote {results_file}")
        return results

    # 4. fitting and training: from epoch `start` (after a resume), `previous` seconds already spent on this run
    start, previous, history = 0, 0.0, []
    started = time.time()

    # what defines the task a checkpoint continues: a resume with any other value would train on something else
    identity = dict(data=str(task.root), dataset=task.dataset, protocol=args.protocol, shots=args.shots,
                    seed=args.seed, backbone=cfg.backbone, init=args.init, precision=runner.precision,
                    config=results["config"])

    def save_checkpoint(epoch, elapsed, optimizer):
        state = dict(method=args.method, backbone=cfg.backbone, config=results["config"], epoch=epoch, run=identity,
                     learned=learned_state(model), optimizer=optimizer.state_dict() if optimizer else None,
                     history=history, time_s=elapsed, precision=runner.precision, scaler=runner.scaler.state_dict())
        save_atomic(functools.partial(torch.save, state), out / "checkpoint.pt")

    def fit(trained):
        try:
            results["fit"] = model.fit(functools.partial(runner.encode_split, folder=out), trained=trained) or {}
        except ValueError as e:  # data the method cannot be fitted on
            raise UserError(f"{args.method}: {e}") from None
        chosen = {k: v for k, v in results["fit"].items() if isinstance(v, (int, float))}
        log(f"fitted{' after training' if trained else ''}: " + "  ".join(f"{k} {v:.4g}" for k, v in chosen.items()))

    if fits:  # before any epoch (and before a resume restores the trained parameters)
        fit(trained=False)
        if not epochs:
            save_checkpoint(0, time.time() - started, None)
    if epochs:
        groups = model.param_groups(cfg) if hasattr(model, "param_groups") else [{"params": learned}]
        groups = [{"lr": cfg.lr, "warmup_epochs": cfg.warmup_epochs, **g, "base_lr": g.get("lr", cfg.lr)}
                  for g in groups]  # a group may bring its own lr and warm-up (CAVPT: visual 10 epochs, text 1)
        optimizer = OPTIMIZERS[getattr(cfg, "optimizer", "sgd")](groups, lr=cfg.lr)
        if args.resume:
            ckpt = load_checkpoint(out / "checkpoint.pt", args.method)
            check_resume(ckpt, identity, out / "checkpoint.pt")
            runner.load_learned(model, ckpt["learned"], out / "checkpoint.pt")
            optimizer.load_state_dict(ckpt["optimizer"])
            if "scaler" in ckpt and runner.scaler.is_enabled():
                runner.scaler.load_state_dict(ckpt["scaler"])  # fp16: the loss scale reached, and its counter
            start, history, previous = ckpt["epoch"], ckpt["history"], ckpt["time_s"]
            log(f"resumed after epoch {start}")
        loader = data.loader(task.train, data.train_transform(runner.n_px), cfg.batch_size, train=True,
                             workers=runner.workers, device=args.device, rank=rank, world=world)
        # order and augmentation depend on the epoch's seed alone, so a resumed run, every process, and view v of
        # --cache-features (= epoch v) see the same batches
        views = [epoch_seed(args.seed, e) for e in range(min(args.cache_features, epochs))]
        cache = runner.encode_views(task.train, views, out) if args.cache_features else None
        trainer = model
        if world > 1:  # DDP averages the gradients over the processes
            device_ids = [runner.device] if args.device == "cuda" else None
            with warnings.catch_warnings():  # broadcast_buffers: renamed in torch 2.14, the only spelling before
                warnings.simplefilter("ignore", FutureWarning)  # False: the frozen buffers are never re-sent
                trainer = torch.nn.parallel.DistributedDataParallel(model, device_ids, broadcast_buffers=False)
    for epoch in range(start, epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, group["base_lr"], epochs, group["warmup_epochs"])
        torch.manual_seed(epoch_seed(args.seed, epoch))
        loader.sampler.set_epoch(epoch_seed(args.seed, epoch))
        loader.dataset.seed = epoch_seed(args.seed, epoch)
        tic = time.time()
        inputs_and_labels = batches(loader, cache, epoch, runner.device)
        mine = len(loader) * loader.batch_size if loader.drop_last else len(loader.sampler)  # this process's images
        with progress(mine, f"epoch {epoch + 1}/{epochs}", rank) as bar:
            seen, loss_sum, correct = runner.train_epoch(trainer, optimizer, inputs_and_labels, epoch, out, bar)
        history.append(dict(epoch=epoch + 1, loss=loss_sum / seen, acc=100 * correct / seen,
                            lr=optimizer.param_groups[0]["lr"], seconds=time.time() - tic))
        this_run = time.time() - started
        elapsed = previous + this_run
        eta = this_run / (epoch + 1 - start) * (epochs - epoch - 1)
        log(f"epoch {epoch + 1}/{epochs}  loss {loss_sum / seen:.3f}  acc {100 * correct / seen:.1f}  "
            f"lr {history[-1]['lr']:.1e}  {seen / (time.time() - tic):.0f} img/s  "
            f"{timedelta(seconds=int(elapsed))} elapsed  ETA {timedelta(seconds=int(eta))}")
        save_checkpoint(epoch + 1, elapsed, optimizer)
        write_json({**results, "history": history, "time_s": elapsed}, out / "results.json")  # no accuracy yet

    if fits and epochs:  # after the last epoch: what the method fits to its trained parameters
        fit(trained=True)
        save_checkpoint(epochs, previous + time.time() - started, optimizer)
    accuracy = {evalset.name: runner.evaluate(evalset) for evalset in task.evals}  # 5. evaluation
    if args.protocol == "base2new":
        base, new = accuracy["base"], accuracy["new"]
        accuracy["hm"] = 2 * base * new / (base + new) if base + new else 0.0
    results.update(accuracy=accuracy, history=history, time_s=previous + time.time() - started)
    write_json(results, results_file)
    log("  ".join(f"{name} {acc:.2f}" for name, acc in accuracy.items()) + f"  -> {results_file}")
    return results

def method_list(classes=1000):
    """One line per variant: its name, file, paper backbone, learned parameters there with `classes` made-up
    classes (ImageNet's count; CLIP on the meta device, so no weights are made), and the module's ABOUT line."""
    names = [f"class {i}" for i in range(classes)]
    clips, lines = {}, [f"{'method':14s} {'file':16s} {'backbone':9s} {'learned*':>10s}  what it is"]
    for name, (module, changes) in METHODS.items():
        cfg = dataclasses.replace(module.Config(), **changes)
        if cfg.backbone not in clips:
            with torch.device("meta"):
                clips[cfg.backbone] = clip_model.CLIP(*clip_model.CONFIGS[cfg.backbone])
        model = module.build(clips[cfg.backbone], names, cfg)
        learned = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines.append(f"{name:14s} {module.__name__ + '.py':16s} {cfg.backbone:9s} {learned:>10,}  "
                     f"{module.ABOUT[name]}")
    return "\n".join(lines + [f"* learned parameters (results.json's learned_params) at the paper backbone with "
                                f"{classes:,} classes, as on ImageNet"])

def main(argv=None):
    args = parse_args(argv)
    # one of the processes of a torchrun job (of 1 process too: its sums then still go through NCCL or gloo)
    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    torchrun = launched and not dist.is_initialized()
    if torchrun:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        if args.list:
            print(method_list())
            return 0
        if args.help_config:
            module, cfg = make_config(args)
            print(inspect.getsource(module.Config).rstrip())
            print(f"# --method {args.method} sets: {METHODS[args.method][1] or 'nothing (the defaults above)'}")
            return 0
        if not args.method or not args.data:
            raise UserError("--method and --data are required (python train.py --list shows the methods)")
        for seed in args.seeds:  # --seed 1 2 3: the papers' protocol, one run and folder per seed
            output = str(Path(args.output, f"seed{seed}")) if args.output and len(args.seeds) > 1 else args.output
            run(argparse.Namespace(**{**vars(args), "seed": seed, "output": output}))
    except OSError as e:  # the run folder or a file the run writes (log.txt) cannot be written
        print(f"error: {e.strerror or e}: {e.filename or 'a file of the run'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the run folder keeps the checkpoint of its last finished epoch: --resume continues "
              "it", file=sys.stderr)
        return 130
    except (UserError, data.DataError, clip_model.LoadError) as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the error's own line
            message = message.splitlines()[-1].split(": ", 1)[-1]
        if not dist.is_initialized() or dist.get_rank() == 0:  # every process meets the same error
            print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        if torchrun:
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
