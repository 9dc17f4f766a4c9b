"""data.py on fake dataset folders in every CoOp layout, the demo data, and every bad input."""
import json
import os
import random
import shutil

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import clip_model
import data

OPENAI_32 = clip_model.Preprocessing(32)  # the tiny models' preprocessing: OpenAI's at 32 px

WNIDS = [f"n{i:08d}" for i in range(1000)]


def image(path, colour=(128, 64, 32), size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def make_split_dataset(root, folder, per_class=(6, 2, 3), classes=("sea_lion", "dog", "cat", "ant", "bee")):
    name, image_dir = data.SPLITS[folder]
    split_file = f"split_zhou_{name}.json"
    base = root / folder
    split = {}
    for s, n in zip(("train", "val", "test"), per_class):
        split[s] = []
        for y, c in enumerate(classes):
            for i in range(n):
                rel = f"{c}/{s}_{i}.jpg"
                image(base / image_dir / rel)
                split[s].append([rel, y, c])
    (base / split_file).write_text(json.dumps(split))
    return base


def make_aircraft(root, variants=("707-320", "A300B4", "F-16A/B")):
    base = root / "fgvc_aircraft"
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    for s, n in (("train", 5), ("val", 2), ("test", 3)):
        lines = []
        for y, v in enumerate(variants):
            for i in range(n):
                image(base / "images" / f"{s}{y}{i}.jpg")
                lines.append(f"{s}{y}{i} {v}")
        (base / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")
    return base


def make_imagenet(root, classes=4, per_class=5):
    base = root / "imagenet"
    (base).mkdir(parents=True)
    (base / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(WNIDS)))
    for w in WNIDS[:classes]:
        for i in range(per_class):
            image(base / "images" / "train" / w / f"{i}.JPEG")
        image(base / "images" / "val" / w / "0.JPEG")
    return base


def make_variant(root, folder, wnids, copy_classnames=True):
    name, image_dir = data.VARIANTS[folder]
    base = root / folder
    (base / image_dir).mkdir(parents=True)
    if copy_classnames:
        (base / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(WNIDS)))
    folders = [str(i) for i in range(1000)] if folder == "imagenetv2" else wnids
    for f in folders:
        (base / image_dir / f).mkdir()
    for f in (folders[:3] if folder == "imagenetv2" else folders):
        image(base / image_dir / f / "a.jpg")
    return base


@pytest.mark.parametrize("folder", list(data.SPLITS))
def test_split_datasets_are_recognised(tmp_path, folder):
    base = make_split_dataset(tmp_path, folder)
    ds = data.load_dataset(str(base))
    assert ds.name == data.SPLITS[folder][0] and ds.template == data.TEMPLATES[ds.name]
    assert ds.classnames == ["sea lion", "dog", "cat", "ant", "bee"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 15)
    assert all(os.path.isfile(p) for p, _ in ds.train + ds.val + ds.test)
    renamed = base.rename(tmp_path / "my_copy")  # recognised by the split file too
    assert data.load_dataset(str(renamed)).name == ds.name


def test_aircraft(tmp_path):
    ds = data.load_dataset(str(make_aircraft(tmp_path)))
    assert ds.name == "FGVCAircraft" and ds.classnames == ["707-320", "A300B4", "F-16A/B"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 6, 9)
    assert ds.train[5] == (str(tmp_path / "fgvc_aircraft" / "images" / "train10.jpg"), 1)


@pytest.mark.slow
def test_imagenet_and_its_variants(tmp_path):
    ds = data.load_dataset(str(make_imagenet(tmp_path)))
    assert ds.name == "ImageNet" and ds.classnames == ["class 0", "class 1", "class 2", "class 3"]
    assert len(ds.train) == 20 and len(ds.test) == 4 and ds.val == []
    subset = sorted(random.Random(0).sample(range(1000), 200))
    for folder, name in [("imagenetv2", "ImageNetV2"), ("imagenet-sketch", "ImageNetSketch"),
                         ("imagenet-adversarial", "ImageNetA"), ("imagenet-rendition", "ImageNetR")]:
        wnids = WNIDS if folder in ("imagenetv2", "imagenet-sketch") else [WNIDS[i] for i in subset]
        v = data.load_dataset(str(make_variant(tmp_path, folder, wnids)))
        assert v.name == name and len(v.classnames) == 1000 and v.classnames[7] == "class 7" and v.train == []
        if name in ("ImageNetA", "ImageNetR"):
            assert v.class_subset == subset  # logits[:, subset] line up with labels 0..199
            assert [y for _, y in v.test] == list(range(200))
            assert [os.path.basename(os.path.dirname(p)) for p, _ in v.test][5] == WNIDS[subset[5]]
        else:
            assert v.class_subset is None
            assert v.test[1][1] == 1 and os.path.basename(os.path.dirname(v.test[1][0])) == (
                "1" if name == "ImageNetV2" else WNIDS[1])


