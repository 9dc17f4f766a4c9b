"""A paper's table in one command: every point of a grid is one train.py command,
run one per GPU of this machine (or as a SLURM job array); run again, it skips the finished runs,
resumes the interrupted ones and retries the failed.

    # a table, as a file (experiments/README.md)
    python sweep.py experiments/coop_fewshot.toml
    # inline
    python sweep.py --method coop cocoop --data ./data/dtd --shots 1 2 4 --seed 1 2 3 \\
        -- --epochs 50
    # the commands, copy-pasteable; starts nothing
    python sweep.py experiments/coop_fewshot.toml --dry-run
    # what is done, running, failed, left
    python sweep.py experiments/coop_fewshot.toml --status

A run started here is the same run as its command typed by hand: the same folder
(runs.default_output), the same results.json. The sweep adds `--resume` to a run that has a
checkpoint but no accuracy, and never `--overwrite` unless it is given after `--`. Each run's output
goes to sweep.log in its folder; a failure also leaves sweep.json there (its one-line error), until
the run is tried again. A run folder locked by another process (a train.py typed by hand, another
sweep) is "running elsewhere", not a failure.

On a SLURM cluster, --slurm submits the runs not done as one job array through submitit (pip install
submitit), a task per run on one node with --gpus-per-run GPUs, and returns with the job's id;
--status then adds each run's job and SLURM's state of it (sacct):

    # 4 h per task at most
    python sweep.py experiments/coop_fewshot.toml --slurm --partition gpu --time 240

A task runs its run as a sweep here does: the same lock, --resume, sweep.json. 90 s before its time
limit (and at a preemption, where the cluster sends the signal then) the task stops train.py, which
keeps its last finished epoch, and requeues itself to continue the run with --resume. submitit's
scripts, pickles and logs go to runs/.slurm/<experiment file's name>/ (--slurm-folder).
"""
import argparse
import contextlib
import ctypes
import fcntl
import io
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

import methods
import report
import runs

TRAIN = Path(__file__).with_name("train.py")
AXES = ("method", "data", "shots", "seed", "backbone", "protocol")  # the inline grid's flags
NOT_IN_A_SWEEP = {"--output": "every run has its own folder",
                  "--resume": "the sweep adds it where a run stopped",
                  "--eval-only": "a sweep trains"}

class Run(NamedTuple):
    argv: list  # train.py's arguments
    folder: Path  # where train.py writes it (runs.default_output)
    # --dry-run: why train.py would refuse the command now (a file it needs is missing, say)
    refused: str = None

def folder_of(argv):
    """The run folder train.py would write for `argv`, and a UserError naming what train.py's parser
    refuses."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = methods.parse_args(argv)
    except SystemExit:
        raise methods.UserError("train.py says "
                                f"{stderr.getvalue().strip().splitlines()[-1]}") from None
    if len(args.seeds) > 1 or argv.count("--seed") > 1:
        raise methods.UserError("one seed per run: make the seeds an axis of the grid "
                                "(--seed 1 2 3, seed = [1, 2, 3])")
    methods.check_flags(args)
    return runs.default_output(args, methods.make_config(args)[1])

def make_runs(points, dry_run=False):
    """[train.py argv] -> [Run], each checked by train.py's own parser and config checks; a
    UserError names the first command refused (--dry-run: each refused command says why), or two
    points that would write one folder."""
    made, seen = [], {}
    for argv in points:
        if clash := next((flag for flag in NOT_IN_A_SWEEP if flag in argv), None):
            raise methods.UserError(f"{clash} is not for a sweep ({NOT_IN_A_SWEEP[clash]}): "
                                    "drop it")
        try:
            folder = folder_of(argv)
        except methods.UserError as e:
            if dry_run:
                made.append(Run(argv, None, str(e)))
                continue
            raise methods.UserError(f"{shlex.join(argv)}: {e}") from None
        if folder in seen:
            raise methods.UserError(f"two points of the grid are one run ({folder}): "
                                    f"{shlex.join(seen[folder])} and {shlex.join(argv)}")
        seen[folder] = argv
        made.append(Run(argv, folder))
    return made

def flag(key, value):
    """A grid's key and value as train.py's flag: shots = 4 -> --shots 4; compile = true
    -> --compile."""
    name = f"--{key.replace('_', '-')}"
    return [name] if value is True else [] if value is False else [name, str(value)]

def expand(grid, data_root=None):
    """One [[grid]] table (or the inline grid) -> (point, train.py argv) per point of the product of
    its list values. With a data_root, `data` values are dataset folder names under it (`demo`, and
    paths holding a "/", as they are); `args` are flags for every point, where {method}, {data},
    {shots}, ... are the point's values."""
    grid = dict(grid)
    extra = grid.pop("args", [])
    axes = {key: value if isinstance(value, list) else [value] for key, value in grid.items()}
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        argv = []
        for key, value in point.items():
            if data_root and key == "data" and value != "demo" and "/" not in str(value):
                value = Path(data_root, value)
            argv += flag(key, value)
        yield point, argv + fill(extra, point)

