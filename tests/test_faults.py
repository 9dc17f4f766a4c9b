"""Faults and bad input: every row of docs/troubleshooting.md's "When something goes wrong" table, kill -9 and resume,
crashes while saving, refused checkpoints, determinism, and the tokenizer on random unicode."""
import fcntl
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

import clip_model
import coop
import runs
import train
from test_data import WNIDS, image, make_imagenet, make_split_dataset, make_variant
from test_released import coop_state, save_dassl

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--backbone", "tiny", "--epochs", "1"]


BAD_NUMBERS = {"negative `--shots`": ["--shots", "-3"], "`--epochs` below 0": ["--epochs", "-1"],
               "`--batch-size` below 1": ["--batch-size", "0"], "`--lr` of 0, below 0 or not a number": ["--lr", "0"],
               "negative `--workers`": ["--workers", "-1"], "negative `--cache-features`": ["--cache-features", "-2"]}


def fault_table_rows():
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    section = text[text.index("# When something goes wrong"):]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^\| (.+?) \| `(.+?)` \|", section, re.M)]


def trained(tmp_path, *extra):
    """A finished 1-epoch coop run on the demo; returns its folder."""
    out = tmp_path / "trained"
    assert train.main(["--method", "coop", "--data", "demo", *TINY, "--output", str(out), *extra]) == 0
    return out


def served_file(tmp_path, content, sha):
    folder = tmp_path / "server" / sha
    folder.mkdir(parents=True)
    (folder / "RN50.pt").write_bytes(content)
    return f"file://{folder}/RN50.pt"


