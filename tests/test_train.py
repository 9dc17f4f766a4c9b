"""train.py end to end on the demo data with a tiny CLIP: every method, resume, eval-only, the CLI's errors,
and the README's copy-a-method loop."""
import dataclasses
import importlib
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import clip_model
import coop
import data
import methods
import runs
import train
import vpt

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def results(folder):
    return json.loads((Path(folder) / "results.json").read_text())


@pytest.mark.slow  # the quick tier steps each method in test_method_files.py; here each trains through the loop
@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_method_runs_on_demo(tmp_path, method, monkeypatch, capsys):
    """Every method trains (or is fitted) from the CLI and writes its results; load_run rebuilds it from the folder:
    the same logits as the trained model (recorded as the run evaluated) and the same test accuracy."""
    epochs = {"cocoop": "2"}.get(method, "4")
    schedule = ["--epochs", epochs, "--batch-size", "8"] if method in methods.TRAINED else []  # fitted: no epochs
    test = data.make_task("demo", shots=4).evals[0].test
    seen, evaluate = {}, train.Runner.evaluate

    def recording(runner, evalset):  # the trained model's logits on the first test images
        x = torch.stack([clip_model.transform(runner.preprocessing)(Image.open(path)) for path, _ in test[:6]])
        seen["logits"] = runner.model_for(evalset).eval()(x)
        return evaluate(runner, evalset)
    monkeypatch.setattr(train.Runner, "evaluate", torch.no_grad()(recording))
    code = train.main(["--method", method, "--data", "demo", "--backbone", "tiny", "--shots", "4", *schedule,
                       "--output", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    r = results(tmp_path)
    for key in ("method", "dataset", "protocol", "shots", "seed", "backbone", "epochs", "learned_params",
                "frozen_params", "accuracy", "history", "time_s", "config"):
        assert key in r, key
    assert r["method"] == method and r["dataset"] == "demo" and r["frozen_params"] == 7_171_201
    assert 0 <= r["accuracy"]["test"] <= 100
    if r["learned_params"]:  # trained or fitted: finite losses, and every learned tensor moved from its start
        assert len(r["history"]) == (int(epochs) if method in methods.TRAINED else 0)
        assert all(math.isfinite(h["loss"]) for h in r["history"])
        args = methods.parse_args(["--method", method, "--data", "demo", "--backbone", "tiny", "--shots", "4"])
        module, cfg = methods.make_config(args)
        start = runs.learned_state(train.Runner(args, module, cfg, data.make_task("demo", shots=4)).model)
        learned = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["learned"]
        assert learned.keys() == start.keys() and all(not torch.equal(learned[k], start[k]) for k in start)
    else:
        assert r["history"] == [] and r["epochs"] == 0
    assert "epoch" in (tmp_path / "log.txt").read_text() or not r["learned_params"]
    model, preprocess, classnames = runs.load_run(tmp_path)  # rebuilt from the folder
    with torch.no_grad():
        logits = model(torch.stack([preprocess(Image.open(path)) for path, _ in test]))
        first = model(torch.stack([preprocess(Image.open(path)) for path, _ in test[:6]]))
    assert classnames == r["classnames"] and not model.training
    torch.testing.assert_close(first, seen["logits"], rtol=0, atol=0)
    assert 100 * (logits.argmax(-1) == torch.tensor([y for _, y in test])).double().mean().item() == \
        pytest.approx(r["accuracy"]["test"], abs=1e-9)


@pytest.mark.slow
def test_coop_learns_the_demo(tmp_path):
    """The README's demo promise, shortened: accuracy rises well above chance (12.5 %)."""
    r = train.run(methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "40",
                                      "--output", str(tmp_path)]))
    assert r["history"][-1]["loss"] < 0.8 * r["history"][0]["loss"]
    assert r["accuracy"]["test"] > 40


@pytest.mark.parametrize("method,epochs,floor", [("coop", 10, 30), ("dualpt", 10, 30), ("codualpt", 5, 20)])
@pytest.mark.slow
def test_resnet_methods_learn_the_demo(tmp_path, method, epochs, floor):
    """On a random ResNet too, accuracy rises well above chance (12.5 %); it stayed at chance while random
    ResNets gave every image the same feature (issue 17)."""
    r = train.run(methods.parse_args(["--method", method, "--data", "demo", "--backbone", "tiny-rn", "--epochs",
                                      str(epochs), "--output", str(tmp_path)]))
    assert r["history"][-1]["loss"] < 0.9 * r["history"][0]["loss"]
    assert r["accuracy"]["test"] > floor


