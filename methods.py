"""The methods train.py knows, and the command line that picks one and sets its Config.

A method is one file (coop.py, vpt.py, ...) that imports torch and clip_model only. To add one,
write the file and add it to METHOD_FILES below. What train.py asks of it:

Required
- `Config`: a dataclass of its paper's defaults, with at least `backbone`; a method trained by SGD
  has `epochs` (0 = by shots, see `SCHEDULE`), `batch_size`, `lr` and `warmup_epochs`.
- `VARIANTS`: CLI name -> Config changes (`{"coop": {}, "coop-csc": {"class_specific": True}}`).
- `ABOUT`: CLI name -> one line for `--list`.
- `build(clip, classnames, cfg) -> nn.Module`: freezes CLIP, creates what is learned; its
  `forward(images) -> logits (B, C)`.
- `loss(logits, labels, epoch)` on the built module, for a method trained by SGD: its whole
  training loss (a cross-entropy where the paper's is one; auxiliary terms from the last forward
  where it has them).

Optional
- `param_groups(cfg)` on the module: the learned parameters in groups, each with its own "lr" and
  "warmup_epochs" (default: one group at cfg.lr, cfg.warmup_epochs).
- `check_config(cfg)` in the file: a ValueError for values it cannot use, raised before CLIP loads.
- `class_specific = True` on the module: its learned parameters are tied to the training classes
  (refused by base-to-new and cross-dataset evaluation).
- `frozen_features(images)` with `forward(features=...)`, when the image tower is frozen:
  `--cache-features`.
- `fit(encode, trained) -> dict` on the module: a method fitted on frozen features. train.py calls
  it before the first epoch (trained=False) and, when it had epochs, after the last (trained=True),
  never under --eval-only. It sets parameters or persistent buffers (the checkpoint keeps both)
  from `encode(split, views=0)` -> (features, labels) of the task's "train" or "val" images through
  `frozen_features`: un-augmented (n, ...), or `views` augmented copies (views, n, ...), view v
  drawn as epoch v's augmentation. It returns what it chose (results.json keeps it as "fit"). A
  Config without `epochs`, or a variant setting it to None, is fitted only: no SGD epochs, and
  --epochs, --batch-size, --lr are refused.
- Config fields train.py fills when present: `template` (the dataset's hand-crafted prompt),
  `dataset` (its name), `shots` (--shots); `optimizer` names the optimizer (train.OPTIMIZERS: sgd,
  the default, adam, adamw).
- `SCHEDULE` in the file: epochs by shots when Config.epochs is 0 (default CoOp's, see epochs_for).
"""
import argparse
import contextlib
import dataclasses
import math
import os
import sys
import typing

import torch
import torch.distributed as dist

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
METHOD_FILES = [coop, vpt, cavpt, mudpt, maple, dualpt, proda, bias_tuning, taskres, clip_adapter,
                tip_adapter, linear_probe]
METHODS = {name: (module, changes) for module in METHOD_FILES
           for name, changes in module.VARIANTS.items()}
# by SGD epochs; the rest are fitted only
TRAINED = [name for name, (module, changes) in METHODS.items()
           if getattr(dataclasses.replace(module.Config(), **changes), "epochs", None) is not None]
BACKBONES = list(clip_model.CONFIGS)

class UserError(Exception):
    """Something the user can fix; printed as one message, without a traceback."""

