"""The one training loop for every method:

    python train.py --method coop --data ./data/dtd --shots 16

Read from the top, in the order it runs: `main` (one run per seed, on one device or on N GPUs under
torchrun), `run` (a run's phases in order), `train` (fitting, then the epochs, each ending with a
checkpoint) with its learning-rate schedule, the precision, then `Runner`, one run's model (built
in `run`'s phase 2), its methods in the order they are called: `build`, `train_epoch` (the SGD
steps of an epoch), `check_finite`, ... `evaluate` (top-1 accuracy). Every method trains
here the same way; what a method file must and may define is listed in methods.py, beside the
command line and the Config checks. The run folder (atomic writes, checkpoints, resume checks, and
load_run for predict.py and analyze.py) is runs.py; the frozen-feature cache (--cache-features) is
features.py; the authors' released checkpoints, read by --eval-only, are released.py.
"""
import argparse
import functools
import inspect
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import clip_model
import data
import features
import methods
import other_weights
import released
import runs
from methods import UserError

OPTIMIZERS = {  # Config.optimizer -> the optimizer
    # Dassl's sgd and adam: weight decay 5e-4, an L2 term added to the gradient
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9, weight_decay=5e-4),
    "adam": functools.partial(torch.optim.Adam, betas=(0.9, 0.999), weight_decay=5e-4),
    # Tip-Adapter-F's
    "adamw": functools.partial(torch.optim.AdamW, eps=1e-4, weight_decay=0.01),
}
WARMUP_LR = 1e-5  # Dassl's WARMUP_CONS_LR, in every CoOp-family config
# what --compile compiles, block by block
COMPILED = (clip_model.ResidualAttentionBlock, clip_model.Bottleneck, clip_model.AttentionPool2d)

def main(argv=None):
    args = methods.parse_args(argv)
    # one of the processes of a torchrun job (of 1 process too: its sums then still go through
    # NCCL or gloo)
    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    torchrun = launched and not dist.is_initialized()
    if torchrun:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        if args.list:
            # flushed here: a closed pipe then raises below, not in the interpreter's exit
            print(methods.method_list(), flush=True)
            return 0
        if args.help_config:
            module, cfg = methods.make_config(args)
            print(inspect.getsource(module.Config).rstrip())
            sets = methods.METHODS[args.method][1] or "nothing (the defaults above)"
            print(f"# --method {args.method} sets: {sets}", flush=True)
            return 0
        if not args.method or not args.data:
            raise UserError("--method and --data are required (python train.py --list shows the "
                            "methods)")
        for seed in args.seeds:  # --seed 1 2 3: the papers' protocol, one run and folder per seed
            output = args.output
            if args.output and len(args.seeds) > 1:
                output = str(Path(args.output, f"seed{seed}"))
            run(argparse.Namespace(**{**vars(args), "seed": seed, "output": output}))
    except (OSError, KeyboardInterrupt, UserError, data.DataError, clip_model.LoadError) as e:
        return methods.exit_status(e, args)  # one line on stderr, never a traceback
    finally:
        if torchrun:
            dist.destroy_process_group()
    return 0

