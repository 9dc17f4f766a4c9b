"""Linear-probe CLIP against the official lpclip/linear_probe.py's solver and search (scikit-learn, a test-only
reference), its counts, train.py's fit hook (fit, checkpoint, --eval-only, refused flags) and learning the demo."""
import copy
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression  # the official script's solver: a test-only reference

import clip_model
import data
import linear_probe
import methods
import train


def blobs(n, seed, classes=4, dim=16, spread=1.0):
    """Gaussian clusters, one per class: a task a linear classifier learns, with val/test errors to search on."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return (centres[y] + spread * torch.randn(n, dim, generator=g)).double(), y


def official_search(train, val, test, steps=8):
    """lpclip/linear_probe.py's search, as the script runs it (scikit-learn's lbfgs, max_iter 1000), on numpy
    arrays -> the c of every fit in order, the final c, the final classifier's test predictions."""
    def fit(c):
        clf = LogisticRegression(C=c, max_iter=1000).fit(*train)
        tried.append(c)
        return (clf.predict(val[0]) == val[1]).mean(), clf
    tried = []
    accuracies = [fit(c)[0] for c in [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]]
    peak = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6][int(np.argmax(accuracies))]
    left, right = 1e-1 * peak, 1e1 * peak
    for _ in range(steps):
        (acc_left, clf_left), (acc_right, clf_right) = fit(left), fit(right)
        if acc_left < acc_right:
            c, clf = right, clf_right
            left, right = 0.5 * (np.log10(right) + np.log10(left)), np.log10(right)
        else:
            c, clf = left, clf_left
            left, right = np.log10(left), 0.5 * (np.log10(right) + np.log10(left))
        left, right = np.power(10, left), np.power(10, right)
    return tried, c, clf.predict(test[0])


@pytest.mark.parametrize("c", [1e-4, 1e-2, 1.0, 1e2])
def test_fit_is_scikit_learns_logistic_regression(c):
    """The same objective, minimised as far (both stop at gradient 1e-4: at c = 100 both are 5 % above the exact
    minimum and their weights differ by 0.2, the probabilities by 0.05), the same predictions."""
    x, y = blobs(40, seed=1)
    test_x, _ = blobs(200, seed=2)
    W, b = linear_probe.logistic_regression(x, y, 4, c)
    clf = LogisticRegression(C=c, max_iter=1000).fit(x.numpy(), y.numpy())

    def objective(W, b):  # scikit-learn's, divided by c n: mean cross-entropy + |W|^2 / (2 c n)
        return torch.nn.functional.cross_entropy(x @ W.T + b, y).item() + (W ** 2).sum().item() / (2 * c * len(x))
    theirs = objective(torch.tensor(clf.coef_), torch.tensor(clf.intercept_))
    assert objective(W, b) == pytest.approx(theirs, rel=1e-3)
    ours = torch.softmax(test_x @ W.T + b, -1).numpy()
    assert (ours.argmax(1) == clf.predict(test_x.numpy())).all()
    if c <= 1:  # converged well within the tolerance: the same classifier
        np.testing.assert_allclose(ours, clf.predict_proba(test_x.numpy()), rtol=0, atol=1e-2 if c == 1 else 1e-4)


def test_search_follows_the_official_script():
    """The same 23 values of c in the same order, the same answer, the same test predictions (scikit-learn fits
    standing in for the script's)."""
    train_set, val, test = blobs(32, seed=3, spread=2.0), blobs(16, seed=4, spread=2.0), blobs(200, seed=5, spread=2.0)
    c, (W, b), tried = linear_probe.search_c(train_set, val, 4, steps=8)
    numpy = [tuple(t.numpy() for t in split) for split in (train_set, val, test)]
    official_tried, official_c, official_predictions = official_search(*numpy)
    assert len(tried) == 7 + 2 * 8 == len(official_tried)
    np.testing.assert_allclose([t[0] for t in tried], official_tried, rtol=1e-12)
    assert c == pytest.approx(official_c, rel=1e-12)
    assert len({a for _, a in tried}) > 1  # the validation accuracy varies over c: the search had a choice
    assert ((test[0] @ W.T + b).argmax(-1).numpy() == official_predictions).all()


def test_search_keeps_the_first_best_and_the_left_end_on_ties():
    """With every fit equally good: the first coarse value (1e6), then the left end at every step (1e5)."""
    x, y = blobs(8, seed=6, spread=0.01)  # separable at any c: every val accuracy 100 %
    c, _, tried = linear_probe.search_c((x, y), (x, y), 4, steps=3, max_iter=5)
    assert [round(math.log10(t[0]), 6) for t in tried[7:]] == [5, 7, 5, 6, 5, 5.5]
    assert c == pytest.approx(1e5)


