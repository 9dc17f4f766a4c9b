"""A run's folder and what it keeps: results.json, checkpoint.pt, log.txt, written atomically, and
read back.

train.py writes a run through these functions; predict.py and analyze.py read one back with
`load_run` (the model rebuilt as it was trained) without importing the training loop. A folder
holding results.json or checkpoint.pt holds a run: claim_folder refuses to write into it unless the
run continues it (--resume) or replaces it (--overwrite), and locks it while a run writes.
save_checkpoint writes a run's checkpoint after each epoch; resume loads it back, after
check_resume has refused one of another task or config.
"""
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import clip_model
import data
import other_weights
import released
from methods import METHODS, UserError, for_data

# a folder holding either holds a run
RUN_FILES = ("results.json", "checkpoint.pt")
# method file -> {a Config field's name in older runs: its name now}
RENAMED = {"mudpt": {"n_tokens": "n_ctx"}}

def all_sum(values, device):
    """Numbers or device tensors summed over the processes of a torchrun job (in a single process,
    the values themselves), read on the host: one synchronisation for all of them."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()

def save_atomic(write, path):
    """write(tmp) then rename: a crash leaves the previous file, never half a new one. Only
    torchrun's rank 0 writes."""
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # a full disk (torch.save's is a RuntimeError), a read-only folder
        reason = getattr(e, "strerror", None) or "the write failed: is the disk full?"
        raise UserError(f"cannot write {path} ({reason}): free space or fix the folder; "
                        f"the previous {Path(path).name}, if there was one, is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def write_json(obj, path):
    save_atomic(lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)), path)

def load_checkpoint(path, method=None, released_too=False):
    """A checkpoint of this project (of `method`, when given), read without running code; with
    released_too, also one the authors of a method released (a Dassl file, converted by
    released.py)."""
    try:
        # a downloaded file cannot run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"method", "learned", "config", "epoch"} <= ckpt.keys()
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}: train first (without --resume), or pass the "
                        "right path") from None
    except Exception:
        ckpt = released.load(path, method) if released_too else None
        if ckpt is None:
            kind = "of this project or a Dassl checkpoint" if released_too else "of this project"
            raise UserError(f"{path} is not a readable checkpoint {kind} (truncated or another "
                            "file): delete it and train again") from None
    if method and ckpt["method"] != method:
        raise UserError(f"{path} holds a {ckpt['method']} run, not {method}: "
                        f"pass --method {ckpt['method']}")
    ckpt["config"] = current_names(ckpt["method"], ckpt["config"])
    if "run" in ckpt:
        ckpt["run"]["config"] = current_names(ckpt["method"], ckpt["run"]["config"])
    return ckpt

def current_names(method, config):
    """A saved config with today's field names (RENAMED), so that an older run loads, resumes and
    compares."""
    renamed = RENAMED.get(METHODS[method][0].__name__, {}) if method in METHODS else {}
    return {renamed.get(k, k): v for k, v in config.items()}

def learned_tensors(model):
    """What a run learned, by name: the parameters it trains, and the persistent buffers of the
    method a fit() set (a method keeps what it computes at build non-persistent; CLIP's own buffers,
    under `clip.`, are CLIP's)."""
    tensors = {k: v for k, v in model.named_parameters() if v.requires_grad}
    persistent = model.state_dict().keys()
    tensors.update({k: v for k, v in model.named_buffers()
                    if k in persistent and not k.startswith("clip.")})
    return tensors

def learned_state(model):
    """A copy of learned_tensors(model): what a checkpoint holds."""
    return {k: v.detach().clone() for k, v in learned_tensors(model).items()}

def restore(model, learned, where, method, backbone, classes):
    """Copy a checkpoint's learned state into `model` (onto its device): `method` built on
    `backbone` for `classes` classes; a UserError naming `where` the state came from, when they do
    not fit."""
    try:
        missing, unexpected = model.load_state_dict(learned, strict=False)
    except RuntimeError:
        # shapes differ: class-specific parameters, or another backbone
        missing = unexpected = ["(shapes differ)"]
    # frozen weights are not in a checkpoint
    missing = [k for k in missing if k in learned_tensors(model)]
    if missing or unexpected:
        raise UserError(f"the parameters from {where} do not fit {method} on {backbone} with "
                        f"{classes} classes (class-specific context on other classes, or another "
                        f"backbone or config): {(missing + unexpected)[:3]}")

