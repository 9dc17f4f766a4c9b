"""TaskRes on tiny random CLIPs: zero-shot CLIP at the start, the official base (ImageNet's templates, the enhanced
base's projection), counts, the official optimiser and schedule, learning the demo."""
import copy

import pytest
import torch

import clip_model
import coop
import methods
import taskres
import train
from conftest import NAMES, assert_learns, random_images, train_steps


@pytest.fixture(scope="module", params=["tiny", "tiny-rn"])
def clip(request):
    return clip_model.load(request.param)[0]


def images(clip, n=6, seed=0):
    return random_images(n, seed, clip.visual.input_resolution)


@torch.no_grad()
def test_zero_residual_is_zero_shot_clip(clip):
    model = taskres.build(clip, NAMES, taskres.Config(template="a photo of a {}, a shape.")).eval()
    zeroshot = coop.build(clip, NAMES, coop.Config(n_ctx=0, template="a photo of a {}, a shape.")).eval()
    x = images(clip)
    torch.testing.assert_close(model(x), zeroshot(x), rtol=0, atol=1e-4)
    assert model.residual.abs().sum() == 0
    model.residual.normal_()  # a residual moves it, by alpha
    assert not torch.allclose(model(x), zeroshot(x), atol=1e-2)


@torch.no_grad()
def test_imagenet_base_is_the_mean_of_eight_templates(clip):
    """The official base on ImageNet: the raw (un-normalised) text features of the template and the 7 others,
    averaged; on any other dataset the template's alone."""
    model = taskres.build(clip, NAMES, taskres.Config(dataset="ImageNet"))
    templates = ["a photo of a {}."] + taskres.IMAGENET_TEMPLATES
    raw = [clip.encode_text(clip_model.tokenize([t.format(n.replace("_", " ")) for n in NAMES])) for t in templates]
    torch.testing.assert_close(model.base, torch.stack(raw).mean(0), rtol=0, atol=1e-5)
    other = taskres.build(clip, NAMES, taskres.Config(dataset="DescribableTextures"))
    torch.testing.assert_close(other.base, raw[0], rtol=0, atol=1e-5)
    assert len(templates) == 8 and not torch.allclose(model.base, other.base, atol=1e-3)


@torch.no_grad()
def test_enhanced_base_encodes_with_the_files_projection(clip, tmp_path):
    D, E = clip.text_projection.shape
    weight = torch.randn(E, D, generator=torch.Generator().manual_seed(1)) * D ** -0.5  # an nn.Linear(D, E)'s
    torch.save({"state_dict": {"weight": weight}, "epoch": 200}, tmp_path / "model.pth.tar")
    model = taskres.build(clip, NAMES, taskres.Config(enhanced_base=str(tmp_path / "model.pth.tar")))
    enhanced = copy.deepcopy(clip)
    enhanced.text_projection.copy_(weight.t())  # the official code loads it into the text encoder the same way
    expected = enhanced.encode_text(clip_model.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    torch.testing.assert_close(model.base, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("content,message", [
    (None, "no such file"), ({"weight": 1}, "is not an official TaskRes enhanced base"),
    ({"state_dict": {"weight": torch.zeros(3, 5)}}, "projects (5, 3)")])
def test_bad_enhanced_base_files(tmp_path, content, message):
    clip = clip_model.load("tiny")[0]
    if content is not None:
        torch.save(content, tmp_path / "base.pth.tar")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        taskres.build(clip, NAMES, taskres.Config(enhanced_base=str(tmp_path / "base.pth.tar")))


@torch.no_grad()
def test_imagenet_test_sets_keep_the_imagenet_base():
    """The official DG evaluation scores ImageNet-V2/Sketch/A/R with the base trained on ImageNet (8 templates):
    a model built for one of them (train.py rebuilds it per target) has ImageNet's base."""
    clip = clip_model.load("tiny")[0]
    imagenet = taskres.build(clip, NAMES, taskres.Config(dataset="ImageNet")).base
    for target in ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"):
        assert torch.equal(taskres.build(clip, NAMES, taskres.Config(dataset=target)).base, imagenet)
    assert not torch.allclose(taskres.build(clip, NAMES, taskres.Config(dataset="Caltech101")).base, imagenet)


def test_parameter_count_at_the_paper_backbone():
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["RN50"])
    model = taskres.build(clip, [f"class {i}" for i in range(47)], taskres.Config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 47 * 1024  # DTD on RN50: C E


def test_training_moves_only_the_residual():
    clip = clip_model.load("tiny")[0]
    before = copy.deepcopy(clip.state_dict())
    model = taskres.build(clip, NAMES, taskres.Config())
    x, y = images(clip, 8), torch.arange(8) % len(NAMES)
    assert_learns(train_steps(model, x, y, lr=0.03), len(NAMES))
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["residual"]


@pytest.mark.usefixtures("random_weights_once")  # a paper backbone, built once per process
@pytest.mark.parametrize("shots,epochs", [(1, 100), (4, 100), (8, 200), (16, 200)])
@pytest.mark.slow
def test_official_schedule_by_shots(tmp_path, shots, epochs):
    r = train.run(methods.parse_args(["--method", "taskres", "--data", "demo", "--shots", str(shots), "--init",
                                      "random", "--dry-run", "--output", str(tmp_path)]))
    assert r["epochs"] == epochs and r["backbone"] == "RN50" and r["learned_params"] == 8 * 1024
    cfg = r["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["batch_size"], cfg["alpha"]) == ("adam", 0.002, 256, 0.5)


@pytest.mark.slow
def test_demo_learns_with_adam(tmp_path):
    """The CLI, the official optimiser: the checkpoint holds Adam's moments; accuracy above chance (12.5 %). (The
    demo's 128 images are half of one official batch: smaller batches and a larger lr give it 80 steps.)"""
    r = train.run(methods.parse_args(["--method", "taskres", "--data", "demo", "--backbone", "tiny", "--epochs", "20",
                                      "--batch-size", "32", "--lr", "0.05", "--output", str(tmp_path)]))
    assert r["history"][-1]["loss"] < 0.8 * r["history"][0]["loss"] and r["accuracy"]["test"] > 40
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    assert {"exp_avg", "exp_avg_sq"} <= state[0].keys()
