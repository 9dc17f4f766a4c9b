"""Datasets in CoOp's folder layout, few-shot sampling, the four protocols, transforms, and a demo
dataset.

`--data ./data/dtd` reads a folder as KaiyangZhou/CoOp does (its split files, labels and few-shot
sampling), so results compare with the CoOp family of papers; a folder of `<class name>/<image>`
works too, and `demo` is generated. Nothing is ever written into a dataset folder. Layouts:
docs/datasets.md."""
import json
import math
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

import clip_model

HELP = "see docs/datasets.md"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PROTOCOLS = ("fewshot", "base2new", "cross", "dg")
TEMPLATES = {  # CoOp's hand-crafted prompts (trainers/zsclip.py CUSTOM_TEMPLATES), per dataset
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.", "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.", "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.", "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
# folder -> (name, image folder the paths of its split file split_zhou_<name>.json start from)
SPLITS = {
    "caltech-101": ("Caltech101", "101_ObjectCategories"), "oxford_pets": ("OxfordPets", "images"),
    "stanford_cars": ("StanfordCars", ""), "oxford_flowers": ("OxfordFlowers", "jpg"),
    "sun397": ("SUN397", "SUN397"),
    "food-101": ("Food101", "images"), "dtd": ("DescribableTextures", "images"),
    "eurosat": ("EuroSAT", "2750"),
    "ucf101": ("UCF101", "UCF-101-midframes"),
}  # as CoOp's datasets/*.py
# ImageNet test sets: folder -> (name, image folder); all need ImageNet's classnames.txt
VARIANTS = {
    "imagenetv2": ("ImageNetV2", "imagenetv2-matched-frequency-format-val"),
    "imagenet-sketch": ("ImageNetSketch", "images"),
    "imagenet-adversarial": ("ImageNetA", "imagenet-a"),
    "imagenet-rendition": ("ImageNetR", "imagenet-r"),
}
CROSS_TARGETS = [*SPLITS, "fgvc_aircraft"]  # cross-dataset: the ten datasets besides ImageNet

class DataError(ValueError):
    """A dataset folder, split file or image that cannot be used; the message says what to do."""

@dataclass
class Dataset:
    name: str
    root: Path
    classnames: list       # index = label
    template: str
    train: list            # [(image path, label)]
    val: list
    test: list
    # ImageNet-A/R: the columns of their 200 classes among the 1000 classnames
    class_subset: list = None

@dataclass
class Task:
    dataset: str
    root: Path             # the dataset's folder
    classnames: list       # what the model is trained on
    template: str
    train: list
    val: list
    evals: list            # [Dataset]: each is evaluated on its test split, under its name

def _read_json_split(root, name, image_dir):
    path = root / f"split_zhou_{name}.json"
    try:
        split = json.loads(path.read_text())
        items = {s: [(str(root / image_dir / p), int(y), c) for p, y, c in split[s]]
                 for s in ("train", "val", "test")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is missing or malformed ({type(e).__name__}: {e}): download "
                        f"CoOp's split file into {root} ({HELP})") from None
    names = {y: c.replace("_", " ") for s in items.values() for _, y, c in s}
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{path}: labels must be 0..{len(names) - 1}; the file is malformed "
                        f"({HELP})")
    strip = {s: [(p, y) for p, y, _ in v] for s, v in items.items()}
    return Dataset(name, root, [names[y] for y in range(len(names))], TEMPLATES[name], **strip)

def _read_lines(path):
    try:
        return [line.strip() for line in open(path) if line.strip()]
    except OSError:
        raise DataError(f"cannot read {path}: it is part of the dataset's layout "
                        f"({HELP})") from None

def _read_aircraft(root):
    classnames = _read_lines(root / "variants.txt")
    index = {c: i for i, c in enumerate(classnames)}
    split = {}
    for s in ("train", "val", "test"):  # lines "<image id> <variant name>"
        rows = [line.split(" ", 1) for line in _read_lines(root / f"images_variant_{s}.txt")]
        try:
            split[s] = [(str(root / "images" / f"{image}.jpg"), index[variant])
                        for image, variant in rows]
        except (KeyError, ValueError):
            raise DataError(f"{root / f'images_variant_{s}.txt'} names a variant missing from "
                            f"variants.txt ({HELP})") from None
    return Dataset("FGVCAircraft", root, classnames, TEMPLATES["FGVCAircraft"], **split)