def read_run(run_dir):
    """A run folder's results.json -> (results, method module, the Config its model was built with,
    classnames): the classes the run trained on (base-to-new: the base half)."""
    run = Path(run_dir)
    if run.is_file():
        raise UserError(f"{run} is a file: pass the folder of a run of train.py (its --output)")
    try:
        results = json.loads((run / "results.json").read_text())
        method = results["method"]
        module = METHODS[method][0]
        # the saved config also holds run options
        known = {f.name for f in dataclasses.fields(module.Config)}
        saved = current_names(method, results["config"])
        cfg = module.Config(**{k: v for k, v in saved.items() if k in known})
        # load_run reads them
        if missing := [key for key in ("dataset", "seed", "init") if key not in results]:
            raise KeyError(missing[0])
        classnames, template = results.get("classnames"), results.get("template")
        # a run from before results.json kept its classes: read them from its dataset
        if classnames is None:
            task = data.make_task(results["data"], results["protocol"], 0, results["seed"])
            classnames, template = task.classnames, task.template
    except FileNotFoundError:
        raise UserError(f"no results.json in {run}: pass the folder of a run of train.py "
                        "(its --output)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, data.DataError):
            raise
        raise UserError(f"{run / 'results.json'} is not the results of a run of this project "
                        f"({type(e).__name__}: {e})") from None
    return results, module, for_data(cfg, template, results["dataset"]), classnames

def preprocessing_record(preprocessing):
    """A clip_model.Preprocessing as results.json and checkpoints keep it: plain values, equal after
    a JSON trip."""
    return {**preprocessing._asdict(), "mean": list(preprocessing.mean),
            "std": list(preprocessing.std)}

def preprocessing_of(record, size):
    """The preprocessing a run's `record` (results.json, a checkpoint's run) holds; in one from
    before records kept it, OpenAI's at `size`, which every model then got."""
    saved = record.get("preprocessing") or preprocessing_record(clip_model.Preprocessing(size))
    return clip_model.Preprocessing(**{**saved, "mean": tuple(saved["mean"]),
                                       "std": tuple(saved["std"])})

def recorded_preprocessing(record, clip, where):
    """The preprocessing a run was trained with (preprocessing_of its results.json or checkpoint's
    `record`), said on stderr when `clip`'s backbone now gives another."""
    recorded = preprocessing_of(record, clip.preprocessing.size)
    if recorded != clip.preprocessing:
        print(f"{where}: the run was trained with preprocessing {preprocessing_record(recorded)}; "
              f"its backbone now gives {preprocessing_record(clip.preprocessing)}: using the run's",
              file=sys.stderr)
    return recorded

def load_run(run_dir, device="cpu"):
    """A run of train.py, rebuilt -> (model in eval mode, preprocess, classnames): method, backbone,
    config, classes and preprocessing from its results.json (read_run), what it learned or fitted
    from its checkpoint.pt, CLIP's weights from the download cache (an --init random run's are made
    again from its seed). A run that did not finish is rebuilt from its last checkpoint, with a
    warning on stderr naming its epoch."""
    run = Path(run_dir)
    results, module, cfg, classnames = read_run(run)
    method = results["method"]
    clip, _ = other_weights.load_backbone(cfg.backbone, device=device,
                                          pretrained=results["init"] == "pretrained",
                                          seed=results["seed"])
    clip.preprocessing = recorded_preprocessing(results, clip, run / "results.json")
    torch.manual_seed(results["seed"])
    model = module.build(clip, classnames, cfg).to(device)
    if learned_tensors(model):  # learned or fitted: its checkpoint
        path = run / "checkpoint.pt"
        ckpt = load_checkpoint(path)
        if (ckpt["method"], ckpt.get("backbone", cfg.backbone)) != (method, cfg.backbone):
            raise UserError(f"{path} holds a {ckpt['method']} run on {ckpt.get('backbone')}, and "
                            f"results.json one of {method} on {cfg.backbone}: the folder mixes two "
                            "runs; train it again")
        if bad := [k for k, v in ckpt["learned"].items()
                   if v.is_floating_point() and not torch.isfinite(v).all()]:
            raise UserError(f"{path} holds nan or inf values ({bad[0]}): the run diverged; train "
                            "it again with a lower --lr")
        restore(model, ckpt["learned"], path, method, cfg.backbone, len(classnames))
        # stopped by a nan loss, or killed: its last checkpoint, not a finished run
        if "accuracy" not in results:
            print(f"warning: {run}: this run did not finish (its results.json has no accuracy): "
                  f"its checkpoint holds epoch {ckpt['epoch']} of {results.get('epochs', '?')}",
                  file=sys.stderr)
    return model.eval(), clip_model.transform(clip.preprocessing), classnames

def default_output(args, cfg):
    """runs/<data>/<method>/<backbone>/shots<K>[-<protocol>][,<changes>]/seed<S>, the changes being
    what sets this run apart from the method's defaults: its Config fields that differ (--epochs,
    --lr, --batch-size, --set; a file by its name), --init random and an explicit --precision. Runs
    with other settings get other folders. A backbone file or folder appears by its name."""
    module, variant = METHODS[args.method]
    defaults = dataclasses.replace(module.Config(), **variant)
    changes = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name not in ("backbone", "shots") and value != getattr(defaults, field.name):
            changes.append(f"{field.name}={Path(value).name if isinstance(value, str) else value}")
    changes += (["init=random"] * (args.init == "random")
                + [f"precision={args.precision}"] * (args.precision != "auto"))
    protocol = "" if args.protocol == "fewshot" else f"-{args.protocol}"
    folder = f"shots{args.shots}{protocol}" + "".join(f",{c}" for c in changes)
    # a file or folder by its name (a whole path made one odd name); a model name or
    # hf:<org>/<name> as it reads
    backbone, (model, colon, path) = cfg.backbone, cfg.backbone.partition(":")
    if os.path.exists(backbone):
        backbone = Path(backbone).name
    elif colon and os.path.exists(path):  # OpenCLIP's MODEL:<checkpoint file>
        backbone = f"{model}:{Path(path).name}"
    return Path("runs", Path(args.data).name, args.method, backbone.replace("/", "-"), folder,
                f"seed{args.seed}")

def output_folder(args, cfg):
    """Where a run writes: --output, else default_output; an evaluation (--eval-only) writes its own
    file beside its checkpoint unless --output says elsewhere."""
    if args.eval_only:
        return Path(args.output or Path(args.checkpoint).parent)
    return Path(args.output or default_output(args, cfg))

@contextlib.contextmanager
def claim_folder(out, args, device):
    """The run folder, created and, for training, locked while the run writes (a lock the system
    drops when the process ends, even by kill -9): a UserError when the folder holds a run that this
    one would replace without --resume or --overwrite, or when another run holds the lock. Under
    torchrun process 0 takes the lock and every process learns whether it could, so that all stop
    together. An evaluation writes its own file: no lock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"cannot make the run folder {out} ({e.strerror}): "
                        "pass another --output") from None
    try:
        if not args.eval_only:
            lock_run(out, lock, args, device)
        yield out
    finally:
        os.close(lock)

def lock_run(out, lock, args, device):
    first = not dist.is_initialized() or dist.get_rank() == 0
    # before any process writes: the same for all
    held = [name for name in RUN_FILES if (out / name).exists()]
    busy = False
    if first and not (held and not args.resume and not args.overwrite):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = True
        except OSError:
            # a file system without locks on folders (some NFS mounts): no guard, but the run
            # goes on
            pass
    if dist.is_initialized():
        busy = all_sum([busy], device)[0] > 0
    if held and not args.resume and not args.overwrite:
        raise UserError(f"{out} already holds a run ({' and '.join(held)}): pass --resume to "
                        "continue it, --overwrite to replace it, or another --output")
    if busy:
        raise UserError(f"another run is writing to {out} now: wait for it to end, or pass "
                        "another --output")
    if args.overwrite and first:
        for name in (*RUN_FILES, "log.txt"):
            (out / name).unlink(missing_ok=True)
        # --tensorboard's curves of the run replaced
        for events in out.glob("events.out.tfevents.*"):
            events.unlink()

def checkpoint_config(args, cfg, ckpt):
    """--eval-only: the Config the checkpoint was trained with (its model is rebuilt as it was); a
    UserError when --backbone or --set ask for another value, which could not apply."""
    # the saved config also holds run options
    known = dataclasses.asdict(cfg).keys() - {"template", "dataset"}
    saved = {k: v for k, v in ckpt["config"].items() if k in known}
    flagged = ([item.partition("=")[0] for item in args.set]
               + (["backbone"] if args.backbone else []))
    if clash := [k for k in flagged if k in saved and saved[k] != getattr(cfg, k)]:
        raise UserError(f"--eval-only rebuilds the model {args.checkpoint} was trained as, with "
                        f"{', '.join(f'{k}={saved[k]}' for k in clash)}; the flags ask for "
                        f"{', '.join(f'{k}={getattr(cfg, k)}' for k in clash)}: drop them")
    return dataclasses.replace(cfg, **saved)

def run_identity(runner):
    """What defines the task a checkpoint continues (a train.Runner's): a resume with any other
    value would train on something else."""
    args = runner.args
    return dict(data=str(runner.task.root), dataset=runner.task.dataset, protocol=args.protocol,
                shots=args.shots, seed=args.seed, backbone=runner.cfg.backbone, init=args.init,
                precision=runner.precision,
                preprocessing=preprocessing_record(runner.preprocessing),
                config={**dataclasses.asdict(runner.cfg), "cache_features": args.cache_features})

def save_checkpoint(runner, out, epoch, history, elapsed, optimizer):
    """out/checkpoint.pt after `epoch` epochs: what the run learned, its optimizer and fp16 scaler,
    its history and time, and its identity (what --resume and --eval-only check against)."""
    run = run_identity(runner)
    state = dict(method=runner.args.method, backbone=runner.cfg.backbone, config=run["config"],
                 epoch=epoch, run=run, learned=learned_state(runner.model),
                 optimizer=optimizer.state_dict() if optimizer else None, history=history,
                 time_s=elapsed, precision=runner.precision, scaler=runner.scaler.state_dict())
    save_atomic(functools.partial(torch.save, state), out / "checkpoint.pt")

def resume(runner, out, optimizer):
    """The output folder's checkpoint, checked to continue this task and loaded: model, optimizer,
    fp16's scaler."""
    path = out / "checkpoint.pt"
    ckpt = load_checkpoint(path, runner.args.method)
    check_resume(ckpt, run_identity(runner), path)
    runner.load_learned(runner.model, ckpt["learned"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt and runner.scaler.is_enabled():
        runner.scaler.load_state_dict(ckpt["scaler"])  # fp16: the loss scale reached, its counter
    return ckpt

def check_resume(ckpt, identity, path):
    """A UserError unless the checkpoint at `path` continues this run's task: the same precision,
    and the same `identity` (data, protocol, shots, seed, backbone, init, precision, preprocessing,
    config), each difference named."""
    if ckpt.get("precision", identity["precision"]) != identity["precision"]:
        raise UserError(f"{path} was trained in {ckpt['precision']}, this run would use "
                        f"{identity['precision']}: pass --precision {ckpt['precision']} to resume "
                        "it exactly")
    # a checkpoint from before it kept the task
    saved = ckpt.get("run", dict(config=ckpt["config"]))
    preprocessing = preprocessing_of(saved, identity["preprocessing"]["size"])
    saved = {**saved, "preprocessing": preprocessing_record(preprocessing)}
    differences = []
    for key in [key for key in saved if saved[key] != identity[key]]:
        if key == "config":  # the fields that differ
            fields = sorted(k for k in saved[key].keys() | identity[key].keys()
                            if saved[key].get(k) != identity[key].get(k))
            differences += [f"config {k}: {saved[key].get(k)}, this run {identity[key].get(k)}"
                            for k in fields]
        else:
            differences.append(f"{key}: {saved[key]}, this run {identity[key]}")
    if differences:
        raise UserError(f"{path} was trained on another task or config ({'; '.join(differences)}): "
                        "resume with the flags it was trained with, or pass another --output")

def start_results(runner, epochs):
    """results.json before training: the run's task, model and config, with what load_run()
    rebuilds it for."""
    args, cfg, task, model = runner.args, runner.cfg, runner.task, runner.model
    run = run_identity(runner)
    return dict(method=args.method, dataset=task.dataset, data=args.data, protocol=args.protocol,
                shots=args.shots, seed=args.seed, backbone=cfg.backbone, init=args.init,
                epochs=epochs,
                learned_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                frozen_params=sum(p.numel() for p in model.parameters() if not p.requires_grad),
                precision=runner.precision, processes=runner.world,
                config=run["config"], classnames=task.classnames, template=task.template,
                preprocessing=run["preprocessing"])

def headline(runner, results):
    """The log's first line: what trains on what, where, and for how long."""
    args = runner.args
    where = f"{args.device} x{runner.world} (torchrun)" if runner.world > 1 else args.device
    epochs = results["epochs"]
    cached = (f", cached image features: {args.cache_features} views"
              if args.cache_features and epochs else "")
    fits = hasattr(runner.model, "fit") and not args.eval_only
    schedule = ("fitted, no SGD epochs" if fits and not epochs
                else f"{'fitted, then ' if fits else ''}{epochs} epochs")
    return (f"{args.method} on {results['dataset']} ({args.protocol}, {args.shots} shots, "
            f"seed {args.seed}): {results['backbone']}"
            f"{' random init' if args.init == 'random' else ''}, {where}, {runner.precision}, "
            f"{results['learned_params']:,} learned / {results['frozen_params']:,} frozen "
            f"parameters, {len(runner.task.train)} train images, {schedule}{cached}")

class Log:
    """log(line): printed, and appended to the run's log.txt; log.scalars(step, values): with
    --tensorboard, TensorBoard scalars in the run folder. One process speaks and writes for a
    torchrun job. `with` closes the event file."""

    def __init__(self, out, rank, tensorboard=False):
        self.path, self.rank = Path(out) / "log.txt", rank
        self.out = Path(out)
        self.tensorboard = tensorboard and rank == 0
        self.writer = None

    def __call__(self, line):
        if self.rank == 0:
            # first: log.txt keeps the line even if stdout's reader went away
            with open(self.path, "a") as f:
                print(line, file=f)
            print(line, flush=True)

    def scalars(self, step, values, purge=False):
        """values ({tag: number}) at `step`, an epoch. The event files go into the run folder itself
        (not a subfolder), so that `tensorboard --logdir runs/` lists each run by its folder's path,
        <data>/<method>/.../seed<S>. The first call opens this process's file; with purge,
        TensorBoard hides what an earlier process logged here from `step` on (an epoch that a killed
        run logged before its checkpoint was written, which --resume trains again)."""
        if not self.tensorboard:
            return
        if self.writer is None:
            # optional: methods.check_flags made sure it imports
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out), purge_step=step if purge else None)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # on disk each epoch: a killed run keeps what it logged

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()

def progress(total, what, rank=0):
    """A bar of the images this process handles (count, img/s, ETA) on a terminal, for process 0;
    elsewhere (a pipe, a log file, pytest, torchrun's other processes) a bar that draws nothing, and
    the log lines are all there is."""
    return tqdm(total=total, desc=what, unit="img", leave=False, dynamic_ncols=True,
                disable=rank != 0 or not sys.stderr.isatty())