def output_closed():
    """After a BrokenPipeError: the reader of stdout went away (`python train.py --list | head`).
    stdout now goes to /dev/null, so that nothing more written, and not the interpreter's last flush
    either, meets the closed pipe again (the idiom of Python's signal docs). The tool then stops
    without a message."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

def exit_status(error, args):
    """The exit status of train.py for the error that ended it, said in one line on stderr."""
    if isinstance(error, BrokenPipeError):  # stdout's reader went away (`| head`): an OSError
        output_closed()
        if args.list or args.help_config:
            # status 0, as fetch.py --dry-run and ripgrep: the reader took what it wanted. (cat and
            # grep die of SIGPIPE, status 141, which fails a `set -o pipefail` script whose `| head`
            # did what it was asked.)
            return 0
        # stderr may go to the same closed pipe (`2>&1 | head`)
        with contextlib.suppress(BrokenPipeError):
            print("error: the output was closed (its reader ended), so the run stopped; the run "
                  "folder keeps the checkpoint of its last finished epoch: --resume continues it",
                  file=sys.stderr)
        return 141  # 128 + SIGPIPE, as 130 is 128 + SIGINT below: the run did not finish
    if isinstance(error, OSError):  # the run folder or a file the run writes (log.txt)
        print(f"error: {error.strerror or error}: {error.filename or 'a file of the run'}",
              file=sys.stderr)
        return 2
    if isinstance(error, KeyboardInterrupt):
        print("error: interrupted; the run folder keeps the checkpoint of its last finished epoch: "
              "--resume continues it", file=sys.stderr)
        return 130
    message = str(error).strip()  # a UserError, DataError or LoadError
    if "Original Traceback" in message:  # raised in a DataLoader worker: its error's own line
        message = message.splitlines()[-1].split(": ", 1)[-1]
    if not dist.is_initialized() or dist.get_rank() == 0:  # every process meets the same error
        print(f"error: {message}", file=sys.stderr)
    return 2

def parse_args(argv):
    p = argparse.ArgumentParser(description="The one training loop for every method: python "
                                "train.py --method coop --data ./data/dtd --shots 16",
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", help=" ".join(METHODS))
    p.add_argument("--data", help="dataset folder (CoOp layout, or class-per-subfolder), or 'demo'")
    p.add_argument("--shots", type=int, default=16, help="images per class for training; 0 = all")
    p.add_argument("--backbone", help=f"default: the method's paper backbone; one of "
                   f"{' '.join(BACKBONES)}, a .pt, a Hugging Face CLIPModel folder, "
                   "hf:<org>/<name>, or OpenCLIP's MODEL:TAG or MODEL:<file> (docs/weights.md)")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="random: build the backbone with random weights, no download "
                        "(tests, dry runs)")
    p.add_argument("--seed", type=int, nargs="+", default=[1], dest="seeds",
                   help="one run per seed: --seed 1 2 3")
    p.add_argument("--epochs", type=int,
                   help="default: the method's; 0 = no training, evaluate it as initialised")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--protocol", default="fewshot", help=" | ".join(data.PROTOCOLS))
    p.add_argument("--eval-data", nargs="*", default=[], help="target datasets for cross / dg")
    p.add_argument("--output",
                   help="default: runs/<data>/<method>/<backbone>/shots<K>[-<protocol>]/seed<S>")
    p.add_argument("--resume", action="store_true",
                   help="continue from the output folder's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run the output folder holds (else refused)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint, no training; "
                   "writes eval_<dataset>_<protocol>.json beside it (or in --output)")
    p.add_argument("--checkpoint", help="checkpoint.pt of a finished run, for --eval-only")
    p.add_argument("--dry-run", action="store_true",
                   help="build data and model, write results.json, stop")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast; auto: bf16 on a GPU that has it, else fp16 with a gradient "
                        "scaler; fp32 on a CPU")
    p.add_argument("--workers", type=int,
                   help="data-loading processes (default 8 on CUDA, 0 on CPU)")
    p.add_argument("--cache-features", type=int, default=0, metavar="V",
                   help="frozen image tower only: encode V augmented views of the training images "
                        "once; epoch e trains on view e mod V")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the frozen blocks of both towers")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log each epoch's loss, training accuracy and lr, and the final "
                        "accuracies, as TensorBoard scalars in the run folder (pip install "
                        "tensorboard)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change a field of the method's Config")
    p.add_argument("--list", action="store_true", help="list the methods")
    p.add_argument("--help-config", action="store_true",
                   help="show the method's Config fields and defaults")
    args = p.parse_args(argv)
    # train.main() runs each of args.seeds
    return argparse.Namespace(**vars(args), seed=args.seeds[0])

def broken_rule(name, value):
    """The rule a number of the loop breaks ("above 0"), or None when `value` can be used: for the
    flags and every Config's fields alike (epochs, batch_size, lr and any *_epochs / *_lr field)."""
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
    """A UserError for a flag no run can use, or that a run would ignore, before anything is loaded
    or written."""
    for name in ("shots", "epochs", "batch_size", "lr", "workers", "cache_features"):
        value = getattr(args, name)
        rule = None if value is None else broken_rule(name, value)
        if rule:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be {rule}")
    if bad := [seed for seed in args.seeds if not 0 <= seed < 2**32]:
        raise UserError(f"--seed {bad[0]}: must be 0 to {2**32 - 1} (a 32-bit seed, as numpy's)")
    if args.eval_data and args.protocol not in ("cross", "dg"):
        raise UserError(f"--eval-data names the target datasets of --protocol cross or dg; with "
                        f"--protocol {args.protocol} it would be ignored: add --protocol cross "
                        "(or dg), or drop --eval-data")
    if args.tensorboard and args.eval_only:
        raise UserError("--tensorboard logs the epochs of a training run; --eval-only trains none: "
                        "drop --tensorboard")
    if args.tensorboard:
        # an optional extra: imported only for this flag, before anything is written (runs.Log
        # writes with it)
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError("--tensorboard needs tensorboard: pip install tensorboard") from None
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in the output folder, --overwrite replaces it: "
                        "pass one of them")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                        "False): use --device cpu, or a CUDA build of torch on a machine with a "
                        "GPU")