def _imagenet_classnames(root):
    """{wnid: class name} from classnames.txt in the folder, or in a sibling imagenet/ folder."""
    for path in (root / "classnames.txt", root.parent / "imagenet" / "classnames.txt"):
        if path.is_file():
            lines = [line.split(" ", 1) for line in _read_lines(path)]
            if bad := [" ".join(words) for words in lines if len(words) != 2]:
                raise DataError(f"{path}: {bad[0]!r} is not '<wnid> <class name>': the file is "
                                f"malformed ({HELP})")
            return dict(lines)
    raise DataError(f"{root} needs ImageNet's classnames.txt (wnid and name per line): copy it "
                    f"from your imagenet folder into {root} ({HELP})")

def _images(folder):
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

def _class_folders(folder):
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_dir() and not p.name.startswith("."))

def _read_imagenet(root):
    names = _imagenet_classnames(root)
    # classnames.txt alone: the images by hand are still to come
    if not (root / "images" / "train").is_dir():
        raise DataError(f"{root / 'images' / 'train'} is missing: ImageNet's images go there by "
                        f"hand, as `python fetch.py imagenet` says ({HELP})")
    # label = index of the sorted WordNet ids, as in CoOp
    wnids = _class_folders(root / "images" / "train")

    def read(split):
        return [(p, y) for y, w in enumerate(wnids) for p in _images(root / "images" / split / w)]
    try:  # no test split: CoOp tests on the official val set
        return Dataset("ImageNet", root, [names[w] for w in wnids], TEMPLATES["ImageNet"],
                       read("train"), [], read("val"))
    except (KeyError, FileNotFoundError) as e:
        raise DataError(f"{root}: {e} is missing from classnames.txt or images/val "
                        f"({HELP})") from None

def _read_variant(root, name, image_dir):
    names, images = _imagenet_classnames(root), root / image_dir
    wnids = sorted(names)  # ImageNet's label order
    if not images.is_dir():
        raise DataError(f"{images} is missing: extract {name} into {root} ({HELP})")
    label = ({w: i for i, w in enumerate(wnids)} if name != "ImageNetV2"
             else {str(i): i for i in range(len(wnids))})
    folders = ([str(i) for i in range(len(wnids))] if name == "ImageNetV2"
               else _class_folders(images))
    if unknown := [f for f in folders if f not in label]:
        raise DataError(f"{images / unknown[0]} is not a class of classnames.txt ({HELP})")
    # ImageNet-V2: a folder per label
    if missing := [f for f in folders if not (images / f).is_dir()]:
        raise DataError(f"{images / missing[0]} is missing: {name} is incomplete ({HELP})")
    subset = [label[f] for f in folders]  # A and R hold 200 of the 1000 classes
    test = [(p, y) for y, f in enumerate(folders) for p in _images(images / f)]
    return Dataset(name, root, [names[w] for w in wnids], TEMPLATES[name], [], [], test,
                   None if subset == list(range(len(wnids))) else subset)

def _read_generic(root, name=None, template="a photo of a {}."):
    """root/<class>/<image>: a fixed 50/20/30 train/val/test split per class (seed 0, like CoOp's
    own)."""
    classes = _class_folders(root)
    empty = [c for c in classes if not _images(root / c)]
    if not classes or len(empty) == len(classes):
        raise DataError(f"{root} is not a dataset folder: expected a CoOp dataset folder "
                        f"({', '.join(CROSS_TARGETS)}, imagenet, {', '.join(VARIANTS)}) or "
                        f"<class name>/<image> sub-folders ({HELP})")
    if empty:  # a class without images would still be a class the model is asked to predict
        raise DataError(f"{root / empty[0]} holds no images ({' '.join(IMAGE_SUFFIXES)}): add its "
                        f"images, or move the folder out of {root} if it is not a class")
    rng, train, val, test = random.Random(0), [], [], []
    for label, c in enumerate(classes):
        images = _images(root / c)
        if len(images) < 4:
            raise DataError(f"{root / c} has {len(images)} images; a class needs at least 4 "
                            "(train, val, test)")
        rng.shuffle(images)
        # as CoOp splits its own
        n_train, n_val = round(0.5 * len(images)), round(0.2 * len(images))
        train += [(p, label) for p in images[:n_train]]
        val += [(p, label) for p in images[n_train:n_train + n_val]]
        test += [(p, label) for p in images[n_train + n_val:]]
    return Dataset(name or root.name, root, [c.replace("_", " ") for c in classes], template,
                   train, val, test)

