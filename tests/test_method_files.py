"""What every method file states the same way: its training loss (`loss()`, defined by the method's own model
class, even when it is a cross-entropy)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import methods
from conftest import NAMES

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
