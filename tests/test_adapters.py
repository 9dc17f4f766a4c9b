"""CLIP-Adapter, Tip-Adapter and Tip-Adapter-F on tiny random CLIPs: the formulas by hand, zero-shot CLIP at
alpha 0 / ratio 0, the cache against a direct computation from the augmented images, the official search, counts,
the CLI (fitted runs, checkpoints, --eval-only, resume) and learning."""
import copy

import pytest
import torch
import torch.nn.functional as F

import clip_adapter
import clip_model
import coop
import data
import methods
import tip_adapter
import train
from conftest import NAMES, assert_learns, random_images, train_steps

OPENAI_32 = clip_model.Preprocessing(32)  # the tiny models' preprocessing: OpenAI's at 32 px


def zero_shot(clip, template="a photo of a {}."):
    return coop.build(clip, NAMES, coop.Config(n_ctx=0, template=template)).eval()


# ---- CLIP-Adapter ----

@torch.no_grad()
def test_clip_adapter_mixes_the_adapted_feature(clip):
    torch.manual_seed(0)
    model = clip_adapter.build(clip, NAMES, clip_adapter.Config()).eval()
    x = random_images(6)
    f = clip.encode_image(x)
    W1, W2 = model.adapter[0].weight, model.adapter[2].weight  # (E/4, E), (E, E/4)
    mixed = 0.2 * F.relu(F.relu(f @ W1.t()) @ W2.t()) + 0.8 * f
    text = F.normalize(clip.encode_text(clip_model.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])),
                       dim=-1)
    torch.testing.assert_close(model(x), clip.logit_scale.exp() * F.normalize(mixed, dim=-1) @ text.t(),
                               rtol=0, atol=1e-5)
    assert W1.shape == (16, 64) and model.adapter[0].bias is None  # E / 4, no biases (tiny: E = 64)
    off = clip_adapter.build(clip, NAMES, clip_adapter.Config(ratio=0.0)).eval()
    torch.testing.assert_close(off(x), zero_shot(clip)(x), rtol=0, atol=1e-5)  # ratio 0: zero-shot CLIP


def test_clip_adapter_learns_and_moves_only_the_adapter(clip):
    clip = copy.deepcopy(clip)
    before = copy.deepcopy(clip.state_dict())
    torch.manual_seed(0)
    model = clip_adapter.build(clip, NAMES, clip_adapter.Config())
    x, y = random_images(8, seed=1), torch.arange(8) % len(NAMES)
    assert_learns(train_steps(model, x, y, lr=0.03), len(NAMES))
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["adapter.0.weight", "adapter.2.weight"]


# ---- Tip-Adapter ----

def cache_encode(x, y, val=None):
    """An `encode` for fit(): the same features for every view (enough to test what fit does with them)."""
    def encode(split, views=0):
        features, labels = (x, y) if split == "train" else val
        return (features.expand(views, -1, -1) if views else features), labels
    return encode


