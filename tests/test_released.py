"""The authors' released checkpoints (released.py): Dassl files in the official trainers' key layouts, read
without running code, give the logits of the same parameters set directly; --eval-only evaluates them as it does
our own checkpoints; every mismatch is one line; and the class order is Dassl's for every CoOp dataset.

No released file can be downloaded here (Google Drive), so each test writes its file as the official trainer
would, from the layouts read in the official repositories (listed in released.py's FORMATS): CoOp's PromptLearner
registered alone (ctx, token_prefix, token_suffix), MaPLe's, IVLP's and VPT's whole CustomCLIP (prompt keys beside
`image_encoder.*` and `text_encoder.*`), and Dassl's save_checkpoint dict around it (dassl/utils/torchtools.py:
state_dict, epoch, optimizer, and a scheduler state holding the pickled CosineAnnealingLR it wraps, as
ConstantWarmupScheduler's does, which is what makes torch.load(weights_only=True) refuse the real files)."""
import collections
import dataclasses
import json
import math
import os
import pickle
import types

import pytest
import torch
import torch.nn.functional as F

import clip_model
import data
import methods
import released
import runs
import train
from conftest import NAMES, random_images, randomize
from test_data import WNIDS, image, make_split_dataset


def save_dassl(path, state_dict, epoch=5):
    """`state_dict` in the dict Dassl's TrainerBase.save_model passes to save_checkpoint (fp16 tensors, as the
    official fp16 runs save most of them)."""
    learned = [torch.nn.Parameter(v.float().clone()) for v in state_dict.values() if v.dim() >= 1][:3]
    sgd = torch.optim.SGD(learned, lr=0.002, momentum=0.9, weight_decay=5e-4)
    for p in learned:
        p.grad = torch.ones_like(p)
    sgd.step()  # momentum buffers, as a trained optimizer holds
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=epoch)
    # ConstantWarmupScheduler.state_dict(): its __dict__ but the optimizer, with the scheduler it wraps
    scheduler = {"successor": cosine, "warmup_epoch": 1, "cons_lr": 1e-5, "base_lrs": [0.002],
                 "last_epoch": epoch, "_step_count": epoch + 1, "_last_lr": [0.002]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": collections.OrderedDict(state_dict), "epoch": epoch, "optimizer": sgd.state_dict(),
                "scheduler": scheduler}, path)
    return path


def official_tokens(clip, prompts):
    """The official token buffers: the whole 77 embedded rows of each prompt (C, 77, D), no positions."""
    with torch.no_grad():
        return clip.embed_text(clip_model.tokenize(prompts))


def whole_clip(clip, dtype=torch.float16):
    """The frozen CLIP inside an official CustomCLIP's state dict: image_encoder = clip.visual, text_encoder =
    TextEncoder (transformer, positional_embedding, ln_final, text_projection; no token embedding)."""
    state = {"image_encoder." + k: v.to(dtype) for k, v in clip.visual.state_dict().items()}
    for k, v in clip.state_dict().items():
        if k.startswith(("transformer.", "ln_final.")) or k in ("positional_embedding", "text_projection"):
            state["text_encoder." + k] = v.to(dtype)
    state["logit_scale"] = clip.logit_scale.detach().to(dtype)
    return state


def fp16_exact(*tensors):
    """Round parameters to fp16 values in place: an fp16 file then holds them exactly."""
    with torch.no_grad():
        for t in tensors:
            t.copy_(t.half().float())


def coop_state(clip, model, classnames, n):
    """CoOp's PromptLearner state dict (CoOp trainers/coop.py): keys without a prefix, "X X ... X {class}."."""
    names = [c.replace("_", " ") for c in classnames]
    embedded = official_tokens(clip, [" ".join(["X"] * n) + " " + c + "." for c in names])
    return {"ctx": model.prompt_learner.ctx.detach().half(), "token_prefix": embedded[:, :1].half(),
            "token_suffix": embedded[:, 1 + n:].half()}