def load_dataset(data):
    """A Dataset from 'demo' or a folder, recognised by its name or by the split file it holds."""
    if data == "demo":
        return _read_generic(demo_folder(), "demo")
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        known = [*SPLITS, "fgvc_aircraft", "imagenet", *VARIANTS]
        fetch = (f"; `python fetch.py {root.name} --root {root.parent}` downloads it"
                 if root.name in known else "")
        raise DataError(f"no dataset folder at {root}: check --data{fetch} ({HELP})")
    for folder, (name, image_dir) in SPLITS.items():
        if root.name == folder or (root / f"split_zhou_{name}.json").is_file():
            return _read_json_split(root, name, image_dir)
    if root.name == "fgvc_aircraft" or (root / "variants.txt").is_file():
        return _read_aircraft(root)
    if root.name == "imagenet" or (root / "images" / "train").is_dir():
        return _read_imagenet(root)
    for folder, (name, image_dir) in VARIANTS.items():
        if (root.name == folder
                or (root / image_dir).is_dir() and (root / "classnames.txt").is_file()):
            return _read_variant(root, name, image_dir)
    return _read_generic(root)

def few_shot(items, shots, rng):
    """`shots` items per label, without replacement, labels in order of first appearance (Dassl's
    generate_fewshot_dataset: a label with fewer items keeps them all); shots <= 0 keeps
    everything."""
    if shots <= 0:
        return list(items)
    by_label = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    return [x for group in by_label.values()
            for x in (rng.sample(group, shots) if len(group) >= shots else group)]

def subsample_classes(ds, subset):
    """CoCoOp's split: "base" = the first ceil(C/2) labels, "new" = the rest, relabelled from 0."""
    m = math.ceil(len(ds.classnames) / 2)
    keep = range(m) if subset == "base" else range(m, len(ds.classnames))

    def relabel(items):
        return [(p, y - keep.start) for p, y in items if y in keep]
    return replace(ds, classnames=ds.classnames[keep.start:keep.stop], train=relabel(ds.train),
                   val=relabel(ds.val), test=relabel(ds.test))

def make_task(data, protocol="fewshot", shots=16, seed=1, eval_data=()):
    """What a run trains on and evaluates on, for one of PROTOCOLS."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    ds = load_dataset(data)
    counts = Counter(y for _, y in ds.train)
    if ds.train and (absent := [c for c in range(len(ds.classnames)) if not counts[c]]):
        raise DataError(f"class {ds.classnames[absent[0]]!r} of {ds.name} has no training images "
                        "in its split: the split file or the image folders are incomplete "
                        f"({HELP})")
    if shots > 0 and counts and min(counts.values()) < shots:
        label = min(counts, key=counts.get)
        raise DataError(f"class {ds.classnames[label]!r} of {ds.name} has {counts[label]} training "
                        f"images, fewer than --shots {shots}: use --shots {counts[label]} or less")
    rng = random.Random(seed)  # train first, then val, from one generator, as Dassl samples them
    ds = replace(ds, train=few_shot(ds.train, shots, rng), val=few_shot(ds.val, min(shots, 4), rng))
    evals = [replace(ds, name="test")]
    if protocol == "base2new":
        if len(ds.classnames) < 2:
            raise DataError("--protocol base2new splits the classes into a base and a new half, "
                            f"and {ds.name} has {len(ds.classnames)} class: use --protocol fewshot")
        ds = subsample_classes(ds, "base")
        evals = [replace(ds, name="base"), replace(subsample_classes(evals[0], "new"), name="new")]
    elif protocol in ("cross", "dg"):
        siblings = CROSS_TARGETS if protocol == "cross" else VARIANTS
        found = [ds.root.parent / f for f in siblings if (ds.root.parent / f).is_dir()]
        targets = eval_data or [str(f) for f in found if f != ds.root]
        if not targets:
            raise DataError(f"--protocol {protocol}: no target datasets; pass --eval-data FOLDER "
                            f"... or put them next to {ds.root} ({HELP})")
        evals = [ds] + [load_dataset(t) for t in targets]
    if empty := next((e for e in evals if not e.test), None):
        raise DataError(f"{empty.name}: {empty.root}'s test split is empty, so there is nothing to "
                        f"evaluate on: the split file or the image folders are incomplete ({HELP})")
    missing = next((p for items in [ds.train, ds.val] + [e.test for e in evals] for p, _ in items
                    if not os.path.isfile(p)), None)
    if missing:
        raise DataError(f"{missing} is named by the dataset's split but does not exist: the "
                        f"download is incomplete or the folder layout differs ({HELP})")
    return Task(ds.name, ds.root, ds.classnames, ds.template, ds.train, ds.val, evals)

def open_image(path):
    """The image at `path`, loaded; a DataError naming it when it cannot be read (not an image,
    truncated, an unsupported mode, or over PIL's pixel limit, its guard against decompression
    bombs)."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({e}): replace or remove it") from None
    return image

