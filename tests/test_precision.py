"""The GPU path's CPU proxies: bf16 and fp16 autocast (with the gradient scaler) train every method, resume stays
exact in fp16, the loop reads nothing from the device per step, and text checkpointing changes no number."""
import dataclasses
import json
import math

import pytest
import torch

import clip_model
import coop
import data
import dualpt
import methods
import train

STEPS = ["--data", "demo", "--backbone", "tiny", "--epochs", "1", "--shots", "2", "--batch-size", "8"]  # 2 steps


def results(folder):
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("method", [m for m in methods.TRAINED if m != "zeroshot"])
@pytest.mark.slow
def test_every_method_trains_two_steps_in_bf16_on_cpu(tmp_path, method):
    assert train.main(["--method", method, *STEPS, "--precision", "bf16", "--output", str(tmp_path)]) == 0
    r = results(tmp_path)
    assert r["precision"] == "bf16" and math.isfinite(r["history"][0]["loss"])
    assert "bf16" in (tmp_path / "log.txt").read_text().splitlines()[0]  # the header line says it


@pytest.mark.parametrize("method", ["coop", "cocoop", "vpt", "cavpt", "mudpt", "dualpt", "codualpt", "bias_tuning"])
@pytest.mark.slow
def test_fp16_with_the_gradient_scaler_on_cpu(tmp_path, method):
    """fp16 autocast runs the fp32 islands (cross-entropies, the transport plan, the aux loss); the checkpoint
    keeps the scaler's state."""
    assert train.main(["--method", method, *STEPS, "--precision", "fp16", "--output", str(tmp_path)]) == 0
    r = results(tmp_path)
    assert r["precision"] == "fp16" and math.isfinite(r["history"][0]["loss"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["precision"] == "fp16" and ckpt["scaler"]["scale"] > 1  # an enabled scaler's state (off: {})
    assert all(v.dtype == torch.float32 for v in ckpt["learned"].values())  # learned parameters stay fp32


@pytest.mark.slow
def test_fp16_resume_equals_an_uninterrupted_run(tmp_path):
    args = ["--method", "coop", "--data", "demo", "--backbone", "tiny", "--shots", "2", "--batch-size", "4",
            "--precision", "fp16", "--epochs", "3"]
    whole = train.run(methods.parse_args(args + ["--output", str(tmp_path / "whole")]))
    train.run(methods.parse_args(args[:-1] + ["1", "--output", str(tmp_path / "part")]))  # stopped after epoch 1...
    ckpt = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    ckpt["config"]["epochs"] = 3  # ...of a 3-epoch run: make its checkpoint say so, as a killed run's would
    torch.save(ckpt, tmp_path / "part" / "checkpoint.pt")
    resumed = train.run(methods.parse_args(args + ["--output", str(tmp_path / "part"), "--resume"]))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["accuracy"] == whole["accuracy"]
    ckpt["scaler"]["scale"] = 1024.0  # a scale the run could have reached: the resumed scaler starts from it
    torch.save(ckpt, tmp_path / "part" / "checkpoint.pt")
    train.run(methods.parse_args(args + ["--output", str(tmp_path / "part"), "--resume"]))
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["scaler"]["scale"] == 1024.0


def test_auto_precision(monkeypatch):
    assert train.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert train.resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train.resolve_precision("auto", "cuda") == "fp16"  # a T4 or V100: bf16 only emulated
    assert train.resolve_precision("fp16", "cpu") == "fp16"  # an explicit choice is kept


@pytest.mark.slow
def test_resume_in_another_precision_is_refused(tmp_path, capsys):
    args = ["--method", "coop", *STEPS, "--output", str(tmp_path)]
    assert train.main([*args, "--precision", "fp16"]) == 0
    assert train.main([*args, "--precision", "bf16", "--resume"]) == 2
    assert "was trained in fp16, this run would use bf16: pass --precision fp16" in capsys.readouterr().err


class Reads:
    """Counts the ways Python reads a tensor's value on the host (each one waits for a GPU to finish)."""
    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("method", ["coop", "cocoop", "vpt", "vlp", "mudpt", "bias_tuning"])
def test_the_loop_reads_nothing_per_step(monkeypatch, method):
    """An epoch of 2 steps and one of 6 read the device equally often: once, at the end (the sums and the
    finiteness flag together), and the method's forward reads nothing either."""
    args = methods.parse_args(["--method", method, "--data", "demo", "--backbone", "tiny"])
    module, cfg = methods.make_config(args)
    runner = train.Runner(args, module, cfg, data.make_task("demo", shots=2))
    optimizer = torch.optim.SGD([p for p in runner.model.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(2, 3, 32, 32)

    def reads(steps):
        batches = [(dict(images=images), torch.tensor([0, 1]))] * steps
        counter = Reads(monkeypatch)
        runner.train_epoch(runner.model, optimizer, batches, 0)
        monkeypatch.undo()
        return counter.count
    assert reads(2) == reads(6) <= 3


@pytest.mark.parametrize("build,cfg", [(coop.build, coop.Config(conditional=True, n_ctx=4, checkpoint_prompts=4)),
                                       (dualpt.build, dualpt.Config(conditional=True, n_ctx=4,
                                                                    checkpoint_prompts=4))])
def test_text_checkpointing_changes_no_number(monkeypatch, build, cfg):
    """Activation checkpointing through the text tower (on for large passes) gives the same loss and gradients."""
    clip = clip_model.load("tiny", pretrained=False)[0]
    names = ["red circle", "blue square", "green triangle"]
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([0, 2])

    def loss_and_grads(cfg):
        torch.manual_seed(0)
        model = build(clip, names, cfg).train()
        loss = model.loss(model(images), labels, 0)
        return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    plain_loss, plain_grads = loss_and_grads(dataclasses.replace(cfg, checkpoint_prompts=0))
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss, grads = loss_and_grads(cfg)
    assert len(calls) == len(clip.transformer.resblocks)  # every text block checkpointed, in one pass
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for g, h in zip(grads, plain_grads):
        torch.testing.assert_close(g, h, rtol=0, atol=0)