def test_parameter_count_at_the_paper_backbone():
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["RN50"])
    model = linear_probe.build(clip, [f"class {i}" for i in range(1000)], linear_probe.Config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1000 * 1024 + 1000  # ImageNet, RN50


def test_fit_moves_only_the_classifier_and_learns():
    clip = clip_model.load("tiny")[0]
    before = copy.deepcopy(clip.state_dict())
    model = linear_probe.build(clip, ["a", "b", "c", "d"], linear_probe.Config(c_weight=1.0))
    x, y = blobs(24, seed=7, dim=clip.text_projection.shape[1])
    fitted = model.fit(lambda split: (x, y))
    assert fitted["c_weight"] == 1.0 and fitted["train_accuracy"] == 100 and fitted["searched"] == []
    assert (model(features=x).argmax(-1) == y).all() and model.weight.abs().sum() > 0
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())


def test_a_search_without_validation_images_is_a_clear_error():
    model = linear_probe.build(clip_model.load("tiny")[0], ["a", "b"], linear_probe.Config())
    x, y = blobs(4, seed=8, classes=2, dim=64)
    with pytest.raises(ValueError, match="needs validation images .* --set c_weight=VALUE"):
        model.fit(lambda split: (x, y) if split == "train" else (x[:0], y[:0]))


@pytest.mark.slow
def test_demo_fits_writes_a_checkpoint_and_evaluates_it(tmp_path):
    """The CLI: fitted (no epochs), well above chance (12.5 %), a checkpoint that --eval-only scores the same."""
    r = train.run(methods.parse_args(["--method", "linear-probe", "--data", "demo", "--backbone", "tiny", "--shots",
                                      "4", "--output", str(tmp_path / "fit")]))
    assert r["epochs"] == 0 and r["history"] == [] and r["learned_params"] == 8 * 64 + 8  # C E + C, tiny: E = 64
    assert len(r["fit"]["searched"]) == 23 and r["fit"]["c_weight"] > 0 and r["accuracy"]["test"] > 50
    assert "fitted, no SGD epochs" in (tmp_path / "fit" / "log.txt").read_text().splitlines()[0]
    again = train.run(methods.parse_args(["--method", "linear-probe", "--data", "demo", "--backbone", "tiny",
                                          "--eval-only", "--checkpoint", str(tmp_path / "fit" / "checkpoint.pt"),
                                          "--output", str(tmp_path / "eval")]))
    assert again["accuracy"] == r["accuracy"] and "fit" not in again


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "5"], "--epochs: linear-probe is fitted on the frozen features, not trained in SGD epochs"),
    (["--lr", "0.1"], "--lr: linear-probe is fitted"),
    (["--cache-features", "2"], "--cache-features: linear-probe is fitted once on un-augmented features"),
    (["--protocol", "base2new"], "linear-probe with this config learns class-specific parameters"),
    (["--set", "c_weight=-1"], "linear-probe: c_weight=-1.0: must be 0 (search it) or more")])
def test_flags_a_fitted_method_cannot_use(tmp_path, capsys, flags, message):
    argv = ["--method", "linear-probe", "--data", "demo", "--backbone", "tiny", "--output", str(tmp_path / "o"), *flags]
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_encode_gives_un_augmented_and_augmented_views():
    """train.py's `encode` for fit(): the un-augmented features equal the evaluation transform's; view v is the
    augmentation epoch v draws (the same twice, different between views)."""
    args = methods.parse_args(["--method", "linear-probe", "--data", "demo", "--backbone", "tiny", "--shots", "1"])
    module, cfg = methods.make_config(args)
    runner = train.Runner(args, module, cfg, data.make_task("demo", shots=1))
    plain, labels = runner.encode_split("train")
    views, same_labels = runner.encode_split("train", views=2)
    assert plain.shape == (8, 64) and views.shape == (2, 8, 64) and torch.equal(labels, same_labels)
    images = torch.stack([clip_model.transform(runner.preprocessing)(data.Image.open(p)) for p, _ in runner.task.train])
    torch.testing.assert_close(plain, runner.clip.encode_image(images), rtol=0, atol=1e-5)
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[0], plain)
    torch.testing.assert_close(runner.encode_split("train", views=1)[0][0], views[0], rtol=0, atol=0)