def test_variant_finds_classnames_next_to_imagenet(tmp_path):
    make_imagenet(tmp_path)
    v = data.load_dataset(str(make_variant(tmp_path, "imagenet-sketch", WNIDS, copy_classnames=False)))
    assert v.classnames[3] == "class 3"


def test_malformed_classnames_and_an_incomplete_imagenet_v2(tmp_path):
    base = make_variant(tmp_path, "imagenetv2", WNIDS)
    shutil.rmtree(base / "imagenetv2-matched-frequency-format-val" / "7")
    with pytest.raises(data.DataError, match="format-val/7 is missing: ImageNetV2 is incomplete"):
        data.load_dataset(str(base))
    (base / "classnames.txt").write_text("n00000000 class 0\nn00000001\n")
    with pytest.raises(data.DataError, match="classnames.txt: 'n00000001' is not '<wnid> <class name>'"):
        data.load_dataset(str(base))


def test_variant_without_classnames_is_a_clear_error(tmp_path):
    base = make_variant(tmp_path, "imagenet-rendition", WNIDS[:2], copy_classnames=False)
    with pytest.raises(data.DataError, match="needs ImageNet's classnames.txt.*copy it"):
        data.load_dataset(str(base))


def test_generic_folder_split_is_fixed(tmp_path):
    for c in ("apple", "pear_tree"):
        for i in range(10):
            image(tmp_path / "mine" / c / f"{i}.png")
    a, b = data.load_dataset(str(tmp_path / "mine")), data.load_dataset(str(tmp_path / "mine"))
    assert a.classnames == ["apple", "pear tree"] and a.name == "mine"
    assert (len(a.train), len(a.val), len(a.test)) == (10, 4, 6)
    assert a.train == b.train and a.test == b.test
    assert not set(a.train) & set(a.test)


def test_few_shot_is_exact_and_seeded(tmp_path):
    base = make_split_dataset(tmp_path, "dtd", per_class=(10, 6, 3))
    one, again, other = (data.make_task(str(base), shots=4, seed=s) for s in (1, 1, 2))
    counts = {y: sum(1 for _, label in one.train if label == y) for y in range(5)}
    assert counts == {y: 4 for y in range(5)} and len(one.val) == 5 * 4
    assert one.train == again.train and one.val == again.val
    assert one.train != other.train
    assert len(set(one.train)) == len(one.train)  # without replacement
    assert data.make_task(str(base), shots=0).train == data.load_dataset(str(base)).train


def test_few_shot_follows_dassl():
    """Dassl's generate_fewshot_dataset: labels in order of first appearance, random.sample per label."""
    items = [(f"{i}", i % 3) for i in range(30)]
    random.seed(5)
    expected = [x for y in (0, 1, 2) for x in random.sample([it for it in items if it[1] == y], 4)]
    assert data.few_shot(items, 4, random.Random(5)) == expected


def test_base_to_new(tmp_path):
    base = make_split_dataset(tmp_path, "oxford_pets")  # 5 classes: base 3, new 2
    task = data.make_task(str(base), protocol="base2new", shots=2)
    assert task.classnames == ["sea lion", "dog", "cat"]
    assert {y for _, y in task.train} == {0, 1, 2} and len(task.train) == 6
    b, n = task.evals
    assert (b.name, n.name) == ("base", "new")
    assert n.classnames == ["ant", "bee"] and {y for _, y in n.test} == {0, 1}
    assert all("/ant/" in p for p, y in n.test if y == 0) and len(n.test) == 6
    assert b.template == n.template == "a photo of a {}, a type of pet."


