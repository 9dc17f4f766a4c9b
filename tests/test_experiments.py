"""experiments/*.toml, the papers' tables as sweeps: each file expands into train.py commands that train.py's own
parser and config checks accept (sweep.make_runs), as many as its table has runs, with the papers' settings in them
(ImageNet's 50 epochs, TaskRes's SGD in the bias-tuning table, DUAL-PT's descriptions file per dataset, ...); no run
is in two files; `sweep.py FILE --dry-run` prints them."""
import shlex
from collections import Counter
from pathlib import Path

import pytest

import methods
import sweep

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
D11 = ["imagenet", "caltech-101", "oxford_pets", "stanford_cars", "oxford_flowers", "food-101", "fgvc_aircraft",
       "sun397", "dtd", "eurosat", "ucf101"]
CAVPT8 = ["eurosat", "caltech-101", "oxford_flowers", "food-101", "fgvc_aircraft", "dtd", "oxford_pets",
          "stanford_cars"]
SEEDS = 3
RUNS = {  # each table's runs, counted from the paper's table (datasets x shots x methods x seeds)
    "coop_fewshot": 11 * 5 * 2 * SEEDS,  # coop, linear-probe; 1-16 shots
    "cocoop_base2new": 11 * SEEDS,
    "cavpt_table1": 8 * 7 * SEEDS,  # zeroshot coop vpt-shallow vpt vpt-cavpt vlp cavpt
    "mudpt_tables": 11 * 4 * SEEDS + 11 * SEEDS + 2 * SEEDS,  # I (mudpt and 3 baselines), II, III and IV
    "dualpt": 11 * 5 * 2 * SEEDS + 11 * 2 * SEEDS,  # dualpt, proda few-shot; codualpt, cocoop base-to-new
    "bias_tuning_table1": 11 * 3 * 6 * SEEDS,  # 4/8/16 shots, 6 methods
    "maple_base2new": 11 * SEEDS,
    "maple_cross_dg": 2 * SEEDS,
    "plot_taskres_fewshot": 11 * 5 * 2 * SEEDS,
    "adapters_fewshot": 11 * 5 * 3 * SEEDS,
}
SLOW = {"bias_tuning_table1", "adapters_fewshot", "dualpt", "coop_fewshot", "plot_taskres_fewshot"}  # 0.7-1.5 s


def described(tmp_path, monkeypatch):
    """Work in tmp_path, where descriptions/<dataset>.json exist (describe.py's output, which DUAL-PT's config
    check asks for), so that dualpt.toml expands as it does once they are written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "descriptions").mkdir()
    for name in D11:
        (tmp_path / "descriptions" / f"{name}.json").write_text("{}")


def commands(stem):
    """The file's train.py commands for seed 1 (the other seeds' differ only there, as the test of each file's runs
    checks), each parsed by train.py's parser, so flag order and spelling do not matter."""
    argvs = sweep.read_experiment(EXPERIMENTS / f"{stem}.toml", "data")
    return [methods.parse_args(argv) for argv in argvs if argv[argv.index("--seed") + 1] == "1"]


def test_every_table_has_a_file():
    assert sorted(path.stem for path in EXPERIMENTS.glob("*.toml")) == sorted(RUNS)