class ImageDataset(torch.utils.data.Dataset):
    """(image, label); image i's augmentation depends on (seed, i) only: the same in any process,
    worker or order."""

    def __init__(self, items, transform, seed=0):
        self.items, self.transform, self.seed = items, transform, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        image = open_image(path)
        # DDP ranks, cached views and resumed runs see the same pixels
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only, which the transforms draw from and fork_rng restores
            # (torch.manual_seed would also reseed the GPUs' generators, unrestored, and queue
            # their seeding with a traceback on the CPU)
            # 64-bit seeds (large --seed)
            torch.default_generator.manual_seed((self.seed * 1_000_003 + i) % 2**64)
            return self.transform(image), label

def train_transform(preprocessing):
    """CoOp's augmentation (a random crop resized to the model's size, with its interpolation; a
    flip), then the model's preprocess from its RGB conversion on (its mean and std).
    `preprocessing`: a clip_model.Preprocessing, the model's (`model.preprocessing`)."""
    p = preprocessing
    crop = T.RandomResizedCrop(p.size, scale=(0.08, 1.0),
                               interpolation=T.InterpolationMode(p.interpolation))
    return T.Compose([crop, T.RandomHorizontalFlip(), *clip_model.transform(p).transforms[-3:]])

def loader(items, transform, batch_size, train, workers=0, device="cpu", rank=0, world=1):
    """This process's batches (images (B, 3, R, R), labels (B,)). Training: `.sampler.set_epoch(s)`
    shuffles, `.dataset.seed = s` augments; rank r gets positions r, r + world, ... of each
    batch_size slice of one order."""
    # evaluation: a 1/world share
    dataset = ImageDataset(items if train else items[rank::world], transform)
    sampler = torch.utils.data.DistributedSampler(items, world, rank, shuffle=True,
                                                  drop_last=True) if train else None
    return torch.utils.data.DataLoader(dataset, batch_size // world if train else batch_size,
                                       sampler=sampler, num_workers=workers,
                                       drop_last=train and len(items) > batch_size,
                                       pin_memory=device == "cuda")

DEMO_CLASSES = {"red circle": (220, 40, 40), "green square": (40, 190, 60),
                "blue triangle": (50, 80, 230), "yellow stripes": (230, 210, 40),
                "magenta checkerboard": (210, 50, 200), "cyan diamond": (40, 210, 220),
                "orange ring": (240, 140, 30), "white triangle": (235, 235, 235)}

def _draw(name, rng, size=64):
    """One demo image: the class's shape or texture in its colour, placed at random, on a noisy
    background."""
    shape, image = name.split()[1], Image.new("RGB", (size, size),
                                              tuple(rng.randint(0, 80) for _ in range(3)))
    draw, fill = ImageDraw.Draw(image), tuple(min(255, max(0, c + rng.randint(-30, 30)))
                                              for c in DEMO_CLASSES[name])
    r = rng.randint(size // 5, size // 3)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape in ("stripes", "checkerboard"):  # textures fill the image
        step = rng.randint(6, 10)
        for i in range(size // step + 1):
            for j in range(size // step + 1):
                if i % 2 == 0 if shape == "stripes" else (i + j) % 2 == 0:
                    draw.rectangle((i * step, j * step, (i + 1) * step - 1, (j + 1) * step - 1),
                                   fill=fill)
    elif shape in ("triangle", "diamond"):
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)] if shape == "triangle" else
                     [(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:  # circle, ring
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill if shape == "circle" else None,
                     outline=fill, width=r // 3)
    return image

def demo_folder(per_class=60):
    """The demo dataset as <class>/<image>.png, generated once (deterministically) into the user's
    cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-prompt-tuning"
    target = cache / f"demo-v2-{per_class}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp, rng = Path(tempfile.mkdtemp(dir=cache, prefix=".demo-")), random.Random(0)
    for name in DEMO_CLASSES:
        folder = tmp / name.replace(" ", "_")
        folder.mkdir()
        for i in range(per_class):
            _draw(name, rng).save(folder / f"{i:03d}.png")
    try:
        os.replace(tmp, target)  # whole or not at all; another process may have won the race
    except OSError:
        if not target.is_dir():
            raise
    return target
