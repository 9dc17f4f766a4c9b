"""fetch.py against a local HTTP server on 127.0.0.1 that stands in for every source: small archives with the real
archives' internal layout, split files behind a Google Drive stand-in (with the confirmation page that large Drive
files get), and the failures a long download meets. Each fetched folder is then trained on (or tested, for the
ImageNet test sets) with train.py. A guard refuses any connection beyond 127.0.0.1."""
import errno
import fcntl
import hashlib
import http.server
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import zipfile

import pytest
from PIL import Image

import data
import fetch
import methods
import train

UUID = "5e2b"  # the token the stand-in's confirmation page hands out


class Source(http.server.BaseHTTPRequestHandler):
    """GET /<host>/<path> serves files["<host>/<path>"], from a Range's first byte when asked. Drive's
    /drive.google.com/uc?id=X serves files["drive/X"] at once, or, for an id in `large`, a confirmation page whose
    form leads to /drive.usercontent.google.com/download. A key in `cut` is sent half, once, then the connection
    closes; a key in `pages` gets that HTML instead of the file, with the status in `status` (200 by default); a key
    in `unsized` is sent without a Content-Length; a key in `stalls` is sent half, then the rest once its event is
    set."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        key = url.path.lstrip("/")
        server.requests.append((key, self.headers.get("Range")))
        if key == "drive.google.com/uc":
            key = "drive/" + query["id"]
            if key in server.large:
                page = confirmation_page(server, query["id"], key in server.old_forms)
                return self.send(page.encode(), "text/html; charset=utf-8")
        elif key == "drive.usercontent.google.com/download":
            if query.get("confirm") != "t" or query.get("uuid") != UUID:
                return self.send_error(403)
            key = "drive/" + query["id"]
        if key in server.pages:
            return self.send(server.pages[key].encode(), "text/html; charset=utf-8", server.status.get(key, 200))
        if key not in server.files:
            return self.send_error(404)
        body, start = server.files[key], 0
        if getattr(self, "ranges", True) and (match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")):
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        if key not in server.unsized:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if key in server.cut:
            server.cut.discard(key)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            return
        if key in server.stalls:
            half = start + (len(body) - start) // 2
            self.wfile.write(body[start:half])
            server.stalls[key].wait(timeout=30)
            start = half
        self.wfile.write(body[start:])

    def send(self, body, content_type, status=200):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def confirmation_page(server, drive_id, old_form=False):
    """Google Drive's page for a file too large to scan for viruses, with its download form (as served in 2024);
    an older form carried the id in its action's query, and only the confirmation in its fields."""
    action = f"http://127.0.0.1:{server.server_address[1]}/drive.usercontent.google.com/download"
    fields = {"confirm": "t", "uuid": UUID}
    if old_form:
        action += f"?id={drive_id}&amp;export=download"
    else:
        fields = {"id": drive_id, "export": "download", **fields}
    inputs = "".join(f'<input type="hidden" name="{name}" value="{value}">' for name, value in fields.items())
    return (f'<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>'
            f'<div class="uc-main"><p class="uc-warning-caption">Google Drive can\'t scan this file for viruses.</p>'
            f'<form id="download-form" action="{action}" method="get">'
            f'<input type="submit" id="uc-download-link" value="Download anyway"/>{inputs}</form></div></body></html>')


@pytest.fixture
def server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Source)
    server.files, server.large, server.cut, server.pages, server.requests = {}, set(), set(), {}, []
    server.status, server.unsized, server.old_forms, server.stalls = {}, set(), set(), {}
    # shutdown() waits for serve_forever's next poll: every 0.5 s by default, half a second per test
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Any connection to an address other than 127.0.0.1 fails the test."""
    connect = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"a test tried to reach {address}"
        return connect(address, *args, **kwargs)
    monkeypatch.setattr(socket, "create_connection", guarded)


def local(url, server):
    """The URL on the stand-in server: https://host/path -> http://127.0.0.1:port/host/path."""
    return re.sub(r"^https?://", f"http://127.0.0.1:{server.server_address[1]}/", url)


def key_of(url):
    """The stand-in's key for a source URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc == "drive.google.com":
        return "drive/" + dict(urllib.parse.parse_qsl(parts.query))["id"]
    return parts.netloc + parts.path


def serve(monkeypatch, server, name, contents, large=()):
    """Serve `contents` ({file name: bytes}) as dataset `name`'s files; each File's URL, size and checksum (where it
    has one) become those of the stand-in's bytes."""
    recipe = fetch.RECIPES[name]
    files = []
    for file in recipe.files:
        body = contents[file.name]
        server.files[key_of(file.url)] = body
        if file.name in large:
            server.large.add(key_of(file.url))
        checksum = None
        if file.checksum:  # the same algorithm, over the stand-in's bytes
            algorithm = file.checksum.split(":")[0]
            checksum = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
        files.append(file._replace(url=local(file.url, server), size=len(body), checksum=checksum))
    monkeypatch.setitem(fetch.RECIPES, name, recipe._replace(files=tuple(files)))


# --- archives with the real archives' layout ------------------------------------------------------------------------

