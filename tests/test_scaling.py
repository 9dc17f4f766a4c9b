"""Scaling: torchrun DDP on the CPU (gloo) equals one process, cached image features equal encoding every
epoch, several seeds in one command, and --compile equals the eager run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_adapter
import clip_model
import coop
import data
import dualpt
import features
import methods
import proda
import taskres
import tip_adapter
import train
import vpt

ROOT = Path(__file__).resolve().parent.parent
DEMO = ["--data", "demo", "--backbone", "tiny", "--shots", "2", "--epochs", "2", "--batch-size", "4"]


def learned(folder):
    return torch.load(Path(folder) / "checkpoint.pt", weights_only=True)["learned"]


def assert_same_run(a, b, atol=1e-5):
    """Two finished runs: the same learned parameters (to atol), losses and accuracy."""
    pa, pb = learned(a), learned(b)
    assert pa.keys() == pb.keys() and all(torch.allclose(pa[k], pb[k], rtol=0, atol=atol) for k in pa)
    ra, rb = (json.loads((Path(f) / "results.json").read_text()) for f in (a, b))
    assert [h["loss"] for h in ra["history"]] == pytest.approx([h["loss"] for h in rb["history"]], abs=1e-5)
    assert ra["accuracy"] == rb["accuracy"]


def torchrun(script_args, tmp_path):
    """`torchrun --standalone --nproc_per_node 2 ...` on the CPU (gloo), as a user would start it."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *script_args], cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    base = ["--method", "coop", *DEMO, "--batch-size", "8", "--device", "cpu"]
    args = base + ["--epochs", "3"]
    train.run(methods.parse_args(args + ["--output", str(tmp_path / "one")]))
    done = torchrun([str(ROOT / "train.py"), *args, "--output", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "log.txt", "results.json"]
    log = (tmp_path / "two" / "log.txt").read_text()
    assert log.count("coop on demo") == 1 and "cpu x2 (torchrun)" in log and log.count("epoch 3/3") == 1
    assert done.stdout.count("epoch 3/3") == 1  # one process prints
    assert json.loads((tmp_path / "two" / "results.json").read_text())["processes"] == 2
    # --resume under torchrun: stop after epoch 2 of the 3 (as a killed run would), then continue
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    train.run(methods.parse_args(base + ["--epochs", "2", "--output", str(tmp_path / "part")]))
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    part["config"] = part["run"]["config"] = ckpt["config"]  # as if killed after epoch 2 of 3
    torch.save(part, tmp_path / "part" / "checkpoint.pt")
    done = torchrun([str(ROOT / "train.py"), *args, "--output", str(tmp_path / "part"), "--resume"], tmp_path)
    assert done.returncode == 0 and "resumed after epoch 2" in done.stdout, done.stderr
    assert_same_run(tmp_path / "one", tmp_path / "part")


DDP_SCRIPT = """
import sys
import torch.distributed as dist
sys.path.insert(0, {root!r})
import train
dist.init_process_group("gloo")
codes = [train.main(argv) for argv in {runs!r}]
rank = dist.get_rank()
dist.destroy_process_group()
if rank == 0:  # one line: two processes printing at once can interleave theirs
    print("exit codes", codes)
"""
METHOD_RUNS = {  # every training path through DDP: deep prompts, extra losses and groups, OT, per-image prompts
    "vpt": [], "cavpt": [], "mudpt": [], "dualpt": ["--set", "descriptions=descriptions/demo.json"],
    "bias_tuning": [], "cocoop": ["--batch-size", "2"], "coop-cached": ["--cache-features", "2"],
    "maple": [], "proda": ["--set", "n_prompts=4", "prompt_batch=2"], "taskres": [],  # coupled prompts, sampled
    "tip-adapter-f": [],  # prompts (the same draw in every process), Adam; a cache fitted in every process, AdamW
}


@pytest.mark.slow
def test_every_kind_of_method_under_ddp_equals_one_process(tmp_path):
    runs = [["--method", name.removesuffix("-cached"), *DEMO, *extra, "--output", str(tmp_path / "two" / name)]
            for name, extra in METHOD_RUNS.items()]
    runs.append(["--method", "coop", *DEMO, "--batch-size", "3", "--output", str(tmp_path / "odd")])
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT.format(root=str(ROOT), runs=runs))
    done = torchrun(["ddp.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"exit codes {[0] * len(METHOD_RUNS) + [2]}" in done.stdout, done.stdout + done.stderr
    assert "--batch-size 3 is the global batch; it must split evenly over the 2 processes" in done.stderr
    assert done.stderr.count("--batch-size 3") == 1  # the error is printed once
    for name, run in zip(METHOD_RUNS, runs):
        train.run(methods.parse_args(run[:-1] + [str(tmp_path / "one" / name)]))
        assert_same_run(tmp_path / "one" / name, run[-1])


@pytest.mark.slow
def test_cached_features_give_the_same_logits():
    torch.manual_seed(0)
    for module, name, backbone in [(coop, "zeroshot", "tiny"), (coop, "coop", "tiny"), (coop, "cocoop", "tiny"),
                                   (dualpt, "dualpt", "tiny-rn"), (dualpt, "codualpt", "tiny"),
                                   (dualpt, "plot", "tiny-rn"), (proda, "proda", "tiny"),
                                   (taskres, "taskres", "tiny-rn"), (clip_adapter, "clip-adapter", "tiny"),
                                   (tip_adapter, "tip-adapter-f", "tiny-rn")]:
        clip, _ = clip_model.load(backbone)
        cfg = methods.make_config(methods.parse_args(["--method", name, "--backbone", backbone]))[1]
        model = module.build(clip, ["cat", "dog", "red car"], cfg).eval()
        images = torch.randn(3, 3, clip.visual.input_resolution, clip.visual.input_resolution)
        with torch.no_grad():
            assert torch.allclose(model(images), model(features=model.frozen_features(images)), atol=1e-6), name


def test_cached_run_equals_the_uncached_one_when_every_epoch_has_its_view(tmp_path, monkeypatch, capsys):
    """View v is epoch v's augmentation, so with V >= epochs the cache changes nothing but the speed; with
    fewer views the run still learns. A set too large for memory goes to a memory-mapped file, deleted."""
    args = ["--method", "coop", *DEMO, "--epochs", "3"]
    train.run(methods.parse_args(args + ["--output", str(tmp_path / "plain")]))
    cached = train.run(methods.parse_args(args + ["--cache-features", "3", "--output", str(tmp_path / "cached")]))
    assert "cached image features: 3 views" in capsys.readouterr().out
    assert cached["config"]["cache_features"] == 3
    assert_same_run(tmp_path / "plain", tmp_path / "cached")
    monkeypatch.setattr(features, "CACHE_IN_MEMORY", 0)  # and V > epochs: only the 3 views the epochs use
    train.run(methods.parse_args(args + ["--cache-features", "5", "--output", str(tmp_path / "mapped")]))
    assert_same_run(tmp_path / "plain", tmp_path / "mapped")
    assert sorted(p.name for p in (tmp_path / "mapped").iterdir()) == ["checkpoint.pt", "log.txt", "results.json"]
    few = train.run(methods.parse_args(["--method", "coop", *DEMO, "--shots", "8", "--epochs", "8", "--batch-size",
                                        "16", "--cache-features", "2", "--output", str(tmp_path / "few")]))
    losses = [h["loss"] for h in few["history"]]
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("method", ["vpt", "mudpt", "cavpt", "bias_tuning"])
def test_cache_features_refused_when_the_image_tower_learns(tmp_path, capsys, method):
    assert train.main(["--method", method, *DEMO, "--cache-features", "2", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--cache-features: {method} learns inside the image tower" in err and "drop the flag" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_seeds_sweep_writes_one_complete_folder_per_seed(tmp_path):
    assert train.main(["--method", "coop", *DEMO, "--epochs", "1", "--seed", "1", "2", "3",
                       "--output", str(tmp_path)]) == 0
    results = [json.loads((tmp_path / f"seed{s}" / "results.json").read_text()) for s in (1, 2, 3)]
    assert [r["seed"] for r in results] == [1, 2, 3] and all("test" in r["accuracy"] for r in results)
    assert all((tmp_path / f"seed{s}" / "checkpoint.pt").is_file() for s in (1, 2, 3))
    assert len({json.dumps(r["history"]) for r in results}) == 3  # different few-shot sets and orders
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--method", "zeroshot", "--data", "demo", "--backbone",
                    "tiny", "--seed", "4", "5"], cwd=tmp_path, check=True, capture_output=True)
    assert [p.name for p in sorted((tmp_path / "runs" / "demo" / "zeroshot" / "tiny" / "shots16").iterdir())] == [
        "seed4", "seed5"]


@pytest.mark.slow
def test_compile_equals_eager(tmp_path):
    args = ["--method", "vpt", *DEMO, "--epochs", "1"]
    cfg = methods.make_config(methods.parse_args(args))[1]
    runner = train.Runner(methods.parse_args(args + ["--compile"]), vpt, cfg, data.make_task("demo", shots=2))
    blocks = [m for m in runner.clip.modules() if isinstance(m, train.COMPILED)]
    assert len(blocks) == 4 and all(b._compiled_call_impl is not None for b in blocks)  # 2 image + 2 text blocks
    train.run(methods.parse_args(args + ["--output", str(tmp_path / "eager")]))
    train.run(methods.parse_args(args + ["--compile", "--output", str(tmp_path / "compiled")]))
    assert_same_run(tmp_path / "eager", tmp_path / "compiled", atol=1e-4)
