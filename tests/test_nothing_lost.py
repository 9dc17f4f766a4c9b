"""Issue 28, nothing lost and nothing silently wrong: run folders that are never clobbered, resumes that refuse
another task, checkpoints whose parameters give finite logits, and one-line errors from every entry point."""
import json
import os
import tracemalloc
from pathlib import Path

import pytest
import torch

import analyze
import data
import describe
import methods
import predict
import report
import runs
import train
from test_data import image, make_split_dataset

DEMO = ["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "1"]


def run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    return train.main([*DEMO, "--output", str(out), *extra]), out


def test_a_finished_run_is_never_overwritten(tmp_path, capsys):
    assert run(tmp_path)[0] == 0
    out = tmp_path / "run"
    before = {name: (out / name).read_bytes() for name in ("results.json", "checkpoint.pt", "log.txt")}
    for extra in ([], ["--dry-run"], ["--lr", "0.1"]):
        assert run(tmp_path, *extra)[0] == 2
        assert "already holds a run (results.json and checkpoint.pt): pass --resume" in capsys.readouterr().err
        assert {name: (out / name).read_bytes() for name in before} == before
    assert run(tmp_path, "--lr", "0.1", "--overwrite")[0] == 0  # replaced, as asked
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lr"] == 0.1 and (out / "log.txt").read_text().count("coop on demo") == 1


def test_default_folders_tell_settings_apart():
    def folder(*extra):
        args = methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", "tiny", *extra])
        return runs.default_output(args, methods.make_config(args)[1])
    assert folder() == Path("runs/demo/coop/tiny/shots16/seed1")  # the method's defaults: as before
    assert folder("--epochs", "50") == Path("runs/demo/coop/tiny/shots16,epochs=50/seed1")
    assert folder("--lr", "0.01", "--set", "n_ctx=4", "--init", "random", "--protocol", "base2new") == Path(
        "runs/demo/coop/tiny/shots16-base2new,n_ctx=4,lr=0.01,init=random/seed1")
    assert folder("--set", "n_ctx=16") == folder()  # a default given explicitly is the same run
    assert len({folder(), folder("--batch-size", "8"), folder("--precision", "bf16"), folder("--set", "csc=true")}) == 4


@pytest.mark.slow
def test_eval_only_writes_its_own_file(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "2")[0] == 0
    out = tmp_path / "run"
    before = (out / "results.json").read_bytes()
    trained = json.loads(before)["accuracy"]["test"]
    assert train.main(["--method", "coop", "--data", "demo", "--eval-only", "--checkpoint",
                       str(out / "checkpoint.pt")]) == 0
    assert (out / "results.json").read_bytes() == before
    evaluated = json.loads((out / "eval_demo_fewshot.json").read_text())
    assert evaluated["accuracy"]["test"] == trained and evaluated["epochs"] == 0
    assert f"-> {out / 'eval_demo_fewshot.json'}" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_releases_the_folder(tmp_path, capsys, monkeypatch):
    """The lock is the folder's, held while a run writes, dropped when it ends or fails (here: Ctrl-C)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.Runner, "train_epoch", interrupted)
    assert run(tmp_path)[0] == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: interrupted") and "--resume continues it" in err
    monkeypatch.undo()
    assert run(tmp_path)[0] == 0  # nothing was kept, and the lock went with the interrupted run


@pytest.mark.parametrize("flag,value,message", [("--shots", "8", "shots: 16, this run 8"),
                                                ("--seed", "2", "seed: 1, this run 2"),
                                                ("--init", "random", "init: pretrained, this run random")])
@pytest.mark.slow
def test_resume_refuses_another_task(tmp_path, capsys, flag, value, message):
    """Before, only the method's config was compared: another --shots or --seed trained on other images."""
    assert run(tmp_path, "--epochs", "2")[0] == 0
    out = tmp_path / "run"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "epoch": 1}, out / "checkpoint.pt")  # as if killed after epoch 1 of 2
    assert train.main([*DEMO[:-1], "2", "--output", str(out), "--resume", flag, value]) == 2
    err = capsys.readouterr().err
    assert "was trained on another task or config" in err and message in err, err
    assert train.main([*DEMO[:-1], "2", "--output", str(out), "--resume"]) == 0  # the same task continues