def check_config(args, module, cfg):
    """The loop's numbers in the method's Config (its paper's defaults and --set), then its own
    check_config."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        rule = broken_rule(field.name, value) if is_number else None
        if rule:
            raise UserError(f"{args.method}: {field.name}={value}: must be {rule}")
    try:
        if hasattr(module, "check_config"):
            module.check_config(cfg)
    except ValueError as e:
        raise UserError(f"{args.method}: {e}") from None

def make_config(args):
    """The method's Config: paper defaults, then the variant, then --set, then the explicit
    flags."""
    if args.method not in METHODS:
        raise UserError(f"unknown method {args.method!r}; choose one of: {' '.join(METHODS)}")
    module, changes = METHODS[args.method]
    cfg = dataclasses.replace(module.Config(), **changes)
    for item in args.set:
        key, sep, value = item.partition("=")
        if key == "epochs" and fitted_only(cfg):
            raise UserError(f"--set {item}: {args.method} is fitted on the frozen features, not "
                            "trained in SGD epochs")
        # for_data sets them: a --set would be overwritten
        if key in ("template", "dataset") and hasattr(cfg, key):
            raise UserError(f"--set {item}: train.py gives {args.method} the {key} of the data it "
                            "runs on (data.py's TEMPLATES); drop it")
        if not sep or key not in {f.name for f in dataclasses.fields(cfg)}:
            raise UserError(f"--set {item}: {args.method} has no field {key!r}; its fields are "
                            f"{', '.join(f.name for f in dataclasses.fields(cfg))} "
                            "(see --help-config)")
        cfg = dataclasses.replace(cfg, **{key: parse_value(cfg, key, value)})
    check_config(args, module, cfg)  # before the flags: check_flags has checked those
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "backbone": args.backbone, "shots": args.shots if hasattr(cfg, "shots") else None}
    for flag in ("epochs", "batch_size", "lr"):
        if fitted_only(cfg) and flags[flag] is not None:
            raise UserError(f"--{flag.replace('_', '-')}: {args.method} is fitted on the frozen "
                            "features, not trained in SGD epochs; drop the flag (--help-config "
                            "shows what it has)")
    return module, dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})

def parse_value(cfg, key, text):
    """--set key=text as the type the Config's field is annotated with; a field that may be None
    (`float | None`) also takes "none"."""
    kind = typing.get_type_hints(type(cfg))[key]
    optional = type(None) in typing.get_args(kind)
    if optional and text.lower() == "none":
        return None
    if optional:
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"--set {key}={text}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected a "
                        f"{kind.__name__}{' or none' if optional else ''}") from None

def fitted_only(cfg):
    """A method without SGD epochs: no `epochs` in its Config, or None there (see fit above)."""
    return getattr(cfg, "epochs", None) is None

def epochs_for(cfg, shots, module):
    """cfg.epochs, or 0 = by shots: the module's SCHEDULE, else CoOp's: 50 (1 shot), 100 (2 and 4),
    200 (8, 16, all)."""
    return cfg.epochs or getattr(module, "SCHEDULE", {1: 50, 2: 100, 4: 100}).get(shots, 200)

def for_data(cfg, template, dataset):
    """cfg with what a method takes from the data it is built for, where its Config has the field:
    the dataset's template (`template`) and name (`dataset`)."""
    fields = {k: v for k, v in dict(template=template, dataset=dataset).items() if hasattr(cfg, k)}
    return dataclasses.replace(cfg, **fields)