@pytest.mark.parametrize("method", ["coop", "mudpt", "ivlp", "maple"])
@pytest.mark.slow
def test_base_to_new_reports_harmonic_mean(tmp_path, method):
    r = train.run(methods.parse_args(["--method", method, "--data", "demo", "--backbone", "tiny", "--epochs", "2",
                                      "--protocol", "base2new", "--output", str(tmp_path)]))
    base, new = r["accuracy"]["base"], r["accuracy"]["new"]
    assert r["accuracy"]["hm"] == pytest.approx(2 * base * new / (base + new))


def test_resume_gives_the_same_run(tmp_path):
    args = ["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "3"]
    whole = train.run(methods.parse_args(args + ["--output", str(tmp_path / "whole")]))
    train.run(methods.parse_args(args[:-1] + ["1", "--output", str(tmp_path / "part")]))  # stopped after epoch 1...
    ckpt = train.torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    ckpt["config"]["epochs"] = 3  # ...of a 3-epoch run: make its checkpoint say so, as a killed run's would
    train.torch.save(ckpt, tmp_path / "part" / "checkpoint.pt")
    resumed = train.run(methods.parse_args(args + ["--output", str(tmp_path / "part"), "--resume"]))
    assert resumed["accuracy"] == whole["accuracy"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]


@pytest.mark.slow
def test_eval_only_reproduces_accuracy(tmp_path):
    trained = train.run(methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "3",
                                            "--output", str(tmp_path / "a")]))
    again = train.run(methods.parse_args(["--method", "coop", "--data", "demo", "--eval-only", "--checkpoint",
                                          str(tmp_path / "a" / "checkpoint.pt"), "--output", str(tmp_path / "b")]))
    assert again["accuracy"] == trained["accuracy"] and again["backbone"] == "tiny"


@pytest.mark.usefixtures("random_weights_once")  # a paper backbone, built once per process
@pytest.mark.slow
def test_dry_run_counts_parameters(tmp_path):
    r = train.run(methods.parse_args(["--method", "cocoop", "--data", "demo", "--backbone", "ViT-B/16", "--init",
                                      "random", "--dry-run", "--output", str(tmp_path)]))
    assert r["learned_params"] == 35_360 and r["frozen_params"] == 149_620_737
    assert "accuracy" not in r and results(tmp_path)["learned_params"] == 35_360


