"""What every method file states the same way: its training loss (`loss()`, defined by the method's own model
class, even when it is a cross-entropy); and every variant builds, steps and evaluates on the tiny CLIP."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import methods
import train
from conftest import NAMES, random_images

# variants whose loss is the plain cross-entropy at their defaults (the others add terms from the last forward:
# CAVPT's aux classifiers, DUAL-PT's L_LLM, ProDA's variance and orthogonality)
CROSS_ENTROPY = ["coop", "cocoop", "vpt-shallow", "vpt", "vlp", "mudpt", "ivlp", "maple", "plot", "bias_tuning",
                 "taskres", "clip-adapter", "tip-adapter-f"]
# in TRAINED (its Config has epochs) but nothing to learn: train.py runs no epochs for it, so it needs no loss
NOTHING_LEARNED = ["zeroshot"]


def build(clip, method):
    module, changes = methods.METHODS[method]
    return module.build(clip, NAMES, dataclasses.replace(module.Config(), **changes))


def test_the_lists_cover_every_trained_variant():
    assert set(CROSS_ENTROPY) | set(NOTHING_LEARNED) <= set(methods.TRAINED)
    assert "linear-probe" not in methods.TRAINED and "tip-adapter" not in methods.TRAINED  # fitted only


@pytest.mark.parametrize("method", methods.TRAINED)
def test_every_trained_model_states_its_loss(clip, method):
    model = build(clip, method)
    learned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method in NOTHING_LEARNED:
        assert learned == 0
        return
    assert learned > 0
    assert "loss" in type(model).__dict__, f"{method}: {type(model).__name__} does not define loss()"


@pytest.mark.parametrize("method", CROSS_ENTROPY)
def test_a_cross_entropy_loss_is_train_py_s_former_default(clip, method):
    """Exactly F.cross_entropy on fp32 logits, what train.py took for a model without loss() before every method
    stated its own: numbers do not move."""
    model = build(clip, method).train()
    labels = torch.tensor([0, 3, 1, 1, 2])
    uniform = torch.zeros(5, len(NAMES))
    assert model.loss(uniform, labels, 0).item() == pytest.approx(math.log(len(NAMES)), rel=1e-6)  # ln C
    logits = torch.randn(5, len(NAMES), generator=torch.Generator().manual_seed(0)) * 10
    assert torch.equal(model.loss(logits, labels, 0), F.cross_entropy(logits, labels))
    half = logits.bfloat16()  # autocast's logits: the loss is still an fp32 softmax
    loss = model.loss(half, labels, 0)
    assert loss.dtype == torch.float32 and torch.equal(loss, F.cross_entropy(half.float(), labels))
    by_hand = -(logits.log_softmax(-1)[torch.arange(5), labels]).mean()
    torch.testing.assert_close(model.loss(logits, labels, 0), by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_variant_builds_steps_and_evaluates(clip, method):
    """The quick tier's smoke test of each method file, as train.py drives it: built from its CLI variant, fitted
    when it fits, one step of the optimizer train.py builds from its Config, then one evaluation. The step moves every
    learned tensor; the evaluation gives finite (B, C) logits, and other ones than before the step."""
    module, cfg = methods.make_config(methods.parse_args(["--method", method, "--backbone", "tiny", "--shots", "2"]))
    torch.manual_seed(0)
    model = module.build(clip, NAMES, methods.for_data(cfg, "a photo of a {}.", "demo"))
    images, labels = random_images(8, seed=1), torch.arange(8) % len(NAMES)  # 2 shots of each class
    if hasattr(model, "fit"):  # on the frozen features of a stand-in split, un-augmented or in `views` copies
        def encode(split, views=0):
            with torch.no_grad():
                feats = model.frozen_features(images)
            return (feats.expand(views, *feats.shape) if views else feats), labels
        model.fit(encode, trained=False)
    model.eval()
    with torch.no_grad():
        before = model(images)
    learned = [p for p in model.parameters() if p.requires_grad]
    steps = method in methods.TRAINED and bool(learned)  # zeroshot learns nothing; fitted-only methods take no step
    if steps:
        groups = model.param_groups(cfg) if hasattr(model, "param_groups") else [{"params": learned}]
        optimizer = train.OPTIMIZERS[getattr(cfg, "optimizer", "sgd")](groups, lr=cfg.lr)
        start = [p.detach().clone() for p in learned]
        model.train()
        loss = model.loss(model(images), labels, 0)
        optimizer.zero_grad()
        loss.backward()
        # (not every tensor has a gradient yet: CoDUAL-PT's meta-net starts with a zero last layer)
        assert math.isfinite(loss.item()) and any(p.grad is not None and p.grad.any() for p in learned)
        optimizer.step()
        assert all(not torch.equal(p, p0) for p, p0 in zip(learned, start))
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (8, len(NAMES)) and torch.isfinite(logits).all()
    if steps:
        assert not torch.equal(logits, before)
