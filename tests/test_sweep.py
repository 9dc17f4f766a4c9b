"""sweep.py on this machine: a grid of tiny demo runs over 2 processes, each run the same as its command typed by
hand; skipped when done, resumed when stopped (kill -9 of the sweep included), failures listed and retried, and two
sweeps over one grid never running one run twice. Each run here is a train.py process of a few seconds."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import methods
import runs
import sweep
import train

SWEEP = Path(sweep.__file__)
FAST = ["--", "--backbone", "tiny", "--batch-size", "8"]


def same_run(a, b):
    """Two results.json alike but for the seconds they took."""
    strip = lambda r: {**r, "time_s": None, "history": [{**h, "seconds": None} for h in r.get("history", [])]}  # noqa: E731
    return strip(a) == strip(b)


def results(folder):
    return json.loads((folder / "results.json").read_text())


def start(tmp_path, *args):
    return subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_grid_is_train_pys_commands(tmp_path, monkeypatch, capsys):
    """--dry-run: one copy-pasteable train.py command per point, its folder, the count; a flag train.py refuses, or
    one a sweep cannot use, is one line before anything runs."""
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--method", "coop", "cocoop", "--data", "demo", "--shots", "1", "2", "--seed", "1", "2",
                       "--dry-run", "--", "--epochs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "# 8 runs" and len(lines) == 9
    command, folder = lines[0].split("  # ")
    assert command.endswith("train.py --method coop --data demo --shots 1 --seed 1 --epochs 3")
    args = methods.parse_args(command.split("train.py ")[1].split())
    assert Path(folder) == runs.default_output(args, methods.make_config(args)[1])
    for extra, message in [(["--output", "x"], "--output is not for a sweep"), (["--seed", "4"], "one seed per run"),
                           (["--epochs", "-1"], "--epochs -1: must be 0 or more"), (["--bogus"], "unrecognized")]:
        assert sweep.main(["--method", "coop", "--data", "demo", "--seed", "1", "--status", "--", *extra]) == 2
        assert message in capsys.readouterr().err
    assert sweep.main(["--method", "coop", "--data", "demo", "--seed", "1", "--dry-run", "--", "--epochs", "-1"]) == 0
    assert "--epochs -1  # refused now: --epochs -1: must be 0 or more" in capsys.readouterr().out


@pytest.mark.slow
def test_a_two_process_sweep_equals_the_runs_by_hand_and_is_skipped_when_done(tmp_path, monkeypatch):
    """8 runs over 2 processes: each results.json equals its train.py command run by hand (in another folder), and
    the same sweep again starts nothing and changes no file."""
    grid = ["--method", "coop", "vpt", "--data", "demo", "--shots", "1", "2", "--seed", "1", "2", "--jobs", "2",
            *FAST, "--epochs", "1"]
    done = subprocess.run([sys.executable, str(SWEEP), *grid], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "8 runs: 0 done, 8 to run, 2 at once" in done.stdout and "| demo | vpt | tiny | 2 |" in done.stdout
    assert len(results(next((tmp_path / "runs").rglob("seed1")))["history"]) == 1
    folders = sorted(p.parent for p in (tmp_path / "runs").rglob("results.json"))
    assert len(folders) == 8
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    monkeypatch.chdir(by_hand)
    for folder in folders:
        command = (folder / "sweep.log").read_text().splitlines()[0].split("train.py ")[1].split()
        assert train.main(command) == 0
        assert same_run(results(folder), results(by_hand / folder.relative_to(tmp_path)))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    again = subprocess.run([sys.executable, str(SWEEP), *grid], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "8 runs: 8 done, 0 to run" in again.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
def test_kill_9_of_the_sweep_loses_only_unfinished_epochs(tmp_path, monkeypatch):
    """The sweep killed with SIGKILL while one run is done (1 shot: 8 images an epoch) and another is mid-way (16
    shots: 128): no run outlives it (the kernel stops each when the sweep dies), the same command again leaves the
    finished run's files as they were and resumes the stopped one to the result of an uninterrupted run."""
    grid = ["--method", "coop", "--data", "demo", "--shots", "1", "16", "--seed", "1", "--jobs", "2", *FAST,
            "--epochs", "30"]
    process = start(tmp_path, *grid)
    folders = [tmp_path / f"runs/demo/coop/tiny/shots{k},epochs=30,batch_size=8/seed1" for k in (1, 16)]
    deadline = time.monotonic() + 240
    while not (any(sweep.finished(f) for f in folders) and any(
            (f / "checkpoint.pt").exists() and not sweep.finished(f) for f in folders)):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(3)  # the runs receive SIGTERM from the kernel and end
    assert not any(sweep.locked(f) for f in folders)  # no train.py holds its folder
    finished = [f for f in folders if sweep.finished(f)]
    stopped = [f for f in folders if not sweep.finished(f) and (f / "checkpoint.pt").exists()]
    assert finished and stopped
    kept = {f: digest(f) for f in finished}
    again = subprocess.run([sys.executable, str(SWEEP), *grid], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert kept == {f: digest(f) for f in finished}
    monkeypatch.chdir(tmp_path / "runs")  # uninterrupted, by hand, elsewhere
    for folder in stopped:
        assert "--resume" in (folder / "sweep.log").read_text().split("$ ")[-1].splitlines()[0]
        command = (folder / "sweep.log").read_text().splitlines()[0].split("train.py ")[1].split()
        assert train.main(command + ["--output", "uninterrupted"]) == 0
        assert same_run(results(folder), {**results(Path("uninterrupted")), "data": "demo"})
        (Path("uninterrupted") / "results.json").unlink()
        (Path("uninterrupted") / "checkpoint.pt").unlink()


@pytest.mark.slow
def test_a_failing_run_is_listed_and_retried_while_the_others_finish(tmp_path):
    """--shots 100 on demo (30 training images a class) fails when it starts: the other runs finish, the failure is
    listed with its one-line error and log, the exit status is 1; --status shows it; the same command retries
    only it."""
    grid = ["--method", "coop", "--data", "demo", "--shots", "1", "100", "--seed", "1", "--jobs", "2", *FAST,
            "--epochs", "1"]
    first = subprocess.run([sys.executable, str(SWEEP), *grid], cwd=tmp_path, capture_output=True, text=True)
    failed = tmp_path / "runs/demo/coop/tiny/shots100,epochs=1,batch_size=8/seed1"
    assert first.returncode == 1
    assert f"FAILED {failed.relative_to(tmp_path)}: error: " in first.stderr and "fewer than" in first.stderr
    assert "sweep.log)" in first.stderr and "1 of 2 runs failed" in first.stderr
    assert sweep.finished(tmp_path / "runs/demo/coop/tiny/shots1,epochs=1,batch_size=8/seed1")
    status = subprocess.run([sys.executable, str(SWEEP), "--status", *grid], cwd=tmp_path, capture_output=True,
                            text=True)
    assert "2 runs: 1 done, 1 failed" in status.stdout and "failed: runs/demo/coop" in status.stdout
    again = subprocess.run([sys.executable, str(SWEEP), *grid], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 1 and "2 runs: 1 done, 1 to run" in again.stdout


@pytest.mark.slow
def test_two_sweeps_over_one_grid_run_each_run_once(tmp_path):
    """Two sweeps started together on the same 3 runs: every run trains once (one headline in its log.txt), none
    fails, and what one sweep runs the other reports as running elsewhere or finds done."""
    grid = ["--method", "coop", "--data", "demo", "--shots", "4", "--seed", "1", "2", "3", "--jobs", "2",
            *FAST, "--epochs", "5"]
    first, second = start(tmp_path, *grid), start(tmp_path, *grid)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    for folder in (tmp_path / "runs").rglob("seed*"):
        assert sweep.finished(folder)
        log = (folder / "log.txt").read_text()
        assert log.count("coop on demo") == 1, log
    text = "".join(out for out, _ in outputs)
    assert text.count("started runs/") == 3


def test_stopping_sends_sigterm_to_each_run_in_flight(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM of the sweep: each run in flight gets SIGTERM (its process group), and is killed after
    10 s if it is still there."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    started = time.monotonic()
    sweep.stop([child])
    assert child.returncode == -signal.SIGTERM and time.monotonic() - started < 5
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print(flush=True); time.sleep(60)"], start_new_session=True,
                                stdout=subprocess.PIPE)
    stubborn.stdout.readline()  # its handler is in place
    sweep.stop([stubborn], grace=0.5)
    assert stubborn.wait(5) == -signal.SIGKILL
    if sys.platform == "linux":  # the kernel's SIGTERM when the sweep dies
        orphan = subprocess.run([sys.executable, "-c", (
            "import subprocess, sys, sweep; sleep = [sys.executable, '-c', 'import time; time.sleep(60)']; "
            "print(subprocess.Popen(sleep, preexec_fn=sweep.die_with_parent).pid)")],
            capture_output=True, text=True, cwd=Path(sweep.__file__).parent)
        time.sleep(1)
        assert not alive(int(orphan.stdout))


def alive(pid):
    """Whether process `pid` runs (a zombie, dead but not reaped by a container's first process, does not)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_runs_on_the_cpu_share_its_cores(tmp_path, monkeypatch):
    """--jobs N without GPUs: each run gets its share of the cores as OMP_NUM_THREADS (unless the user set it), so
    N runs do not oversubscribe them; a GPU slot gets its CUDA_VISIBLE_DEVICES."""
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda run, process, env, setup: launched.append(env) or subprocess.Popen(
        ["true"]))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    folders = [tmp_path / str(i) for i in range(3)]
    pool = sweep.Local([None, None], 1)
    assert all(pool.start(sweep.Run(["--method", "coop"], folder)) for folder in folders[:2])
    assert [env["OMP_NUM_THREADS"] for env in launched] == ["4", "4"] and not pool.free
    gpus = sweep.Local(["0", "1"], 1)
    gpus.start(sweep.Run(["--method", "coop"], folders[2]))
    assert launched[-1]["CUDA_VISIBLE_DEVICES"] == "0" and "OMP_NUM_THREADS" not in launched[-1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    pool = sweep.Local([None], 1)
    pool.start(sweep.Run(["--method", "coop"], tmp_path / "mine"))
    assert launched[-1]["OMP_NUM_THREADS"] == "3"