def fill(args, point):
    """Flags with the point's values in place of {method}, {data}, ..."""
    try:
        return [str(arg).format_map(point) for arg in args]
    except KeyError as e:
        raise methods.UserError(f"the flags {args} name {{{e.args[0]}}}, which is not a key of the "
                                f"grid ({', '.join(point)})") from None

def matches(point, where):
    return all(point.get(key) in (value if isinstance(value, list) else [value])
               for key, value in where.items())

def read_experiment(path, data_root):
    """An experiment file (TOML: [[grid]] tables and [[rule]] tables, experiments/README.md) ->
    [train.py argv]."""
    try:
        spec = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise methods.UserError(f"no experiment file at {path}: see experiments/ for the papers' "
                                "tables") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise methods.UserError(f"{path} is not valid TOML: {e}") from None
    if unknown := set(spec) - {"title", "paper", "data_root", "grid", "rule"}:
        raise methods.UserError(f"{path}: unknown key {sorted(unknown)[0]!r}: an experiment has "
                                "title, paper, data_root, [[grid]] and [[rule]] tables")
    if not spec.get("grid"):
        raise methods.UserError(f"{path} has no [[grid]] table: nothing to run")
    for rule in spec.get("rule", []):
        if set(rule) != {"where", "args"}:
            raise methods.UserError(f"{path}: a [[rule]] has a `where` table and an `args` list, "
                                    f"not {sorted(rule)}")
    points = []
    for grid in spec["grid"]:
        for point, argv in expand(grid, data_root or spec.get("data_root", "data")):
            for rule in spec.get("rule", []):
                if matches(point, rule["where"]):
                    argv += fill(rule["args"], point)
            points.append(argv)
    return points

# The state of a run folder, read from the folder alone:
# what --status prints and what a sweep does next.
DONE, ELSEWHERE, FAILED, STOPPED, TODO = ("done", "running elsewhere", "failed", "interrupted",
                                          "to run")

def locked(path):
    """Whether another process holds the lock on `path` (train.py's on its run folder, a sweep's on
    sweep.lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)

def finished(folder):
    with contextlib.suppress(OSError, ValueError, TypeError):
        return "accuracy" in json.loads((folder / "results.json").read_text())
    return False

def started(folder):  # a checkpoint, or results.json without accuracy: --resume continues it
    return any((folder / name).exists() for name in runs.RUN_FILES)

def state(folder):
    if finished(folder):
        return DONE
    if locked(folder) or locked(folder / "sweep.lock"):
        return ELSEWHERE
    if (folder / "sweep.json").exists():
        return FAILED
    return STOPPED if started(folder) else TODO

def failure(folder):
    """A failed run's one-line error, from its sweep.json."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((folder / "sweep.json").read_text())["error"]
    return "?"

# Running them here: one run per slot, a slot being the GPUs a run sees (CUDA_VISIBLE_DEVICES),
# or none on a CPU.
# A SLURM task (below) runs its one run with the same pieces: command, claim, launch, outcome, stop.

