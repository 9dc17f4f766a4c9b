"""analyze.py: the statistics on hand-made attention maps with known answers, relevancy, and the CLI."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import analyze
import clip_model
import coop
import maple
import methods
import mudpt
import train
import vpt


def test_distance_of_self_attention_is_zero_and_uniform_is_the_grid_mean():
    grid, patch, G = 3, 10, 9
    eye = torch.eye(1 + G + 2)[None, None]  # cls, 9 patches, 2 prompts; every query on itself
    assert analyze.attention_distance(eye, grid, patch)[0].item() == 0
    uniform = torch.full((1, 2, 1 + G + 2, 1 + G + 2), 1 / (1 + G + 2))
    centres = torch.tensor([[(i % 3 + 0.5) * 10, (i // 3 + 0.5) * 10] for i in range(9)])
    mean_pairwise = torch.cdist(centres, centres).mean().item()
    without, with_prompts = analyze.attention_distance(uniform, grid, patch)
    assert without.tolist() == pytest.approx([mean_pairwise] * 2)
    assert with_prompts.tolist() == pytest.approx([mean_pairwise * G / (1 + G + 2)] * 2)  # cls, prompts: 0


def test_entropy_and_prompt_share():
    L = 12
    uniform = torch.full((2, 3, L, L), 1 / L)
    assert analyze.entropy(uniform, list(range(1, 10))).tolist() == pytest.approx([math.log(L)] * 3)
    assert analyze.entropy(torch.eye(L)[None, None], [1, 2]).item() == pytest.approx(0, abs=1e-6)
    A = torch.zeros(1, 1, L, L)
    A[..., :10] = 0.07  # 0.7 on cls + patches, 0.3 on the two prompt rows 10, 11
    A[..., 10:] = 0.15
    assert analyze.share(A, [0], [10, 11]).item() == pytest.approx(0.3)
    assert analyze.share(A, list(range(1, 10)), [10, 11]).item() == pytest.approx(0.3)


def test_rollout_of_identity_maps_is_the_identity_plus_gradient_mass():
    A = torch.eye(4)[None, None].expand(2, 2, 4, 4)
    R = analyze.rollout([A, A], [torch.ones_like(A), torch.zeros_like(A)])
    assert torch.equal(R, 2 * torch.eye(4).expand(2, 4, 4))  # R = I + I·I, then + 0


@pytest.fixture(scope="module")
def tiny_analysis():
    clip = clip_model.load("tiny")[0]
    names = ["red circle", "green square", "blue triangle"]
    cfg = coop.Config(n_ctx=0)
    model = coop.build(clip, names, cfg)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return clip, names, cfg, model, images


def test_relevancy_is_grid_shaped_non_negative_and_depends_on_the_target(tiny_analysis):
    clip, names, cfg, model, images = tiny_analysis
    stats, image_rel, text_rel, target, p = analyze.analyse(model, clip, cfg, images, names, torch.tensor([0, 0]))
    assert image_rel.shape == (2, 4, 4) and (image_rel >= 0).all()
    assert target.tolist() == [0, 0] and p.shape == (2, 3) and p.sum(-1).tolist() == pytest.approx([1, 1])
    other = analyze.analyse(model, clip, cfg, images, names, torch.tensor([1, 1]))[1]
    assert (other - image_rel).abs().max() > 1e-6  # another class, another map
    assert len(text_rel) == 2 and all(r >= 0 for r in text_rel[0])
    assert stats["text_side"] == "frozen" and len(stats["image"]["entropy"]) == 2  # per block
    assert stats["image"]["prompt_share_cls"] == [[0.0, 0.0], [0.0, 0.0]]  # zero-shot has no prompts


@pytest.mark.parametrize("method", ["vpt", "ivlp", "mudpt", "maple", "bias_tuning", "coop", "cocoop"])
@pytest.mark.slow
def test_cli_on_a_tiny_run_writes_json_and_pngs(tmp_path, method):
    train.run(methods.parse_args(["--method", method, "--data", "demo", "--backbone", "tiny", "--epochs", "1",
                                  "--batch-size", "16", "--output", str(tmp_path)]))
    assert analyze.main([str(tmp_path), "--images", "2"]) == 0
    stats = json.loads((tmp_path / "analysis" / "stats.json").read_text())
    assert stats["method"]["name"] == method and len(stats["targets"]) == 2
    blocks = len(stats["method"]["image"]["distance"])
    assert blocks == 2 and len(stats["method"]["text_eot"]["sot"]) == 2
    if method in ("vpt", "ivlp", "mudpt"):  # image prompts take some attention
        assert stats["method"]["image"]["prompt_share_patches"][0][0] > 0
    for i in range(2):
        with Image.open(tmp_path / "analysis" / f"relevancy_{i}.png") as png:
            assert png.format == "PNG" and png.size[0] == 914  # 3 panels of 256 px and the colour bar


def test_a_resnet_run_is_analysed_on_its_text_side(tmp_path):
    """A ResNet image tower has no attention maps: the text side is analysed and the figure says so (analyze.py
    failed on ResNet runs until issue 22)."""
    train.run(methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", "tiny-rn", "--epochs", "1",
                                  "--output", str(tmp_path)]))
    assert analyze.main([str(tmp_path), "--images", "1"]) == 0
    stats = json.loads((tmp_path / "analysis" / "stats.json").read_text())
    assert "image" not in stats["method"] and len(stats["method"]["text_eot"]["sot"]) == 2
    with Image.open(tmp_path / "analysis" / "relevancy_0.png") as png:
        assert png.size[0] == 914


@pytest.mark.parametrize("target", ["pred", "label"])
@pytest.mark.slow
def test_a_base_to_new_run_is_analysed_on_its_own_classes(tmp_path, target):
    """A base-to-new run knows the base half of the classes: its test images are drawn from those (analyze.py
    failed on such runs, indexing past the model's classes, until issue 22's review)."""
    r = train.run(methods.parse_args(["--method", "coop", "--data", "demo", "--backbone", "tiny", "--epochs", "1",
                                      "--protocol", "base2new", "--output", str(tmp_path)]))
    assert analyze.main([str(tmp_path), "--images", "8", "--target", target]) == 0
    stats = json.loads((tmp_path / "analysis" / "stats.json").read_text())
    assert len(stats["labels"]) == 8 and all(0 <= y < len(r["classnames"]) == 4 for y in stats["labels"])
    base = {Path(path).parent.name.replace("_", " ") for path in stats["images"]}  # the demo's folders: class names
    assert base <= set(r["classnames"])
    if target == "label":
        assert stats["targets"] == stats["labels"]


def test_relevancy_figure_is_labelled_and_coloured():
    """The figure's parts, read back from its pixels: 914 px wide; the image pasted under its title; each model's
    map beside it; prediction lines green when right and red when wrong; a colour bar from yellow (high) to dark
    blue (low); one cell per text token, the most relevant yellow, the least dark blue."""
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    rel = torch.zeros(4, 4)
    rel[0, 0] = 1  # top-left patch: the relevant one
    tokens = [("SOT", 0.1), ("a", 0.0), ("photo", 0.5), ("red", 2.0), (".", 1.0)]
    fig = analyze.figure(image, "red", [("zero-shot CLIP", "red", 0.9, True, rel), ("coop", "blue", 0.4, False, None)],
                         tokens, ["maps: ...", "text: ..."])
    assert fig.width == 914 and fig.height > 16 + 50 + 256
    px = fig.load()
    margin, header, cell, gap = 16, 50, 256, 12
    assert px[margin + 128, margin + header + 128] == (200, 30, 30)  # the image
    first = (margin + cell + gap, margin + header)  # zero-shot's map: brightest top left, darkest bottom right
    assert sum(px[first[0] + 5, first[1] + 5]) > sum(px[first[0] + cell - 5, first[1] + cell - 5])
    bar = margin + 3 * (cell + gap)
    assert px[bar + 9, margin + header] == (255, 220, 0) and px[bar + 9, margin + header + cell - 1] == (0, 0, 160)
    lines = [px[x, y] for x in range(16, 800) for y in range(40, 56)]
    assert any(c[1] > 100 and c[0] < 60 for c in lines) and any(c[0] > 150 and c[1] < 60 for c in lines)
    text_top = margin + header + cell + 12 + 18 * 2  # under the two caption lines
    cells = [px[int(margin + (i + 0.5) * (fig.width - 2 * margin) / 5), text_top + 11] for i in range(5)]
    assert cells[3] == (255, 220, 0) and cells[1] == (0, 0, 160)  # "red" the most relevant, "a" the least
    assert sum(cells[4]) > sum(cells[2]) > sum(cells[0]) > sum(cells[1])  # shades in the order of relevancy
    assert any(px[x, y] != (255, 255, 255) for x in range(16, 900) for y in range(text_top + 24, fig.height))  # words


def test_prompt_tokens_are_the_words_the_text_tower_ran():
    zero = analyze.prompt_tokens(coop.Config(n_ctx=0), "red_circle")
    assert zero == ["SOT", "a", "photo", "of", "a", "red", "circle", "."]
    learned = analyze.prompt_tokens(coop.Config(n_ctx=4), "red circle")
    assert learned == ["SOT", "[V1]", "[V2]", "[V3]", "[V4]", "red", "circle", "."]
    assert len(learned) == analyze.text_rows(coop.Config(n_ctx=4), "red circle")[2]  # = EOT's row
    assert analyze.prompt_tokens(coop.Config(n_ctx=4), "red circle", template_only=True) == zero


def test_zeroshot_without_a_run_and_errors(tmp_path, capsys):
    assert analyze.main(["--method", "zeroshot", "--data", "demo", "--backbone", "tiny", "--images", "1",
                         "--out", str(tmp_path)]) == 0
    assert (tmp_path / "stats.json").is_file()
    assert analyze.main([str(tmp_path / "nothing")]) == 2
    assert "no results.json in" in capsys.readouterr().err  # one loader: runs.load_run's message
    assert analyze.main(["--method", "vpt-deep", "--data", "demo"]) == 2
    assert "unknown method 'vpt-deep'" in capsys.readouterr().err


def test_analysis_into_a_closed_pipe_writes_its_files_and_ends_quietly(tmp_path, closed_stdout, capsys):
    """`python analyze.py ... | head`: stats.json is written before anything is printed, and the end is quiet."""
    with closed_stdout:
        assert analyze.main(["--method", "zeroshot", "--data", "demo", "--backbone", "tiny", "--images", "1",
                             "--out", str(tmp_path)]) == 0
    assert (tmp_path / "stats.json").is_file() and closed_stdout.goes_to_devnull()
    assert capsys.readouterr().err == ""


def test_nearest_words_of_an_init_phrase_are_its_words():
    """CoOp's reading of learned context: a context that starts as "a photo of a" is nearest those four tokens
    (distance 0); MuDPT reads its first block's text prompts only, MaPLe its input context, not the deep ones."""
    clip = clip_model.load("tiny")[0]
    model = coop.build(clip, ["cat", "dog"], coop.Config(ctx_init="a photo of a"))
    found = analyze.word_context(model)
    assert list(found) == ["prompt_learner.ctx"] and found["prompt_learner.ctx"].shape == (4, 128)
    rows = analyze.nearest_words(clip, found["prompt_learner.ctx"])
    assert [row[0][0] for row in rows] == ["a", "photo", "of", "a"] and all(row[0][1] < 1e-4 for row in rows)
    assert all(row[1][1] > 0.01 for row in rows)  # the next nearest are other tokens, further away
    model = mudpt.build(clip, ["cat", "dog"], mudpt.Config(depth=2))
    assert [row[0][0] for row in analyze.nearest_words(clip, analyze.word_context(model)["text_prompts[0]"])] == \
        ["a", "photo", "of", "a"]
    model = maple.build(clip, ["cat", "dog"], maple.Config())
    assert list(analyze.word_context(model)) == ["ctx"]  # "a photo", not the deep prompts