def test_a_diverged_epoch_is_not_kept(tmp_path, capsys):
    """lr 1e30 and one step per epoch: epoch 2's step leaves the context at about 5e29, finite, and every logit nan.
    Before, that checkpoint was kept as the last good one and predict.py printed nan for every class."""
    code, out = run(tmp_path, "--epochs", "5", "--lr", "1e30", "--batch-size", "128")
    assert code == 2
    assert "at epoch 2 (in the parameters it ends with)" in capsys.readouterr().err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["learned"]["prompt_learner.ctx"].abs().max() < 1
    # a checkpoint with nan or inf in it: predict says so
    ckpt["learned"]["prompt_learner.ctx"][0, 0] = float("inf")
    torch.save(ckpt, out / "checkpoint.pt")
    demo = Path(data.demo_folder())
    assert predict.main([str(out), str(next(demo.rglob("*.png")))]) == 2
    assert "holds nan or inf values (prompt_learner.ctx): the run diverged" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tools_say_when_a_run_did_not_finish(tmp_path, capsys):
    """A run stopped by a nan loss keeps epoch 1's checkpoint and a results.json without accuracy: predict.py and
    analyze.py use that checkpoint and say so on stderr, once (they said nothing: it passed for the finished run).
    The quick tier checks the warning in test_predict.py."""
    code, out = run(tmp_path, "--epochs", "5", "--lr", "1e30", "--batch-size", "128")
    assert code == 2 and "accuracy" not in json.loads((out / "results.json").read_text())
    capsys.readouterr()
    warning = (f"warning: {out}: this run did not finish (its results.json has no accuracy): its checkpoint holds "
               "epoch 1 of 5\n")
    picture = str(next(Path(data.demo_folder()).rglob("*.png")))
    assert predict.main([str(out), picture]) == 0
    assert capsys.readouterr().err == warning
    assert analyze.main([str(out), "--images", "1"]) == 0
    assert capsys.readouterr().err == warning


@pytest.mark.slow
def test_a_large_seed_trains(tmp_path):
    assert run(tmp_path, "--seed", "1764633600")[0] == 0  # $(date +%s): an overflow at the first batch before


def test_a_billion_epochs_allocate_nothing_before_the_first(tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.Runner, "train_epoch", stop)
    tracemalloc.start()
    try:
        assert run(tmp_path, "--epochs", str(10**9))[0] == 130
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, peak  # a list of 10^9 epoch seeds: over 8 GB


@pytest.mark.slow
def test_predict_and_analyze_refuse_what_they_cannot_use(tmp_path, capsys):
    assert run(tmp_path)[0] == 0
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    assert predict.main([str(out), str(tmp_path / "empty")]) == 2
    assert "error: no image files" in capsys.readouterr().err
    assert predict.main([str(out / "results.json"), str(tmp_path)]) == 2
    assert "results.json is a file: pass the folder of a run" in capsys.readouterr().err
    for args in (["--images", "0"], ["--images", "-1"]):
        with pytest.raises(SystemExit):
            analyze.main([str(out), *args])
        assert "must be 1 or more" in capsys.readouterr().err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "backbone": "tiny-rn"}, out / "checkpoint.pt")  # another run's file, shapes that fit
    picture = str(next(Path(data.demo_folder()).rglob("*.png")))
    assert predict.main([str(out), picture]) == 2
    assert "the folder mixes two runs" in capsys.readouterr().err
    torch.save(ckpt, out / "checkpoint.pt")
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "init"}))
    assert predict.main([str(out), picture]) == 2
    assert "is not the results of a run of this project (KeyError: 'init')" in capsys.readouterr().err
    assert analyze.main([str(out), "--images", "1"]) == 2


@pytest.mark.slow
def test_predict_skips_an_image_over_the_pixel_limit(tmp_path, capsys, monkeypatch):
    assert run(tmp_path)[0] == 0
    image(tmp_path / "big.png", size=200)
    image(tmp_path / "small.png", size=8)
    monkeypatch.setattr(data.Image, "MAX_IMAGE_PIXELS", 10_000)  # 200 x 200 is over twice that
    assert predict.main([str(tmp_path / "run"), str(tmp_path / "big.png"), str(tmp_path / "small.png")]) == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "big.png" in captured.err and "decompression bomb" in captured.err
    assert "small.png: " in captured.out


def test_report_keeps_the_good_runs_beside_an_odd_one(tmp_path, capsys):
    assert run(tmp_path)[0] == 0
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "results.json").write_text(json.dumps(
        {"dataset": ["a"], "method": "coop", "backbone": "x", "shots": 1, "protocol": "fewshot", "accuracy": {}}))
    (tmp_path / "odd2").mkdir()
    (tmp_path / "odd2" / "results.json").write_text(json.dumps(
        {"dataset": "d", "method": "coop", "backbone": "x", "shots": 1, "protocol": "fewshot", "accuracy": [1]}))
    report.main([str(tmp_path)])
    captured = capsys.readouterr()
    assert "| demo | coop | tiny | 16 | fewshot | test |" in captured.out
    assert captured.err.count("skipped") == 2