def check_task(runner, task):
    """A UserError for what this method cannot do with this task, flags or processes, before
    anything is written."""
    args, cfg, model = runner.args, runner.cfg, runner.model
    if not task.train and not args.eval_only:
        raise UserError(f"{task.dataset} has no training split: evaluate on it with --eval-data or "
                        "--eval-only")
    if getattr(model, "class_specific", False) and any(
            (e.classnames, e.template) != (task.classnames, task.template) for e in task.evals):
        raise UserError(f"{args.method} with this config learns class-specific parameters, "
                        f"which do not transfer to other classes: use --protocol fewshot, or a "
                        f"config without them")
    if args.cache_features and fitted_only(cfg):
        raise UserError(f"--cache-features: {args.method} is fitted once on un-augmented features, "
                        "with no epochs to cache for; drop the flag")
    if args.cache_features and not hasattr(model, "frozen_features"):
        raise UserError(f"--cache-features: {args.method} learns inside the image tower, so its "
                        "features change as it trains; drop the flag (it is for methods with a "
                        "frozen image tower: README, Scaling up)")
    if not fitted_only(cfg) and cfg.batch_size % runner.world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch; it must split evenly "
                        f"over the {runner.world} processes: use a multiple of {runner.world}")

def method_list(classes=1000):
    """One line per variant: its name, file, paper backbone, learned parameters there with `classes`
    made-up classes (ImageNet's count; CLIP on the meta device, so no weights are made), and the
    module's ABOUT line."""
    names = [f"class {i}" for i in range(classes)]
    clips = {}
    lines = [f"{'method':14s} {'file':16s} {'backbone':9s} {'learned*':>10s}  what it is"]
    for name, (module, changes) in METHODS.items():
        cfg = dataclasses.replace(module.Config(), **changes)
        if cfg.backbone not in clips:
            with torch.device("meta"):
                clips[cfg.backbone] = clip_model.CLIP(*clip_model.CONFIGS[cfg.backbone])
        model = module.build(clips[cfg.backbone], names, cfg)
        learned = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines.append(f"{name:14s} {module.__name__ + '.py':16s} {cfg.backbone:9s} {learned:>10,}  "
                     f"{module.ABOUT[name]}")
    return "\n".join(lines + [f"* learned parameters (results.json's learned_params) at the paper "
                              f"backbone with {classes:,} classes, as on ImageNet; --backbone also "
                              "takes Hugging Face's and OpenCLIP's weights (docs/weights.md)"])