def slots(gpus, per_gpu, gpus_per_run, jobs):
    if gpus is None and jobs is None:
        import torch  # only to count the GPUs
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:  # no GPU: --jobs processes (default 1)
        return [None] * (jobs or 1)
    if len(gpus) < gpus_per_run:
        raise methods.UserError(f"--gpus-per-run {gpus_per_run}: only {len(gpus)} GPUs "
                                f"({','.join(gpus)})")
    groups = [gpus[i:i + gpus_per_run]
              for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
    return [",".join(group) for group in groups for _ in range(per_gpu)]

def die_with_parent():
    """In the child, before it runs: the kernel sends it SIGTERM when the sweep dies, even by
    kill -9, so no run outlives the sweep holding a GPU (Linux; elsewhere the sweep's own handlers
    stop the children)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

def command(run, gpus_per_run):
    """The process for `run`: train.py, or torchrun with one process per GPU of its slot; --resume
    where it stopped."""
    argv = run.argv + ["--resume"] * started(run.folder)
    if gpus_per_run > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={gpus_per_run}", str(TRAIN), *argv]
    return [sys.executable, str(TRAIN), *argv]

def claim(run):
    """Take `run`'s sweep.lock -> its file descriptor (the lock is held until it is closed), or
    None: another process holds it, or the run finished or was typed by hand since the list was
    made. A claimed run's last failure (sweep.json) is cleared: it is tried again."""
    run.folder.mkdir(parents=True, exist_ok=True)
    lock = os.open(run.folder / "sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # first come: two sweeps never start one run twice
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    # done, or typed by hand, since the list was made
    if finished(run.folder) or locked(run.folder):
        os.close(lock)
        return None
    (run.folder / "sweep.json").unlink(missing_ok=True)
    return lock

def launch(run, process, env, preexec_fn):
    """Start `process` (command(run, ...)) in a session of its own, its output appended to the run's
    sweep.log."""
    with open(run.folder / "sweep.log", "a") as log:
        print(f"$ {shlex.join(process)}", file=log, flush=True)
        return subprocess.Popen(process, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=preexec_fn)

def outcome(run, returncode):
    """What became of `run`, its process ended with `returncode` -> (DONE, None), (ELSEWHERE, None),
    or (FAILED, its one-line error), which the run's sweep.json records."""
    if returncode == 0:
        return DONE, None
    if locked(run.folder):  # a train.py typed by hand got there first
        return ELSEWHERE, None
    error = last_error(run.folder / "sweep.log", returncode)
    runs.write_json({"error": error, "returncode": returncode, "argv": run.argv},
                    run.folder / "sweep.json")
    return FAILED, error

def stop(children, grace=10):
    """SIGTERM to each child's process group (torchrun's processes, the data loaders'), then SIGKILL
    to those still alive after `grace` seconds; each run keeps the checkpoint of its last finished
    epoch (train.py writes a checkpoint whole or not at all). A killed child is not waited for: the
    kernel ends it at once."""
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(max(0.1, deadline - time.monotonic()))
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

class Local:
    """The runs in flight on this machine: at most one per slot."""

    def __init__(self, slots, gpus_per_run):
        self.free, self.gpus_per_run = list(slots), gpus_per_run
        self.cpu_runs = sum(slot is None for slot in slots)  # --jobs: runs at once without a GPU
        self.running = {}  # Popen -> (run, slot, its sweep.lock's fd, start time)

    def start(self, run):
        """Start `run` in a free slot -> whether it started (False: another process holds it, or it
        is done)."""
        lock = claim(run)
        if lock is None:
            return False
        slot = self.free.pop(0)
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
        # CPU runs share the cores (as torchrun's processes do): oversubscribed, each run's threads
        # wait on the others' (measured: 2 runs of 2 threads each on 2 cores, 1.8x slower)
        if slot is None and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.cpu_runs))
        child = launch(run, command(run, self.gpus_per_run), env, die_with_parent)
        self.running[child] = (run, slot, lock, time.monotonic())
        return True

    def ended(self):
        """The runs that ended since the last call -> [(run, what: DONE, FAILED or ELSEWHERE, error,
        seconds)]."""
        ended = []
        for child in [c for c in self.running if c.poll() is not None]:
            run, slot, lock, start = self.running.pop(child)
            self.free.append(slot)
            what, error = outcome(run, child.returncode)
            os.close(lock)
            ended.append((run, what, error, time.monotonic() - start))
        return ended

