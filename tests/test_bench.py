"""bench.py's smoke mode: every row is measured and the fast paths equal the slow ones (no timing asserted)."""
import pytest

import bench
import methods


@pytest.mark.slow
def test_smoke_prints_every_row(capsys):
    rows = bench.main(["--smoke", "--device", "cpu"])
    table = capsys.readouterr().out
    names = [r[0] for r in rows]
    assert sum(n.startswith("text, EOT cut") for n in names) == 3
    assert any(n.startswith("CoCoOp: batched") for n in names) and any(n.startswith("eval, 4 batches") for n in names)
    assert sum("vs OpenAI's code" in n for n in names) == 4
    assert sum("(GELU, same weights)" in n for n in names) == 4  # transformers' and open_clip's, both towers
    assert any(n.startswith("CoOp epoch: 10 cached views") for n in names)
    assert any(n.startswith("DDP, 2 processes vs 1") for n in names)
    assert any(n.startswith("sweep.py, 2 CoOp runs (tiny, 1 epochs): 2 at a time") for n in names)
    measured = {n.split(": ")[1].split(" (")[0] for n in names if n.startswith("train step")}
    assert measured == set(methods.TRAINED)  # every method trained by SGD runs on tiny
    assert any(n.startswith("train.py's epoch vs bare SGD steps") for n in names)
    assert sum(n.startswith("one training step, 20 classes: ") and "text checkpointing" in n for n in names) == 1
    assert "nan" not in " ".join(n for n in names if n.startswith("one training step"))  # both children measured
    assert any(n.startswith("frozen image forward, tiny") and "TFLOP/s achieved" in n for n in names)
    for what, ours, other, ratio, diff in rows:  # equal outputs where two paths compute the same thing
        if what.startswith("frozen image forward") and "peak of CPU unknown" in what:
            other = ratio = 1.0  # no peak FLOP/s for a CPU: the row reports the achieved rate only
        assert ours > 0 and other > 0 and ratio > 0
        assert diff is None or diff < 1e-4, (what, diff)
    assert table.count("\n|") == len(rows) + 2  # header, separator, one line per row