def maple_state(clip, model, classnames, n, phrase="a photo of a"):
    """MaPLe's CustomCLIP (trainers/maple.py): the prompt learner under `prompt_learner.`, the text
    "{CTX_INIT} {class}." with its first n tokens learned; ctx and proj fp16, the deeper prompts fp32."""
    p = "prompt_learner."
    embedded = official_tokens(clip, [f"{phrase} {c.replace('_', ' ')}." for c in classnames])
    state = {p + "ctx": model.ctx.detach().half(), p + "proj.weight": model.couple[0].weight.detach().half(),
             p + "proj.bias": model.couple[0].bias.detach().half(), p + "token_prefix": embedded[:, :1].half(),
             p + "token_suffix": embedded[:, 1 + n:].half()}
    for i, text in enumerate(model.deep_text.detach()):
        state[f"{p}compound_prompts_text.{i}"] = text.clone()
        state[f"{p}compound_prompt_projections.{i}.weight"] = model.couple[i + 1].weight.detach().clone()
        state[f"{p}compound_prompt_projections.{i}.bias"] = model.couple[i + 1].bias.detach().clone()
    return {**state, **whole_clip(clip)}


def ivlp_state(clip, text, image_prompts, classnames, phrase="a photo of a", vision=True):
    """IVLP's CustomCLIP (trainers/independentVL.py): text prompts `prompt_learner.ctx` and the text blocks'
    `VPT_shallow`, image prompts `image_encoder.VPT` and the image blocks' `VPT_shallow`; language-only: none."""
    n = text.shape[1]
    embedded = official_tokens(clip, [f"{phrase} {c.replace('_', ' ')}." for c in classnames])
    state = {"prompt_learner.ctx": text[0].half(), "prompt_learner.token_prefix": embedded[:, :1].half(),
             "prompt_learner.token_suffix": embedded[:, 1 + n:].half()}
    for i in range(1, len(text)):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = text[i].clone()
    if vision:
        state["image_encoder.VPT"] = image_prompts[0].clone()
        for i in range(1, len(image_prompts)):
            state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = image_prompts[i].clone()
    return {**state, **whole_clip(clip)}


def build_from(path, method, clip, classnames, template="a photo of a {}."):
    """What train.py --eval-only does with the file: its Config, the model built, checked and restored."""
    ckpt = runs.load_checkpoint(path, method, released_too=True)
    module, variant = methods.METHODS[method]
    fields = {k: v for k, v in ckpt["config"].items() if k != "backbone"}
    cfg = methods.for_data(dataclasses.replace(module.Config(), **{**variant, **fields}), template, "test")
    model = module.build(clip, classnames, cfg).eval()
    evalset = types.SimpleNamespace(template=template, name="test")
    task = types.SimpleNamespace(template=template, dataset="test", classnames=classnames, evals=[evalset])
    released.check(ckpt, model, "tiny", task, path)
    runs.restore(model, ckpt["learned"], path, method, "tiny", len(classnames))
    return model