def last_error(log, returncode):
    """A failed run's one line: train.py's `error: ...`, else the last line it printed."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exit status {returncode}"])[-1]

def run_local(todo, slots, gpus_per_run, say):
    """Run `todo` over the slots -> [(run, error)] of the failed runs, [run] of those running
    elsewhere."""
    pool, waiting, failed, elsewhere = Local(slots, gpus_per_run), list(todo), [], []
    with progress(len(todo)) as bar:
        try:
            while waiting or pool.running:
                while waiting and pool.free:
                    run = waiting.pop(0)
                    if pool.start(run):
                        say(f"started {run.folder}")
                    elif finished(run.folder):
                        bar.update(1)
                    else:
                        elsewhere.append(run)
                        say(f"running elsewhere: {run.folder}")
                        bar.update(1)
                time.sleep(0.2)
                for run, what, error, seconds in pool.ended():
                    if what == FAILED:
                        failed.append((run, error))
                    elif what == ELSEWHERE:
                        elsewhere.append(run)
                    say(f"{what} after {seconds:.0f} s: "
                        f"{run.folder}{f': {error}' if error else ''}")
                    bar.update(1)
                bar.set_postfix_str(f"{len(pool.running)} running, {len(failed)} failed",
                                    refresh=False)
        except KeyboardInterrupt:
            stop(pool.running)
            raise
    return failed, elsewhere

def progress(total):
    """A bar over runs (done, rate, ETA from the finished runs) on a terminal; off one, a bar that
    draws nothing (the sweep's lines say what happens)."""
    return tqdm(total=total, unit="run", desc="sweep", disable=not sys.stderr.isatty(),
                dynamic_ncols=True)

def sigterm_as_interrupt(*_):
    # SIGTERM (a cluster's, a `kill`) stops the runs in flight as Ctrl-C does
    raise KeyboardInterrupt

# Or as one SLURM job array (--slurm): a task per run,
# which submitit starts on a node with the run's GPUs.

class SlurmTask:
    """One run as one task of the job array: submitit pickles it at submission and calls it on the
    task's node. It runs the run as a local sweep does (sweep.lock, --resume where the folder has a
    checkpoint, a failure in sweep.json), and submitit can requeue it: on SIGUSR2, which SLURM sends
    90 s before the time limit (and at a preemption, where the cluster says so), submitit calls
    `checkpoint` in this process, requeues the task it returns and exits. (SIGTERM, submitit only
    logs in this process.)"""

    def __init__(self, run, gpus_per_run):
        self.run, self.gpus_per_run = run, gpus_per_run
        self.child = None  # train.py (or torchrun) while it runs

    def __call__(self):
        """Run the run -> a line saying what became of it; a failed run raises, so that SLURM counts
        the task failed."""
        import submitit  # this runs in a task that submitit started
        # SIGUSR2 unless changed
        self.requeue_signal = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")
        run = self.run
        lock = claim(run)
        if lock is None:
            return f"{DONE if finished(run.folder) else ELSEWHERE}: {run.folder}"
        try:
            self.child = launch(run, command(run, self.gpus_per_run), os.environ, self.child_setup)
            # not wait(): checkpoint() may run meanwhile (a signal handler) and wait
            while self.child.poll() is None:
                time.sleep(1)
            # killed from outside (scancel, a preemption's SIGTERM): not a failure
            if self.child.returncode < 0:
                return f"{STOPPED} by {signal.Signals(-self.child.returncode).name}: {run.folder}"
            what, error = outcome(run, self.child.returncode)
        finally:
            os.close(lock)
        if what == FAILED:
            raise RuntimeError(f"{run.folder}: {error} (log: {run.folder / 'sweep.log'})")
        return f"{what}: {run.folder}"

    def child_setup(self):
        """In train.py's process before it starts: it dies with the task, and ignores the requeue
        signal, which SLURM sends to every process of the task (where its cgroup tracks them), so
        that checkpoint() alone stops it."""
        die_with_parent()
        signal.signal(self.requeue_signal, signal.SIG_IGN)

    def checkpoint(self):
        """submitit's Checkpointable protocol: called on the requeue signal -> the submission to
        requeue, this run as a new task (a running train.py does not pickle). train.py is stopped
        first, keeping the checkpoint of its last finished epoch; the requeued task finds it and
        continues the run with --resume."""
        import submitit
        if self.child is not None:
            stop([self.child])
        return submitit.helpers.DelayedSubmission(SlurmTask(self.run, self.gpus_per_run))

def slurm_executor(args, folder):
    """submitit's SlurmExecutor, each task asking for the flags' resources: one node, one task of
    --gpus-per-run GPUs (torchrun inside starts a process per GPU), requeueable."""
    import submitit
    try:
        executor = submitit.SlurmExecutor(folder)
    except RuntimeError:  # submitit's check that srun is here
        raise methods.UserError("--slurm: no SLURM here (srun is not on PATH): submit from a login "
                                "node of the cluster") from None
    asked = {"partition": args.partition, "account": args.account, "constraint": args.constraint,
             "mem": args.mem, "cpus_per_task": args.cpus_per_task,
             "array_parallelism": args.array_parallelism}
    executor.update_parameters(job_name=f"sweep-{folder.name}", time=args.time, nodes=1,
                               ntasks_per_node=1, gres=f"gpu:{args.gpus_per_run}",
                               additional_parameters={"requeue": True},
                               **{key: value for key, value in asked.items() if value is not None})
    return executor

def submit(executor, todo, gpus_per_run):
    """A task per run of `todo`, in one job array -> the jobs, one per run; each run's slurm.json
    records its job, for --status."""
    # a task unpickles its SlurmTask by importing this folder's modules, whichever folder the sweep
    # started in
    here = shlex.quote(str(TRAIN.parent))
    executor.update_parameters(setup=[f"export PYTHONPATH={here}${{PYTHONPATH:+:$PYTHONPATH}}"])
    jobs = executor.submit_array([SlurmTask(run, gpus_per_run) for run in todo])
    for run, job in zip(todo, jobs):
        run.folder.mkdir(parents=True, exist_ok=True)
        runs.write_json({"job": job.job_id, "folder": str(executor.folder)},
                        run.folder / "slurm.json")
    return jobs

def run_slurm(args, all_runs, todo):
    """--slurm: submit the runs not done; print the job's id and how to follow it."""
    try:
        import submitit
    except ImportError:
        raise methods.UserError("--slurm needs submitit: pip install submitit") from None
    if args.time is None:
        raise methods.UserError("--slurm needs --time MINUTES: each task's time limit")
    print(f"{len(all_runs)} runs: {len(all_runs) - len(todo)} done, {len(todo)} to submit",
          flush=True)
    if not todo:
        print_report(all_runs, args.plot)
        return
    name = Path(args.experiment).stem if args.experiment else "inline"
    folder = Path(args.slurm_folder or Path("runs", ".slurm", name))
    try:
        jobs = submit(slurm_executor(args, folder), todo, args.gpus_per_run)
    except submitit.core.utils.FailedJobError as e:  # sbatch's own message is printed above
        raise methods.UserError("sbatch refused the job array: "
                                f"{str(e).strip().splitlines()[-1]}") from None
    array = jobs[0].job_id.split("_")[0]
    print(f"submitted SLURM job {array}, a task per run; submitit's scripts and logs in {folder}")
    for run, job in zip(todo, jobs):
        print(f"  {job.job_id}: {run.folder}")
    print(f"follow it: squeue -j {array}; this command with --status in place of --slurm (each "
          "run's state and SLURM's); a run's output in its sweep.log")

def slurm_jobs(folders):
    """{run folder: ' (SLURM job 4242_3: RUNNING)'} for the runs submitted to SLURM (their
    slurm.json), with SLURM's state as submitit reads it from sacct where both are here (one sacct
    call for all)."""
    recorded = {}
    for folder in folders:
        with contextlib.suppress(OSError, ValueError, KeyError):
            recorded[folder] = json.loads((folder / "slurm.json").read_text())
    states = {}
    if recorded and shutil.which("sacct"):
        with contextlib.suppress(ImportError):
            import submitit
            jobs = {folder: submitit.SlurmJob(record["folder"], record["job"])
                    for folder, record in recorded.items()}
            states = {folder: f": {job.state}" for folder, job in jobs.items()}
    return {folder: f" (SLURM job {record['job']}{states.get(folder, '')})"
            for folder, record in recorded.items()}

def parse_args(argv):
    argv, extra = ((argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv
                   else (argv, []))
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the first paragraph, one line
    p = argparse.ArgumentParser(description=summary,
                                formatter_class=argparse.RawTextHelpFormatter,
                                epilog="What follows -- goes to every run: "
                                       "sweep.py ... -- --epochs 50")
    p.add_argument("experiment", nargs="?",
                   help="an experiment file (experiments/*.toml); or the flags below")
    for axis in AXES:
        p.add_argument(f"--{axis}", nargs="+",
                       help=f"inline grid: one run per {axis} (with the other axes)")
    p.add_argument("--data-root", help="where the datasets of an experiment file are (default: its "
                   "data_root, else ./data)")
    p.add_argument("--only", nargs="+", default=[], metavar="KEY=VALUE",
                   help="the runs whose train.py flag KEY has VALUE (data=dtd matches ./data/dtd; "
                   "method=coop method=vpt: either)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands and their folders; start nothing")
    p.add_argument("--status", action="store_true", help="print each run's state; start nothing")
    p.add_argument("--gpus", help="GPUs to use, e.g. 0,1,2,3 (default: every visible GPU)")
    p.add_argument("--per-gpu", type=int, default=1, metavar="K", help="runs sharing one GPU")
    p.add_argument("--gpus-per-run", type=int, default=1, metavar="K",
                   help="GPUs per run (torchrun, K processes)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="runs at once on a machine without GPUs (default 1)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="at the end, also report.py's plot of accuracy against shots")
    slurm = p.add_argument_group("SLURM", "--slurm submits the runs not done as one job array "
                                 "through submitit (pip install submitit),\na task per run: "
                                 "one node, --gpus-per-run GPUs (torchrun inside for several), "
                                 "requeued to go on\nwith --resume at the time limit (SIGUSR2 90 s "
                                 "before it; 3 times at most) or a preemption")
    slurm.add_argument("--slurm", action="store_true", help="submit, print the job's id and "
                       "return; --status then adds SLURM's state")
    slurm.add_argument("--time", type=int, metavar="MINUTES", help="each task's time limit, in "
                       "minutes (required; sbatch --time)")
    slurm.add_argument("--partition", help="sbatch --partition (default: the cluster's)")
    slurm.add_argument("--account", help="sbatch --account")
    slurm.add_argument("--constraint",
                       help="sbatch --constraint, e.g. a100 (node features: a GPU model)")
    slurm.add_argument("--mem", help="memory per task, as sbatch --mem takes it: 64G")
    slurm.add_argument("--cpus-per-task", type=int, metavar="N",
                       help="sbatch --cpus-per-task (data loading)")
    slurm.add_argument("--array-parallelism", type=int, metavar="N",
                       help="tasks running at once at most (default 256): --array=0-K%%N")
    slurm.add_argument("--slurm-folder", metavar="DIR", help="submitit's scripts, pickles and logs "
                       "(default runs/.slurm/<experiment file's name,\nor inline>: beside the "
                       "runs, on the file system the nodes share)")
    args = p.parse_args(argv)
    args.extra = extra
    return args

def selected(points, only):
    """The points whose train.py flags have the --only values (one of them, where a key has
    several)."""
    wanted = {}
    for item in only:
        key, sep, value = item.partition("=")
        if not sep:
            raise methods.UserError(f"--only {item}: write KEY=VALUE, e.g. data=dtd or method=coop")
        wanted.setdefault(f"--{key.replace('_', '-')}", []).append(value)

    def keeps(argv):
        given = dict(zip(argv, argv[1:]))
        return all(key in given and (given[key] in values or Path(given[key]).name in values)
                   for key, values in wanted.items())
    return [argv for argv in points if keeps(argv)]

def grid_points(args):
    if args.experiment and any(getattr(args, axis) for axis in AXES):
        raise methods.UserError("pass an experiment file or the inline grid's flags, not both")
    if args.experiment:
        points = read_experiment(args.experiment, args.data_root)
    elif args.method and args.data:
        grid = {axis: getattr(args, axis) for axis in AXES if getattr(args, axis)}
        points = [argv for _, argv in expand(grid)]  # --data as train.py takes it
    else:
        raise methods.UserError("pass an experiment file (experiments/*.toml), or --method and "
                                "--data (and --shots, --seed, ...) for an inline grid")
    points = [argv + args.extra for argv in selected(points, args.only)]
    if not points:
        raise methods.UserError(f"no run matches --only {' '.join(args.only)}")
    return points

def print_status(all_runs):
    # a list: a Run (its argv a list) is no dict key
    states = [state(run.folder) for run in all_runs]
    counts = {s: states.count(s) for s in (DONE, ELSEWHERE, FAILED, STOPPED, TODO)}
    print(f"{len(all_runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    jobs = slurm_jobs([run.folder for run, s in zip(all_runs, states) if s != DONE])
    for run, s in zip(all_runs, states):
        if s != DONE:
            detail = (f": {failure(run.folder)} (log: {run.folder / 'sweep.log'})" if s == FAILED
                      else "")
            print(f"  {s}: {run.folder}{detail}{jobs.get(run.folder, '')}")

def print_report(all_runs, plot):
    """report.py's table (mean ± std over seeds, the papers' numbers beside) of this sweep's
    finished runs."""
    groups = report.collect_files([run.folder / "results.json"
                                   for run in all_runs if finished(run.folder)])
    if groups:
        print(report.table(groups, report.paper_numbers()), flush=True)
    if groups and plot:
        report.plot(groups, plot)

def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        all_runs = make_runs(grid_points(args), args.dry_run)
        train = os.path.relpath(TRAIN)
        if args.dry_run:
            for run in all_runs:
                print(f"python {train} {shlex.join(run.argv)}  "
                      f"# {run.folder or f'refused now: {run.refused}'}")
            refused = sum(run.refused is not None for run in all_runs)
            print(f"# {len(all_runs)} runs"
                  + (f"; {refused} refused now, as said" if refused else ""))
            return 0
        if args.status:
            print_status(all_runs)
            return 0
        for name in ("per_gpu", "gpus_per_run", "jobs", "time", "cpus_per_task",
                     "array_parallelism"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise methods.UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: "
                                        "must be 1 or more")
        if args.slurm:
            run_slurm(args, all_runs, [run for run in all_runs if not finished(run.folder)])
            return 0
        gpus = None if args.gpus is None else [g for g in args.gpus.split(",") if g]
        places = slots(gpus, args.per_gpu, args.gpus_per_run, args.jobs)
        todo = [run for run in all_runs if not finished(run.folder)]
        print(f"{len(all_runs)} runs: {len(all_runs) - len(todo)} done, {len(todo)} to run, "
              f"{len(places)} at once", flush=True)
        signal.signal(signal.SIGTERM, sigterm_as_interrupt)
        failed, elsewhere = run_local(todo, places, args.gpus_per_run,
                                      lambda line: print(line, flush=True))
    except methods.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `--dry-run | head`: the reader took what it wanted
        methods.output_closed()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted; the runs in flight keep the checkpoint of their last finished "
              "epoch, and the same command continues them", file=sys.stderr)
        return 130
    print_report(all_runs, args.plot)
    for run in elsewhere:
        print(f"running elsewhere (not started here): {run.folder}")
    for run, error in failed:
        print(f"FAILED {run.folder}: {error} (log: {run.folder / 'sweep.log'})", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(all_runs)} runs failed; the same command retries them",
              file=sys.stderr)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