@torch.no_grad()
def test_tip_logits_are_the_official_formula_and_alpha_0_is_zero_shot(clip):
    model = tip_adapter.build(clip, NAMES, tip_adapter.Config(shots=2, search=False)).eval()
    cache_x = F.normalize(clip.encode_image(random_images(8, seed=2)), dim=-1)
    y = torch.arange(8) % 4
    model.fit(cache_encode(cache_x, y))
    assert (model.alpha.item(), model.beta.item()) == pytest.approx((1.17, 1.0))  # ImageNet's, for an unknown dataset
    x = random_images(6)
    f = F.normalize(clip.encode_image(x), dim=-1)
    text = F.normalize(clip.encode_text(clip_model.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])),
                       dim=-1)
    vote = torch.exp(-1.0 * (1 - f @ cache_x.t())) @ F.one_hot(y, 4).float()  # beta 1
    expected = clip.logit_scale.exp() * f @ text.t() + 1.17 * vote
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    off = tip_adapter.build(clip, NAMES, tip_adapter.Config(shots=2, search=False, alpha=0.0)).eval()
    off.fit(cache_encode(cache_x, y))
    torch.testing.assert_close(off(x), zero_shot(clip)(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_tip_imagenet_classifier_is_the_seven_templates(clip):
    model = tip_adapter.build(clip, NAMES, tip_adapter.Config(dataset="ImageNetV2"))
    features = [clip.encode_text(clip_model.tokenize([t.format(n.replace("_", " ")) for n in NAMES]))
                for t in tip_adapter.IMAGENET_TEMPLATES]
    features = [F.normalize(t, dim=-1) for t in features]  # each template normalised, averaged, normalised again
    torch.testing.assert_close(model.text, F.normalize(torch.stack(features).mean(0), dim=-1), rtol=0, atol=1e-6)
    assert len(tip_adapter.IMAGENET_TEMPLATES) == 7 and model.alpha.item() == pytest.approx(1.17)
    flowers = tip_adapter.build(clip, NAMES, tip_adapter.Config(dataset="OxfordFlowers"))
    assert (flowers.alpha.item(), flowers.beta_max, flowers.alpha_max) == (10.0, 50, 50)


def official_search(model, f, labels):
    """utils.py's search_hp as written: beta outer, alpha inner, a new best only when strictly better, from 0."""
    best_acc, best = 0.0, (model.alpha.item(), model.beta.item())
    for beta in [i * (model.beta_max - 0.1) / 200 + 0.1 for i in range(200)]:
        for alpha in [i * (model.alpha_max - 0.1) / 20 + 0.1 for i in range(20)]:
            logits = model.logits(f, alpha, beta)
            acc = 100 * (logits.argmax(-1) == labels).float().mean().item()
            if acc > best_acc:
                best_acc, best = acc, (alpha, beta)
    return best, best_acc


@torch.no_grad()
def test_tip_search_is_the_official_one(clip):
    model = tip_adapter.build(clip, NAMES, tip_adapter.Config(shots=2, dataset="DescribableTextures"))
    g = torch.Generator().manual_seed(3)
    keys = F.normalize(torch.randn(8, 64, generator=g), dim=-1)
    val = F.normalize(keys.repeat(3, 1) + 0.9 * torch.randn(24, 64, generator=g), dim=-1)  # noisy copies
    y = torch.arange(8) % 4
    fitted = model.fit(cache_encode(keys, y, (val, y.repeat(3))))
    (alpha, beta), accuracy = official_search(model, val, y.repeat(3))
    assert fitted["alpha"] == pytest.approx(alpha) and fitted["beta"] == pytest.approx(beta)
    assert fitted["val_accuracy"] == pytest.approx(accuracy) and 25 < accuracy < 100  # a search with a choice
    assert (model.alpha.item(), model.beta.item()) == pytest.approx((alpha, beta))
    assert tip_adapter.search_grid(13, 200)[:2] == pytest.approx([0.1, 0.1 + 12.9 / 200])  # DTD's beta grid


def test_cache_is_the_mean_of_the_augmented_views(tmp_path):
    """Through train.py: the keys equal the normalised mean of the features of 3 augmentations drawn as epochs 0-2
    would, each encoded here directly; the values are the one-hot labels."""
    args = methods.parse_args(["--method", "tip-adapter", "--data", "demo", "--backbone", "tiny", "--shots", "1",
                               "--set", "augment_views=3", "search=false"])
    module, cfg = methods.make_config(args)
    task = data.make_task("demo", shots=1)
    runner = train.Runner(args, module, cfg, task)
    runner.model.fit(runner.encode_split)
    views = []
    for v in range(3):
        dataset = data.ImageDataset(task.train, data.train_transform(OPENAI_32), seed=train.epoch_seed(1, v))
        batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
        with torch.no_grad():
            views.append(runner.clip.encode_image(batch))  # raw: the official code averages, then normalises
    torch.testing.assert_close(runner.model.keys, F.normalize(torch.stack(views).mean(0), dim=-1), rtol=0, atol=1e-5)
    assert not torch.allclose(views[0], views[1])  # the views differ
    labels = torch.tensor([y for _, y in task.train])
    assert torch.equal(runner.model.values, F.one_hot(labels, 8).float())


@pytest.mark.usefixtures("random_weights_once")  # a paper backbone, built once per process
@pytest.mark.parametrize("method,count", [("tip-adapter-f", 4 * 8 * 1024), ("tip-adapter", 0),
                                          ("clip-adapter", 524_288)])
@pytest.mark.slow
def test_counts_at_rn50(tmp_path, method, count):
    """Tip-Adapter-F: shots x classes x E = 4 x 8 x 1024 = 32,768; CLIP-Adapter: 2 x 1024 x 256 = 524,288."""
    r = train.run(methods.parse_args(["--method", method, "--data", "demo", "--shots", "4", "--init", "random",
                                      "--dry-run", "--output", str(tmp_path)]))
    assert r["backbone"] == "RN50" and r["learned_params"] == count


def test_tip_adapter_fits_without_epochs_and_its_checkpoint_evaluates(tmp_path):
    r = train.run(methods.parse_args(["--method", "tip-adapter", "--data", "demo", "--backbone", "tiny", "--shots", "4",
                                      "--output", str(tmp_path / "fit")]))
    assert r["epochs"] == 0 and r["history"] == [] and r["learned_params"] == 0
    assert r["accuracy"]["test"] > 40 and r["fit"]["val_accuracy"] > 40  # chance: 12.5 %
    assert "fitted, no SGD epochs" in (tmp_path / "fit" / "log.txt").read_text().splitlines()[0]
    saved = torch.load(tmp_path / "fit" / "checkpoint.pt", weights_only=True)["learned"]
    assert sorted(saved) == ["alpha", "beta", "keys", "values"] and saved["alpha"] == r["fit"]["alpha"]
    again = train.run(methods.parse_args(["--method", "tip-adapter", "--data", "demo", "--backbone", "tiny",
                                          "--eval-only", "--checkpoint", str(tmp_path / "fit" / "checkpoint.pt"),
                                          "--output", str(tmp_path / "eval")]))
    assert again["accuracy"] == r["accuracy"]


@pytest.mark.slow
def test_tip_adapter_f_trains_the_keys_with_adamw_then_searches(tmp_path):
    args = ["--method", "tip-adapter-f", "--data", "demo", "--backbone", "tiny", "--shots", "4", "--epochs", "3",
            "--batch-size", "8", "--lr", "0.01"]
    r = train.run(methods.parse_args(args + ["--output", str(tmp_path / "whole")]))
    log = (tmp_path / "whole" / "log.txt").read_text()
    assert "fitted, then 3 epochs" in log and "fitted: alpha 1.17  beta 1" in log  # trains at the initial pair
    assert "fitted after training: alpha" in log and r["fit"]["val_accuracy"] > 0
    ckpt = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["eps"] == 1e-4 and "exp_avg" in ckpt["optimizer"]["state"][0]
    assert ckpt["learned"]["alpha"] == r["fit"]["alpha"]  # the searched pair is what the checkpoint evaluates
    train.run(methods.parse_args(args[:-5] + ["1", "--batch-size", "8", "--lr", "0.01", "--output",
                                            str(tmp_path / "part")]))
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)  # after 1 of 3 epochs...
    assert part["epoch"] == 1
    part["config"]["epochs"] = 3  # as a killed run's: alpha and beta still the initial pair, searched at the end
    part["learned"].update(alpha=torch.tensor(1.17), beta=torch.tensor(1.0))
    torch.save(part, tmp_path / "part" / "checkpoint.pt")
    resumed = train.run(methods.parse_args(args + ["--output", str(tmp_path / "part"), "--resume"]))
    assert resumed["accuracy"] == r["accuracy"] and resumed["fit"] == r["fit"]


def test_tip_adapter_needs_shots(tmp_path, capsys):
    argv = ["--method", "tip-adapter", "--data", "demo", "--backbone", "tiny", "--shots", "0",
            "--output", str(tmp_path / "o")]
    assert train.main(argv) == 2
    assert "tip-adapter: shots=0: must be 1 or more: the cache holds shots x classes images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--epochs", "3"], ["--set", "epochs=3"], ["--lr", "0.1"]])