def test_describe_checks_its_output_before_the_first_answer(tmp_path, capsys, monkeypatch):
    asked = []
    monkeypatch.setattr(describe, "ask", lambda *args: asked.append(args) or ["a phrase"])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    argv = ["--classes", str(tmp_path / "classes.txt"), "--out"]
    assert describe.main(argv + [str(tmp_path / "missing" / "d.json")]) == 2
    assert "no folder" in capsys.readouterr().err and asked == []
    assert describe.main(argv + [str(tmp_path)]) == 2 and asked == []
    assert describe.main(argv + [str(tmp_path / "d.json")]) == 0 and len(asked) == 2


@pytest.mark.slow
def test_a_dualpt_run_evaluates_after_its_descriptions_moved(tmp_path):
    descriptions = tmp_path / "d.json"
    names = ["red circle", "green square", "blue triangle", "yellow stripes", "magenta checkerboard",
             "cyan diamond", "orange ring", "white triangle"]
    descriptions.write_text(json.dumps({n: [f"a {n}", f"the {n}"] for n in names}))
    out = tmp_path / "run"
    assert train.main(["--method", "dualpt", "--data", "demo", "--backbone", "tiny", "--epochs", "1",
                       "--set", f"descriptions={descriptions}", "--output", str(out)]) == 0
    accuracy = json.loads((out / "results.json").read_text())["accuracy"]["test"]
    os.rename(descriptions, tmp_path / "elsewhere.json")
    model = runs.load_run(out)[0]
    assert model.desc is None
    assert train.main(["--method", "dualpt", "--data", "demo", "--eval-only", "--checkpoint",
                       str(out / "checkpoint.pt")]) == 0
    assert json.loads((out / "eval_demo_fewshot.json").read_text())["accuracy"]["test"] == accuracy


@pytest.mark.parametrize("method,message", [("linear-probe", "the search for c_weight needs validation images"),
                                            ("tip-adapter", "the search for alpha and beta needs validation images"),
                                            ("tip-adapter-f", "the search for alpha and beta needs validation images")])
def test_fitted_methods_without_val_images(tmp_path, capsys, method, message):
    """Before: a TypeError from encoding an empty split; Tip-Adapter-F now says so before its 20 epochs."""
    base = make_split_dataset(tmp_path, "dtd")
    split_file = base / "split_zhou_DescribableTextures.json"
    split_file.write_text(json.dumps({**json.loads(split_file.read_text()), "val": []}))
    out = tmp_path / "out"
    assert train.main(["--method", method, "--data", str(base), "--backbone", "tiny", "--shots", "2", "--output",
                       str(out)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "epoch 1/" not in captured.out
    assert not (out / "results.json").exists() and not (out / "checkpoint.pt").exists()


def test_report_plot_into_a_missing_folder(tmp_path):
    with pytest.raises(SystemExit, match="no folder"):
        report.main([str(tmp_path), "--plot", str(tmp_path / "missing" / "shots.png")])


def test_a_file_system_without_folder_locks_still_trains(tmp_path, monkeypatch):
    def no_locks(*args):
        raise OSError(9, "Bad file descriptor")  # flock on a folder of some NFS mounts
    monkeypatch.setattr(runs.fcntl, "flock", no_locks)
    assert run(tmp_path)[0] == 0


@pytest.mark.slow
def test_a_run_saved_under_an_old_field_name_loads_and_resumes(tmp_path):
    """MuDPT's Config.n_tokens is n_ctx now: a run that saved n_tokens=2 is rebuilt with 2 prompt tokens (not the
    default 4: its checkpoint would not fit), resumes as the same task, and is evaluated by --eval-only."""
    args = ["--method", "mudpt", "--data", "demo", "--backbone", "tiny", "--shots", "1", "--batch-size", "8",
            "--set", "n_ctx=2", "--output", str(tmp_path)]
    assert train.main([*args, "--epochs", "1"]) == 0
    model, _, _ = runs.load_run(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    results = json.loads((tmp_path / "results.json").read_text())
    results["config"]["n_tokens"] = results["config"].pop("n_ctx")
    (tmp_path / "results.json").write_text(json.dumps(results))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for config in (ckpt["config"], ckpt["run"]["config"]):
        config["n_tokens"] = config.pop("n_ctx", 2)  # one dict, saved twice
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    old, _, _ = runs.load_run(tmp_path)
    assert old.text_prompts.shape[1] == 2 and torch.equal(old(images), logits)  # (depth, n, D)
    assert train.main([*args, "--epochs", "1", "--resume"]) == 0  # the same task: check_resume finds no difference
    assert json.loads((tmp_path / "results.json").read_text())["config"]["n_ctx"] == 2
    torch.save(ckpt, tmp_path / "checkpoint.pt")  # epoch 1's, as an older run left it
    assert train.main(["--method", "mudpt", "--data", "demo", "--backbone", "tiny", "--eval-only", "--checkpoint",
                       str(tmp_path / "checkpoint.pt")]) == 0