def scenario(name, tmp_path, monkeypatch):
    """The argv that causes the fault table's row `name` (after preparing files under tmp_path)."""
    out = ["--output", str(tmp_path / "out")]
    demo = ["--method", "coop", "--data", "demo", *TINY, *out]
    if name == "unknown method":
        return ["--method", "vpt-deep", "--data", "demo", *out]
    if name == "--method or --data missing":
        return ["--method", "coop"]
    if name == "unknown backbone":
        return ["--method", "coop", "--data", "demo", "--backbone", "ViT-B/99", *out]
    if name == "backbone file is not a checkpoint":
        (tmp_path / "weights.pt").write_bytes(b"half a download " * 300)
        return ["--method", "coop", "--data", "demo", "--backbone", str(tmp_path / "weights.pt"), *out]
    if name == "backbone file holds another model":
        torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
        return ["--method", "coop", "--data", "demo", "--backbone", str(tmp_path / "other.pt"), *out]
    if name in ("download with a wrong checksum", "no internet for the download"):
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        url = served_file(tmp_path, b"not the weights", "0" * 64) if "checksum" in name else \
            "file:///nonexistent/" + "1" * 64 + "/RN50.pt"
        monkeypatch.setitem(clip_model.MODELS, "RN50", url)
        return ["--method", "coop", "--data", "demo", "--backbone", "RN50", *out]
    if name == "visual prompts on a ResNet":
        return ["--method", "vpt", "--data", "demo", "--backbone", "tiny-rn", *out]
    if name == "unknown `--set` field":
        return demo + ["--set", "n_tokens=4"]
    if name == "`--set` value of the wrong type":
        return demo + ["--set", "n_ctx=four"]
    if name == "`--set` value the method rejects":
        return demo + ["--set", "class_token_position=left"]
    if name == "`--set` number the method cannot use":
        return demo + ["--set", "n_ctx=-1"]
    if name == "`--set` epochs or learning rate out of range":
        return demo + ["--set", "warmup_epochs=-1"]
    if name in BAD_NUMBERS:
        return demo + BAD_NUMBERS[name]
    if name == "dataset folder missing":
        return ["--method", "coop", "--data", str(tmp_path / "nowhere" / "dtd"), *TINY, *out]
    if name == "folder not recognised":
        (tmp_path / "stuff").mkdir()
        return ["--method", "coop", "--data", str(tmp_path / "stuff"), *TINY, *out]
    if name == "split file malformed":
        (tmp_path / "dtd" / "images").mkdir(parents=True)
        (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{\"train\": [")
        return ["--method", "coop", "--data", str(tmp_path / "dtd"), *TINY, *out]
    if name == "split names a missing image":
        base = make_split_dataset(tmp_path, "dtd")
        os.remove(base / "images" / "cat" / "test_2.jpg")
        return ["--method", "coop", "--data", str(base), *TINY, "--shots", "2", *out]
    if name == "fewer images than shots":
        return demo + ["--shots", "50"]
    if name == "corrupt image":
        for c in ("apple", "pear"):
            for i in range(6):
                image(tmp_path / "mine" / c / f"{i}.png")
        (tmp_path / "mine" / "pear" / "3.png").write_bytes(b"\x89PNG broken")
        return ["--method", "coop", "--data", str(tmp_path / "mine"), *TINY, "--shots", "0", *out]
    if name == "unknown protocol":
        return demo + ["--protocol", "zeroshot"]
    if name == "ImageNet variant without class names":
        target = make_variant(tmp_path / "elsewhere", "imagenet-rendition", WNIDS[:2], copy_classnames=False)
        return ["--method", "coop", "--data", str(make_imagenet(tmp_path)), *TINY, "--shots", "2", "--protocol", "dg",
                "--eval-data", str(target), *out]
    if name == "cross / dg with no targets":
        return ["--method", "coop", "--data", str(make_split_dataset(tmp_path, "dtd")), *TINY, "--shots", "2",
                "--protocol", "cross", *out]
    if name == "training on a test-only dataset":
        make_imagenet(tmp_path)
        return ["--method", "coop", "--data", str(make_variant(tmp_path, "imagenet-sketch", WNIDS)), *TINY, *out]
    if name == "`--resume` without a checkpoint":
        return demo + ["--resume"]
    if name == "`--resume` with other settings":
        folder = trained(tmp_path)
        return ["--method", "coop", "--data", "demo", *TINY, "--output", str(folder), "--resume", "--lr", "0.1"]
    if name == "`--eval-only` without a checkpoint":
        return ["--method", "coop", "--data", "demo", "--eval-only", *out]
    if name == "checkpoint of another method":
        return ["--method", "cocoop", "--data", "demo", "--eval-only", "--checkpoint",
                str(trained(tmp_path) / "checkpoint.pt"), *out]
    if name == "truncated or foreign checkpoint":
        data = (trained(tmp_path) / "checkpoint.pt").read_bytes()
        (tmp_path / "half.pt").write_bytes(data[:len(data) // 2])
        return ["--method", "coop", "--data", "demo", "--eval-only", "--checkpoint", str(tmp_path / "half.pt"), *out]
    if name == "class-specific context on other classes":
        return demo + ["--set", "csc=true", "--protocol", "base2new"]
    if name == "`--cache-features` on a method that learns in the image tower":
        return ["--method", "vpt", "--data", "demo", *TINY, "--cache-features", "4", *out]
    if name == "`--batch-size` not divisible by the torchrun processes":  # rank 0 of 2, as torchrun would start it
        monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(train.dist, "get_rank", lambda: 0)
        monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
        return demo + ["--batch-size", "3"]
    if name == "the loss becomes NaN or inf":
        return ["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "5", "--lr", "1e30", *out]
    if name == "the output folder already holds a run (training or `--dry-run`)":
        return ["--method", "coop", "--data", "demo", *TINY, "--output", str(trained(tmp_path)), "--dry-run"]
    if name == "`--resume` and `--overwrite` together":
        return demo + ["--resume", "--overwrite"]
    if name == "another run is writing to the output folder":
        (tmp_path / "out").mkdir()
        held = os.open(tmp_path / "out", os.O_RDONLY)  # as another process's train.py holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        return demo
    if name == "`--output` is a file, or below one":
        (tmp_path / "file").write_text("not a folder")
        return ["--method", "coop", "--data", "demo", *TINY, "--output", str(tmp_path / "file" / "run")]
    if name == "the disk fills, or the folder turns read-only, while writing":
        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # ENOSPC
        monkeypatch.setattr(torch, "save", full)
        return demo
    if name == "`--device cuda` without a GPU":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return demo + ["--device", "cuda"]
    if name == "`--seed` outside 0 .. 2^32 - 1":
        return demo + ["--seed", "1", str(2**32)]
    if name == "an image over PIL's pixel limit":
        monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # the demo's 64 x 64 images: over twice that
        return demo
    if name == "a class folder without images":
        for c in ("apple", "pear"):
            for i in range(6):
                image(tmp_path / "mine" / c / f"{i}.png")
        (tmp_path / "mine" / "plum").mkdir()
        return ["--method", "coop", "--data", str(tmp_path / "mine"), *TINY, "--shots", "0", *out]
    if name == "a class without training images in the split":
        base = make_split_dataset(tmp_path, "dtd")
        split = json.loads((base / "split_zhou_DescribableTextures.json").read_text())
        split["train"] = [item for item in split["train"] if item[2] != "cat"]
        (base / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
        return ["--method", "coop", "--data", str(base), *TINY, "--shots", "0", *out]
    if name == "an empty test split":
        base = make_split_dataset(tmp_path, "dtd")
        split = json.loads((base / "split_zhou_DescribableTextures.json").read_text())
        (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({**split, "test": []}))
        return ["--method", "coop", "--data", str(base), *TINY, "--shots", "2", *out]
    if name == "base-to-new on one class":
        for i in range(6):
            image(tmp_path / "one" / "apple" / f"{i}.png")
        return ["--method", "coop", "--data", str(tmp_path / "one"), *TINY, "--shots", "2", "--protocol", "base2new",
                *out]
    if name == "`--eval-data` without `--protocol cross` or `dg`":
        return demo + ["--eval-data", str(tmp_path)]
    if name == "a learned context too long for the 77 text tokens":
        return demo + ["--set", "n_ctx=80"]
    if name == "`--eval-only` with a `--backbone` or `--set` the checkpoint was not trained with":
        return ["--method", "coop", "--data", "demo", "--eval-only", "--checkpoint",
                str(trained(tmp_path) / "checkpoint.pt"), "--set", "n_ctx=4", *out]
    if name == "`--set template=...` (or `dataset`)":
        return demo + ["--set", "template=a {}."]
    if name.startswith("an authors' checkpoint"):  # CoOp's file layout, as test_released.py writes it
        clip = clip_model.load("tiny", seed=2 if "backbone" in name else 1)[0]
        names = [f"class {i}" for i in range(8)]
        model = coop.build(clip, names, coop.Config(n_ctx=4))
        path = save_dassl(tmp_path / "prompt_learner" / "model.pth.tar-50", coop_state(clip, model, names, 4))
        method = "maple" if "another method" in name else "coop"
        return ["--method", method, "--data", "demo", "--backbone", "tiny", "--eval-only", "--checkpoint",
                str(path), *out]
    raise KeyError(f"docs/troubleshooting.md row {name!r} has no scenario in tests/test_faults.py")


ROWS = fault_table_rows()
NOTHING_WRITTEN = {"`--resume` and `--overwrite` together", "`--device cuda` without a GPU",
                   "`--seed` outside 0 .. 2^32 - 1", "a class folder without images",
                   "a class without training images in the split", "an empty test split", "base-to-new on one class",
                   "`--eval-data` without `--protocol cross` or `dg`",
                   "a learned context too long for the 77 text tokens",
                   "`--eval-only` with a `--backbone` or `--set` the checkpoint was not trained with",
                   "`--set template=...` (or `dataset`)", "an authors' checkpoint (Dassl's `model.pth.tar-N`) of "
                   "another method", "an authors' checkpoint with another backbone than the run's"}


def test_the_fault_table_is_complete():
    assert len(ROWS) >= 20


@pytest.mark.parametrize("name,message", ROWS, ids=[r[0] for r in ROWS])
def test_fault_row(tmp_path, monkeypatch, capsys, name, message):
    argv = scenario(name, tmp_path, monkeypatch)
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    if name in BAD_NUMBERS or name.startswith("`--set`") or name in NOTHING_WRITTEN:  # refused before anything is
        assert not (tmp_path / "out").exists()  # written


@pytest.mark.parametrize("name", ["unknown backbone", "corrupt image"])
@pytest.mark.slow
def test_fault_row_as_a_process(tmp_path, monkeypatch, name):
    argv = scenario(name, tmp_path, monkeypatch)
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert dict(ROWS)[name] in done.stderr


def test_nan_keeps_the_last_good_epoch(tmp_path, monkeypatch, capsys):
    assert train.main(scenario("the loss becomes NaN or inf", tmp_path, monkeypatch)) == 2
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert ckpt["epoch"] == 1 and len(results["history"]) == 1 and "accuracy" not in results
    assert torch.isfinite(ckpt["learned"]["prompt_learner.ctx"]).all()


def comparable(results):
    return {k: v for k, v in results.items() if k != "time_s"} | {
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in results["history"]]}


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "--method", "coop", "--data", "demo", "--backbone", "tiny",
            "--epochs", "12", "--batch-size", "4"]
    subprocess.run(args + ["--output", str(tmp_path / "whole")], check=True, capture_output=True, timeout=300)
    run = subprocess.Popen(args + ["--output", str(tmp_path / "killed")], stdout=subprocess.PIPE, text=True)
    for line in run.stdout:  # kill -9 as soon as epoch 3 is done: it is then inside epoch 4
        if line.startswith("epoch 3/"):
            os.kill(run.pid, signal.SIGKILL)
            break
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL
    killed_at = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["epoch"]
    assert 2 <= killed_at < 12  # killed in epoch 4, or just before epoch 3 was saved
    subprocess.run(args + ["--output", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True,
                   timeout=300)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert comparable(resumed) == comparable(whole)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    runs.save_atomic(lambda tmp: torch.save({"epoch": 1}, tmp), path)

    def crash(tmp):
        Path(tmp).write_bytes(b"half a check")
        raise KeyboardInterrupt  # killed mid-write
    with pytest.raises(KeyboardInterrupt):
        runs.save_atomic(crash, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clip-prompt-tuning-pwned",))


def test_a_checkpoint_carrying_code_is_refused_unread(tmp_path, capsys):
    marker = Path("/tmp/clip-prompt-tuning-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"method": "coop", "learned": {}, "config": {}, "epoch": 1, "x": Payload()}, tmp_path / "evil.pt")
    assert train.main(["--method", "coop", "--data", "demo", "--eval-only", "--checkpoint",
                       str(tmp_path / "evil.pt"), "--output", str(tmp_path / "out")]) == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err and not marker.exists()
    (tmp_path / "evil_weights.pt").write_bytes((tmp_path / "evil.pt").read_bytes())
    with pytest.raises(clip_model.LoadError, match="unreadable or corrupt"):
        clip_model.load(str(tmp_path / "evil_weights.pt"))
    assert not marker.exists()


def test_bit_flipped_download_is_rejected_and_nothing_stays(tmp_path):
    good = b"pretend weights" * 1000
    sha = hashlib.sha256(good).hexdigest()
    flipped = bytearray(good)
    flipped[1234] ^= 0x01
    url = served_file(tmp_path, bytes(flipped), sha)
    with pytest.raises(clip_model.LoadError, match="the file was discarded"):
        clip_model.download(url, str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []
    truncated = served_file(tmp_path / "t", good[:len(good) // 2], sha)
    with pytest.raises(clip_model.LoadError, match="the file was discarded"):
        clip_model.download(truncated, str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    results = []
    for name in ("a", "b"):
        train.main(["--method", "cocoop", "--data", "demo", "--backbone", "tiny", "--epochs", "2", "--batch-size", "8",
                    "--output", str(tmp_path / name)])
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert comparable(results[0]) == comparable(results[1])
    assert results[0]["history"][-1]["loss"] > 0


@pytest.mark.slow
def test_tokenizer_survives_random_unicode():
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x2FFF)] + [chr(c) for c in range(0x1F300, 0x1F6FF)] + list("\t\n &;<>|")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    tokens = clip_model.tokenize(texts, truncate=True)
    assert tokens.shape == (3000, 77) and (tokens[:, 0] == 49406).all()
    assert (tokens.argmax(-1) > 0).all()  # every row has its EOT