def logits(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("csc,position", [(False, "end"), (True, "middle")])
def test_coop_file_gives_the_same_logits(clip, tmp_path, csc, position):
    cfg = dataclasses.replace(train.methods.METHODS["coop"][0].Config(), n_ctx=4, csc=csc,
                              class_token_position=position)
    torch.manual_seed(0)
    ours = train.methods.METHODS["coop"][0].build(clip, NAMES, cfg).eval()
    fp16_exact(ours.prompt_learner.ctx)
    folder = tmp_path / "vit_b16_ep50_16shots" / f"nctx4_csc{csc}_ctp{position}" / "seed1" / "prompt_learner"
    path = save_dassl(folder / "model.pth.tar-50", coop_state(clip, ours, NAMES, 4), epoch=50)
    ckpt = runs.load_checkpoint(path, "coop", released_too=True)
    assert ckpt["epoch"] == 50 and ckpt["released"]["format"] == "CoOp"
    assert ckpt["config"] == dict(n_ctx=4, csc=csc, ctx_init="", backbone="ViT-B/16", class_token_position=position)
    images = random_images(6)
    loaded = build_from(path, "coop", clip, NAMES)
    assert torch.allclose(logits(loaded, images), logits(ours, images), atol=1e-6, rtol=0)
    with pytest.raises(pickle.UnpicklingError, match="CosineAnnealingLR"):  # why released.read exists
        torch.load(path, weights_only=True)


def test_cocoop_file_gives_the_same_logits(clip, tmp_path):
    module, variant = methods.METHODS["cocoop"]
    torch.manual_seed(0)
    ours = module.build(clip, NAMES, dataclasses.replace(module.Config(), **variant)).eval()
    fp16_exact(*(p for p in ours.parameters() if p.requires_grad))  # not the shared CLIP's
    state = coop_state(clip, ours, NAMES, 4)
    for theirs, layer in (("linear1", ours.meta_net[0]), ("linear2", ours.meta_net[2])):  # named Sequential
        state[f"meta_net.{theirs}.weight"], state[f"meta_net.{theirs}.bias"] = layer.weight.half(), layer.bias.half()
    path = save_dassl(tmp_path / "prompt_learner" / "model.pth.tar-10", state, epoch=10)
    images = random_images(4)
    assert torch.allclose(logits(build_from(path, "cocoop", clip, NAMES), images), logits(ours, images), atol=1e-6,
                          rtol=0)


def test_maple_file_gives_the_same_logits(clip, tmp_path):
    module = methods.METHODS["maple"][0]
    torch.manual_seed(0)
    ours = module.build(clip, NAMES, module.Config(depth=2)).eval()  # tiny: 2 blocks
    with torch.no_grad():
        for p in ours.parameters():  # nothing left at its init (couple[1:] start as copies)
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    fp16_exact(ours.ctx, *ours.couple[0].parameters())
    path = save_dassl(tmp_path / "base" / "seed1" / "MultiModalPromptLearner" / "model.pth.tar-5",
                      maple_state(clip, ours, NAMES, 2))
    ckpt = runs.load_checkpoint(path, "maple", released_too=True)
    assert ckpt["config"] == dict(n_ctx=2, depth=2, backbone="tiny")  # the backbone read off CLIP's shapes
    images = random_images(6)
    assert torch.allclose(logits(build_from(path, "maple", clip, NAMES), images), logits(ours, images), atol=1e-6,
                          rtol=0)


@pytest.mark.parametrize("n", [2, 4])
def test_ivlp_file_gives_the_same_logits(clip, tmp_path, n):
    """The Model Zoo's IVLP (n = 2: "a photo" learned, "of a" kept in the text: ivlp's keep_phrase), and n = 4
    ("a photo of a" all learned)."""
    module, variant = methods.METHODS["ivlp"]
    torch.manual_seed(0)
    cfg = dataclasses.replace(module.Config(), **variant, n_ctx=n, depth=2, keep_phrase=True)
    ours = module.build(clip, NAMES, cfg).eval()
    with torch.no_grad():
        ours.text_prompts[0].add_(0.05 * torch.randn_like(ours.text_prompts[0]))  # not at the phrase's init
    fp16_exact(ours.text_prompts)
    state = ivlp_state(clip, ours.text_prompts.detach(), ours.image_prompts.detach(), NAMES)
    path = save_dassl(tmp_path / "VLPromptLearner" / "model.pth.tar-5", state)
    assert runs.load_checkpoint(path, "ivlp", released_too=True)["config"] == dict(
        n_ctx=n, depth=2, keep_phrase=True, backbone="tiny")
    images = random_images(6)
    assert torch.allclose(logits(build_from(path, "ivlp", clip, NAMES), images), logits(ours, images), atol=1e-6,
                          rtol=0)


def test_deep_language_prompting_file_gives_the_same_logits(clip, tmp_path):
    """The Model Zoo's deep language prompting: 4 text prompts in every text block, CLIP's image tower as it is
    (ivlp's text_only)."""
    module, variant = methods.METHODS["ivlp"]
    torch.manual_seed(0)
    ours = module.build(clip, NAMES, dataclasses.replace(module.Config(), **variant, n_ctx=4, depth=2,
                                                          text_only=True)).eval()
    fp16_exact(ours.text_prompts)
    path = save_dassl(tmp_path / "VLPromptLearner" / "model.pth.tar-5",
                      ivlp_state(clip, ours.text_prompts.detach(), None, NAMES, vision=False))
    assert runs.load_checkpoint(path, "ivlp", released_too=True)["config"] == dict(
        n_ctx=4, depth=2, keep_phrase=True, text_only=True, backbone="tiny")
    images = random_images(6)
    loaded = build_from(path, "ivlp", clip, NAMES)
    assert torch.allclose(logits(loaded, images), logits(ours, images), atol=1e-6, rtol=0)
    with torch.no_grad():  # the image side is CLIP's own
        image = F.normalize(clip.encode_image(images), dim=-1)
        text = F.normalize(loaded.encode_text(loaded.text_prompts), dim=-1)
        assert torch.allclose(logits(loaded, images), clip.logit_scale.exp() * image @ text.t(), atol=1e-6)
    with pytest.raises(ValueError, match="text_only=true leaves no image prompts for injection=shared"):
        module.build(clip, NAMES, module.Config(text_only=True))


def test_keep_phrase_is_the_maple_repositorys_text(clip):
    """keep_phrase: the text "a photo of a {class}." with the first n rows learned, as maple.py's; off, the text
    is "X X {class}." (MuDPT's), and the numbers of ivlp and mudpt as before."""
    module, variant = methods.METHODS["ivlp"]
    kept = module.build(clip, NAMES, dataclasses.replace(module.Config(), **variant, n_ctx=2, keep_phrase=True))
    maple = methods.METHODS["maple"][0].build(clip, NAMES, methods.METHODS["maple"][0].Config(n_ctx=2))
    assert torch.equal(kept.embedded, maple.embedded) and torch.equal(kept.text_prompts[0], maple.ctx)
    plain = module.build(clip, NAMES, dataclasses.replace(module.Config(), **variant, n_ctx=2))
    names = [c.replace("_", " ") for c in NAMES]
    tokens = clip_model.tokenize([f"X X {c}." for c in names])
    assert torch.equal(plain.embedded, clip.embed_text(tokens[:, :plain.embedded.shape[1]]))
    with pytest.raises(ValueError, match="keep_phrase=true learns the first n_ctx=5 tokens"):
        module.build(clip, NAMES, dataclasses.replace(module.Config(), **variant, n_ctx=5, keep_phrase=True))


def official_vpt_logits(clip, images, prompts, classnames):
    """The MaPLe repository's deep vision prompting, from its code (clip/model.py, trainers/vpt.py): the first
    prompts appended to the patches *before* ln_pre, each deeper block's replacing the previous outputs, and the
    text "a photo of a {class}." for every dataset."""
    visual, n = clip.visual, prompts.shape[1]
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, N, W)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1))  # (B, 1+N+n, W)
    for i, block in enumerate(visual.transformer.resblocks):
        if i > 0:
            x = torch.cat([x[:, :-n], prompts[i].expand(len(x), -1, -1)], dim=1)
        x = block(x)
    image_features = F.normalize(visual.head(x), dim=-1)
    text = clip.encode_text(clip_model.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in classnames]))
    return clip.logit_scale.exp() * image_features @ F.normalize(text, dim=-1).t()


