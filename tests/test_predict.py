"""predict.py and runs.load_run on a trained demo run: the run's own predictions, probabilities, unreadable
images skipped, clear errors for folders that are not runs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_model
import data
import methods
import predict
import runs
import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    results = train.run(methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", "tiny", "--shots", "4",
                                            "--epochs", "10", "--output", str(folder)]))
    return folder, results


def test_predictions_are_the_runs_own(run, capsys):
    folder, results = run
    test = data.make_task("demo", shots=4).evals[0].test
    assert predict.main([str(folder), *[path for path, _ in test], "--json", "--top", "8"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in predictions] == [path for path, _ in test]
    names = results["classnames"]
    correct = [names.index(p["top"][0]["class"]) == y for p, (_, y) in zip(predictions, test)]
    assert 100 * sum(correct) / len(test) == pytest.approx(results["accuracy"]["test"], abs=1e-9)
    for p in predictions:  # all 8 classes: a distribution, most probable first
        probabilities = [t["probability"] for t in p["top"]]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5) and probabilities == sorted(probabilities)[::-1]


def test_folders_and_unreadable_images(run, tmp_path, capsys):
    folder, _ = run
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    test = data.make_task("demo", shots=4).evals[0].test
    shutil.copy(test[0][0], images / "b.png")
    shutil.copy(test[1][0], images / "sub" / "a.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not an image, not listed")
    code = predict.main([str(folder), str(images), str(tmp_path / "missing.png"), "--top", "2"])
    out, err = capsys.readouterr()
    assert code == 1  # something was skipped; the rest was predicted
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(images / "b.png"), str(images / "sub" / "a.png")]
    assert all(len(line.split(": ")[1].split(", ")) == 2 for line in lines)  # --top 2
    assert f"skipped {images / 'broken.jpg'}: cannot read image {images / 'broken.jpg'}" in err
    assert f"skipped {tmp_path / 'missing.png'}: no such file or folder" in err


def test_predictions_into_a_closed_pipe_end_quietly(run, closed_stdout, capsys):
    """`python predict.py RUN images/ | head`: the reader has what it wanted; no traceback, the usual status."""
    folder, _ = run
    test = data.make_task("demo", shots=4).evals[0].test
    with closed_stdout:
        assert predict.main([str(folder), test[0][0], test[1][0]]) == 0
        assert predict.main([str(folder), test[0][0], "missing.png"]) == 1  # a skipped image still says so
    assert closed_stdout.goes_to_devnull()
    assert capsys.readouterr().err == "skipped missing.png: no such file or folder\n"


def test_a_run_that_did_not_finish_is_named_on_stderr(run, tmp_path, capsys):
    """A run killed while it evaluated: its last checkpoint (epoch 10 of 10) but no accuracy in results.json. It is
    used with a warning; the finished run, without one."""
    folder, _ = run
    picture = data.make_task("demo", shots=4).evals[0].test[0][0]
    assert predict.main([str(folder), picture]) == 0
    assert capsys.readouterr().err == ""
    killed = tmp_path / "killed"
    shutil.copytree(folder, killed)
    results = json.loads((killed / "results.json").read_text())
    (killed / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "accuracy"}))
    assert predict.main([str(killed), picture]) == 0
    assert capsys.readouterr().err == (f"warning: {killed}: this run did not finish (its results.json has no "
                                       "accuracy): its checkpoint holds epoch 10 of 10\n")


def test_folders_that_are_not_runs(run, tmp_path, capsys):
    folder, _ = run
    assert predict.main([str(tmp_path), "x.png"]) == 2
    assert f"error: no results.json in {tmp_path}: pass the folder of a run of train.py" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "checkpoint.pt").write_bytes(b"half a file")
    assert predict.main([str(broken), "x.png"]) == 2
    assert "is not a readable checkpoint of this project" in capsys.readouterr().err
    (broken / "checkpoint.pt").unlink()
    assert predict.main([str(broken), "x.png"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    (broken / "results.json").write_text("{}")
    assert predict.main([str(broken), "x.png"]) == 2
    assert "is not the results of a run of this project" in capsys.readouterr().err


def test_a_run_from_before_the_classes_were_saved(run, tmp_path):
    """results.json without classnames (older runs): load_run reads them from the run's dataset."""
    folder, results = run
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    saved = json.loads((old / "results.json").read_text())
    del saved["classnames"], saved["template"]
    (old / "results.json").write_text(json.dumps(saved))
    model, _, classnames = runs.load_run(old)
    new_model, _, _ = runs.load_run(folder)
    assert classnames == results["classnames"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), new_model(x), rtol=0, atol=0)


def test_a_run_whose_weights_are_not_here_says_how_to_get_them(run, tmp_path, monkeypatch, capsys):
    """A run of OpenAI's RN50, on a machine offline without its weights: one line saying where to put the file."""
    folder, _ = run
    rn50 = tmp_path / "rn50"
    shutil.copytree(folder, rn50)
    saved = json.loads((rn50 / "results.json").read_text())
    saved["backbone"] = saved["config"]["backbone"] = "RN50"
    (rn50 / "results.json").write_text(json.dumps(saved))
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty download cache, and no network:
    monkeypatch.setitem(clip_model.MODELS, "RN50",
                        clip_model.MODELS["RN50"].replace("https://", "file:///nonexistent/"))
    assert predict.main([str(rn50), "x.png"]) == 2
    assert f"without internet, copy RN50.pt into {tmp_path / '.cache' / 'clip'}" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tools_read_a_run_without_the_training_loop():
    """predict.py and analyze.py rebuild a run through runs.py and import neither train.py nor the feature cache
    (checked in a fresh interpreter: this session has imported train)."""
    code = "import sys, predict, analyze; print(sorted(m for m in ('train', 'features') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