def test_cross_and_dg_targets(tmp_path):
    make_imagenet(tmp_path)
    make_split_dataset(tmp_path, "dtd")
    make_variant(tmp_path, "imagenet-adversarial", WNIDS[:3])
    cross = data.make_task(str(tmp_path / "imagenet"), protocol="cross", shots=2)
    assert [e.name for e in cross.evals] == ["ImageNet", "DescribableTextures"]
    assert cross.evals[1].template == "{} texture."
    dg = data.make_task(str(tmp_path / "imagenet"), protocol="dg", shots=2)
    assert [e.name for e in dg.evals] == ["ImageNet", "ImageNetA"] and dg.evals[1].class_subset == [0, 1, 2]
    explicit = data.make_task(str(tmp_path / "imagenet"), "cross", 2, 1, [str(tmp_path / "dtd")])
    assert [e.name for e in explicit.evals] == ["ImageNet", "DescribableTextures"]
    alone = make_split_dataset(tmp_path / "alone", "dtd")
    with pytest.raises(data.DataError, match="no target datasets.*--eval-data"):
        data.make_task(str(alone), protocol="dg", shots=2)


def test_demo_is_deterministic_and_learnable_looking():
    ds = data.load_dataset("demo")
    assert len(ds.classnames) == 8 and "red circle" in ds.classnames
    assert ds.train == data.load_dataset("demo").train
    means = torch.stack([torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(p), dtype="float32"))
                                      .mean((0, 1)) for p, y in ds.train if y == c]).mean(0) for c in range(8)])
    distances = torch.cdist(means, means) + torch.eye(8) * 1e3
    assert distances.min() > 10  # every pair of classes differs in mean colour by > 10 (of 255)
    task = data.make_task("demo", shots=16)
    images, labels = next(iter(data.loader(task.train, data.train_transform(OPENAI_32), 16, train=True)))
    assert images.shape == (16, 3, 32, 32) and labels.dtype == torch.long


def test_loader_order_follows_set_epoch(monkeypatch):
    items = [(str(i), i) for i in range(20)]
    dataset_loader = data.loader(items, lambda x: x, 4, train=True)
    monkeypatch.setattr(data.ImageDataset, "__getitem__", lambda self, i: (torch.zeros(1), self.items[i][1]))
    orders = []
    for epoch_seed in (7, 7, 8):
        dataset_loader.sampler.set_epoch(epoch_seed)
        orders.append(torch.cat([y for _, y in dataset_loader]).tolist())
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == list(range(20)) and orders[0] != list(range(20))


@pytest.mark.parametrize("n, batch", [(22, 8), (20, 4), (7, 8)])
def test_ranks_batches_together_are_the_one_process_batches(monkeypatch, n, batch):
    """DDP with the global batch split over ranks sees exactly the one-process batches (DistributedSampler
    deals position j to rank j % world), and the same number of them."""
    items = [(str(i), i) for i in range(n)]
    monkeypatch.setattr(data.ImageDataset, "__getitem__", lambda self, i: (torch.zeros(1), self.items[i][1]))
    batches = {}
    for rank, world in [(0, 1), (0, 2), (1, 2)]:
        dataset_loader = data.loader(items, lambda x: x, batch, train=True, rank=rank, world=world)
        dataset_loader.sampler.set_epoch(3)
        batches[rank, world] = [y.tolist() for _, y in dataset_loader]
    one, (r0, r1) = batches[0, 1], (batches[0, 2], batches[1, 2])
    if n % 2 == 0 or n >= batch:  # an odd set smaller than one batch loses an image over 2 ranks
        assert [sorted(a + b) for a, b in zip(r0, r1)] == [sorted(b) for b in one] and len(r0) == len(one)
    assert all(len(a) == len(b) for a, b in zip(r0, r1)) and len(r0) == len(r1)


def test_augmentation_depends_on_seed_and_index_only():
    task = data.make_task("demo", shots=4)
    dataset = data.ImageDataset(task.train, data.train_transform(OPENAI_32), seed=5)
    first = dataset[3][0]
    torch.manual_seed(123)  # the global generator does not matter, nor the order
    for i in (7, 1):
        dataset[i]
    assert torch.equal(dataset[3][0], first)
    dataset.seed = 6
    assert not torch.equal(dataset[3][0], first)
    # the same image in a loader with workers, another batch size and order: the same pixels
    dataset_loader = data.loader(task.train, data.train_transform(OPENAI_32), 8, train=True, workers=2)
    dataset_loader.dataset.seed = 5
    dataset_loader.sampler.set_epoch(9)
    order = list(dataset_loader.sampler)
    images = torch.cat([x for x, _ in dataset_loader])
    assert torch.equal(images[order.index(3)], first)


