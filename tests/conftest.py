"""Shared helpers: tiny CLIP configurations and randomised weights (std 1/sqrt(fan-in): features differ by input),
the tiny CLIP fixture, class names and random images the method tests share; and how the suite runs: on every core
(pytest-xdist, one thread per worker) and in its quick tier (`-m quick`: every test not marked slow)."""
import copy
import math
import os
import sys

import pytest

# torch and clip_model are imported inside the functions below: pytest-xdist's controller process reads this file for
# its hooks but runs no test, and importing torch there would hold up the start of every run by about 4 s.

# CLIP constructor arguments (reference order); widths >= 128 so several heads are split and merged.
TINY_VIT = (64, 32, 2, 128, 8, 77, 49408, 128, 2, 2)
TINY_RN = (64, 64, (1, 2, 1, 1), 8, None, 77, 49408, 128, 2, 2)
B32_SHAPED = (512, 224, 2, 768, 32, 77, 49408, 512, 8, 2)        # ViT-B/32 widths, 2 layers per tower
RN50_SHAPED = (1024, 224, (1, 1, 1, 1), 64, None, 77, 49408, 512, 8, 2)  # RN50 widths, 1 block per stage
NAMES = ["red circle", "blue_stripes", "green checkerboard", "sea lion"]  # an underscore, words of several tokens


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without pytest-xdist (-p no:xdist), never called
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini) starts a worker per core, but the CUDA suite runs in one process: its tests share one
    GPU and measure its peak memory. None: pytest-xdist counts the cores."""
    selected = config.option.markexpr or ""
    if "cuda" in selected and "not cuda" not in selected:
        return 0
    return None


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """The quick tier, `python -m pytest -m quick`: every test but those marked slow (over about a second on a 2-core
    CPU, or a process of their own) and the CUDA suite."""
    for item in items:
        if not item.get_closest_marker("slow") and not item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.quick)


def pytest_configure(config):
    """In a pytest-xdist worker, torch computes on one thread, and so do the processes the tests start (train.py,
    torchrun, bench.py): with the workers already on every core, more threads only wait for each other (2 workers of
    2 threads each on 2 cores took 1.9x the time of one process)."""
    if hasattr(config, "workerinput"):
        import torch
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="module")
def clip():
    """The tiny random-weight CLIP (clip_model's `tiny`), one per test module."""
    import clip_model
    return clip_model.load("tiny")[0]


class ClosedPipe:
    """A stdout whose reader went away (`| head`), sys.stdout inside `with`: every write raises BrokenPipeError, as a
    closed pipe does. Its file descriptor is a file of its own, which a tool may point at /dev/null (never the test
    process's stdout)."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        self.stdout, sys.stdout = sys.stdout, self  # in the test's body: capsys sets sys.stdout when the test starts
        return self

    def __exit__(self, *exc):
        sys.stdout = self.stdout

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        return self.file.fileno()

    def goes_to_devnull(self):
        return os.path.samestat(os.fstat(self.fileno()), os.stat(os.devnull))


@pytest.fixture
def closed_stdout(tmp_path):
    """A ClosedPipe: `with closed_stdout: tool.main([...])`."""
    with open(tmp_path / "stdout", "w") as file:
        pipe = ClosedPipe(file)
        yield pipe


RANDOM_MODELS = {}  # (config, seed, options) -> the model clip_model.random_model built, for random_weights_once


@pytest.fixture
def random_weights_once(monkeypatch):
    """clip_model.random_model builds each (config, seed) once per test process and hands out copies: the dry runs
    that count a paper backbone's parameters build the same few full-size random CLIPs, each for seconds (RN50: most
    of it measuring its BatchNorm statistics). The weights are the same as a fresh build's (it is seeded), and each
    caller gets its own copy, so no test sees another's changes. Tests of random_model itself do not use this.
    Returns the real random_model."""
    import clip_model
    build = clip_model.random_model

    def once(config, seed, **options):
        key = (config, seed, tuple(sorted(options.items())))
        if key not in RANDOM_MODELS:
            RANDOM_MODELS[key] = build(config, seed, **options)
        return copy.deepcopy(RANDOM_MODELS[key])
    monkeypatch.setattr(clip_model, "random_model", once)
    return build


def random_images(n, seed=0, size=32):
    """n Gaussian images (n, 3, size, size), the same for the same seed."""
    import torch
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize(state_dict, seed=0):
    """Overwrite every floating tensor so that no LayerNorm/BatchNorm is an identity and no branch is
    zero (the reference init zeroes bn3): swapped or ignored keys then change the outputs."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point() or key == "logit_scale":
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        elif value.ndim >= 2:  # std 1/sqrt(fan-in): signals keep their scale through each layer
            # visual.proj and text_projection are (in, out), used as x @ proj; the others (out, in, ...)
            fan_in = value.shape[0] if key.endswith(("proj", "projection")) else value[0].numel()
            out[key] = torch.randn(value.shape, generator=g) * fan_in ** -0.5
        elif key.endswith(".weight"):  # LayerNorm / BatchNorm scales
            out[key] = 1 + 0.1 * torch.randn(value.shape, generator=g)
        else:  # biases, running means, the class embedding
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
    return out


def reference_clip(args, seed=0):
    """OpenAI's reference CLIP (clip-anytorch) with randomised weights, in eval mode, and its state dict.
    A ResNet's BatchNorm statistics are then measured on noise images (as clip_model.load does for random
    weights): at arbitrary statistics its features are the same for every image and the comparison is blind."""
    import clip.model
    import torch

    import clip_model
    torch.manual_seed(seed)
    model = clip.model.CLIP(*args)
    model.load_state_dict(randomize(model.state_dict(), seed))
    if isinstance(model.visual, clip.model.ModifiedResNet):
        clip_model.calibrate_batchnorm(model.visual, clip_model.noise_images(8, args[1]))
    return model.eval(), model.state_dict()


def train_steps(model, images, labels, lr, steps=30):
    """`steps` Adam steps on the model's learned parameters; the loss of each step. Adam moves each parameter by
    about `lr` a step whatever the scale of its gradient, which differs by orders of magnitude between the methods
    here (logit scale 100, prompts initialised at std 0.02): with SGD, learning rates that moved some methods in a few
    steps made others overshoot on their first step (issue 32)."""
    import torch
    import torch.nn.functional as F
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        model.train()
        logits = model(images)
        loss = model.loss(logits, labels, 0) if hasattr(model, "loss") else F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_learns(losses, classes, by=0.05):
    """A stable descent to below chance. No step's loss above the first: after a step that overshoots, where
    training ends depends on float rounding that differs between machines (VPT-CAVPT's test at SGD lr 0.5 ended at
    1.67 on one and 19.6 on another, one trajectory up to its 10th step). The last loss `by` under both the first and
    ln(classes), the cross-entropy of a uniform guess: a model that only flattens its logits stops at ln(classes), and
    a loss that adds non-negative terms to the cross-entropy (CAVPT's aux, ProDA's variance) is above it."""
    assert max(losses[1:]) < losses[0], f"a step rose above the first loss: {losses}"
    assert losses[-1] < min(losses[0], math.log(classes)) - by, losses
