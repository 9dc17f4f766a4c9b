"""train.py --tensorboard (issue 39): each epoch's loss, training accuracy and lr, and the final accuracies, written as
TensorBoard scalars into the run folder and read back here with TensorBoard's own reader; a resumed run continues
them without a repeated epoch; the flag changes no number and no folder, and without tensorboard it is refused."""
import json
import sys

import pytest

import methods
import runs
import train

ARGS = ["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "2", "--batch-size", "8"]
MISSING = "error: --tensorboard needs tensorboard: pip install tensorboard\n"


def scalars(folder):
    """{tag: [(step, value), ...]} from every event file in the folder, as TensorBoard shows them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_files(folder):
    return sorted(folder.glob("events.out.tfevents.*"))


def results(folder):
    return json.loads((folder / "results.json").read_text())


def assert_logged(folder, evaluation_sets):
    """The folder's scalars are its results.json: history's loss, acc and lr per epoch, and each accuracy at the
    last epoch (float32 in the event file)."""
    done, logged = results(folder), scalars(folder)
    epochs = [entry["epoch"] for entry in done["history"]]
    assert sorted(logged) == sorted([f"train/{key}" for key in ("loss", "acc", "lr")] +
                                    [f"accuracy/{name}" for name in evaluation_sets])
    for key in ("loss", "acc", "lr"):
        steps, values = zip(*logged[f"train/{key}"])
        assert list(steps) == epochs
        assert list(values) == pytest.approx([entry[key] for entry in done["history"]], rel=1e-6)
    for name, accuracy in done["accuracy"].items():
        assert logged[f"accuracy/{name}"] == [(epochs[-1], pytest.approx(accuracy, rel=1e-6))]


@pytest.mark.slow
def test_scalars_equal_results_and_nothing_else_changes(tmp_path):
    """Two runs, with and without the flag: the same numbers, the same default folder; only the first has events."""
    assert train.main([*ARGS, "--output", str(tmp_path / "logged"), "--tensorboard"]) == 0
    assert train.main([*ARGS, "--output", str(tmp_path / "plain")]) == 0
    assert len(event_files(tmp_path / "logged")) == 1
    assert_logged(tmp_path / "logged", ["test"])

    assert event_files(tmp_path / "plain") == []
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["checkpoint.pt", "log.txt", "results.json"]
    logged, plain = results(tmp_path / "logged"), results(tmp_path / "plain")
    for done in (logged, plain):
        del done["time_s"]
        for entry in done["history"]:
            del entry["seconds"]
    assert logged == plain
    flagged, unflagged = methods.parse_args([*ARGS, "--tensorboard"]), methods.parse_args(ARGS)
    cfg = methods.make_config(unflagged)[1]
    assert runs.default_output(flagged, cfg) == runs.default_output(unflagged, cfg)


@pytest.mark.slow
def test_base_to_new_logs_each_evaluation_set(tmp_path):
    out = tmp_path / "run"
    assert train.main([*ARGS, "--protocol", "base2new", "--output", str(out), "--tensorboard"]) == 0
    assert_logged(out, ["base", "new", "hm"])


@pytest.mark.slow
def test_a_resumed_run_logs_each_epoch_once(tmp_path, monkeypatch):
    """Killed after epoch 2's scalars were written but before its checkpoint: --resume trains epoch 2 again, and its
    event file's purge step hides the killed process's epoch 2, so each epoch shows once."""
    out = tmp_path / "run"
    save = train.runs.save_checkpoint

    def killed_at_epoch_2(runner, folder, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return save(runner, folder, epoch, *rest)
    with monkeypatch.context() as patch:
        patch.setattr(train.runs, "save_checkpoint", killed_at_epoch_2)
        assert train.main([*ARGS, "--output", str(out), "--tensorboard"]) == 130
    assert [step for step, _ in scalars(out)["train/loss"]] == [1, 2]  # epoch 2 logged, its checkpoint not kept
    assert train.main([*ARGS, "--output", str(out), "--tensorboard", "--resume"]) == 0
    assert len(event_files(out)) == 2  # the killed process's file is kept; the resumed one adds its own
    assert_logged(out, ["test"])


@pytest.mark.slow
def test_overwrite_removes_the_replaced_runs_events(tmp_path):
    """--overwrite replaces the run, its curves included (else TensorBoard would show them beside the new run's)."""
    out = tmp_path / "run"
    assert train.main([*ARGS, "--epochs", "1", "--output", str(out), "--tensorboard"]) == 0  # the last --epochs counts
    assert len(event_files(out)) == 1
    assert train.main([*ARGS, "--output", str(out), "--overwrite", "--dry-run"]) == 0
    assert event_files(out) == []


def test_without_tensorboard_the_flag_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    monkeypatch.chdir(tmp_path)  # a default output folder would be made here
    assert train.main([*ARGS, "--tensorboard"]) == 2
    assert capsys.readouterr().err == MISSING
    assert list(tmp_path.iterdir()) == []


def test_eval_only_refuses_the_flag(tmp_path, capsys):
    argv = ["--method", "coop", "--data", "demo", "--eval-only", "--checkpoint", str(tmp_path / "checkpoint.pt")]
    assert train.main([*argv, "--tensorboard"]) == 2
    assert "--eval-only trains none: drop --tensorboard" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