def test_set_overrides_config_fields(tmp_path):
    r = train.run(methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", "tiny", "--dry-run",
                                      "--set", "n_ctx=4", "csc=true", "class_token_position=front", "--output",
                                      str(tmp_path)]))
    assert r["learned_params"] == 8 * 4 * 128 and r["config"]["csc"] is True
    assert r["config"]["template"] == "a photo of a {}."  # set from the dataset


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.slow
def test_progress_bars_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    """On a terminal, tqdm bars of images with img/s for each epoch, the feature cache and evaluation, and the
    running loss once a second; in a pipe nothing on stderr. log.txt has the same lines either way."""
    args = ["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "2", "--cache-features", "2"]
    assert train.main([*args, "--output", str(tmp_path / "pipe")]) == 0
    assert capsys.readouterr().err == ""
    terminal, clock = Terminal(), itertools.count(step=2)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(train.time, "monotonic", lambda: next(clock))  # a second passes between any two steps
    assert train.main([*args, "--output", str(tmp_path / "terminal")]) == 0
    bars = terminal.getvalue()
    for what, images in [("encoding 2 x 128 images", 256), ("epoch 1/2", 128), ("epoch 2/2", 128),
                         ("evaluating test", 144)]:
        assert re.search(f"{what}: .* \\d+/{images} .*img/s", bars), what
    assert re.search(r"epoch 2/2: .*loss=\d\.\d{3}", bars) and "loss=" not in capsys.readouterr().out

    def lines(run):  # without the timings
        log = (tmp_path / run / "log.txt").read_text().splitlines()
        return [re.sub(r"\d+ img/s.*|-> .*", "", line) for line in log]
    assert lines("terminal") == lines("pipe") and len(lines("pipe")) == 4


@pytest.mark.slow
def test_list_and_help_config(capsys):
    assert train.main(["--list"]) == 0
    listed = capsys.readouterr().out
    lines = {line.split()[0]: line for line in listed.splitlines()[1:-1]}
    assert list(lines) == list(methods.METHODS)  # one line per variant, each its own
    assert len({line.split(None, 4)[4] for line in lines.values()}) == len(lines)
    assert lines["maple"].split()[1:4] == ["maple.py", "ViT-B/16", "3,555,072"]  # the official count
    assert lines["plot"].split()[1:4] == ["dualpt.py", "RN50", "32,768"] and "PLOT" in lines["plot"]
    assert lines["tip-adapter"].split()[3] == "0" and lines["coop"].split()[3] == "8,192"
    assert train.main(["--method", "cocoop", "--help-config"]) == 0
    shown = capsys.readouterr().out
    assert "n_ctx: int = 16" in shown and "'conditional': True" in shown


def test_a_listing_whose_reader_went_away_ends_quietly(closed_stdout, capsys, monkeypatch):
    """`python train.py --list | head`: the pipe's reader is gone before the list is written. Was "error: Broken
    pipe: a file of the run" and status 2 (the handler of the run folder's OSErrors caught it)."""
    monkeypatch.setattr(methods, "method_list", lambda: "coop ...\n" * 1000)  # the real list takes seconds
    with closed_stdout:
        assert train.main(["--list"]) == 0
    assert capsys.readouterr().err == "" and closed_stdout.goes_to_devnull()  # the exit's flush finds /dev/null


def test_a_run_whose_output_reader_went_away_stops_with_one_line(tmp_path, closed_stdout, capsys):
    with closed_stdout:
        assert train.main(["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "1",
                           "--output", str(tmp_path / "run")]) == 141
    assert capsys.readouterr().err == ("error: the output was closed (its reader ended), so the run stopped; the "
                                       "run folder keeps the checkpoint of its last finished epoch: --resume "
                                       "continues it\n")
    assert (tmp_path / "run" / "log.txt").read_text().startswith("coop on demo")  # the line stdout did not take


@pytest.mark.slow
@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_list_into_a_closed_pipe_as_a_process(unbuffered):
    """The same as a process, its stdout a pipe closed before it writes; with a buffered stdout the list waits in
    the buffer and Python's flush at exit met the closed pipe ("Exception ignored", status 120)."""
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--list"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader goes away while the process still imports torch
    assert process.wait(timeout=300) == 0 and process.stderr.read() == ""
    process.stderr.close()


@pytest.mark.parametrize("args,message", [
    (["--method", "vpt-deep", "--data", "demo"], "unknown method 'vpt-deep'; choose one of: zeroshot coop cocoop"),
    (["--method", "coop", "--data", "demo", "--backbone", "ViT-B/99"], "Unknown CLIP model 'ViT-B/99'"),
    (["--method", "coop", "--data", "demo", "--backbone", "tiny", "--set", "n_tokens=4"],
     "coop has no field 'n_tokens'; its fields are backbone, template"),
    (["--method", "coop", "--data", "demo", "--backbone", "tiny", "--set", "n_ctx=four"], "expected a int"),
    (["--method", "coop", "--data", "demo", "--backbone", "tiny", "--set", "class_token_position=left"],
     "use end, middle or front"),
    (["--method", "coop", "--data", "/nonexistent/dtd"], "no dataset folder at /nonexistent/dtd"),
    (["--method", "coop", "--data", "demo", "--backbone", "tiny", "--shots", "50"], "use --shots 30 or less"),
    (["--method", "coop", "--data", "demo", "--eval-only"], "--eval-only needs --checkpoint"),
])
def test_user_errors_are_one_clear_line(tmp_path, monkeypatch, capsys, args, message):
    """train.main turns each into one line on stderr and exit status 2 (the next test runs the script itself)."""
    monkeypatch.chdir(tmp_path)  # a default output folder would be made here
    assert train.main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing half-made


@pytest.mark.slow
def test_resume_without_checkpoint_and_wrong_method(tmp_path, capsys):
    done = run("--method", "coop", "--data", "demo", "--backbone", "tiny", "--resume", "--output", str(tmp_path))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "no checkpoint at" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1  # the script's own output
    assert train.main(["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "1", "--output",
                       str(tmp_path)]) == 0
    capsys.readouterr()
    assert train.main(["--method", "cocoop", "--data", "demo", "--eval-only", "--checkpoint",
                       str(tmp_path / "checkpoint.pt"), "--output", str(tmp_path / "a")]) == 2
    assert "holds a coop run, not cocoop: pass --method coop" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert train.main(["--method", "coop", "--data", "demo", "--eval-only", "--checkpoint", str(tmp_path / "junk.pt"),
                       "--output", str(tmp_path / "b")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_class_specific_context_does_not_transfer(tmp_path, capsys):
    assert train.main(["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "1", "--set",
                       "csc=true", "--protocol", "base2new", "--output", str(tmp_path)]) == 2
    assert "class-specific parameters, which do not transfer" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()  # refused before training


def readme_block(name):
    text = (ROOT / "README.md").read_text()
    return re.search(rf"<!-- {name} -->\n```python\n(.*?)```", text, re.S).group(1)


def module_config_lr(name):
    return next(m for m, _ in methods.METHODS.values() if m.__name__ == name).Config().lr


def copy_and_run(tmp_path, module, block, original):
    """The README's promise: the method file, clip_model.py and the vocabulary, nothing else of the repo."""
    for name in (f"{module}.py", "clip_model.py", "bpe_simple_vocab_16e6.txt.gz"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "loop.py").write_text(block.replace(f"import {original} as method", f"import {module} as method"))
    env = {"PATH": "/usr/bin:/bin"}  # nothing of this environment but the thread count tests/conftest.py sets
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    done = subprocess.run([sys.executable, "-s", "-E", "loop.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done


FITTED_FILES = {m.__name__ for name, (m, _) in methods.METHODS.items() if name not in methods.TRAINED}


@pytest.mark.parametrize("module", sorted({m.__name__ for m, _ in methods.METHODS.values()} - FITTED_FILES))
@pytest.mark.slow
def test_a_copied_method_file_trains_alone(tmp_path, module):
    loop = readme_block("copy-loop") + ('print("optimizer", type(optimizer).__name__)\n'
                                        'print("lrs", sorted({g["lr"] for g in optimizer.param_groups}))\n')
    done = copy_and_run(tmp_path, module, loop, "coop")
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", done.stdout)]
    assert len(losses) == 30 and losses[-1] < losses[0]
    # the optimizer train.py would build from the Config (TaskRes: Adam; README's loop built SGD for every method)
    module_object = importlib.import_module(module)
    expected = type(train.OPTIMIZERS[getattr(module_object.Config(), "optimizer", "sgd")]([torch.zeros(1)], lr=1))
    assert done.stdout.strip().splitlines()[-2] == f"optimizer {expected.__name__}"
    # the method's own learning rates (cavpt.py: DPT's text context at 0.002, the visual prompts at 0.01)
    assert done.stdout.strip().splitlines()[-1] == ("lrs [0.002, 0.01]" if module == "cavpt" else
                                                   f"lrs [{module_config_lr(module)}]")


@pytest.mark.parametrize("module", sorted(FITTED_FILES))
@pytest.mark.slow
def test_a_copied_fitted_method_file_fits_alone(tmp_path, module):
    done = copy_and_run(tmp_path, module, readme_block("copy-fit"), "linear_probe")
    fitted, predictions = done.stdout.strip().splitlines()
    assert fitted.startswith("fitted {")
    assert predictions == "tensor([0, 1, 2, 0, 1, 2]) tensor([0, 1, 2, 0, 1, 2])"  # the stand-in task is learned


@pytest.mark.parametrize("method", [m for m in methods.METHODS if m != "zeroshot"])  # zeroshot learns nothing
def test_eval_mode_never_returns_stale_logits(method):
    """A model in eval mode caches its text features; load_state_dict (or any in-place change) must invalidate
    them: the logits then equal a freshly built model's with those parameters (issue 17: they were stale)."""
    module, changes = methods.METHODS[method]
    clip = clip_model.load("tiny")[0]
    cfg = dataclasses.replace(module.Config(), **changes)
    names = ["red circle", "blue square", "green ring"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = module.build(clip, names, cfg).eval()
    torch.manual_seed(1)
    other = module.build(clip, names, cfg)
    with torch.no_grad():  # other values in everything a run learns or fits (some start at zero: bias tuning,
        for t in runs.learned_tensors(other).values():  # meta-nets, Tip-Adapter's cache)
            t.add_(0.1 * torch.randn_like(t))
        before = model(x)
        assert torch.equal(model(x), before)
        model.load_state_dict(other.state_dict())
        after = model(x)
        fresh = module.build(clip, names, cfg).eval()
        fresh.load_state_dict(other.state_dict())
        assert not torch.allclose(after, before, atol=1e-4)
        torch.testing.assert_close(after, fresh(x), rtol=0, atol=1e-6)
        for p in model.parameters():  # an in-place change (an optimiser step) is seen as well
            if p.requires_grad:
                p.add_(0.1)
        torch.testing.assert_close(model(x), model.train().eval()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,field", [("coop", "n_ctx"), ("cocoop", "n_ctx"), ("mudpt", "n_ctx"),
                                          ("ivlp", "n_ctx"), ("dualpt", "n_ctx"), ("codualpt", "n_ctx")])
def test_ctx_init_underscores_are_spaces(method, field):
    """The official code turns "_" into spaces (CoCoOp's configs write a_photo_of_a): the same 4 tokens and
    learned parameters as "a photo of a" (issue 17: 7 tokens, or MuDPT's random start)."""
    module, changes = methods.METHODS[method]
    clip = clip_model.load("tiny")[0]
    learned = []
    for phrase in ("a photo of a", "a_photo_of_a", ""):
        torch.manual_seed(0)
        cfg = dataclasses.replace(module.Config(), **{**changes, "ctx_init": phrase, field: 4})
        model = module.build(clip, ["cat", "dog"], cfg)
        learned.append({k: v for k, v in model.named_parameters() if v.requires_grad})
    spaces, underscores, no_phrase = learned
    assert spaces.keys() == underscores.keys() and all(torch.equal(spaces[k], underscores[k]) for k in spaces)
    assert not all(torch.equal(spaces[k], no_phrase[k]) for k in spaces)  # the phrase was used


@pytest.mark.parametrize("method,setting,message", [
    ("coop", "max_prompts=0", "max_prompts=0: must be 1 or more"),
    ("vpt", "n_tokens=-1", "n_tokens=-1: must be 0 (no visual prompts) or more"),
    ("vlp", "text_lr=0", "text_lr=0.0: must be above 0"),
    ("vlp", "guidance_epochs=-2", "guidance_epochs=-2: must be 0 or more"),
    ("cavpt", "top_k=0", "top_k=0: must be 1 or more"),
    ("cavpt", "aux_weight=-1", "aux_weight=-1.0: must be 0 (no aux loss) or more"),
    ("mudpt", "depth=0", "depth=0: must be 1 or more"),
    ("mudpt", "n_ctx=0", "n_ctx=0: must be 1 or more"),
    ("dualpt", "n_prompts=0", "n_prompts=0: must be 1 or more"),
    ("dualpt", "sinkhorn_iters=0", "sinkhorn_iters=0: must be 1 or more"),
    ("dualpt", "alpha=nan", "alpha=nan: must be a finite number"),
    ("bias_tuning", "batch_size=0", "batch_size=0: must be 1 or more")])
def test_numbers_a_method_cannot_use_are_refused_first(tmp_path, capsys, method, setting, message):
    """Refused before the backbone is loaded or anything is written (issue 17: some crashed, some ran)."""
    argv = ["--method", method, "--data", "demo", "--backbone", "no-such-backbone", "--set", setting,
            "--output", str(tmp_path / "out")]
    assert train.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {method}: {message}"
    assert not (tmp_path / "out").exists()


def test_epochs_zero_evaluates_the_method_as_initialised(tmp_path):
    """--epochs 0 trains nothing (it was quietly read as 'the method's schedule': 200 epochs for vpt)."""
    r = train.run(methods.parse_args(["--method", "vpt", "--data", "demo", "--backbone", "tiny", "--epochs", "0",
                                      "--shots", "2", "--output", str(tmp_path)]))
    assert r["epochs"] == 0 and r["history"] == [] and 0 <= r["accuracy"]["test"] <= 100
    assert not (tmp_path / "checkpoint.pt").exists()


def test_learned_state_that_does_not_fit_is_refused_by_name(tmp_path):
    """restore(): class-specific context trained on 4 classes does not load into a model for 3; nor a checkpoint of
    another method; the message says where the state came from and what it was asked to fit."""
    clip = clip_model.load("tiny")[0]
    cfg = dataclasses.replace(coop.Config(), n_ctx=4, csc=True)
    four = coop.build(clip, ["a", "b", "c", "d"], cfg)
    three = coop.build(clip, ["a", "b", "c"], cfg)
    with pytest.raises(methods.UserError, match=r"the parameters from x\.pt do not fit coop on tiny with 3 classes"):
        runs.restore(three, runs.learned_state(four), "x.pt", "coop", "tiny", 3)
    vpt_model = vpt.build(clip, ["a", "b", "c"], vpt.Config())
    with pytest.raises(methods.UserError, match=r"do not fit vpt on tiny with 3 classes .*prompt_learner\.ctx"):
        runs.restore(vpt_model, runs.learned_state(three), "y.pt", "vpt", "tiny", 3)
    fresh = coop.build(clip, ["a", "b", "c", "d"], cfg)
    runs.restore(fresh, runs.learned_state(four), "z.pt", "coop", "tiny", 4)  # the same shapes: loaded
    assert torch.equal(fresh.prompt_learner.ctx, four.prompt_learner.ctx)