def test_train_transform_keeps_coops_augmentation_with_the_models_preprocessing():
    """CoOp's random crop and flip, then the model's own normalisation and interpolation (Inception's mean and std,
    bilinear, as a preprocessor_config.json may say): the same crop and flip as with OpenAI's, other values."""
    image = Image.open(data.make_task("demo", shots=1).train[0][0])
    own = clip_model.Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash", "bilinear")
    crop, flip, *_, normalize = data.train_transform(own).transforms
    assert (crop.size, crop.scale, crop.interpolation.value) == ((32, 32), (0.08, 1.0), "bilinear")
    assert isinstance(flip, T.RandomHorizontalFlip) and tuple(normalize.mean) == (0.5, 0.5, 0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ours = data.train_transform(own)(image)
        torch.manual_seed(0)
        openai = data.train_transform(clip_model.Preprocessing(32, interpolation="bilinear"))(image)
    mean, std = torch.tensor(clip_model.MEAN)[:, None, None], torch.tensor(clip_model.STD)[:, None, None]
    assert torch.allclose(ours * 0.5 + 0.5, openai * std + mean, atol=1e-6)  # the same pixels, normalised otherwise
    assert (ours - openai).abs().max() > 0.1


def test_read_only_dataset_folder_is_untouched(tmp_path):
    base = make_split_dataset(tmp_path, "eurosat")
    before = sorted((p, p.stat().st_mtime_ns) for p in base.rglob("*"))
    for p in [base, *base.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        task = data.make_task(str(base), shots=2)
        next(iter(data.loader(task.train, data.train_transform(OPENAI_32), 4, train=True)))
    finally:
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert sorted((p, p.stat().st_mtime_ns) for p in base.rglob("*")) == before


# ------------------------------------------------------------------------------------------ bad input

def test_missing_folder(tmp_path):
    with pytest.raises(data.DataError, match="no dataset folder at .*check --data") as error:
        data.load_dataset(str(tmp_path / "nope"))
    assert "fetch.py" not in str(error.value)
    with pytest.raises(data.DataError, match=f"no dataset folder at .*check --data; `python fetch.py food-101 --root "
                                             f"{tmp_path}` downloads it"):
        data.load_dataset(str(tmp_path / "food-101"))


def test_unrecognised_folder(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    with pytest.raises(data.DataError, match="is not a dataset folder: expected a CoOp dataset folder"):
        data.load_dataset(str(tmp_path / "stuff"))


@pytest.mark.parametrize("content", [None, "{not json", '{"train": []}', '{"train": [[1]], "val": [], "test": []}'])
def test_missing_or_malformed_split(tmp_path, content):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    if content is not None:
        (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(content)
    with pytest.raises(data.DataError, match="split_zhou_DescribableTextures.json is missing or malformed"):
        data.load_dataset(str(tmp_path / "dtd"))


def test_split_entry_pointing_at_missing_image(tmp_path):
    base = make_split_dataset(tmp_path, "dtd")
    os.remove(base / "images" / "dog" / "test_1.jpg")
    with pytest.raises(data.DataError, match="dog/test_1.jpg is named by the dataset's split but does not exist"):
        data.make_task(str(base), shots=2)


def test_fewer_images_than_shots(tmp_path):
    base = make_split_dataset(tmp_path, "dtd")
    with pytest.raises(data.DataError, match="class 'sea lion' of DescribableTextures has 6 training images, "
                                             "fewer than --shots 8: use --shots 6 or less"):
        data.make_task(str(base), shots=8)


def test_corrupt_image_is_named(tmp_path):
    base = make_split_dataset(tmp_path, "dtd")
    (base / "images" / "cat" / "train_0.jpg").write_bytes(b"not an image")
    task = data.make_task(str(base), shots=0)
    with pytest.raises(data.DataError, match="cannot read image .*cat/train_0.jpg.*replace or remove it"):
        list(data.loader(task.train, data.train_transform(OPENAI_32), 64, train=False))


def test_unknown_protocol(tmp_path):
    with pytest.raises(data.DataError, match="unknown protocol 'zeroshot': use one of fewshot, base2new, cross, dg"):
        data.make_task("demo", protocol="zeroshot")


def test_generic_class_with_too_few_images(tmp_path):
    for i in range(2):
        image(tmp_path / "mine" / "tiny_class" / f"{i}.png")
    with pytest.raises(data.DataError, match="tiny_class has 2 images; a class needs at least 4"):
        data.load_dataset(str(tmp_path / "mine"))