def run(args):
    """One run, its phases in order -> its results. Nothing is written before the run folder (3) is
    claimed, and the folder's lock is held until this returns or fails."""
    # 1. the config and the data
    methods.check_flags(args)
    module, cfg = methods.make_config(args)
    if getattr(cfg, "optimizer", "sgd") not in OPTIMIZERS:
        raise UserError(f"{args.method}: optimizer={cfg.optimizer}: use one of "
                        f"{', '.join(OPTIMIZERS)}")
    if args.eval_only:  # the model rebuilt as its checkpoint was trained
        if not args.checkpoint:
            raise UserError("--eval-only needs --checkpoint PATH (the checkpoint.pt of a finished "
                            "run, or an authors' released model.pth.tar-N)")
        # ours, or a file the method's authors released
        ckpt = runs.load_checkpoint(args.checkpoint, args.method, released_too=True)
        cfg = runs.checkpoint_config(args, cfg, ckpt)
    shots = 0 if args.eval_only else args.shots
    task = data.make_task(args.data, args.protocol, shots, args.seed, args.eval_data)

    # 2. CLIP and the method (Runner, below train); a bad backbone leaves nothing behind
    runner = Runner(args, module, cfg, task)
    if args.eval_only:  # the checkpoint's parameters, and the preprocessing it was trained with
        if "released" in ckpt:  # the authors' file: was it trained as the model built here?
            released.check(ckpt, runner.model, cfg.backbone, task, args.checkpoint)
        runner.load_learned(runner.model, ckpt["learned"], args.checkpoint)
        run_record = ckpt.get("run", {})
        runner.preprocessing = runs.recorded_preprocessing(run_record, runner.clip, args.checkpoint)
    epochs = planned_epochs(args, cfg, module, runner.model)
    methods.check_task(runner, task)

    # 3. the run folder, claimed; the log (leaving `with`, it closes --tensorboard's file)
    out = runs.output_folder(args, cfg)
    with (runs.claim_folder(out, args, runner.device),
          runs.Log(out, runner.rank, args.tensorboard) as log):
        results = runs.start_results(runner, epochs)
        if args.eval_only:  # what was evaluated
            results["checkpoint"] = dict(path=str(args.checkpoint), epoch=ckpt["epoch"],
                                         released=ckpt.get("released", {}).get("format"))
        log(runs.headline(runner, results))
        results_file = out / "results.json"
        if args.eval_only:
            results_file = out / f"eval_{task.dataset}_{args.protocol}.json"
        if args.dry_run:
            runs.write_json(results, results_file)
            log(f"dry run: wrote {results_file}")
            return results

        # 4. fitting and training
        started = time.time()
        history, seconds_before = train(runner, results, epochs, out, log)

        # 5. evaluation
        accuracy = {evalset.name: runner.evaluate(evalset) for evalset in task.evals}
        if args.protocol == "base2new":
            base = accuracy["base"]
            new = accuracy["new"]
            accuracy["hm"] = 2 * base * new / (base + new) if base + new else 0.0
        log.scalars(epochs, {f"accuracy/{name}": acc for name, acc in accuracy.items()})
        results.update(accuracy=accuracy, history=history,
                       time_s=seconds_before + time.time() - started)
        runs.write_json(results, results_file)
        scores = "  ".join(f"{name} {acc:.2f}" for name, acc in accuracy.items())
        log(f"{scores}  -> {results_file}")
    return results

def planned_epochs(args, cfg, module, model):
    """The SGD epochs of this run: none for an evaluation, a fitted-only method or one with nothing
    to learn."""
    learns = any(p.requires_grad for p in model.parameters())
    if args.eval_only or methods.fitted_only(cfg) or not learns:
        return 0
    return args.epochs if args.epochs is not None else methods.epochs_for(cfg, args.shots, module)