@pytest.mark.parametrize("stem", [pytest.param(stem, marks=[pytest.mark.slow] * (stem in SLOW)) for stem in RUNS])
def test_a_file_is_its_tables_runs_as_train_py_accepts_them(stem, tmp_path, monkeypatch):
    described(tmp_path, monkeypatch)
    made = sweep.make_runs(sweep.read_experiment(EXPERIMENTS / f"{stem}.toml", "data"))  # train.py's parser, checks
    assert len(made) == RUNS[stem]
    assert all(run.argv.count("--seed") == 1 for run in made)
    seeds = Counter(run.argv[run.argv.index("--seed") + 1] for run in made)
    assert seeds == {str(seed): RUNS[stem] // SEEDS for seed in range(1, SEEDS + 1)}  # every run with every seed
    assert all(Path(run.argv[run.argv.index("--data") + 1]).parent == Path("data") for run in made)


@pytest.mark.slow
def test_no_run_is_in_two_files(tmp_path, monkeypatch):
    described(tmp_path, monkeypatch)
    seen = {}
    for stem in RUNS:
        for run in sweep.make_runs(sweep.read_experiment(EXPERIMENTS / f"{stem}.toml", "data")):
            assert run.folder not in seen, f"{run.folder}: in {seen.get(run.folder)} and {stem}"
            seen[run.folder] = stem
    assert len(seen) == sum(RUNS.values())


def test_coop_runs_its_schedule_by_shots_and_50_epochs_on_imagenet():
    coop = commands("coop_fewshot")
    assert {(a.method, a.epochs) for a in coop if a.data == "data/imagenet"} == {("coop", 50), ("linear-probe", None)}
    assert {a.epochs for a in coop if a.data != "data/imagenet"} == {None}
    assert sorted({Path(a.data).name for a in coop}) == sorted(D11) and {a.shots for a in coop} == {1, 2, 4, 8, 16}


def test_bias_tuning_is_one_schedule_for_every_method_sgd_for_taskres_too():
    bias = commands("bias_tuning_table1")
    assert {(a.backbone, a.epochs, a.batch_size, a.lr) for a in bias} == {("ViT-B/16", 10, 32, 0.0025)}
    assert {a.shots for a in bias} == {4, 8, 16}
    assert {(a.method, tuple(a.set)) for a in bias} == {("bias_tuning", ()), ("coop", ()), ("vpt", ()), ("ivlp", ()),
                                                          ("maple", ()), ("taskres", ("optimizer=sgd",))}


def test_dualpt_reads_the_descriptions_of_each_dataset():
    dual = commands("dualpt")
    for a in dual:
        describes = a.method in ("dualpt", "codualpt")
        assert a.set == ([f"descriptions=descriptions/{Path(a.data).name}.json"] if describes else [])
        assert a.epochs == (50 if a.method in ("dualpt", "proda") and a.data == "data/imagenet" else None)
    assert {(a.method, a.protocol, a.backbone) for a in dual} == {
        ("dualpt", "fewshot", None), ("proda", "fewshot", None), ("codualpt", "base2new", None),
        ("cocoop", "base2new", "RN50")}


def test_cavpt_and_mudpt_tables():
    cavpt = commands("cavpt_table1")
    assert sorted({Path(a.data).name for a in cavpt}) == sorted(CAVPT8)
    assert {(a.backbone, a.shots, a.epochs) for a in cavpt} == {("ViT-B/32", 16, 200)}
    mudpt = commands("mudpt_tables")
    assert {(a.method, a.protocol, a.backbone) for a in mudpt if a.data == "data/imagenet"} == {
        ("mudpt", "fewshot", "ViT-B/16"), ("coop", "fewshot", "ViT-B/16"), ("cocoop", "fewshot", "ViT-B/16"),
        ("zeroshot", "fewshot", "ViT-B/16"), ("mudpt", "base2new", None), ("mudpt", "cross", None),
        ("mudpt", "dg", None)}


def test_the_baselines_exceptions_per_dataset():
    maple = commands("maple_cross_dg")
    assert {(a.protocol, a.epochs, a.lr, tuple(a.set), a.data) for a in maple} == {
        (protocol, 2, 0.0026, ("depth=3",), "data/imagenet") for protocol in ("cross", "dg")}
    exceptions = {(a.method, Path(a.data).name, a.batch_size, a.lr, tuple(a.set))
                  for a in commands("plot_taskres_fewshot") if a.batch_size or a.lr or a.set}
    assert exceptions == {("plot", "fgvc_aircraft", 32, None, ()), ("taskres", "imagenet", None, 2e-4, ()),
                          ("taskres", "oxford_flowers", None, None, ("alpha=1.0",))}
    longer = {(a.method, Path(a.data).name, a.epochs) for a in commands("adapters_fewshot") if a.epochs}
    assert longer == {("tip-adapter-f", "eurosat", 100)}


def test_dry_run_prints_the_files_commands_and_their_count(capsys):
    file = EXPERIMENTS / "maple_cross_dg.toml"
    assert sweep.main([str(file), "--dry-run"]) == 0
    *lines, count = capsys.readouterr().out.splitlines()
    assert count == "# 6 runs"
    printed = [shlex.split(line.split("  # ")[0]) for line in lines]
    assert all(argv[0] == "python" and Path(argv[1]).name == "train.py" for argv in printed)
    assert [argv[2:] for argv in printed] == sweep.read_experiment(file, "data")
    assert lines[0].endswith("  # runs/imagenet/maple/ViT-B-16/shots16-cross,depth=3,epochs=2,lr=0.0026/seed1")


@pytest.mark.skipif((ROOT / "descriptions" / "imagenet.json").exists(), reason="describe.py's files are here")
def test_dualpt_waits_for_its_descriptions_but_its_baselines_run_meanwhile(tmp_path, monkeypatch, capsys):
    """docs/reproducing.md: until describe.py has written them the sweep refuses dualpt.toml, naming the file;
    --dry-run prints every command and marks the refused ones; --only method=proda method=cocoop runs the rest."""
    monkeypatch.chdir(tmp_path)
    file = str(EXPERIMENTS / "dualpt.toml")
    assert sweep.main([file]) == 2
    assert "descriptions=descriptions/imagenet.json: no such file (python describe.py" in capsys.readouterr().err
    assert sweep.main([file, "--dry-run"]) == 0
    *lines, count = capsys.readouterr().out.splitlines()
    assert count == "# 396 runs; 198 refused now, as said" and len(lines) == 396
    assert "# refused now: dualpt: descriptions=descriptions/imagenet.json: no such file" in lines[0]
    assert sweep.main([file, "--dry-run", "--only", "method=proda", "method=cocoop"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "# 198 runs"


def test_the_readmes_example_expands(tmp_path, monkeypatch, capsys):
    """experiments/README.md's example, as written there."""
    text = (EXPERIMENTS / "README.md").read_text()
    example = text.split("```toml\n")[1].split("```")[0]
    (tmp_path / "example.toml").write_text(example)
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["example.toml", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "# 4 runs"
    assert lines[0].split("train.py ")[1].startswith(
        "--method coop --data demo --backbone tiny --epochs 5 --seed 1 --set n_ctx=8  # runs/demo/coop/tiny/")
