"""CAVPT / DPT on a tiny random CLIP: counts, the top-K pick, the generator's equations, the aux loss,
gradients, learning, parameter groups."""
import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import cavpt
import clip_model
from conftest import assert_learns, random_images, train_steps

NAMES = ["red circle", "blue_stripes", "green checkerboard", "sea lion", "oak tree", "tabby cat"]


def config(variant, **changes):
    return replace(cavpt.Config(), **{**cavpt.VARIANTS[variant], **changes})


def learned(model):
    return [p for p in model.parameters() if p.requires_grad]


def shake(model, seed=0):
    """Larger random prompts and tokens than the N(0, 0.02) init, so that every path moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learned(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("variant,classes,count", [("vpt-cavpt", 47, 1_164_288), ("cavpt", 47, 1_172_480),
                                                   ("vpt-cavpt", 10, 1_128_192 + 768 * 10),
                                                   ("cavpt", 100, 1_128_192 + 768 * 100 + 8_192)])
def test_parameter_counts_for_vit_b32(variant, classes, count):
    """VPT 11·10·768 + meta-net 393,984 + attention 638,976 + LayerNorms 3,072 + tokens 7,680
    + aux classifier 768·C (+ CoOp 16·512); the official code's trainable set (ctx_learner, extractor,
    prompt_learner) is the same."""
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["ViT-B/32"])
    model = cavpt.build(clip, [f"c{i}" for i in range(classes)], config(variant))
    assert sum(p.numel() for p in learned(model)) == count


def test_bottom_limit_moves_blocks_from_vpt_to_class_aware():
    with torch.device("meta"):
        clip = clip_model.CLIP(*clip_model.CONFIGS["ViT-B/32"])
    model = cavpt.build(clip, NAMES, config("vpt-cavpt", bottom_limit=8))
    assert model.visual_prompts.prompts.shape == (7, 10, 768) and len(model.visual_prompts.generators) == 5
    assert sum(p.numel() for p in learned(model)) == 7 * 7_680 + 5 * (1_043_712 + 768 * len(NAMES))


@torch.no_grad()
@pytest.mark.parametrize("k,expected_k", [(3, 3), (100, len(NAMES))])
def test_top_k_is_the_zero_shot_pick(clip, k, expected_k):
    template = "{} texture."  # not the default: the pick must use the dataset's template
    model = cavpt.build(clip, NAMES, config("cavpt", top_k=k, template=template)).train()
    shake(model)
    x = random_images(6)
    model(x)
    tokens = clip_model.tokenize([template.format(n.replace("_", " ")) for n in NAMES])
    text = F.normalize(clip.encode_text(tokens), dim=-1)
    zeroshot = F.normalize(clip.encode_image(x), dim=-1) @ text.t()
    assert torch.equal(model.topk, zeroshot.topk(expected_k, dim=-1).indices)
    assert model.aux_logits.shape == (6, 1, expected_k, len(NAMES))


@torch.no_grad()
@pytest.mark.parametrize("variant", list(cavpt.VARIANTS))
def test_forward_follows_the_spec_equations(clip, variant):
    """Block 0: VPT prompts; block 1 (the last, b = 12 capped at L = 2): K class-aware prompts
    p = LN2(((softmax(Q0 A_q (KV A_k)^T / sqrt 32)) KV) A_v + Q0), Q0 = meta_net(text[top-K])."""
    model = cavpt.build(clip, NAMES, config(variant, top_k=3)).eval()
    shake(model)
    x, visual, g = random_images(4), clip.visual, model.visual_prompts.generators[0]
    text = model.text_context(clip) if variant == "cavpt" else model.template_text  # unnormalised features
    tokens = visual.embed(x)
    tokens = visual.transformer.resblocks[0](torch.cat([tokens, model.visual_prompts.prompts[0].expand(4, -1, -1)], 1))
    tokens = tokens[:, :tokens.shape[1] - 10]
    query = text[_topk(clip, model, x)] @ g.meta_net.weight.t() + g.meta_net.bias
    kv = torch.cat([tokens, g.tokens.expand(4, -1, -1)], 1)
    attn = ((query @ g.q_proj.weight.t()) @ (kv @ g.k_proj.weight.t()).transpose(1, 2) / math.sqrt(32)).softmax(-1)
    out = (attn @ kv) @ g.v_proj.weight.t()
    prompts = F.layer_norm(out + query, (128,), g.ln_prompts.weight, g.ln_prompts.bias)
    image = visual.head(visual.transformer.resblocks[1](torch.cat([tokens, prompts], 1)))
    expected = clip.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    aux = F.layer_norm(out, (128,), g.ln_logits.weight, g.ln_logits.bias) @ g.classifier.weight.t()
    torch.testing.assert_close(model.aux_logits[:, 0], aux, rtol=0, atol=1e-5)
    assert (expected - clip(x, clip_model.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
            ).abs().max() > 1e-3


def _topk(clip, model, x):
    return (F.normalize(clip.encode_image(x), dim=-1) @ model.template_features.t()).topk(model.K).indices


@torch.no_grad()
def test_images_do_not_interact(clip):
    model = cavpt.build(clip, NAMES, config("cavpt", top_k=3)).eval()
    shake(model)
    x = random_images(4)
    torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(4)]), rtol=0, atol=1e-5)
    assert model.cached is not None and model.train().cached is None  # cached while evaluating only


def aux_term(model, logits, labels):
    """The aux part of Eq. 12: the method's loss minus CE(logits)."""
    return model.loss(logits, labels, epoch=0) - F.cross_entropy(logits, labels)


