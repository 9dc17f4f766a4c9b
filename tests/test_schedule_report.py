"""The learning-rate schedule against Dassl's, and report.py's averaging."""
import json

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

import coop
import methods
import report
import train


class DasslConstantWarmup(LRScheduler):
    """Dassl's ConstantWarmupScheduler (dassl/optim/lr_scheduler.py) around its cosine successor, as CoOp
    configures it (WARMUP_RECOUNT=True): stepped once at the end of every epoch."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()


@pytest.mark.parametrize("epochs,warmup,base", [(200, 1, 0.002), (10, 1, 0.0025), (50, 10, 0.01), (5, 0, 0.1)])
def test_lr_matches_dassl_epoch_by_epoch(epochs, warmup, base):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = CosineAnnealingLR(optimizer, float(epochs))
    if warmup:
        scheduler = DasslConstantWarmup(optimizer, scheduler, warmup, 1e-5)
    for epoch in range(epochs):
        assert train.lr_at(epoch, base, epochs, warmup) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()
    if warmup:  # the hand-over: the cosine starts from the full lr the epoch after warm-up, and never reaches 0
        assert train.lr_at(warmup, base, epochs, warmup) == base
        assert train.lr_at(epochs - 1, base, epochs, warmup) > 0


def test_epochs_by_shots_follow_coop():
    cfg = coop.Config()
    assert [methods.epochs_for(cfg, k, coop) for k in (1, 2, 4, 8, 16, 0)] == [50, 100, 100, 200, 200, 200]
    assert methods.epochs_for(coop.Config(epochs=7), 1, coop) == 7


def test_report_averages_seeds(tmp_path, capsys):
    for seed, acc in [(1, 60.0), (2, 70.0)]:
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps(dict(
            dataset="DescribableTextures", method="coop", backbone="ViT-B/16", shots=16, protocol="fewshot",
            seed=seed, accuracy={"test": acc})))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    report.main([str(tmp_path)])
    out = capsys.readouterr()
    row = [line for line in out.out.splitlines() if "DescribableTextures" in line]
    assert row == ["| DescribableTextures | coop | ViT-B/16 | 16 | fewshot | test | 65.00 ± 7.07 | 2 | 64.20 | "
                   "MuDPT paper Table I |"]
    assert "skipped" in out.err


def test_report_into_a_closed_pipe_ends_quietly(tmp_path, closed_stdout, capsys):
    """`python report.py runs/ | head`: no "Exception ignored ... BrokenPipeError" and status 120 at exit."""
    (tmp_path / "results.json").write_text(json.dumps(dict(
        dataset="d", method="coop", backbone="x", shots=1, protocol="fewshot", seed=1, accuracy={"test": 50.0})))
    with closed_stdout:
        report.main([str(tmp_path)])
    assert closed_stdout.goes_to_devnull() and capsys.readouterr().err == ""


def test_report_without_runs_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="run train.py first"):
        report.main([str(tmp_path)])


def test_report_plot_draws_or_says_what_to_install(tmp_path, capsys):
    for shots, acc in [(1, 40.0), (16, 70.0)]:
        run = tmp_path / f"shots{shots}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps(dict(
            dataset="demo", method="coop", backbone="tiny", shots=shots, protocol="fewshot", seed=1,
            accuracy={"test": acc})))
    try:
        import matplotlib  # noqa: F401  (an optional extra)
    except ImportError:
        with pytest.raises(SystemExit, match="--plot needs matplotlib: pip install matplotlib"):
            report.main([str(tmp_path), "--plot", str(tmp_path / "shots.png")])
    else:
        report.main([str(tmp_path), "--plot", str(tmp_path / "shots.png")])
        assert (tmp_path / "shots.png").read_bytes()[:4] == b"\x89PNG"


def test_paper_numbers_name_real_methods_once_with_a_source():
    """Every row of paper_results.csv: a method of train.py, an accuracy in [0, 100], a source, one row per key
    (report.py keys them: a second row would silently replace the first)."""
    import csv
    with open(report.PAPER, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [(r["dataset"], r["method"], r["backbone"], r["shots"], r["protocol"], r["metric"]) for r in rows]
    assert len(set(keys)) == len(keys) == len(report.paper_numbers())
    assert all(r["method"] in methods.METHODS and 0 < float(r["value"]) <= 100 and r["source"] for r in rows)
    assert {"maple", "taskres"} <= {r["method"] for r in rows}
