"""The CUDA acceptance suite: `python -m pytest -m cuda` checks a new GPU machine in a few minutes.

Every method trains on the demo in auto precision and in fp16; one random-init step per method at its paper's
backbone and batch size in bf16 and fp16 (peak memory printed); bf16 accuracy against fp32; the loop's steps
never wait for the host; --compile, --cache-features, loader workers with pinned memory, torchrun with NCCL.
Without a GPU every test is skipped, with a reason naming CUDA.
"""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_model
import data
import methods
import train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() "
                                                                       "is False)")]
DEMO = ["--data", "demo", "--backbone", "tiny", "--device", "cuda", "--workers", "0"]
DTD = ("banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous "
       "flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted "
       "meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled "
       "stained stratified striped studded swirly veined waffled woven wrinkled zigzagged").split()


def results(folder):
    return json.loads((Path(folder) / "results.json").read_text())


def finished(folder):
    r = results(folder)
    assert all(math.isfinite(h["loss"]) for h in r["history"]), r["history"]
    assert 0 <= r["accuracy"]["test"] <= 100
    return r


@pytest.mark.parametrize("precision", ["auto", "fp16"])
@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_method_trains_the_demo(tmp_path, method, precision):
    schedule = ["--epochs", "2", "--batch-size", "8"] if method in methods.TRAINED else []  # fitted: no epochs
    argv = ["--method", method, *DEMO, *schedule, "--shots", "4", "--precision", precision, "--output", str(tmp_path)]
    assert train.main(argv) == 0
    r = finished(tmp_path)
    expected = precision if precision != "auto" else train.resolve_precision("auto", "cuda")
    assert r["precision"] == expected and expected in (tmp_path / "log.txt").read_text().splitlines()[0]


@pytest.fixture(scope="module")
def backbones():
    """Random-init ViT-B/16 and RN50 on the GPU, shared by the steps below (methods do not change CLIP)."""
    return {name: clip_model.load(name, device="cuda", pretrained=False)[0] for name in ("ViT-B/16", "RN50")}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", [m for m in methods.TRAINED if m != "zeroshot"])
def test_one_paper_sized_step(backbones, capsys, method, precision):
    """One training step at the paper's batch size on DTD's 47 classes: finite loss, and the peak memory."""
    module, changes = methods.METHODS[method]
    cfg = dataclasses.replace(module.Config(), **changes)
    name = "RN50" if cfg.backbone.startswith("RN") else "ViT-B/16"  # the paper's ResNet, else ViT-B/16
    clip = backbones[name]
    model = module.build(clip, DTD, cfg).cuda().train()
    R = clip.visual.input_resolution
    images = torch.randn(cfg.batch_size, 3, R, R, device="cuda")
    labels = torch.arange(cfg.batch_size, device="cuda") % len(DTD)
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(learned, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with train.autocast(precision, "cuda"):
        loss = model.loss(model(images), labels, 0)
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert torch.isfinite(loss) and all(p.dtype == torch.float32 for p in learned)
    with capsys.disabled():
        print(f"\n  {method} {name} batch {cfg.batch_size} {precision}: loss {loss.item():.3f}, step peak "
              f"+{peak:.2f} GiB on {torch.cuda.get_device_name()}")


def test_bf16_accuracy_equals_fp32_within_tolerance(tmp_path):
    """CoOp on the demo, 10 epochs: bf16's test accuracy within 10 points of fp32's (144 test images: 10 points
    is 14 images; rounding changes the trajectory, not what is learned)."""
    args = ["--method", "coop", *DEMO, "--epochs", "10"]
    assert train.main([*args, "--precision", "fp32", "--output", str(tmp_path / "fp32")]) == 0
    assert train.main([*args, "--precision", "bf16", "--output", str(tmp_path / "bf16")]) == 0
    fp32, bf16 = finished(tmp_path / "fp32"), finished(tmp_path / "bf16")
    assert fp32["accuracy"]["test"] > 25 and abs(bf16["accuracy"]["test"] - fp32["accuracy"]["test"]) <= 10


@pytest.mark.parametrize("method", ["coop", "cocoop", "vpt", "mudpt", "bias_tuning"])
def test_training_steps_never_wait_for_the_host(method):
    """torch.cuda's sync debug mode raises on any host synchronisation while the steps run (the epoch's sums
    are read once, after the last step). dualpt's Sinkhorn stop test and cavpt's aux-loss rows do read the
    device inside the method, so they are not in this list."""
    args = methods.parse_args(["--method", method, *DEMO, "--precision", "bf16"])
    module, cfg = methods.make_config(args)
    runner = train.Runner(args, module, cfg, data.make_task("demo", shots=2))
    optimizer = torch.optim.SGD([p for p in runner.model.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(4, 3, 32, 32, device="cuda")
    labels = torch.tensor([0, 1, 2, 3], device="cuda")

    def watched(steps):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from [(dict(images=images), labels)] * steps
        finally:
            torch.cuda.set_sync_debug_mode("default")
    runner.train_epoch(runner.model, optimizer, [(dict(images=images), labels)], 0)  # first allocations
    seen, loss_sum, correct = runner.train_epoch(runner.model, optimizer, watched(5), 0)
    assert seen == 20 and math.isfinite(loss_sum)


def test_compile_equals_eager(tmp_path):
    args = ["--method", "coop", *DEMO, "--epochs", "2", "--shots", "2", "--batch-size", "4", "--precision", "fp32"]
    assert train.main([*args, "--output", str(tmp_path / "eager")]) == 0
    assert train.main([*args, "--compile", "--output", str(tmp_path / "compiled")]) == 0
    eager, compiled = finished(tmp_path / "eager"), finished(tmp_path / "compiled")
    assert [h["loss"] for h in compiled["history"]] == pytest.approx([h["loss"] for h in eager["history"]], abs=1e-3)


def test_cache_features_on_the_gpu(tmp_path):
    args = ["--method", "coop", *DEMO, "--epochs", "2", "--shots", "2", "--batch-size", "4"]
    assert train.main([*args, "--cache-features", "2", "--output", str(tmp_path)]) == 0
    r = finished(tmp_path)
    assert r["config"]["cache_features"] == 2 and len(r["history"]) == 2


def test_loader_workers_with_pinned_memory(tmp_path):
    args = ["--method", "coop", "--data", "demo", "--backbone", "tiny", "--device", "cuda", "--epochs", "1",
            "--workers", "2", "--output", str(tmp_path)]
    loader = data.loader(data.make_task("demo", shots=2).train, clip_model.transform(32), 4, train=True, workers=2,
                         device="cuda")
    assert loader.pin_memory and loader.num_workers == 2
    assert train.main(args) == 0
    finished(tmp_path)


def test_torchrun_with_nccl(tmp_path):
    """A torchrun job over this machine's GPUs (at most 2): NCCL all-reduces the sums and, with 2, DDP the
    gradients."""
    n = min(torch.cuda.device_count(), 2)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           str(ROOT / "train.py"), "--method", "coop", *DEMO, "--epochs", "2", "--shots", "2",
                           "--batch-size", "4", "--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = finished(tmp_path)
    assert r["processes"] == n