def test_deep_vision_prompting_file_gives_the_official_logits(tmp_path):
    """Ours appends the first prompts after ln_pre: the conversion passes them through the file's ln_pre. (With
    ln_pre's default scale 1 and shift 0 the two would agree after block 0's own LayerNorm: randomised weights.)
    The text is "a photo of a {class}." on a dataset whose template is another (vpt's fixed_template)."""
    clip = clip_model.load("tiny")[0]
    clip.load_state_dict(randomize(clip.state_dict()))
    prompts = torch.randn(2, 3, clip.visual.conv1.out_channels, generator=torch.Generator().manual_seed(0))
    state = {"image_encoder.VPT": prompts[0], "image_encoder.transformer.resblocks.1.VPT_shallow": prompts[1],
             **whole_clip(clip, torch.float32)}  # trainers/vpt.py keeps CLIP in fp32
    path = save_dassl(tmp_path / "prompt_learner" / "model.pth.tar-5", state)
    images = random_images(6)
    with torch.no_grad():
        expected = official_vpt_logits(clip, images, prompts, NAMES)
    loaded = build_from(path, "vpt", clip, NAMES, template="{} texture.")
    assert torch.allclose(logits(loaded, images), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_eval_only_on_coop_and_maple_files(tmp_path, capsys):
    """The CLI: our own run's parameters, saved as the authors' trainer saves them, evaluate to our checkpoint's
    accuracy, into eval_<dataset>_<protocol>.json beside the file; MaPLe's base-to-new model is rebuilt for the
    new classes as ours is."""
    clip = clip_model.load("tiny", seed=1)[0]  # what --backbone tiny --seed 1 loads
    for method, protocol in (("coop", "fewshot"), ("maple", "base2new")):
        run = ["--method", method, "--data", "demo", "--backbone", "tiny", "--protocol", protocol]
        assert train.main(run + ["--epochs", "1", "--shots", "2", "--output", str(tmp_path / method)]) == 0
        ckpt = runs.load_checkpoint(tmp_path / method / "checkpoint.pt")
        classnames = json.loads((tmp_path / method / "results.json").read_text())["classnames"]
        model = methods.METHODS[method][0].build(clip, classnames, runs.read_run(tmp_path / method)[2])
        runs.restore(model, ckpt["learned"], "test", method, "tiny", len(classnames))
        state = coop_state(clip, model, classnames, 16) if method == "coop" else maple_state(clip, model, classnames, 2)
        state = {k: v.float() for k, v in state.items()}  # fp32 (PREC fp32): the very parameters
        path = save_dassl(tmp_path / "released" / method / "model.pth.tar-1", state, epoch=1)
        ours = train.run(methods.parse_args(run + ["--eval-only", "--checkpoint", str(tmp_path / method /
                                                                                        "checkpoint.pt")]))
        theirs = train.run(methods.parse_args(run + ["--eval-only", "--checkpoint", str(path)]))
        assert theirs["accuracy"] == ours["accuracy"] and len(theirs["accuracy"]) == (3 if method == "maple" else 1)
        written = json.loads((path.parent / f"eval_demo_{protocol}.json").read_text())
        assert written["accuracy"] == ours["accuracy"]
        assert written["checkpoint"] == dict(path=str(path), epoch=1, released={"coop": "CoOp"}.get(method, "MaPLe"))


def error_of(argv, capsys):
    """train.main's status and its one stderr line."""
    capsys.readouterr()
    status = train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_mismatches_are_one_line_each(tmp_path, capsys):
    clip = clip_model.load("tiny", seed=1)[0]
    other_clip = clip_model.load("tiny", seed=2)[0]
    demo = data.make_task("demo", "fewshot", 0, 1).classnames
    coop = methods.METHODS["coop"][0]
    torch.manual_seed(0)
    model = coop.build(clip, demo, coop.Config(n_ctx=4))
    run = ["--data", "demo", "--backbone", "tiny", "--eval-only", "--output", str(tmp_path / "out"), "--checkpoint"]

    path = save_dassl(tmp_path / "coop.pth.tar-50", coop_state(clip, model, demo, 4))
    assert "is a CoOp checkpoint (KaiyangZhou/CoOp trainers/coop.py), not maple: pass --method coop" in error_of(
        ["--method", "maple", *run, str(path)], capsys)
    assert "--eval-only rebuilds the model" in error_of(["--method", "coop", *run, str(path), "--set", "n_ctx=16"],
                                                        capsys)

    csc = coop.build(clip, demo[:5], coop.Config(n_ctx=4, csc=True))
    path = save_dassl(tmp_path / "csc.pth.tar-50", coop_state(clip, csc, demo[:5], 4))
    assert "was trained on 5 classes; this task has 8" in error_of(["--method", "coop", *run, str(path)], capsys)

    path = save_dassl(tmp_path / "other.pth.tar-50", coop_state(other_clip, model, demo, 4))
    assert "another backbone than tiny (its start-of-text embedding differs)" in error_of(
        ["--method", "coop", *run, str(path)], capsys)

    shuffled = demo[1:] + demo[:1]  # the classes in another order
    path = save_dassl(tmp_path / "order.pth.tar-50", coop_state(clip, model, shuffled, 4))
    assert "the prompt of class 0 ('blue triangle' here) differs from the one it was trained with, as do 7 more" in (
        error_of(["--method", "coop", *run, str(path)], capsys))

    state = maple_state(clip, methods.METHODS["maple"][0].build(clip, demo, methods.METHODS["maple"][0].Config()),
                        demo, 2)
    del state["prompt_learner.compound_prompt_projections.0.bias"]  # a cut-down file
    path = save_dassl(tmp_path / "cut.pth.tar-5", state)
    assert "looks like a MaPLe checkpoint (muzairkhattak/multimodal-prompt-learning trainers/maple.py) but lacks " \
           "'prompt_learner.compound_prompt_projections.0.bias'" in error_of(["--method", "maple", *run, str(path)],
                                                                              capsys)

    whole = (tmp_path / "coop.pth.tar-50").read_bytes()
    (tmp_path / "half.pth.tar-50").write_bytes(whole[:len(whole) // 2])
    assert "is not a readable checkpoint of this project or a Dassl checkpoint" in error_of(
        ["--method", "coop", *run, str(tmp_path / "half.pth.tar-50")], capsys)

    text, image_prompts = torch.randn(2, 4, 128), torch.randn(2, 4, 128)
    path = save_dassl(tmp_path / "lp.pth.tar-5", ivlp_state(clip, text, image_prompts, demo, vision=False))
    assert "is a deep language prompting checkpoint (muzairkhattak/multimodal-prompt-learning trainers/" \
           "independentVL.py), not mudpt: pass --method ivlp" in error_of(["--method", "mudpt", *run, str(path)],
                                                                           capsys)

    # an IVLP trained with another init phrase: "a photo of the {class}." is not the text ivlp builds
    path = save_dassl(tmp_path / "ivlp.pth.tar-5", ivlp_state(clip, text[:, :2], image_prompts[:, :2], demo,
                                                              phrase="a photo of the"))
    assert "another prompt text than ivlp's" in error_of(["--method", "ivlp", *run, str(path)], capsys)


@pytest.mark.slow
def test_deep_vision_prompting_evaluates_on_a_dataset_with_another_template(tmp_path, capsys):
    """The authors' VPT prompts "a photo of a {}." on DTD too (fixed_template), not DTD's "{} texture."."""
    clip = clip_model.load("tiny", seed=1)[0]
    state = {"image_encoder.VPT": torch.randn(3, 128), "image_encoder.transformer.resblocks.1.VPT_shallow":
             torch.randn(3, 128), **whole_clip(clip, torch.float32)}
    path = save_dassl(tmp_path / "prompt_learner" / "model.pth.tar-5", state)
    dtd = make_split_dataset(tmp_path, "dtd")
    assert train.main(["--method", "vpt", "--data", str(dtd), "--eval-only", "--checkpoint", str(path)]) == 0
    evaluated = json.loads((path.parent / "eval_DescribableTextures_fewshot.json").read_text())
    assert evaluated["config"]["fixed_template"] == "a photo of a {}." and evaluated["template"] == "{} texture."
    assert evaluated["config"]["n_tokens"] == 3 and evaluated["backbone"] == "tiny"
    assert "fixed_template='a {} b {}': it needs one {} for the class name" in error_of(
        ["--method", "vpt", "--data", "demo", "--backbone", "tiny", "--set", "fixed_template=a {} b {}"], capsys)


def test_a_multi_step_schedulers_file_is_read(tmp_path):
    """Dassl's multi_step scheduler (MultiStepLR) keeps its milestones in a collections.Counter."""
    params = [torch.nn.Parameter(torch.zeros(4, 8))]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(torch.optim.SGD(params, lr=0.1), milestones=[10, 20])
    torch.save({"state_dict": {"ctx": torch.ones(4, 8)}, "epoch": 30, "scheduler": {"successor": scheduler}},
               tmp_path / "model.pth.tar-30")
    state, epoch = released.read(tmp_path / "model.pth.tar-30")
    assert epoch == 30 and torch.equal(state["ctx"], torch.ones(4, 8))


def test_a_file_that_names_code_is_not_run(tmp_path, capsys):
    """A pickle naming os.system (a file made to run code when loaded) is refused, and nothing runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"state_dict": {"ctx": torch.zeros(4, 128)}, "epoch": 1, "scheduler": Payload()},
               tmp_path / "model.pth.tar-1")
    assert released.read(tmp_path / "model.pth.tar-1") is None
    assert "not a readable checkpoint" in error_of(["--method", "coop", "--data", "demo", "--backbone", "tiny",
                                                    "--eval-only", "--checkpoint", str(tmp_path / "model.pth.tar-1")],
                                                   capsys)
    assert not marker.exists()


def dassl_order(entries):
    """Dassl's class order (dassl/data/datasets/base_dataset.py, get_lab2cname): the training items' labels,
    sorted, each with its class name."""
    names = {label: name for _, label, name in entries}
    return [names[label] for label in sorted(names)]


@pytest.mark.parametrize("folder", list(data.SPLITS))
def test_class_order_is_dassls_for_split_file_datasets(tmp_path, folder):
    """Labels in the split file not in alphabetical order, entries not in label order: our classes are Dassl's (so
    a class-specific context is not permuted, and base-to-new splits the same classes)."""
    name, image_dir = data.SPLITS[folder]
    classes = ["zebra_finch", "apple", "moth", "crane", "bee"]  # label y = classes[y]
    split = {s: [] for s in ("train", "val", "test")}
    for s in split:
        for y in (3, 0, 4, 1, 2):
            image(tmp_path / folder / image_dir / f"{s}{y}.jpg")
            split[s].append([f"{s}{y}.jpg", y, classes[y]])
    (tmp_path / folder / f"split_zhou_{name}.json").write_text(json.dumps(split))
    expected = [c.replace("_", " ") for c in dassl_order(split["train"])]
    assert data.make_task(str(tmp_path / folder), "fewshot", 1, 1).classnames == expected
    base = data.make_task(str(tmp_path / folder), "base2new", 1, 1)  # Dassl: the first ceil(C/2) labels
    assert base.classnames == expected[:math.ceil(5 / 2)]


def test_class_order_is_dassls_for_imagenet_and_aircraft(tmp_path):
    """ImageNet: Dassl labels the sorted folders of images/train (classnames.txt only names them); FGVCAircraft:
    the order of variants.txt."""
    root = tmp_path / "imagenet"
    wnids = WNIDS[:4]
    (root).mkdir()
    (root / "classnames.txt").write_text("".join(f"{w} class {w}\n" for w in reversed(WNIDS)))
    for w in reversed(wnids):
        image(root / "images" / "train" / w / "0.JPEG")
        image(root / "images" / "val" / w / "0.JPEG")
    assert data.make_task(str(root), "fewshot", 1, 1).classnames == [f"class {w}" for w in sorted(wnids)]
    aircraft = tmp_path / "fgvc_aircraft"
    variants = ["F-16A/B", "707-320", "A300B4"]
    (aircraft / "images").mkdir(parents=True)
    (aircraft / "variants.txt").write_text("\n".join(variants) + "\n")
    for s in ("train", "val", "test"):
        for i in range(len(variants)):
            image(aircraft / "images" / f"{s}{i}.jpg")
        (aircraft / f"images_variant_{s}.txt").write_text("".join(f"{s}{i} {v}\n" for i, v in enumerate(variants)))
    assert data.make_task(str(aircraft), "fewshot", 1, 1).classnames == variants