def train(runner, results, epochs, out, log):
    """Fitting and SGD epochs (from the checkpoint's epoch on --resume), each epoch ending with its
    checkpoint and results.json (no accuracy yet) -> the epochs' history, and the seconds the run
    had taken before this process (0 unless it resumes)."""
    args = runner.args
    cfg = runner.cfg
    model = runner.model
    started = time.time()  # this process's start
    seconds_before = 0.0  # what a resumed run took before
    first_epoch = 0  # or the checkpoint's, on --resume
    history = []
    fits = hasattr(model, "fit") and not args.eval_only
    if fits:  # before any epoch (and before a resume restores the trained parameters)
        results["fit"] = runner.fit(out, log, trained=False)
        if not epochs:
            runs.save_checkpoint(runner, out, 0, history, time.time() - started, optimizer=None)
    if not epochs:
        return history, seconds_before
    if hasattr(model, "param_groups"):
        groups = model.param_groups(cfg)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    # a group may bring its own lr and warm-up (CAVPT: visual prompts 10 epochs, text 1)
    defaults = {"lr": cfg.lr, "warmup_epochs": cfg.warmup_epochs}
    groups = [{**defaults, **g, "base_lr": g.get("lr", cfg.lr)} for g in groups]
    optimizer = OPTIMIZERS[getattr(cfg, "optimizer", "sgd")](groups, lr=cfg.lr)
    if args.resume:
        ckpt = runs.resume(runner, out, optimizer)
        first_epoch = ckpt["epoch"]
        history = ckpt["history"]
        seconds_before = ckpt["time_s"]
        log(f"resumed after epoch {first_epoch}")
    loader = data.loader(runner.task.train, data.train_transform(runner.preprocessing),
                         cfg.batch_size, train=True, workers=runner.workers, device=args.device,
                         rank=runner.rank, world=runner.world)
    # order and augmentation depend on the epoch's seed alone, so a resumed run, every process, and
    # view v of --cache-features (= epoch v) see the same batches
    cache = None
    if args.cache_features:
        view_seeds = [epoch_seed(args.seed, e) for e in range(min(args.cache_features, epochs))]
        cache = features.encode_views(runner, runner.task.train, view_seeds, out)
    trainer = model  # what the steps call: the model, or its DDP wrapper
    if runner.world > 1:  # DDP averages the gradients over the processes
        device_ids = [runner.device] if args.device == "cuda" else None
        # torch 2.14 warns that broadcast_buffers will be renamed; it is the only name older
        # versions take. False: the frozen buffers are never sent again
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            trainer = torch.nn.parallel.DistributedDataParallel(model, device_ids,
                                                                broadcast_buffers=False)

    for epoch in range(first_epoch, epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, group["base_lr"], epochs, group["warmup_epochs"])
        torch.manual_seed(epoch_seed(args.seed, epoch))
        loader.sampler.set_epoch(epoch_seed(args.seed, epoch))
        loader.dataset.seed = epoch_seed(args.seed, epoch)
        tic = time.time()
        inputs_and_labels = features.batches(loader, cache, epoch, runner.device)
        if loader.drop_last:
            images_here = len(loader) * loader.batch_size  # this process's images this epoch
        else:
            images_here = len(loader.sampler)
        with runs.progress(images_here, f"epoch {epoch + 1}/{epochs}", runner.rank) as bar:
            seen, loss_sum, correct = runner.train_epoch(trainer, optimizer, inputs_and_labels,
                                                         epoch, bar)
        history.append(dict(epoch=epoch + 1, loss=loss_sum / seen, acc=100 * correct / seen,
                            lr=optimizer.param_groups[0]["lr"], seconds=time.time() - tic))
        scalars = {f"train/{key}": history[-1][key] for key in ("loss", "acc", "lr")}
        log.scalars(epoch + 1, scalars, purge=True)
        this_run = time.time() - started
        elapsed = seconds_before + this_run
        eta = this_run / (epoch + 1 - first_epoch) * (epochs - epoch - 1)
        log(f"epoch {epoch + 1}/{epochs}  loss {loss_sum / seen:.3f}  "
            f"acc {100 * correct / seen:.1f}  lr {history[-1]['lr']:.1e}  "
            f"{seen / (time.time() - tic):.0f} img/s  {timedelta(seconds=int(elapsed))} elapsed  "
            f"ETA {timedelta(seconds=int(eta))}")
        runs.save_checkpoint(runner, out, epoch + 1, history, elapsed, optimizer)
        runs.write_json({**results, "history": history, "time_s": elapsed}, out / "results.json")

    if fits:  # after the last epoch: what the method fits to its trained parameters
        results["fit"] = runner.fit(out, log, trained=True)
        elapsed = seconds_before + time.time() - started
        runs.save_checkpoint(runner, out, epochs, history, elapsed, optimizer)
    return history, seconds_before

def lr_at(epoch, base_lr, epochs, warmup_epochs):
    """Dassl's constant warm-up then cosine (WARMUP_RECOUNT): the cosine restarts at 0 after
    warm-up, over `epochs` steps, so the last epoch's lr is cos at (epochs - 1 - warmup) / epochs,
    not 0."""
    if epoch < warmup_epochs:
        return WARMUP_LR
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))

def epoch_seed(seed, epoch):
    """The seed of an epoch's data order and augmentation (and of --cache-features' and fit()'s
    view `epoch`)."""
    return seed * 100_003 + epoch

def resolve_precision(requested, device):
    """auto: bf16 on a GPU with native bf16 (Ampere and later), fp16 on older GPUs (T4, V100: bf16
    only emulated), fp32 on a CPU. An explicit choice is kept (bf16 and fp16 autocast also run on a
    CPU)."""
    if requested != "auto":
        return requested
    if device != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"

