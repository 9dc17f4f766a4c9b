"""sweep.py --slurm: the job array as submitit writes and submits it (to a stand-in sbatch), its tasks run by
submitit's local executor (each run the same as by hand, finished runs skipped, a signalled task requeued and
resumed), a task started by the sbatch script's own lines and requeued through a stand-in scontrol, the task's
checkpoint protocol called directly, --status with SLURM's view (a stand-in sacct), and the errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sweep

submitit = pytest.importorskip("submitit")  # sweep.py imports it only for --slurm

ROOT = Path(__file__).resolve().parent.parent
GRID = ["--method", "coop", "--data", "demo"]
TINY = ["--backbone", "tiny", "--batch-size", "8"]  # after --: for every run


def run_folder(epochs, seed, shots=16):
    """The folder of `train.py GRID --seed SEED TINY --epochs EPOCHS [--shots SHOTS]` (runs.default_output)."""
    return Path(f"runs/demo/coop/tiny/shots{shots},epochs={epochs},batch_size=8/seed{seed}")


def stand_in(folder, name, script):
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A SLURM login node in tmp_path/bin, first on PATH, and tmp_path the working folder (runs/ goes there).
    sbatch keeps the script it is given (sbatch.sh) and its arguments (sbatch.args), and answers as the real one
    does; srun only needs to exist (submitit looks for it); sacct answers for job 4242 (task 0 running, tasks 1-2
    pending) and keeps its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "sbatch", f'cp "$1" {bin_dir}/sbatch.sh\necho "$@" > {bin_dir}/sbatch.args\n'
                                'echo "Submitted batch job 4242"\n')
    stand_in(bin_dir, "srun", "exit 1\n")
    stand_in(bin_dir, "sacct", f'echo "$@" >> {bin_dir}/sacct.args\ncat <<EOF\nJobID|State|NodeList\n'
                               '4242_0|RUNNING|node7\n4242_0.0|RUNNING|node7\n'
                               '4242_[1-2%2]|PENDING|None assigned\nEOF\n')  # sacct --parsable2 of an array
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    yield bin_dir
    submitit.SlurmJob.watcher.clear()  # the states it read, shared by the jobs of this process


def sbatch_lines(script):
    return {line for line in script.splitlines() if line.startswith("#SBATCH")}


def test_job_array_as_sbatch_gets_it(cluster, capsys):
    """The script and parameters that sbatch receives. Faithful: submitit's own SlurmExecutor writes the script from
    the parameters sweep.py sets, runs `sbatch <script>` and reads the job id from sbatch's answer, as on a cluster;
    only sbatch is a stand-in, and what it receives is what a cluster's sbatch would."""
    assert sweep.main([*GRID, "--seed", "1", "2", "3", "--slurm", "--time", "120", "--partition", "gpu", "--account",
                       "lab", "--gpus-per-run", "2", "--constraint", "a100", "--array-parallelism", "2", "--mem",
                       "64G", "--cpus-per-task", "8", "--", *TINY, "--epochs", "1"]) == 0
    folder = Path("runs/.slurm/inline").absolute()
    script = (cluster / "sbatch.sh").read_text()
    assert sbatch_lines(script) >= {
        "#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=120",
        "#SBATCH --gres=gpu:2", "#SBATCH --constraint=a100", "#SBATCH --mem=64G", "#SBATCH --cpus-per-task=8",
        "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=sweep-inline",
        "#SBATCH --requeue",  # requeueable: submitit's `scontrol requeue`, a preemption, a failed node
        "#SBATCH --signal=USR2@90",  # the signal on which a task stops its run and requeues itself
        f"#SBATCH --output={folder}/%A_%a_0_log.out"}
    assert f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" in script
    assert f"-m submitit.core._submit {folder}" in script.splitlines()[-1]
    assert (cluster / "sbatch.args").read_text().split()[0].endswith(".sh")
    out = capsys.readouterr().out
    assert "3 runs: 0 done, 3 to submit" in out and "submitted SLURM job 4242, a task per run" in out
    assert "squeue -j 4242" in out and "runs/.slurm/inline" in out
    for index, seed in enumerate((1, 2, 3)):  # task i runs run i, as torchrun with 2 processes, in 120 minutes
        run = run_folder(1, seed)
        assert f"  4242_{index}: {run}" in out
        assert json.loads((run / "slurm.json").read_text()) == {"job": f"4242_{index}", "folder": str(folder)}
        delayed = submitit.helpers.DelayedSubmission.load(folder / f"4242_{index}_submitted.pkl")
        task = delayed.function
        assert isinstance(task, sweep.SlurmTask) and task.run.folder == run and task.gpus_per_run == 2
        assert sweep.command(task.run, 2)[2:5] == ["torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        assert delayed._timeout_min == 120  # submitit tells a time-out from a preemption in minutes: --time's unit


def test_status_shows_slurms_state_of_each_run(cluster, capsys):
    every_run = ["--", *TINY, "--epochs", "1"]
    assert sweep.main([*GRID, "--seed", "1", "2", "3", "--slurm", "--time", "60", *every_run]) == 0
    capsys.readouterr()
    assert sweep.main([*GRID, "--seed", "1", "2", "3", "--status", *every_run]) == 0
    out = capsys.readouterr().out
    folders = [run_folder(1, seed) for seed in (1, 2, 3)]
    assert f"  to run: {folders[0]} (SLURM job 4242_0: RUNNING)" in out
    assert f"  to run: {folders[2]} (SLURM job 4242_2: PENDING)" in out  # read off the array's range 4242_[1-2%2]
    assert (cluster / "sacct.args").read_text().splitlines() == ["-o JobID,State,NodeList --parsable2 -j 4242"]


def test_status_without_sacct_shows_the_job_ids(cluster, capsys):
    every_run = ["--", *TINY, "--epochs", "1"]
    assert sweep.main([*GRID, "--seed", "1", "--slurm", "--time", "60", *every_run]) == 0
    (cluster / "sacct").unlink()
    capsys.readouterr()
    assert sweep.main([*GRID, "--seed", "1", "--status", *every_run]) == 0
    assert f"  to run: {run_folder(1, 1)} (SLURM job 4242)\n" in capsys.readouterr().out


@pytest.mark.parametrize("flags, error", [
    (["--time", "60", "--partition", "nope"], "error: sbatch refused the job array: sbatch: error: invalid partition"),
    ([], "error: --slurm needs --time MINUTES: each task's time limit"),
    (["--time", "0"], "error: --time 0: must be 1 or more"),
])
def test_errors(cluster, capsys, flags, error):
    stand_in(cluster, "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n')
    assert sweep.main([*GRID, "--seed", "1", "--slurm", *flags, "--", *TINY]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(error)


def test_no_srun_here(cluster, capsys, monkeypatch):
    (cluster / "srun").unlink()
    monkeypatch.setenv("PATH", str(cluster))
    assert sweep.main([*GRID, "--seed", "1", "--slurm", "--time", "60", "--", *TINY]) == 2
    assert capsys.readouterr().err == ("error: --slurm: no SLURM here (srun is not on PATH): submit from a login "
                                       "node of the cluster\n")


def test_without_submitit(cluster, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    assert sweep.main([*GRID, "--seed", "1", "--slurm", "--time", "60", "--", *TINY]) == 2
    assert capsys.readouterr().err == "error: --slurm needs submitit: pip install submitit\n"


def test_checkpoint_stops_the_run_and_requeues_it(tmp_path, monkeypatch):
    """submitit's Checkpointable protocol, called as submitit's signal handler calls it: train.py (here a stand-in
    that sleeps, in its own session as train.py is) is stopped, and the submission to requeue is the same run, as a
    new task that continues it with --resume when the folder has a checkpoint."""
    monkeypatch.chdir(tmp_path)
    run = sweep.make_runs([[*GRID, "--seed", "1", *TINY, "--epochs", "2"]])[0]
    task = sweep.SlurmTask(run, 1)
    task.child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    delayed = task.checkpoint()
    assert task.child.wait(5) == -signal.SIGTERM
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.args == () and not delayed.kwargs
    again = delayed.function
    assert isinstance(again, sweep.SlurmTask) and again is not task and again.child is None
    assert again.run == run and again.gpus_per_run == 1
    assert "--resume" not in sweep.command(again.run, 1)
    run.folder.mkdir(parents=True)
    (run.folder / "checkpoint.pt").touch()  # what the stopped run left: its last finished epoch
    assert sweep.command(again.run, 1)[-1] == "--resume"


def test_task_leaves_a_run_held_elsewhere_or_done(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = sweep.make_runs([[*GRID, "--seed", "1", *TINY, "--epochs", "2"]])[0]
    lock = sweep.claim(run)  # another sweep, or another task of a second submission, runs it
    assert sweep.SlurmTask(run, 1)() == f"running elsewhere: {run.folder}"
    os.close(lock)
    (run.folder / "results.json").write_text(json.dumps({"accuracy": {"test": 50.0}}))
    assert sweep.SlurmTask(run, 1)() == f"done: {run.folder}"
    assert not (run.folder / "sweep.log").exists()  # nothing started


@pytest.mark.slow
def test_task_records_a_failure_and_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = sweep.make_runs([["--method", "coop", "--data", "no_such_data", "--seed", "1", *TINY]])[0]
    with pytest.raises(RuntimeError, match="no_such_data") as failed:
        sweep.SlurmTask(run, 1)()
    recorded = json.loads((run.folder / "sweep.json").read_text())
    assert recorded["returncode"] == 2 and recorded["error"] in str(failed.value)
    assert sweep.state(run.folder) == sweep.FAILED


def by_hand(argv, folder):
    """train.py with `argv`, typed in `folder`: the run to compare with (started now, waited for later)."""
    folder.mkdir()
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=folder, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def assert_same_results(a, b):
    ra, rb = (json.loads((folder / "results.json").read_text()) for folder in (a, b))
    assert ra["accuracy"] == rb["accuracy"]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in ra["history"]] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in rb["history"]]


@pytest.fixture
def local_cluster(monkeypatch, tmp_path):
    """--slurm through submitit's LocalExecutor: the same SlurmTask pickled, unpickled and called by submitit in a
    process of its own (`python -m submitit.core._submit`, as srun starts it on a node), with submitit's signal
    handling and requeue (exit code 144, the task started again); the jobs each submission made."""
    monkeypatch.chdir(tmp_path)
    submissions, submit = [], sweep.submit

    def local_executor(args, folder):
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=args.time)
        return executor

    def recorded(executor, todo, gpus_per_run):
        submissions.append(submit(executor, todo, gpus_per_run))
        return submissions[-1]
    monkeypatch.setattr(sweep, "slurm_executor", local_executor)
    monkeypatch.setattr(sweep, "submit", recorded)
    return submissions


@pytest.mark.slow
def test_local_executor_runs_each_run_as_by_hand(tmp_path, local_cluster, capsys):
    every_run = [*TINY, "--epochs", "1", "--shots", "4"]  # 32 images: half the time of 16 shots
    hand = [by_hand([*GRID, "--seed", str(seed), *every_run], tmp_path / f"hand{seed}") for seed in (1, 2)]
    argv = [*GRID, "--seed", "1", "2", "--slurm", "--time", "30", "--", *every_run]
    assert sweep.main(argv) == 0
    [jobs] = local_cluster
    folders = [run_folder(1, seed, shots=4) for seed in (1, 2)]
    assert [job.result() for job in jobs] == [f"done: {folder}" for folder in folders]
    assert [process.wait(300) for process in hand] == [0, 0]
    for seed, folder in zip((1, 2), folders):
        assert_same_results(folder, tmp_path / f"hand{seed}" / folder)
        assert (folder / "sweep.log").read_text().startswith(f"$ {sys.executable} {ROOT / 'train.py'} --method coop")
    capsys.readouterr()
    assert sweep.main(argv) == 0  # again: both done, nothing submitted
    out = capsys.readouterr().out
    assert len(local_cluster) == 1 and out.startswith("2 runs: 2 done, 0 to submit\n")
    assert "| demo | coop | tiny | 4 | fewshot | test |" in out  # report.py's table of the finished runs


def task_process(job_id):
    """The pid of the process in which submitit runs the task of local job `job_id` (where SLURM signals a task)."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in environ and b"submitit.core._submit" in cmdline:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_signalled_task_requeues_and_resumes(tmp_path, local_cluster):
    """SIGUSR2 to the task process after the run's first epoch, as SLURM sends it before the time limit: the task
    stops train.py and requeues itself (submitit), and the task started again continues with --resume to the same
    results as the run typed by hand."""
    hand = by_hand([*GRID, "--seed", "1", *TINY, "--epochs", "2"], tmp_path / "hand")
    assert sweep.main([*GRID, "--seed", "1", "--slurm", "--time", "30", "--", *TINY, "--epochs", "2"]) == 0
    [[job]] = local_cluster
    folder = run_folder(2, 1)
    deadline = time.monotonic() + 300
    while not (folder / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (folder / "results.json").exists() or "accuracy" not in (folder / "results.json").read_text()
    os.kill(task_process(job.job_id), signal.SIGUSR2)
    assert job.result() == f"done: {folder}"
    commands = [line for line in (folder / "sweep.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and not commands[0].endswith("--resume") and commands[1].endswith("--resume")
    assert "resumed after epoch 1" in (folder / "log.txt").read_text()
    assert "this job is preempted" in job.stderr() and "Requeued job" in job.stdout()  # submitit's log
    assert hand.wait(300) == 0
    assert_same_results(folder, tmp_path / "hand" / folder)


@pytest.mark.slow
def test_task_as_the_sbatch_script_starts_it(cluster):
    """`python sweep.py ... --slurm` as typed (its SlurmTask pickled from __main__), then its task started by the
    script's own lines with the variables SLURM gives a task (srun left out), as a requeue starts it again: SIGUSR2
    after the first epoch makes it stop train.py and call `scontrol requeue` (a stand-in), and started again it
    continues with --resume."""
    stand_in(cluster, "scontrol", f'echo "$@" >> {cluster}/scontrol.args\n')
    subprocess.run([sys.executable, str(ROOT / "sweep.py"), *GRID, "--seed", "1", "--slurm", "--time", "60", "--",
                    *TINY, "--epochs", "2"], check=True, capture_output=True)
    lines = (cluster / "sbatch.sh").read_text().splitlines()
    python = lines[-1][lines[-1].index(f"{sys.executable} -u -m submitit.core._submit"):]  # srun's command
    task = "\n".join([*[line for line in lines if line.startswith("export ")], f"exec {python}"])
    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
               SLURM_PROCID="0", SLURM_LOCALID="0")  # one run: a job, not an array
    folder = run_folder(2, 1)
    first = subprocess.Popen(["bash", "-c", task], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (folder / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR2)
    assert first.wait(60) == 255  # submitit's sys.exit(-1) after the requeue
    assert (cluster / "scontrol.args").read_text() == "requeue 4242\n"
    assert "accuracy" not in (folder / "results.json").read_text()
    assert subprocess.run(["bash", "-c", task], env=env, capture_output=True).returncode == 0
    commands = [line for line in (folder / "sweep.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[1].endswith("--resume")
    assert "accuracy" in json.loads((folder / "results.json").read_text())
    result = submitit.SlurmJob(Path("runs/.slurm/inline").absolute(), "4242").result()
    assert result == f"done: {folder}"