def test_text_context_counts_are_each_methods_own():
    """VLP's text context is its text_ctx (16), not its 10 visual tokens; MuDPT's is n_ctx with or without a
    phrase; CoOp's init phrase sets its count."""
    assert analyze.prompt_text(vpt.Config(text_ctx=16), "red circle")[1] == 16
    assert analyze.prompt_text(mudpt.Config(n_ctx=2), "red circle")[1] == 2
    assert analyze.prompt_text(coop.Config(n_ctx=16, ctx_init="a photo of a"), "red circle")[1] == 4


def test_maple_learns_two_tokens_of_its_four_word_context(clip):
    """MaPLe's text is its whole init phrase, "a photo of a {class}.", of which the first n_ctx = 2 tokens are learned
    and "of a" stay words (maple.py). analyze.py counted the phrase's 4 tokens as learned ([V1]..[V4], CoOp's rule
    for an init phrase), and with n_ctx over 4 (random context, n_ctx placeholders) 4 again."""
    assert analyze.prompt_text(maple.Config(), "red circle") == ("a photo of a red circle.", 4, 2)
    kept = mudpt.Config(n_ctx=2, injection="off", keep_phrase=True)  # ivlp holding the MaPLe repository's IVLP
    assert analyze.prompt_text(kept, "red circle") == ("a photo of a red circle.", 4, 2)
    fixed = vpt.Config(template="{} texture.", fixed_template="a photo of a {}.")  # the MaPLe repository's VPT
    assert analyze.prompt_text(fixed, "red circle") == ("a photo of a red circle.", 4, 0)
    assert analyze.prompt_tokens(maple.Config(), "red circle") == ["SOT", "[V1]", "[V2]", "of", "a", "red", "circle",
                                                                   "."]
    context, name, eot = analyze.text_rows(maple.Config(), "red circle")
    model = maple.build(clip, ["red circle"], maple.Config())
    assert (context, name) == ([1, 2, 3, 4], [5, 6]) and eot == int(model.eot[0]) == 8  # the model's own EOT row
    assert len(model.ctx) == 2 and analyze.prompt_text(maple.Config(n_ctx=6), "red circle")[1:] == (6, 6)