def autocast(precision, device):
    """The context every forward runs in: bf16 or fp16 autocast, or none for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)

class Runner:
    """One run's model: CLIP and the method built for the task's classes, where they run, and in
    what precision. What the other files read of it (features.py, methods.check_task, runs.py's
    results, checkpoints and resume): args, task, cfg, model, clip, device, rank and world
    (torchrun's), precision, autocast, scaler, preprocessing, workers, and load_learned(). bench.py
    times train_epoch on a stand-in holding model, device, autocast, scaler and check_finite."""

    def __init__(self, args, module, cfg, task):
        self.args = args
        self.module = module  # the method's file
        self.cfg = cfg
        self.task = task
        self.rank = 0  # this process's rank among `world` (torchrun's processes)
        self.world = 1
        if dist.is_initialized():
            self.rank = dist.get_rank()
            self.world = dist.get_world_size()
        self.device = torch.device("cpu")
        if args.device == "cuda":
            self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        self.precision = resolve_precision(args.precision, args.device)
        self.autocast = functools.partial(autocast, self.precision, args.device)
        # fp16 gradients of small losses underflow: the scaler multiplies the loss before backward
        # and skips a step whose gradients overflowed (learned parameters stay fp32 in every
        # precision)
        self.scaler = torch.amp.GradScaler(args.device, enabled=self.precision == "fp16")
        self.workers = args.workers
        if self.workers is None:
            self.workers = 8 if args.device == "cuda" else 0
        self.clip, _ = other_weights.load_backbone(cfg.backbone, device=self.device,
                                                   seed=args.seed,
                                                   pretrained=args.init == "pretrained")
        self.preprocessing = self.clip.preprocessing  # how its images are resized and normalised
        # --compile block by block: methods put prompts between blocks, so every method gains
        if args.compile:
            for block in self.clip.modules():
                if isinstance(block, COMPILED):
                    block.compile()
        torch.manual_seed(args.seed)  # the method's own initialisation
        self.model = self.build(task.classnames, task.template, task.dataset)

    def build(self, classnames, template, dataset):
        """The method for these classes; a Config's `template` and `dataset` take the data's."""
        cfg = methods.for_data(self.cfg, template, dataset)
        try:
            return self.module.build(self.clip, classnames, cfg).to(self.device)
        except clip_model.TextTooLong as e:  # learned context + template + name over 77 tokens
            raise UserError(f"{self.args.method}: a prompt of this config is {e.length} tokens, "
                            f"more than CLIP's {e.context_length}: use a shorter learned context "
                            "(--set n_ctx=... or text_ctx=...) or shorter class names") from None
        except ValueError as e:  # a Config value the method rejects
            raise UserError(f"{self.args.method}: {e}") from None

    def train_epoch(self, trainer, optimizer, inputs_and_labels, epoch, bar=None):
        """One epoch of SGD steps (trainer: the model, or its DDP wrapper) -> images, summed loss
        and correct predictions, over every process (check_finite). The sums stay on the device and
        are read once, at the end: a step never waits for the host (fp16's scaler aside, which
        reads its overflow flag every step; `bar`, a runs.progress() drawn on a terminal, reads the
        running loss once a second)."""
        model = self.model
        if bar is None:  # bench.py times epochs without one: a bar that draws nothing
            bar = runs.progress(None, "", rank=-1)
        model.train()
        seen = 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        first_bad = torch.full((), -1, device=self.device)  # the first step with a nan or inf loss
        shown = time.monotonic()
        for step, (inputs, labels) in enumerate(inputs_and_labels):
            with self.autocast():
                # inputs: {"images": ...}, or {"features": ...} from --cache-features (as
                # features.batches builds them): the keywords every method's forward takes
                logits = trainer(**inputs)
                loss = model.loss(logits, labels, epoch)  # the method's objective (methods.py)
            optimizer.zero_grad(set_to_none=True)
            # fp32 and bf16: the scaler is off and passes the loss through
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()

            seen += len(labels)
            loss_sum += loss.detach().double() * len(labels)
            correct += (logits.argmax(-1) == labels).sum()
            finite = torch.isfinite(loss.detach())
            # a bad step, once found, is kept
            first_bad = torch.where(finite | (first_bad >= 0), first_bad, step)
            bar.update(len(labels))
            if not bar.disable and time.monotonic() - shown > 1:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
                shown = time.monotonic()
        # over every process, in one read from the device; a UserError when a loss went nan or inf
        return self.check_finite([seen, loss_sum, correct], first_bad, inputs, epoch)

    def check_finite(self, sums, first_bad, inputs, epoch):
        """`sums` summed over the processes, in one read from the device; a UserError when a loss
        was nan or inf in any process (first_bad >= 0: its step), or when the parameters the epoch
        ends with give nan or inf on its last batch `inputs`, before this epoch's checkpoint is
        written. (A last step can leave the parameters finite but so large, lr 1e30: 5e29, that
        the next forward is nan.)"""
        self.model.eval()
        with torch.no_grad(), self.autocast():
            ends_bad = ~torch.isfinite(self.model(**inputs)).all()
        *sums, bad_processes = runs.all_sum([*sums, (first_bad >= 0) | ends_bad], self.device)
        if bad_processes:
            where = "in another process"
            if first_bad >= 0:
                where = f"first at step {int(first_bad) + 1}"
            elif ends_bad:
                where = "in the parameters it ends with"
            raise UserError(f"the loss is nan or inf at epoch {epoch + 1} ({where}): lower --lr or "
                            "use --precision fp32 and start again; the run folder keeps the "
                            f"checkpoint and results.json of epoch {epoch} (the last good one)")
        return sums

    def fit(self, out, log, trained):
        """The method's fit() on the frozen features (before the first epoch; after the last:
        trained=True) -> what it chose."""
        try:
            encode = functools.partial(self.encode_split, folder=out)
            chosen = self.model.fit(encode, trained=trained) or {}
        except ValueError as e:  # data the method cannot be fitted on
            raise UserError(f"{self.args.method}: {e}") from None
        numbers = {k: v for k, v in chosen.items() if isinstance(v, (int, float))}
        fitted = "  ".join(f"{k} {v:.4g}" for k, v in numbers.items())
        log(f"fitted{' after training' if trained else ''}: {fitted}")
        return chosen

    def encode_split(self, split, views=0, folder=None):
        """`encode` of a method's fit(): (features, labels) of the task's "train" or "val" images,
        un-augmented (n, ...) or in `views` augmented copies (views, n, ...); each process computes
        all (the same fit in each)."""
        items = {"train": self.task.train, "val": self.task.val}[split]
        labels = torch.tensor([y for _, y in items], device=self.device, dtype=torch.long)
        if not items:  # an empty split (ImageNet has no val): the method's fit says what it needed
            empty = torch.empty((views, 0) if views else (0,), device=self.device)
            return empty, labels
        if views:
            seeds = [epoch_seed(self.args.seed, v) for v in range(views)]
            return features.encode_views(self, items, seeds, folder), labels
        test_transform = clip_model.transform(self.preprocessing)
        return features.encode_views(self, items, [0], folder, test_transform)[0], labels

    @torch.no_grad()
    def evaluate(self, evalset):
        """Top-1 accuracy (%) on evalset.test: each process scores its share, the counts summed."""
        model = self.model_for(evalset).eval()
        loader = data.loader(evalset.test, clip_model.transform(self.preprocessing), 100,
                             train=False, workers=self.workers, device=self.args.device,
                             rank=self.rank, world=self.world)
        # on the device: no sync per batch
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with runs.progress(len(loader.dataset), f"evaluating {evalset.name}", self.rank) as bar:
            for images, labels in loader:
                with self.autocast():
                    logits = model(images.to(self.device, non_blocking=True))
                if evalset.class_subset is not None:
                    logits = logits[:, evalset.class_subset]
                correct += (logits.argmax(-1) == labels.to(self.device, non_blocking=True)).sum()
                bar.update(len(labels))
        return 100 * runs.all_sum([correct], self.device)[0] / len(evalset.test)

    def model_for(self, evalset):
        """The trained model, or the method rebuilt for another class set with the learned
        parameters."""
        task = self.task
        dataset = evalset.name  # another dataset (cross, dg)
        if evalset.root == task.root:  # test, base, new: the task's
            dataset = task.dataset
        # the dataset's name matters only to a Config that has the field
        same_dataset = dataset == task.dataset or not hasattr(self.cfg, "dataset")
        same_classes = (evalset.classnames, evalset.template) == (task.classnames, task.template)
        if same_classes and same_dataset:
            return self.model
        model = self.build(evalset.classnames, evalset.template, dataset)
        # load_state_dict copies them
        self.load_learned(model, runs.learned_tensors(self.model), "training")
        return model

    def load_learned(self, model, learned, where):
        runs.restore(model, learned, where, self.args.method, self.cfg.backbone,
                     len(self.task.classnames))

if __name__ == "__main__":
    sys.exit(main())