def jpeg(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def colour(label):
    return ((53 * label) % 256, (101 * label + 90) % 256, (197 * label + 30) % 256)


def tar(members, compress="gz"):
    """A tar archive of {path: bytes}; a None body is a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compress}" if compress else "w") as archive:
        for path, body in members.items():
            info = tarfile.TarInfo(path)
            if body is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(body)
                archive.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def zip_(members):
    """A zip archive of {path: bytes}; a None body is a directory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, body in members.items():
            archive.writestr(path + "/" if body is None else path, body or b"")
    return buffer.getvalue()


def split_dataset(classes, path, per_class=(3, 2, 2)):
    """Images at path.format(c=class folder, i=index) and CoOp's split of them: {train, val, test: [[path, label,
    class name]]}, the name being the folder's in lower case with spaces, as in CoOp's files."""
    images, split = {}, {}
    for part, n in zip(("train", "val", "test"), per_class):
        split[part] = []
        for label, folder in enumerate(classes):
            for i in range(n):
                relative = path.format(c=folder, i=f"{part}{i}")
                images[relative] = jpeg(colour(label))
                split[part].append([relative, label, folder.lower().replace("_", " ")])
    return images, json.dumps(split).encode()


def under(prefix, images):
    return {f"{prefix}/{path}": body for path, body in images.items()}


# Each builder gives {file name: bytes} for one dataset: its archives laid out inside as the real ones are (the
# top folders the recipe moves, and a few of the files around them), and its split file.

def dtd():
    images, split = split_dataset(["banded", "woven"], "{c}/{c}_{i}.jpg")
    archive = tar({**under("dtd/images", images), "dtd/labels/labels_joint_anno.txt": b"",
                   "dtd/imdb/imdb.mat": b""})
    return {"dtd-r1.0.1.tar.gz": archive, "split_zhou_DescribableTextures.json": split}


def eurosat():
    images, split = split_dataset(["AnnualCrop", "SeaLake"], "{c}/{c}_{i}.jpg")
    return {"EuroSAT.zip": zip_(under("2750", images)), "split_zhou_EuroSAT.json": split}


def caltech():  # CaltechDATA's zip holds the tar.gz CoOp's DATASETS.md links, next to the annotations
    images, split = split_dataset(["accordion", "airplanes"], "{c}/image_{i}.jpg")
    inner = tar({**under("101_ObjectCategories", images), "101_ObjectCategories/BACKGROUND_Google": None})
    archive = zip_({"caltech-101": None, "caltech-101/101_ObjectCategories.tar.gz": inner,
                    "caltech-101/Annotations.tar": tar({"Annotations": None}, compress=""),
                    "caltech-101/show_annotation.m": b""})
    return {"caltech-101.zip": archive, "split_zhou_Caltech101.json": split}


def flowers():
    images, split = split_dataset(["pink_primrose", "globe_thistle"], "image_{c}_{i}.jpg")
    return {"102flowers.tgz": tar(under("jpg", images)), "split_zhou_OxfordFlowers.json": split}


def pets():
    images, split = split_dataset(["Abyssinian", "beagle"], "{c}_{i}.jpg")
    return {"images.tar.gz": tar(under("images", images)), "split_zhou_OxfordPets.json": split}


def ucf():
    images, split = split_dataset(["Apply_Eye_Makeup", "Archery"], "{c}/v_{c}_g01_{i}.jpg")
    return {"UCF-101-midframes.zip": zip_(under("UCF-101-midframes", images)), "split_zhou_UCF101.json": split}


def aircraft():
    variants, members = ["707-320", "A340-500"], {}
    for part, n in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for label, variant in enumerate(variants):
            for i in range(n):
                image_id = f"{label}{part}{i}"
                members[f"fgvc-aircraft-2013b/data/images/{image_id}.jpg"] = jpeg(colour(label))
                lines.append(f"{image_id} {variant}\n")
        members[f"fgvc-aircraft-2013b/data/images_variant_{part}.txt"] = "".join(lines).encode()
    members["fgvc-aircraft-2013b/data/variants.txt"] = "".join(v + "\n" for v in variants).encode()
    members["fgvc-aircraft-2013b/README.html"] = b""
    return {"fgvc-aircraft-2013b.tar.gz": tar(members)}


def food():
    images, split = split_dataset(["apple_pie", "baklava"], "{c}/{i}.jpg")
    archive = tar({**under("food-101/images", images), "food-101/meta/classes.txt": b"apple_pie\nbaklava\n"})
    return {"food-101.tar.gz": archive, "split_zhou_Food101.json": split}


def sun():
    images, split = split_dataset(["a/abbey", "b/bakery/shop"], "{c}/sun_{i}.jpg")
    archive = tar({**under("SUN397", images), "SUN397/ClassName.txt": b"/a/abbey\n/b/bakery/shop\n"})
    return {"SUN397.tar.gz": archive, "split_zhou_SUN397.json": split}


def cars():  # the split file only: the images are put in by hand (val comes from cars_train, as in CoOp's file)
    split = {}
    for part, n in (("train", 3), ("val", 2), ("test", 2)):
        folder = "cars_test" if part == "test" else "cars_train"
        split[part] = [[f"{folder}/{part}{label}{i}.jpg", label, name] for label, name in
                       enumerate(["2012 Tesla Model S", "1993 Volvo 240 Sedan"]) for i in range(n)]
    return {"split_zhou_StanfordCars.json": json.dumps(split).encode()}


BUILDERS = {"dtd": dtd, "eurosat": eurosat, "caltech-101": caltech, "oxford_flowers": flowers, "oxford_pets": pets,
            "ucf101": ucf, "fgvc_aircraft": aircraft, "food-101": food, "sun397": sun, "stanford_cars": cars}


# --- every dataset: fetched, then trained on ----------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILDERS)
def test_fetch_then_train(monkeypatch, server, tmp_path, capsys, name):
    """Each dataset's files come through the stand-in (UCF101's zip and DTD's split file behind Drive's
    confirmation page, as large files), land in CoOp's layout, and train.py trains on the folder."""
    contents = BUILDERS[name]()
    serve(monkeypatch, server, name, contents, large={"UCF-101-midframes.zip", "split_zhou_DescribableTextures.json"})
    fetch.main([name, "--root", str(tmp_path)])
    folder = tmp_path / fetch.RECIPES[name].folder
    out = capsys.readouterr().out
    if name == "stanford_cars":  # by hand: the split file is fetched, and what to do is said
        assert "Kaggle" in out and str(folder) in out
        assert [p.name for p in folder.iterdir()] == ["split_zhou_StanfordCars.json"]
        for part in json.loads(contents["split_zhou_StanfordCars.json"]).values():
            for path, label, _ in part:
                (folder / path).parent.mkdir(exist_ok=True)
                (folder / path).write_bytes(jpeg(colour(label)))
        fetch.main([name, "--root", str(tmp_path)])
        assert "stanford_cars: complete at" in capsys.readouterr().out
    else:
        assert f"{name}: ready at {folder}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # the archives and the work folder are gone
    if name in ("ucf101", "dtd"):
        assert ("drive.usercontent.google.com/download", None) in server.requests  # through the confirmation page
    dataset = data.load_dataset(str(folder))
    assert len(dataset.classnames) == 2 and (len(dataset.train), len(dataset.val), len(dataset.test)) == (6, 4, 4)
    assert all(os.path.isfile(path) for path, _ in dataset.train + dataset.val + dataset.test)
    run = train.run(methods.parse_args(["--method", "coop", "--data", str(folder), "--backbone", "tiny",
                                        "--shots", "2", "--epochs", "1", "--output", str(tmp_path / "run")]))
    assert run["dataset"] == dataset.name and 0 <= run["accuracy"]["test"] <= 100


def test_layouts_are_coops(monkeypatch, server, tmp_path):
    """The folders around the images are kept as CoOp's DATASETS.md shows them."""
    for name in ("dtd", "caltech-101", "fgvc_aircraft", "food-101", "sun397"):
        serve(monkeypatch, server, name, BUILDERS[name]())
    fetch.main(["dtd", "caltech-101", "fgvc_aircraft", "food-101", "sun397", "--root", str(tmp_path)])
    listing = {folder.name: sorted(p.name for p in folder.iterdir()) for folder in tmp_path.iterdir()}
    assert listing == {
        "dtd": ["images", "imdb", "labels", "split_zhou_DescribableTextures.json"],
        "caltech-101": ["101_ObjectCategories", "split_zhou_Caltech101.json"],
        "fgvc_aircraft": ["images", "images_variant_test.txt", "images_variant_train.txt", "images_variant_val.txt",
                          "variants.txt"],
        "food-101": ["images", "meta", "split_zhou_Food101.json"],
        "sun397": ["SUN397", "split_zhou_SUN397.json"],
    }
    assert sorted(p.name for p in (tmp_path / "caltech-101" / "101_ObjectCategories").iterdir()) == [
        "BACKGROUND_Google", "accordion", "airplanes"]


# --- ImageNet (by hand) and its four test sets --------------------------------------------------------------------

WNIDS = [f"n{i:08d}" for i in range(1000)]
CLASSNAMES = "".join(f"{wnid} class {i}\n" for i, wnid in enumerate(WNIDS)).encode()


def imagenet_sets():
    """{dataset: {file name: bytes}} for the four test sets; each holds images of classes 0 and 1 (ImageNet-V2's
    folders are the labels 0..999, all there, most empty here). Each archive is compressed as the real one is:
    ImageNet-V2's .tar.gz on Hugging Face is a plain tar, as are ImageNet-A's and -R's .tar."""
    images = {f"{WNIDS[label]}/{i}.jpg": jpeg(colour(label)) for label in (0, 1) for i in range(2)}
    v2 = {f"imagenetv2-matched-frequency-format-val/{label}": None for label in range(1000)}
    v2.update({f"imagenetv2-matched-frequency-format-val/{label}/{i}.jpeg": jpeg(colour(label))
               for label in (0, 1) for i in range(2)})
    return {
        "imagenetv2": {"imagenetv2-matched-frequency.tar.gz": tar(v2, compress="")},
        "imagenet-sketch": {"ImageNet-Sketch.zip": zip_(under("sketch", images))},
        "imagenet-adversarial": {"imagenet-a.tar": tar({**under("imagenet-a", images), "imagenet-a/README.txt": b""},
                                                       compress="")},
        "imagenet-rendition": {"imagenet-r.tar": tar({**under("imagenet-r", images), "imagenet-r/README.txt": b""},
                                                     compress="")},
    }


def test_a_plain_tar_named_tar_gz_is_unpacked(monkeypatch, server, tmp_path, capsys):
    """Hugging Face's imagenetv2-matched-frequency.tar.gz is a plain tar: 1,264,079,360 bytes in TensorFlow Datasets'
    record, a multiple of 512 as a tar's blocks are. An archive is read by its content, not by its name."""
    archive = imagenet_sets()["imagenetv2"]["imagenetv2-matched-frequency.tar.gz"]
    assert len(archive) % 512 == 0 and archive[:2] != b"\x1f\x8b"  # a plain tar: no gzip magic
    serve(monkeypatch, server, "imagenetv2", {"imagenetv2-matched-frequency.tar.gz": archive,
                                              "classnames.txt": CLASSNAMES})
    fetch.main(["imagenetv2", "--root", str(tmp_path)])
    assert "imagenetv2: ready at" in capsys.readouterr().out
    assert len(data.load_dataset(str(tmp_path / "imagenetv2")).test) == 4


def closed_port():
    """A port on 127.0.0.1 where nothing listens: a source that cannot be reached."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_imagenet_steps_again_and_when_drive_is_unreachable(monkeypatch, server, tmp_path, capsys):
    """`fetch.py imagenet` run again before the images are in place prints the steps again, without an error; and
    so it does when Google Drive, which serves classnames.txt, cannot be reached."""
    serve(monkeypatch, server, "imagenet", {"classnames.txt": CLASSNAMES})
    steps = "ILSVRC2012_img_train.tar"
    for _ in range(2):
        fetch.main(["imagenet", "--root", str(tmp_path)])
        out, err = capsys.readouterr()
        assert steps in out and str(tmp_path / "imagenet") in out and err == ""
    with pytest.raises(data.DataError, match=r"imagenet/images/train is missing: ImageNet's images go there by hand"):
        data.load_dataset(str(tmp_path / "imagenet"))
    recipe = fetch.RECIPES["imagenet"]
    offline = re.sub(r"127.0.0.1:\d+", f"127.0.0.1:{closed_port()}", recipe.files[0].url)
    monkeypatch.setitem(fetch.RECIPES, "imagenet", recipe._replace(files=(recipe.files[0]._replace(url=offline),)))
    with pytest.raises(SystemExit, match="not fetched: imagenet"):
        fetch.main(["imagenet", "--root", str(tmp_path / "offline")])
    out, err = capsys.readouterr()
    assert steps in out and str(tmp_path / "offline" / "imagenet") in out and "error: imagenet: cannot reach" in err


def test_imagenet_sketch_is_checked(monkeypatch, server, tmp_path, capsys):
    """ImageNet-Sketch.zip has a recorded SHA256 now: a zip with other contents at its URL (the source changed) is
    refused and deleted, where it used to be unpacked as ImageNet-Sketch."""
    sketch = key_of(fetch.RECIPES["imagenet-sketch"].files[0].url)
    contents = {**imagenet_sets()["imagenet-sketch"], "classnames.txt": CLASSNAMES}
    serve(monkeypatch, server, "imagenet-sketch", contents)
    server.files[sketch] = zip_(under("sketch", {f"{WNIDS[0]}/other.jpg": jpeg(colour(0))}))
    line = fails("imagenet-sketch", tmp_path, capsys)
    assert re.search(r"ImageNet-Sketch.zip gave a file whose SHA256 is [0-9a-f]{64}, not the published [0-9a-f]{64}; "
                     r"it was deleted", line)
    assert not (tmp_path / "imagenet-sketch").exists()
    assert not (tmp_path / ".fetch" / "downloads" / "imagenet-sketch" / "ImageNet-Sketch.zip").exists()


@pytest.mark.slow
def test_imagenet_by_hand_and_its_test_sets(monkeypatch, server, tmp_path, capsys):
    """ImageNet: classnames.txt is fetched and the steps by hand are printed; with its images in place, a run
    trained on it is tested on the four fetched test sets (--protocol dg)."""
    serve(monkeypatch, server, "imagenet", {"classnames.txt": CLASSNAMES})
    fetch.main(["imagenet", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ILSVRC2012_img_train.tar" in out and "ILSVRC2012_img_val.tar" in out and str(tmp_path / "imagenet") in out
    assert (tmp_path / "imagenet" / "classnames.txt").read_bytes() == CLASSNAMES
    for label in (0, 1):  # what the steps by hand make
        for split, n in (("train", 3), ("val", 2)):
            for i in range(n):
                path = tmp_path / "imagenet" / "images" / split / WNIDS[label] / f"{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpeg(colour(label)))
    fetch.main(["imagenet", "--root", str(tmp_path)])
    assert "imagenet: complete at" in capsys.readouterr().out
    for name, contents in imagenet_sets().items():
        serve(monkeypatch, server, name, {**contents, "classnames.txt": CLASSNAMES})
    fetch.main(["imagenetv2", "ImageNetSketch", "imagenet-adversarial", "imagenet-rendition", "--root", str(tmp_path)])
    layout = {name: sorted(p.name for p in (tmp_path / name).iterdir()) for name in imagenet_sets()}
    assert layout == {"imagenetv2": ["classnames.txt", "imagenetv2-matched-frequency-format-val"],
                      "imagenet-sketch": ["classnames.txt", "images"],
                      "imagenet-adversarial": ["classnames.txt", "imagenet-a"],
                      "imagenet-rendition": ["classnames.txt", "imagenet-r"]}
    run = train.run(methods.parse_args(["--method", "coop", "--data", str(tmp_path / "imagenet"), "--protocol", "dg",
                                        "--backbone", "tiny", "--shots", "2", "--epochs", "1",
                                        "--output", str(tmp_path / "run")]))
    assert sorted(run["accuracy"]) == sorted(["ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"])


# --- what a long download meets, on DTD -------------------------------------------------------------------------------

def test_dry_run_lists_every_dataset_with_its_sources_and_sizes(tmp_path, capsys):
    fetch.main(["--dry-run", "all", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    for name, recipe in fetch.RECIPES.items():
        assert f"\n{name}: " in "\n" + out
        for file in recipe.files:
            assert file.url in out and file.name in out
    assert "dtd: 625.2 MB, into" in out and "sun397: 39.1 GB, into" in out
    assert re.search(r"in all: \d+\.\d GB to download, and caltech-101, ucf101, whose size is unpublished", out)
    assert list(tmp_path.iterdir()) == []  # nothing written


DTD_ARCHIVE = "www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
DTD_SPLIT = "drive/1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"


def fails(name, root, capsys):
    """Run fetch on `name`, which must fail: its one error line."""
    with pytest.raises(SystemExit, match=f"not fetched: {name}"):
        fetch.main([name, "--root", str(root)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}: "), lines
    return lines[0]


def test_second_run_skips(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    fetch.main(["dtd", "--root", str(tmp_path)])
    server.requests.clear()
    fetch.main(["DescribableTextures", "--root", str(tmp_path)])
    assert server.requests == [] and "dtd: complete at" in capsys.readouterr().out


def test_interrupted_download_resumes(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    archive = "www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
    server.cut.add(archive)
    with pytest.raises(SystemExit, match="not fetched: dtd"):
        fetch.main(["dtd", "--root", str(tmp_path)])
    error = capsys.readouterr().err
    assert re.search(r"error: dtd: the download from http://\S+dtd-r1.0.1.tar.gz stopped at .* run again; it resumes",
                     error)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fetch"]  # no dataset folder, half made or not
    part = tmp_path / ".fetch" / "downloads" / "dtd" / "dtd-r1.0.1.tar.gz.part"
    half = part.stat().st_size
    assert 0 < half < len(server.files[archive])
    fetch.main(["dtd", "--root", str(tmp_path)])
    assert (archive, f"bytes={half}-") in server.requests
    assert len(data.load_dataset(str(tmp_path / "dtd")).train) == 6


def test_bytes_reach_the_disk_as_they_arrive(monkeypatch, server, tmp_path):
    """On a slow link the .part grows with what has arrived (reads of at most 64 KiB, not 1 MiB), so that the bar
    moves and a kill loses little: DTD's archive, 1.5 MiB here (its imdb.mat made of random bytes), stalls half way
    until its .part holds bytes."""
    contents = dtd()
    members = tarfile.open(fileobj=io.BytesIO(contents["dtd-r1.0.1.tar.gz"]))
    members = {m.name: members.extractfile(m).read() if m.isfile() else None for m in members}
    members["dtd/imdb/imdb.mat"] = random.Random(0).randbytes(3 << 19)
    contents["dtd-r1.0.1.tar.gz"] = tar(members)
    serve(monkeypatch, server, "dtd", contents)
    part = tmp_path / ".fetch" / "downloads" / "dtd" / "dtd-r1.0.1.tar.gz.part"
    release, seen = server.stalls.setdefault(DTD_ARCHIVE, threading.Event()), []

    def watch():  # the .part's size while the server waits, then the rest is sent
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (part.is_file() and part.stat().st_size):
            time.sleep(0.01)
        seen.append(part.stat().st_size if part.is_file() else 0)
        release.set()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    fetch.main(["dtd", "--root", str(tmp_path)])
    watcher.join()
    assert 0 < seen[0] <= len(server.files[DTD_ARCHIVE]) // 2 and (tmp_path / "dtd" / "images").is_dir()


def test_progress_off_a_terminal_is_plain_lines(monkeypatch, server, tmp_path, capsys):
    """In a log (stdout and stderr not terminals, as under capsys), progress is whole lines, no carriage returns;
    here a line at every read, DTD's archive being downloaded, checked and unpacked."""
    serve(monkeypatch, server, "dtd", dtd())
    monkeypatch.setattr(fetch, "LOG_EVERY", 0)
    fetch.main(["dtd", "--root", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "\r" not in out and err == ""
    size = len(server.files[DTD_ARCHIVE])
    assert size < 1000  # tqdm writes it in bytes
    for what in ("dtd-r1.0.1.tar.gz", "checking dtd-r1.0.1.tar.gz", "unpacking dtd-r1.0.1.tar.gz"):
        assert re.search(rf"^{what}: 100% {size}/{size} \[", out, re.MULTILINE), what


def test_corrupt_archive_fails_its_checksum(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    archive = "www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
    good = server.files[archive]
    server.files[archive] = good[:100] + bytes([good[100] ^ 1]) + good[101:]
    with pytest.raises(SystemExit):
        fetch.main(["dtd", "--root", str(tmp_path)])
    assert re.search(r"error: dtd: http://\S+ gave a file whose MD5 is [0-9a-f]{32}, not the published [0-9a-f]{32}; "
                     r"it was deleted: run again", capsys.readouterr().err)
    assert not (tmp_path / "dtd").exists()
    assert [p.name for p in (tmp_path / ".fetch" / "downloads" / "dtd").iterdir()] == [
        "split_zhou_DescribableTextures.json"]
    server.files[archive] = good
    fetch.main(["dtd", "--root", str(tmp_path)])
    assert (tmp_path / "dtd" / "images" / "woven").is_dir()


def test_missing_file_is_named(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    del server.files["drive/1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"]
    with pytest.raises(SystemExit, match="not fetched: dtd"):
        fetch.main(["dtd", "--root", str(tmp_path)])
    assert re.search(r"error: dtd: http://\S+id=1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x answered HTTP 404 .*check the URL",
                     capsys.readouterr().err)
    assert not (tmp_path / "dtd").exists()


def test_server_that_ignores_ranges_restarts_cleanly(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    server.cut.add(DTD_ARCHIVE)
    fails("dtd", tmp_path, capsys)
    half = (tmp_path / ".fetch" / "downloads" / "dtd" / "dtd-r1.0.1.tar.gz.part").stat().st_size
    monkeypatch.setattr(Source, "ranges", False, raising=False)  # a 200 with the whole file, whatever the Range
    server.requests.clear()
    fetch.main(["dtd", "--root", str(tmp_path)])  # the MD5 passes only if the file was written afresh, not appended
    assert server.requests[0] == (DTD_ARCHIVE, f"bytes={half}-") and (tmp_path / "dtd" / "images").is_dir()


def test_ctrl_c_keeps_the_download_and_a_complete_part_is_taken(monkeypatch, server, tmp_path):
    """Ctrl-C after the last byte, before the check: the next run asks for the bytes after the end, gets a 416 whose
    Content-Range says the file has as many, and takes the .part once its MD5 passes."""
    serve(monkeypatch, server, "dtd", dtd())
    verify = fetch.verify

    def interrupted(path, file):
        if file.name == "dtd-r1.0.1.tar.gz":
            raise KeyboardInterrupt
        verify(path, file)
    monkeypatch.setattr(fetch, "verify", interrupted)
    with pytest.raises(SystemExit, match="interrupted while fetching dtd: run again to resume"):
        fetch.main(["dtd", "--root", str(tmp_path)])
    part = tmp_path / ".fetch" / "downloads" / "dtd" / "dtd-r1.0.1.tar.gz.part"
    assert part.read_bytes() == server.files[DTD_ARCHIVE]
    monkeypatch.setattr(fetch, "verify", verify)
    server.requests.clear()
    fetch.main(["dtd", "--root", str(tmp_path)])
    assert server.requests[0] == (DTD_ARCHIVE, f"bytes={len(server.files[DTD_ARCHIVE])}-")
    assert (tmp_path / "dtd" / "images").is_dir()


def test_a_part_longer_than_the_file_starts_again(monkeypatch, server, tmp_path):
    serve(monkeypatch, server, "dtd", dtd())
    downloads = tmp_path / ".fetch" / "downloads" / "dtd"
    downloads.mkdir(parents=True)
    (downloads / "split_zhou_DescribableTextures.json.part").write_bytes(server.files[DTD_SPLIT] + b"garbage")
    fetch.main(["dtd", "--root", str(tmp_path)])  # no checksum guards the split file: the length must
    assert (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").read_bytes() == server.files[DTD_SPLIT]


def test_an_older_drive_form_with_a_query_in_its_action(monkeypatch, server, tmp_path):
    serve(monkeypatch, server, "dtd", dtd(), large={"split_zhou_DescribableTextures.json"})
    server.old_forms.add(DTD_SPLIT)
    fetch.main(["dtd", "--root", str(tmp_path)])
    assert (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").read_bytes() == server.files[DTD_SPLIT]


def test_a_file_sent_without_its_length(monkeypatch, server, tmp_path):
    serve(monkeypatch, server, "dtd", dtd())
    server.unsized |= {DTD_ARCHIVE, DTD_SPLIT}
    fetch.main(["dtd", "--root", str(tmp_path)])
    assert len(data.load_dataset(str(tmp_path / "dtd")).train) == 6


def test_keep_archives(monkeypatch, server, tmp_path):
    serve(monkeypatch, server, "dtd", dtd())
    fetch.main(["dtd", "--root", str(tmp_path), "--keep-archives"])
    downloads = tmp_path / ".fetch" / "downloads" / "dtd"
    assert sorted(p.name for p in downloads.iterdir()) == ["dtd-r1.0.1.tar.gz", "split_zhou_DescribableTextures.json"]
    shutil.rmtree(tmp_path / "dtd")
    server.requests.clear()
    fetch.main(["dtd", "--root", str(tmp_path)])  # made again from the archives kept, which are then deleted
    assert server.requests == [] and (tmp_path / "dtd" / "images").is_dir() and not downloads.exists()


def test_a_file_saved_by_hand_is_checked(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    downloads = tmp_path / ".fetch" / "downloads" / "dtd"
    downloads.mkdir(parents=True)
    (downloads / "dtd-r1.0.1.tar.gz").write_bytes(b"an error page saved by mistake")
    line = fails("dtd", tmp_path, capsys)
    assert re.search(r"gave a file whose MD5 is [0-9a-f]{32}, not the published [0-9a-f]{32}; it was deleted", line)
    assert not (downloads / "dtd-r1.0.1.tar.gz").exists() and DTD_ARCHIVE not in [key for key, _ in server.requests]


@pytest.mark.parametrize("status, said", [(503, "answered HTTP 503 Service Unavailable: the server is busy or down; "
                                                  "run again later"),
                                          (403, "Google Drive refuses http")])
def test_busy_servers_and_a_quota_sent_as_an_error(monkeypatch, server, tmp_path, capsys, status, said):
    serve(monkeypatch, server, "dtd", dtd())
    server.pages[DTD_ARCHIVE] = "<html><title>Google Drive - Quota exceeded</title></html>" if status == 403 else ""
    server.status[DTD_ARCHIVE] = status
    assert said in fails("dtd", tmp_path, capsys)


QUOTA_PAGE = ("<html><head><title>Google Drive - Quota exceeded</title></head><body><p>Sorry, you can't view or "
              "download this file at this time.</p><p>Too many users have viewed or downloaded this file recently."
              "</p></body></html>")  # Drive's page in place of a file downloaded too often


def test_drive_quota_and_web_pages_are_named(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    server.pages[DTD_SPLIT] = QUOTA_PAGE
    line = fails("dtd", tmp_path, capsys)
    saved = tmp_path / ".fetch" / "downloads" / "dtd" / "split_zhou_DescribableTextures.json"
    assert re.search(rf"Google Drive refuses http://\S+id=1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x for now .* run again "
                     rf"tomorrow, or download it in a browser and save it as {re.escape(str(saved))}$", line)
    assert not (tmp_path / "dtd").exists() and DTD_ARCHIVE not in [key for key, _ in server.requests]  # small first
    saved.write_bytes(server.files[DTD_SPLIT])  # saved by hand, as the message says: the next run takes it
    fetch.main(["dtd", "--root", str(tmp_path)])
    assert (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").read_bytes() == server.files[DTD_SPLIT]
    del server.pages[DTD_SPLIT]
    server.pages[DTD_ARCHIVE] = "<html><body>Our site has moved.</body></html>"
    line = fails("dtd", tmp_path / "elsewhere", capsys)
    assert re.search(r"http://\S+dtd-r1.0.1.tar.gz answered with a web page, not the file: open it in a browser", line)


def test_a_split_file_that_is_a_web_page(monkeypatch, server, tmp_path, capsys):
    """A web page sent in place of DTD's split file, under a file's content type (as a page saved by mistake would
    be): one instruction, to save the real file where the next run takes it, in a folder that is there."""
    serve(monkeypatch, server, "dtd", dtd())
    split = server.files[DTD_SPLIT]
    server.files[DTD_SPLIT] = QUOTA_PAGE.replace("<html>", "<!DOCTYPE html>\n<html>").encode()
    line = fails("dtd", tmp_path, capsys)
    saved = tmp_path / ".fetch" / "downloads" / "dtd" / "split_zhou_DescribableTextures.json"
    assert re.search(rf"http://\S+id=1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x sent a web page, not the file; it was deleted: "
                     rf"open it in a browser; if it gives the file, save it as {re.escape(str(saved))} and run again$",
                     line)
    assert line.count(str(tmp_path)) == 1 and saved.parent.is_dir() and not saved.exists()  # no other path named
    assert DTD_ARCHIVE not in [key for key, _ in server.requests]
    saved.write_bytes(split)
    fetch.main(["dtd", "--root", str(tmp_path)])
    assert len(data.load_dataset(str(tmp_path / "dtd")).train) == 6


def test_a_refused_split_file_costs_no_check_or_unpacking_of_the_archive(monkeypatch, server, tmp_path, capsys):
    """SUN397.tar.gz is 39 GB: while Drive refuses SUN397's split file, each run stops before the archive is
    downloaded, checked or unpacked; once the split file is saved by hand, the archive is checked and unpacked once."""
    archive, split = (key_of(file.url) for file in fetch.RECIPES["sun397"].files)
    serve(monkeypatch, server, "sun397", sun())
    server.pages[split] = QUOTA_PAGE
    verify, unpack = fetch.verify, fetch.unpack
    checked, unpacked = [], []

    def counted_verify(path, file):
        checked.append(file.name)
        verify(path, file)

    def counted_unpack(path, *args):
        unpacked.append(path.name)
        unpack(path, *args)
    monkeypatch.setattr(fetch, "verify", counted_verify)
    monkeypatch.setattr(fetch, "unpack", counted_unpack)
    for _ in range(3):
        assert "Google Drive refuses" in fails("sun397", tmp_path, capsys)
    assert "SUN397.tar.gz" not in checked and unpacked == [] and archive not in [key for key, _ in server.requests]
    downloads = tmp_path / ".fetch" / "downloads" / "sun397"
    (downloads / "split_zhou_SUN397.json").write_bytes(server.files[split])  # saved from a browser, as said
    fetch.main(["sun397", "--root", str(tmp_path)])
    assert checked.count("SUN397.tar.gz") == 1 and unpacked == ["SUN397.tar.gz"]
    assert len(data.load_dataset(str(tmp_path / "sun397")).train) == 6


def test_too_little_space_is_said_before_downloading(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    archive, split = (file.size for file in fetch.RECIPES["dtd"].files)
    size = 2 * archive + split - 1  # the archive, as much again unpacked, and the split file: one byte short
    disk_usage = shutil.disk_usage
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: disk_usage(path)._replace(free=size))
    line = fails("dtd", tmp_path, capsys)
    assert f"needs about {fetch.human(size + 1)} free in {tmp_path}, which has {fetch.human(size)}" in line
    assert server.requests == []


def test_disk_full_while_downloading(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())

    class Full(io.BufferedWriter):
        def write(self, chunk):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "open", lambda path, mode="r": Full(io.BytesIO()) if "b" in mode and mode != "rb"
                        else open(path, mode), raising=False)
    line = fails("dtd", tmp_path, capsys)
    assert re.search(r"the disk is full while writing \S+split_zhou_DescribableTextures.json.part from http://\S+: "
                     r"free some space", line)
    assert not (tmp_path / "dtd").exists()


def test_damaged_archive_without_a_checksum_is_deleted(monkeypatch, server, tmp_path, capsys):
    contents = ucf()
    contents["UCF-101-midframes.zip"] = contents["UCF-101-midframes.zip"][:-30]  # its central directory cut
    serve(monkeypatch, server, "ucf101", contents)
    line = fails("ucf101", tmp_path, capsys)
    assert re.search(r"UCF-101-midframes.zip from http://\S+ is damaged .*it was deleted: run again", line)
    assert sorted(p.name for p in (tmp_path / ".fetch").rglob("*")) == [
        "downloads", "split_zhou_UCF101.json", "ucf101"]  # the split file, fetched first, for the next run


def test_archive_members_outside_the_folder_are_refused(monkeypatch, server, tmp_path, capsys):
    contents = dtd()
    contents["dtd-r1.0.1.tar.gz"] = tar({"dtd/images/banded/a.jpg": jpeg((0, 0, 0)), "../../escaped.txt": b"x"})
    serve(monkeypatch, server, "dtd", contents)
    line = fails("dtd", tmp_path / "root", capsys)
    assert re.search(r"dtd-r1.0.1.tar.gz from http://\S+ passed its checksum but cannot be unpacked here "
                     r"\(OutsideDestinationError: .*escaped.txt.*\); please report it", line)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "root" / "escaped.txt").exists()
    assert (tmp_path / "root" / ".fetch" / "downloads" / "dtd" / "dtd-r1.0.1.tar.gz").is_file()  # kept: it is the
    # published archive, and downloading it again would not help


def test_interrupted_unpacking_leaves_no_folder(monkeypatch, server, tmp_path):
    serve(monkeypatch, server, "dtd", dtd())
    unpack = fetch.unpack

    def interrupted(*args):
        unpack(*args)
        raise KeyboardInterrupt
    monkeypatch.setattr(fetch, "unpack", interrupted)
    with pytest.raises(SystemExit, match="interrupted while fetching dtd: run again to resume"):
        fetch.main(["dtd", "--root", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fetch"]
    assert sorted(p.name for p in (tmp_path / ".fetch").iterdir()) == ["downloads"]
    monkeypatch.setattr(fetch, "unpack", unpack)
    server.requests.clear()
    fetch.main(["dtd", "--root", str(tmp_path)])  # the verified archive is not downloaded again, nor the split file
    assert (tmp_path / "dtd" / "images").is_dir() and server.requests == []


def test_a_folder_that_does_not_read_is_left_alone(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    line = fails("dtd", tmp_path, capsys)
    assert f"{tmp_path / 'dtd'} is there but does not read" in line and "move it away and run again" in line
    assert [p.name for p in (tmp_path / "dtd").iterdir()] == ["images"] and server.requests == []


def test_another_fetch_of_the_same_dataset_is_refused(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "dtd", dtd())
    (tmp_path / ".fetch").mkdir()
    with open(tmp_path / ".fetch" / "dtd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        line = fails("dtd", tmp_path, capsys)
    assert "another fetch holds" in line and "wait for it to finish" in line


def test_an_offline_fetch_of_all_leaves_no_folder(monkeypatch, tmp_path, capsys):
    """`fetch.py all` without a network (every source a closed port): each dataset fails with one line, and no empty
    folder is left behind (there were 15 under .fetch/downloads/)."""
    port = closed_port()
    for name, recipe in fetch.RECIPES.items():
        files = tuple(file._replace(url=re.sub(r"^https?://", f"http://127.0.0.1:{port}/", file.url))
                      for file in recipe.files)
        monkeypatch.setitem(fetch.RECIPES, name, recipe._replace(files=files))
    disk_usage = shutil.disk_usage  # room for SUN397 and the rest, so that each gets as far as its first download
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: disk_usage(path)._replace(free=10 ** 14))
    with pytest.raises(SystemExit, match="not fetched: eurosat, caltech-101, .*, imagenet-rendition"):
        fetch.main(["all", "--root", str(tmp_path)])
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == len(fetch.RECIPES) == 15 and all("cannot reach http://127.0.0.1" in e for e in errors)
    assert list(tmp_path.iterdir()) == []


def test_a_root_that_cannot_be_made(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = fails("dtd", tmp_path / "file" / "data", capsys)
    assert line == f"error: dtd: Not a directory: {tmp_path / 'file' / 'data'}: choose another --root or fix its " \
                   "permissions"


def test_help_does_not_import_torch():
    """`fetch.py --help` took 4.6 s, all of it importing torch through data.py; data is imported where it is used."""
    result = subprocess.run([sys.executable, "-X", "importtime", "fetch.py", "--help"], capture_output=True,
                            text=True, cwd=os.path.dirname(fetch.__file__), timeout=60)
    assert result.returncode == 0 and "docs/datasets.md" in result.stdout
    imported = re.findall(r"^import time: .*\|\s+(\S+)$", result.stderr, re.MULTILINE)  # one line per module
    assert "tqdm" in imported and "torch" not in imported and "data" not in imported


def test_unknown_name(tmp_path):
    with pytest.raises(SystemExit, match="no dataset named 'cifar10'; fetch knows: all, eurosat, caltech-101"):
        fetch.main(["dtd", "cifar10", "--root", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_a_split_naming_missing_images_is_not_a_dataset(monkeypatch, server, tmp_path, capsys):
    contents = dtd()
    split = json.loads(contents["split_zhou_DescribableTextures.json"])
    split["test"].append(["woven/woven_gone.jpg", 1, "woven"])
    contents["split_zhou_DescribableTextures.json"] = json.dumps(split).encode()
    serve(monkeypatch, server, "dtd", contents)
    line = fails("dtd", tmp_path, capsys)
    assert re.search(r"the fetched files do not make a readable dtd folder \(\S+woven_gone.jpg is named by the "
                     r"dataset's split but does not exist: .*\); the downloads without a checksum "
                     r"\(split_zhou_DescribableTextures.json\) were deleted: run again", line)
    assert not (tmp_path / "dtd").exists()
    assert [p.name for p in (tmp_path / ".fetch" / "downloads" / "dtd").iterdir()] == ["dtd-r1.0.1.tar.gz"]


def test_a_fetch_by_hand_is_complete_only_with_its_images(monkeypatch, server, tmp_path, capsys):
    serve(monkeypatch, server, "stanford_cars", cars())
    for _ in range(2):  # the second run finds the split file there, but no images: the steps again, nothing replaced
        fetch.main(["stanford_cars", "--root", str(tmp_path)])
        assert "copy cars_train/ and cars_test/" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "stanford_cars").iterdir()] == ["split_zhou_StanfordCars.json"]


def test_a_folder_without_unchecked_downloads_that_does_not_read(monkeypatch, server, tmp_path, capsys):
    """FGVCAircraft's one archive passed its checksum: nothing is deleted, and the message asks for a report."""
    members = tarfile.open(fileobj=io.BytesIO(aircraft()["fgvc-aircraft-2013b.tar.gz"]))
    kept = {m.name: members.extractfile(m).read() for m in members if not m.name.endswith("0test0.jpg")}
    serve(monkeypatch, server, "fgvc_aircraft", {"fgvc-aircraft-2013b.tar.gz": tar(kept)})
    line = fails("fgvc_aircraft", tmp_path, capsys)
    assert re.search(r"do not make a readable fgvc_aircraft folder \(\S+0test0.jpg is named by the dataset's split "
                     r"but does not exist: .*\); if this repeats please report it$", line)
    assert [p.name for p in (tmp_path / ".fetch" / "downloads" / "fgvc_aircraft").iterdir()] == [
        "fgvc-aircraft-2013b.tar.gz"]