def test_aux_loss_is_ce_at_the_true_class_slot(clip):
    model = cavpt.build(clip, NAMES, config("cavpt", top_k=2)).train()
    shake(model)
    x = random_images(3)
    logits = model(x)
    top, aux = model.topk, model.aux_logits.detach()  # (3, 2), (3, 1, 2, 6)
    outside = next(c for c in range(len(NAMES)) if c not in top[2])
    labels = torch.tensor([int(top[0, 0]), int(top[1, 1]), outside])  # slot 0, slot 1, not among the top K
    by_hand = -(aux[0, 0, 0].log_softmax(-1)[labels[0]] + aux[1, 0, 1].log_softmax(-1)[labels[1]]) / 2
    torch.testing.assert_close(aux_term(model, logits, labels), by_hand, rtol=1e-6, atol=0)
    assert by_hand > 0.1
    model.cfg = replace(model.cfg, aux_weight=0.3)
    torch.testing.assert_close(aux_term(model, logits, labels), 0.3 * by_hand, rtol=1e-6, atol=0)
    nowhere = torch.tensor([next(c for c in range(len(NAMES)) if c not in top[b]) for b in range(3)])
    assert torch.equal(model.loss(logits, nowhere, 0), F.cross_entropy(logits, nowhere))  # no label in top K
    model.cfg = replace(model.cfg, aux_weight=0.0)  # the paper's "w/o loss"
    assert torch.equal(model.loss(logits, labels, 0), F.cross_entropy(logits, labels))


def test_aux_loss_averages_over_class_aware_blocks(clip):
    model = cavpt.build(clip, NAMES, config("vpt-cavpt", top_k=3, bottom_limit=1)).train()  # both blocks
    shake(model)
    logits = model(random_images(2))
    labels = model.topk[:, 2].clone()  # the third most likely class of each image
    aux = model.aux_logits.detach()  # (2, 2 blocks, 3, 6)
    by_hand = -torch.stack([aux[b, j, 2].log_softmax(-1)[labels[b]] for b in range(2) for j in range(2)]).mean()
    torch.testing.assert_close(aux_term(model, logits, labels), by_hand, rtol=1e-6, atol=0)


def test_guidance_loss_in_its_first_epochs(clip):
    model = cavpt.build(clip, NAMES, config("cavpt", top_k=2, guidance_epochs=3, aux_weight=0.0)).train()
    shake(model)
    x, y = random_images(4), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    scale, text = clip.logit_scale.exp(), F.normalize(model.text_context(clip), dim=-1)
    to_learned_text = scale * F.normalize(clip.encode_image(x), dim=-1) @ text.t()
    image = model.visual_prompts(clip.visual, x, model.text_context(clip)[model.topk])[0]
    to_template = scale * F.normalize(image, dim=-1) @ model.template_features.t()

    def ce(logits):
        return F.cross_entropy(logits, y)
    torch.testing.assert_close(model.loss(logits, y, epoch=2), ce(to_learned_text) + ce(to_template) + 0.1 * ce(logits))
    assert torch.equal(model.loss(logits, y, epoch=3), ce(logits))  # guidance over


def test_gradients_reach_only_learned_parameters(clip):
    clip = copy.deepcopy(clip)
    seen = []
    clip.visual.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))  # the zero-shot pass only
    model = cavpt.build(clip, NAMES, config("cavpt", top_k=3)).train()
    x = random_images(6)
    logits = model(x)
    labels = model.topk[:, 0]  # every image's label is among its top K: the aux loss is on
    model.loss(logits.detach(), labels, epoch=0).backward()  # the aux term's gradients alone
    assert seen == [False]
    assert model.visual_prompts.prompts.grad is None  # keys and values are detached: the aux loss stops there
    assert model.text_context.ctx.grad.abs().sum() > 0  # through the queries (learned text features)
    model.loss(model(x), labels, epoch=0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned(model))
    assert all(p.grad is None for p in clip.parameters())


@pytest.mark.parametrize("variant", list(cavpt.VARIANTS))
def test_training_lowers_the_loss_and_moves_only_prompts(clip, variant):
    clip = copy.deepcopy(clip)
    before = copy.deepcopy(clip.state_dict())
    torch.manual_seed(0)
    model = cavpt.build(clip, NAMES, config(variant, top_k=3))
    x, y = random_images(12), torch.arange(12) % len(NAMES)
    assert_learns(train_steps(model, x, y, lr=0.003), len(NAMES))
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("variant,groups", [("cavpt", [(0.01, 10), (0.01, 10), (0.002, 1)]),
                                            ("vpt-cavpt", [(0.01, 10), (0.01, 10)])])
def test_parameter_groups(clip, variant, groups):
    model = cavpt.build(clip, NAMES, config(variant))
    got = model.param_groups(model.cfg)
    assert [(g["lr"], g["warmup_epochs"]) for g in got] == groups
    ids = [id(p) for g in got for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in learned(model)}
    assert got[0]["params"] == [model.visual_prompts.prompts]


def test_learned_parameters_load_on_other_classes(clip):
    """base2new: prompts and generators transfer; the aux classifiers (sized by the classes) stay the new model's."""
    base = cavpt.build(clip, NAMES[:4], config("cavpt"))
    shake(base)
    new = cavpt.build(clip, NAMES[4:], config("cavpt"))
    own = new.visual_prompts.generators[0].classifier.weight.clone()
    state = {k: v for k, v in base.state_dict().items() if k in dict(base.named_parameters())}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not missing and not unexpected and torch.equal(new.visual_prompts.generators[0].classifier.weight, own)
    assert torch.equal(new.visual_prompts.prompts, base.visual_prompts.prompts)
    assert torch.equal(new.text_context.ctx, base.text_context.ctx)


def test_resnet_is_refused():
    rn = clip_model.load("tiny-rn")[0]
    with pytest.raises(ValueError, match="use a ViT backbone"):
        cavpt.build(rn, NAMES, config("cavpt"))
