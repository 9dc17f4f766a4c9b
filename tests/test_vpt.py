"""VPT-CLIP shallow / deep and VLP on a tiny random CLIP: identity, placement, counts, gradients, learning."""
import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip_model
import methods
import vpt
from conftest import NAMES, assert_learns, random_images, train_steps


def config(variant, **changes):
    return replace(vpt.Config(), **{**vpt.VARIANTS[variant], **changes})


@torch.no_grad()
@pytest.mark.parametrize("variant", ["vpt-shallow", "vpt"])
def test_no_prompt_tokens_is_zeroshot_clip(clip, variant):
    model = vpt.build(clip, NAMES, config(variant, n_tokens=0))
    expected = clip(random_images(5), clip_model.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    torch.testing.assert_close(model(random_images(5)), expected, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("deep", [False, True])
def test_prompt_position_in_the_sequence_does_not_matter(clip, deep):
    """The docstring's claim: prompts after the patches (ours) = prompts right after the class token."""
    model = vpt.build(clip, NAMES, config("vpt", deep=deep))
    model.visual_prompts.prompts.normal_(0, 1)
    visual, prompts, x = clip.visual, model.visual_prompts.prompts, clip.visual.embed(random_images(5))
    n = prompts.shape[1]
    for i, block in enumerate(visual.transformer.resblocks):
        if i < len(prompts):
            x = torch.cat([x[:, :1], prompts[i].expand(len(x), -1, -1), x[:, 1 + (n if i > 0 else 0):]], dim=1)
        x = block(x)
    torch.testing.assert_close(model.visual_prompts(visual, random_images(5)), visual.head(x), rtol=0, atol=1e-5)
    assert (visual.head(x) - clip.encode_image(random_images(5))).abs().max() > 1e-3  # prompts change the feature


def test_every_block_prompts_matter_when_deep(clip):
    model = vpt.build(clip, NAMES, config("vpt"))
    model.visual_prompts(clip.visual, random_images(5)).sum().backward()
    grad = model.visual_prompts.prompts.grad
    assert grad.shape == (2, 10, 128) and (grad.abs().sum((1, 2)) > 0).all()


@pytest.mark.parametrize("variant,count", [("vpt-shallow", 7_680), ("vpt", 92_160), ("vlp", 100_352)])
def test_parameter_counts_for_vit_b32(variant, count):
    """n x W per prompted block (1 or 12 blocks, 10 x 768), VLP adds 16 x 512."""
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["ViT-B/32"])
    model = vpt.build(clip, NAMES, config(variant))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def test_resnet_is_refused(clip):
    rn = clip_model.load("tiny-rn")[0]
    with pytest.raises(ValueError, match="use a ViT backbone"):
        vpt.build(rn, NAMES, config("vpt"))


def test_learning_rates_follow_the_official_configs():
    """vit_b32_shallow.yaml: lr 0.001; vit_b32_deep.yaml (VPT, and VLP's visual prompts): 0.01."""
    assert {v: replace(vpt.Config(), **vpt.VARIANTS[v]).lr for v in vpt.VARIANTS} == {
        "vpt-shallow": 0.001, "vpt": 0.01, "vlp": 0.01}


def test_vlp_has_two_learning_rates(clip):
    model = vpt.build(clip, NAMES, config("vlp"))
    groups = model.param_groups(model.cfg)
    assert [(g["lr"], g["warmup_epochs"]) for g in groups] == [(0.01, 10), (0.002, 1)]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_vlp_guidance_loss_in_its_first_epochs(clip):
    """The official VLP trainer's loss for epoch < PRETRAIN.C: CE(zero-shot image, learned text) + CE(prompted
    image, template text) + 0.1 CE(logits); afterwards CE(logits)."""
    model = vpt.build(clip, NAMES, config("vlp", guidance_epochs=3)).train()
    with torch.no_grad():
        model.visual_prompts.prompts.normal_(0, 1)
        model.text_context.ctx.normal_(0, 1)
    x, y = random_images(4), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    scale, text = clip.logit_scale.exp(), F.normalize(model.text_context(clip), dim=-1)
    to_learned_text = scale * F.normalize(clip.encode_image(x), dim=-1) @ text.t()
    image = F.normalize(model.visual_prompts(clip.visual, x), dim=-1)
    to_template = scale * image @ model.template_features.t()
    assert torch.equal(model.loss(logits, y, epoch=3), F.cross_entropy(logits, y))  # guidance over
    torch.testing.assert_close(model.loss(logits, y, epoch=2),
                               F.cross_entropy(to_learned_text, y) + F.cross_entropy(to_template, y)
                               + 0.1 * F.cross_entropy(logits, y))
    model.loss(logits.detach(), y, epoch=0).backward()  # the guidance terms alone train both prompt groups
    assert model.visual_prompts.prompts.grad.abs().sum() > 0 and model.text_context.ctx.grad.abs().sum() > 0
    default = vpt.build(clip, NAMES, config("vlp")).train()  # off by default (as cavpt.py)
    logits = default(x)
    assert torch.equal(default.loss(logits, y, epoch=0), F.cross_entropy(logits, y))


@torch.no_grad()
def test_images_do_not_interact(clip):
    model = vpt.build(clip, NAMES, config("vlp")).eval()
    model.visual_prompts.prompts.normal_(0, 1)
    x = random_images(4)
    torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(4)]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", list(vpt.VARIANTS))
def test_training_moves_only_prompts(clip, variant):
    clip = copy.deepcopy(clip)
    before = copy.deepcopy(clip.state_dict())
    torch.manual_seed(0)
    model = vpt.build(clip, NAMES, config(variant))
    x, y = random_images(8), torch.arange(8) % len(NAMES)
    assert_learns(train_steps(model, x, y, lr=0.001), len(NAMES))
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in clip.parameters())


def test_the_reproduction_commands_give_the_official_scripts_settings():
    """docs/reproducing.md's CAVPT block: the --set that switches to train_single.sh's values works for each method
    named."""
    commands = (Path(__file__).resolve().parent.parent / "docs" / "reproducing.md").read_text()
    assert "--epochs 60 and --set guidance_epochs=30 aux_weight=0.3 (cavpt, vpt-cavpt) or guidance_epochs=30 (vlp)" \
        in commands
    for method, settings in [("cavpt", ["guidance_epochs=30", "aux_weight=0.3"]),
                             ("vpt-cavpt", ["guidance_epochs=30", "aux_weight=0.3"]), ("vlp", ["guidance_epochs=30"])]:
        args = methods.parse_args(["--method", method, "--data", "demo", "--epochs", "60", "--set", *settings])
        _, cfg = methods.make_config(args)
        assert (cfg.epochs, cfg.guidance_epochs, getattr(cfg, "aux_weight", 0.3)) == (60, 30, 0.3)