def test_training_free_tip_adapter_refuses_training_flags(tmp_path, capsys, flags):
    argv = ["--method", "tip-adapter", "--data", "demo", "--backbone", "tiny", *flags, "--output", str(tmp_path / "o")]
    assert train.main(argv) == 2
    assert "tip-adapter is fitted on the frozen features, not trained in SGD epochs" in capsys.readouterr().err


def test_set_parses_a_field_that_may_be_none():
    """Tip-Adapter's alpha is `float | None` (None: the dataset's): --set reads a number or none by the annotation
    (before, the text passed through as a string and skipped the finiteness check)."""
    def alpha(text):
        args = methods.parse_args(["--method", "tip-adapter", "--data", "demo", "--set", f"alpha={text}"])
        return methods.make_config(args)[1].alpha
    assert alpha("1.5") == 1.5 and type(alpha("3")) is float and alpha("none") is None and alpha("None") is None
    with pytest.raises(methods.UserError, match=r"--set alpha=abc: expected a float or none"):
        alpha("abc")
    with pytest.raises(methods.UserError, match=r"tip-adapter: alpha=nan: must be a finite number"):
        alpha("nan")
    with pytest.raises(methods.UserError, match=r"alpha=-1.0: must be a finite number, 0 or more, or none"):
        alpha("-1")  # the old spelling of "the dataset's": refused, not taken as a weight of -1
