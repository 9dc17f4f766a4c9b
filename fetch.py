"""Fetch the CoOp benchmarks: `python fetch.py dtd eurosat --root ./data`, or `all`, or \
`--dry-run all`.

Each dataset ends as one folder in CoOp's layout (KaiyangZhou/CoOp's DATASETS.md), with CoOp's
split file, so `python train.py --data ./data/dtd` trains on the same images as the papers. How it
goes, per dataset:

1. A folder that is already there and reads as its dataset is skipped; one that does not read is
   left alone.
2. Each file is downloaded into <root>/.fetch/downloads/<folder>/ under a `.part` name, resumed
   from where it stopped, checked against the length the server announced and the checksum its
   source publishes, and only then given its name.
3. The archives are unpacked, each read by its content, not by its name (Hugging Face's .tar.gz of
   ImageNet-V2 is a plain tar), and their folders moved into <root>/.fetch/<folder>/, which is read
   exactly as `--data` reads it (every image its split file names must be there) and then renamed
   to <root>/<folder>. So a dataset folder appears whole or not at all; a failure leaves only the
   downloads, for the next run.
4. Once the folder is in place its archives are deleted (`--keep-archives` keeps them).

ImageNet needs a login, and no source serves Stanford Cars any more without one: for those the
split files are fetched and the steps to take by hand are printed. Sizes below are as the sources'
records give them; the table with each source is in docs/datasets.md.
"""
import argparse
import contextlib
import errno
import fcntl
import hashlib
import html.parser
import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

DRIVE = "https://drive.google.com/uc?export=download&id="  # a file on Google Drive, by its id
HF = "https://huggingface.co/datasets/"
LOG_EVERY = 60  # seconds between two progress lines off a terminal

class File(NamedTuple):
    """One download. `unpack` maps a path inside the archive to where it goes in the dataset folder
    ("" is the folder itself; an archive inside the archive is unpacked in turn); a file without
    `unpack` is copied into the dataset folder under its name."""
    name: str
    url: str
    size: int = None      # bytes, as a record of the source gives it (None: unknown, a small file)
    checksum: str = None  # "md5:<hex>" or "sha256:<hex>" where one is published; None where none is
    unpack: dict = None

class Recipe(NamedTuple):
    folder: str           # the folder data.py recognises
    files: tuple
    manual: str = None    # what to do by hand, for a dataset that no source serves to everyone

def split_file(name, drive_id):
    return File(f"split_zhou_{name}.json", DRIVE + drive_id)

# ImageNet's, from CLIP's notebook
CLASSNAMES = File("classnames.txt", DRIVE + "1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF")
TORCHVISION, TFDS = "torchvision.datasets", "tensorflow/datasets url_checksums"

# Where each URL, size and checksum comes from. Split files and classnames.txt: the Google Drive
# links of CoOp's DATASETS.md (no checksums are published for them). Archives: the URL and MD5 that
# torchvision's dataset class downloads and checks (torchvision/datasets/<name>.py), or the
# dataset's own page where torchvision has none; sizes and SHA256s from TensorFlow Datasets'
# url_checksums records of the same files, or Hugging Face's file page.
RECIPES = {
    # torchvision's EuroSAT: the original DFKI zip, mirrored unchanged on the Hub
    "eurosat": Recipe("eurosat", (
        File("EuroSAT.zip",
             HF + "torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
             94_280_567, "md5:c8fa014336c82ac7804f0398fcb19387", {"2750": "2750"}),
        split_file("EuroSAT", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),
    )),
    # torchvision's Caltech101: CaltechDATA's zip holds CoOp's tar.gz
    "caltech-101": Recipe("caltech-101", (
        File("caltech-101.zip",
             "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
             # size unrecorded: the tar.gz inside is 131.7 MB (TFDS)
             None, "md5:3138e1922a9193bfa496528edbbc45d0",
             {"caltech-101/101_ObjectCategories.tar.gz": ""}),
        split_file("Caltech101", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"),
    )),
    "oxford_flowers": Recipe("oxford_flowers", (  # torchvision's Flowers102
        File("102flowers.tgz", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
             344_862_509, "md5:52808999861908f626f3c1f4e79d11fa", {"jpg": "jpg"}),
        split_file("OxfordFlowers", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
    )),
    "dtd": Recipe("dtd", (  # torchvision's DTD
        File("dtd-r1.0.1.tar.gz",
             "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
             625_239_812, "md5:fff73e5086ae6bdbea199a49dfb8a4c1", {"dtd": ""}),
        split_file("DescribableTextures", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),
    )),
    "oxford_pets": Recipe("oxford_pets", (  # torchvision's OxfordIIITPet
        File("images.tar.gz", "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
             791_918_971, "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c", {"images": "images"}),
        split_file("OxfordPets", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),
    )),
    # CoOp's middle frames of UCF101's videos: only on CoOp's Drive, size unpublished
    "ucf101": Recipe("ucf101", (
        File("UCF-101-midframes.zip", DRIVE + "10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O", None, None,
             {"UCF-101-midframes": "UCF-101-midframes"}),
        split_file("UCF101", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
    )),
    # torchvision's FGVCAircraft checks nothing: TFDS's SHA256
    "fgvc_aircraft": Recipe("fgvc_aircraft", (
        File("fgvc-aircraft-2013b.tar.gz",
             "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
             "fgvc-aircraft-2013b.tar.gz",
             2_770_575_360,
             "sha256:d5f68b1b81d6d7831eb9d5c5517074176b5dfbce6bcb43dc14ed1c66a87b8d75",
             # CoOp keeps only data/, and needs no split file
             {"fgvc-aircraft-2013b/data": ""}),
    )),
    "food-101": Recipe("food-101", (  # torchvision's Food101
        File("food-101.tar.gz", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
             4_996_278_331, "md5:85eeb15f3717b99a5da872d97d918f87", {"food-101": ""}),
        split_file("Food101", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),
    )),
    "sun397": Recipe("sun397", (  # torchvision's SUN397
        File("SUN397.tar.gz", "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
             39_077_296_924, "md5:8ca2778205c41d23104230ba66911c7a", {"SUN397": "SUN397"}),
        split_file("SUN397", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),
    )),
    "stanford_cars": Recipe(
        "stanford_cars", (split_file("StanfordCars", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),),
        # size: TFDS's record of the two archives
        manual="no source serves Stanford Cars to everyone any more (Stanford's links are gone, "
               "and torchvision's StanfordCars no longer downloads it): copy cars_train/ and "
               "cars_test/ (about 1.9 GB; Kaggle's jessicali9530/stanford-cars-dataset has them, "
               "behind a Kaggle login, one folder deeper) into {target}, next to the split file "
               "fetched there"),
    "imagenet": Recipe(
        "imagenet", (CLASSNAMES,),
        # sizes: TFDS's record
        manual="ImageNet needs a login at image-net.org: from "
               "https://image-net.org/download-images.php download ILSVRC2012_img_train.tar "
               "(147.9 GB), ILSVRC2012_img_val.tar (6.7 GB) and ILSVRC2012_devkit_t12.tar.gz into "
               "{target}/images, then unpack them into images/train/<wnid>/ and images/val/<wnid>/ "
               "with torchvision, which checks their MD5s (it needs scipy): python -c \"from "
               "torchvision.datasets import ImageNet; ImageNet('{target}/images', 'train'); "
               "ImageNet('{target}/images', 'val')\"; then delete the three archives"),
    # ImageNetV2's README points at the Hub now; SHA256 from its file page
    "imagenetv2": Recipe("imagenetv2", (
        File("imagenetv2-matched-frequency.tar.gz",
             HF + "vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
             1_264_079_360,
             "sha256:f0c37fdf925916b19ea1323cd9a2208cdb6959ba2c32eef2a7fc393835c9ca7c",
             {"imagenetv2-matched-frequency-format-val":
              "imagenetv2-matched-frequency-format-val"}),
        CLASSNAMES,
    )),
    # ImageNet-Sketch: its authors publish no checksum. Size and SHA256 as two records give them,
    # which agree: Hugging Face datasets' of this file, under the repository's old name
    # (huggingface/datasets, datasets/imagenet_sketch/dataset_infos.json, download_checksums of
    # .../imagenet_sketch/resolve/main/data/ImageNet-Sketch.zip) and TFDS's of the authors' Google
    # Drive file (tensorflow_datasets/datasets/imagenet_sketch/checksums.tsv). No record gives a
    # revision of the repository: `main`, whose bytes the SHA256 pins.
    "imagenet-sketch": Recipe("imagenet-sketch", (
        File("ImageNet-Sketch.zip",
             HF + "songweig/imagenet_sketch/resolve/main/data/ImageNet-Sketch.zip",
             7_593_573_012,
             "sha256:4d3ce6b82a7c48aabf14aeac105eb533e75707f152cc858f55bfc022031a72ed",
             {"sketch": "images"}),
        CLASSNAMES,
    )),
    # Hendrycks' page; TFDS's size and SHA256
    "imagenet-adversarial": Recipe("imagenet-adversarial", (
        File("imagenet-a.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
             687_552_512,
             "sha256:3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e",
             {"imagenet-a": "imagenet-a"}),
        CLASSNAMES,
    )),
    # Hendrycks' page; TFDS's size and SHA256
    "imagenet-rendition": Recipe("imagenet-rendition", (
        File("imagenet-r.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
             2_191_079_936,
             "sha256:18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52",
             {"imagenet-r": "imagenet-r"}),
        CLASSNAMES,
    )),
}

class FetchError(Exception):
    """A download or unpacking that failed; the message names the dataset, the URL and what to
    do."""

def human(n):
    if n is None:
        return "size unpublished"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000

# --- downloading ---------------------------------------------------------------------------------

class _Form(html.parser.HTMLParser):
    """The download form of Google Drive's page for a file too large to scan for viruses: its action
    and fields."""
    def __init__(self):
        super().__init__()
        self.action, self.fields, self.text, self.inside = None, {}, [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and self.action is None and "download" in (attrs.get("action") or ""):
            self.action, self.inside = attrs["action"], True
        elif tag == "input" and self.inside and attrs.get("name"):
            self.fields[attrs["name"]] = attrs.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False

    def handle_data(self, text):
        self.text.append(text)

def _open(url, start):
    request = urllib.request.Request(url, headers={"User-Agent": "clip-prompt-tuning-fetch"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=60)

def _refused_by_quota(text):
    """Whether a page is Google Drive's refusal of a file downloaded too often (its text, in any
    case)."""
    text = " ".join(text.split()).lower()
    return "quota exceeded" in text or "too many users have viewed or downloaded this file" in text

def _open_file(url, start, path):
    """The response that carries the file's bytes from `start` on, past Google Drive's confirmation
    page."""
    response = _open(url, start)
    # the file, or a page whose form leads to it (Drive's, for a file too large to scan)
    for attempt in range(3):
        if "text/html" not in response.headers.get("Content-Type", ""):
            return response
        page = _Form()
        page.feed(response.read(1_000_000).decode("utf-8", "replace"))
        response.close()
        if _refused_by_quota(" ".join(page.text)):
            raise FetchError(f"Google Drive refuses {url} for now (its download quota is "
                             "exceeded): run again tomorrow, or download it in a browser and save "
                             f"it as {path}")
        if page.action is None or attempt == 2:
            break
        action = urllib.parse.urlsplit(urllib.parse.urljoin(response.url, page.action))
        # an old form's action has a query too
        query = dict(urllib.parse.parse_qsl(action.query)) | page.fields
        response = _open(action._replace(query=urllib.parse.urlencode(query)).geturl(), start)
    raise FetchError(f"{url} answered with a web page, not the file: open it in a browser; if it "
                     f"gives the file, save it as {path} and run again")

def _http_error(error, url, path):
    """What to say when a source answers with an HTTP error."""
    body = error.read(1_000_000).decode("utf-8", "replace") if error.fp else ""
    if _refused_by_quota(body):  # Drive may send its quota page with a 403
        return (f"Google Drive refuses {url} for now (its download quota is exceeded): run again "
                f"tomorrow, or download it in a browser and save it as {path}")
    if error.code == 429 or error.code >= 500:
        return (f"{url} answered HTTP {error.code} {error.reason}: the server is busy or down; "
                "run again later")
    return (f"{url} answered HTTP {error.code} {error.reason}: the source may have moved; check "
            f"the URL in a browser, and if you find the file elsewhere save it as {path}")

class _Lines:
    """Progress off a terminal: a plain line on stdout (the log) every LOG_EVERY seconds, so that
    stderr holds only the errors; tqdm's bar would leave its carriage returns in the log."""
    def __init__(self, total, what, initial):
        self.total = total
        self.what = what
        self.initial = initial  # bytes a resumed download had already: not counted in the rate
        self.n = initial
        self.start = time.monotonic()
        self.printed = self.start

    def update(self, n):
        self.n += n
        now = time.monotonic()
        if now - self.printed >= LOG_EVERY:
            self.printed = now
            print(tqdm.format_meter(self.n, self.total, now - self.start, ncols=0, prefix=self.what,
                                    unit="B", unit_scale=True, unit_divisor=1000,
                                    initial=self.initial), flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

def _bar(total, what, initial=0):
    """A progress bar of bytes (size, rate, ETA) on the terminal's stderr; off a terminal, a line a
    minute."""
    if not sys.stderr.isatty():
        return _Lines(total, what, initial)
    return tqdm(total=total, initial=initial, desc=what, unit="B", unit_scale=True,
                unit_divisor=1000, file=sys.stderr, dynamic_ncols=True, mininterval=0.1)

def verify(path, file):
    """Delete `path` and raise if its checksum is not the published one. A file without one (a split
    file) must at least not be a web page: one sent under a file's type, or saved from a browser by
    mistake."""
    if file.checksum is None:
        with open(path, "rb") as f:
            head = f.read(100).lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html")):
            path.unlink()
            raise FetchError(f"{file.url} sent a web page, not the file; it was deleted: open it "
                             "in a browser; if it gives the file, save it as "
                             f"{path.parent / file.name} and run again")
        return
    algorithm, expected = file.checksum.split(":")
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f, _bar(path.stat().st_size, f"checking {file.name}") as bar:
        while block := f.read(1 << 24):
            digest.update(block)
            bar.update(len(block))
    if digest.hexdigest() != expected:
        path.unlink()
        raise FetchError(f"{file.url} gave a file whose {algorithm.upper()} is "
                         f"{digest.hexdigest()}, not the published {expected}; it was deleted: "
                         "run again, and if this repeats the source has changed")

def download(file, folder, name):
    """`folder/file.name`, downloaded through a `.part` file that a later call resumes, and
    checked."""
    path = folder / file.name
    # downloaded and checked by an earlier run, or saved by hand as an error said
    if path.is_file():
        print(f"{name}: {file.name} is there already", flush=True)
        verify(path, file)
        return path
    print(f"{name}: {file.name} ({human(file.size)}) from {file.url}", flush=True)
    part = folder / (file.name + ".part")
    folder.mkdir(parents=True, exist_ok=True)
    start = part.stat().st_size if part.is_file() else 0
    try:
        response = _open_file(file.url, start, path)
    except urllib.error.HTTPError as error:
        if error.code != 416:
            raise FetchError(_http_error(error, file.url, path)) from None
        # the .part is longer than the file
        if error.headers.get("Content-Range") != f"bytes */{start}":
            part.unlink()
            return download(file, folder, name)
        response = None  # the range starts at the file's end: the .part holds all of it
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise FetchError(f"cannot reach {file.url} ({getattr(error, 'reason', error)}): check the "
                         "connection and run again; the download resumes") from None
    if response is not None:
        with response:
            if start and response.status != 206:  # the server ignored the range: start again
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length else file.size
            try:
                with open(part, "ab" if start else "wb") as out, \
                        _bar(total, file.name, start) as bar:
                    # what has arrived, up to 64 KiB: on a slow link the bar moves,
                    # and a kill loses little
                    while chunk := response.read1(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                if getattr(error, "errno", None) == errno.ENOSPC:
                    raise FetchError(f"the disk is full while writing {part} from {file.url}: free "
                                     "some space and run again; the download resumes") from None
                raise FetchError(f"the download from {file.url} stopped ({error}): run again; "
                                 "it resumes") from None
            if length and part.stat().st_size != total:
                raise FetchError(f"the download from {file.url} stopped at "
                                 f"{human(part.stat().st_size)} of {human(total)}: run again; "
                                 "it resumes") from None
    verify(part, file)
    os.replace(part, path)
    return path

# --- unpacking -----------------------------------------------------------------------------------

class _Counted:
    """A file whose reads move a progress bar."""
    def __init__(self, file, bar):
        self.file, self.bar = file, bar

    def read(self, size=-1):
        chunk = self.file.read(size)
        self.bar.update(len(chunk))
        return chunk

def unpack(archive, into, url, verified):
    """Every member of a zip or tar archive (plain, gzip, bzip2 or xz) under `into`. The kind is
    read from the archive's first bytes, never from its name: Hugging Face's
    imagenetv2-matched-frequency.tar.gz is a plain tar. An archive found damaged is deleted for the
    next run to download again, unless its checksum was verified: the same bytes would fail
    again."""
    if not hasattr(tarfile, "data_filter"):
        raise FetchError("unpacking archives safely needs Python 3.10.12, 3.11.4 or later "
                         "(tarfile's data filter)")
    into.mkdir(parents=True)
    try:
        with open(archive, "rb") as raw, \
                _bar(archive.stat().st_size, f"unpacking {archive.name}") as bar:
            # a zip starts with its first member's header; a tar with a name
            is_zip = raw.read(4) == b"PK\x03\x04"
            raw.seek(0)
            if is_zip:
                with zipfile.ZipFile(raw) as z:
                    for member in z.infolist():
                        z.extract(member, into)  # names that would leave `into` are made safe
                        bar.update(member.compress_size)
            else:
                # read as a stream, which the bar follows; "r|*" tells the compression from the
                # first bytes
                with tarfile.open(fileobj=_Counted(raw, bar), mode="r|*") as t:
                    # refuses absolute paths, '..' and links that leave `into`
                    t.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
            RuntimeError, OSError) as error:
        if getattr(error, "errno", None) is not None:  # the disk, not the archive
            raise FetchError(f"cannot unpack {archive.name} from {url} into {into} "
                             f"({error.strerror}): free some space or fix the folder's "
                             "permissions, and run again") from None
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        if verified:
            raise FetchError(f"{archive.name} from {url} passed its checksum but cannot be "
                             f"unpacked here ({reason}); please report it") from None
        archive.unlink()
        raise FetchError(f"{archive.name} from {url} is damaged ({reason}); it was deleted: run "
                         "again to download it afresh") from None

# --- one dataset ---------------------------------------------------------------------------------

def check_space(recipe, root, downloads):
    need = 0
    for file in recipe.files:
        if file.size is None:
            continue
        part = downloads / (file.name + ".part")
        if not (downloads / file.name).is_file():
            need += file.size - (part.stat().st_size if part.is_file() else 0)
        if file.unpack:
            # the unpacked images take about as much as the archive: they are compressed already
            need += file.size
    free = shutil.disk_usage(root).free
    if need > free:
        raise FetchError(f"needs about {human(need)} free in {root}, which has {human(free)}: free "
                         "some space or choose another --root")

@contextlib.contextmanager
def locked(path):
    """Hold `path`'s lock while fetching, so that two fetches of one dataset into one root do not
    interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # its holder removed it as we opened it
            if os.stat(path).st_ino != os.fstat(lock.fileno()).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise FetchError(f"another fetch holds {path}: wait for it to finish") from None
        try:
            yield
        finally:
            path.unlink()

def remove_empty(folder, up_to):
    """`folder` and the folders above it, up to `up_to` (excluded), as long as they are empty."""
    while folder != up_to:
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return
        folder = folder.parent

def place(source, destination):
    """Move `source` to `destination`, or its contents into `destination` when that folder exists
    already."""
    if destination.is_dir():
        for child in source.iterdir():
            os.rename(child, destination / child.name)
    else:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, destination)

def assemble(name, recipe, downloads, stage, scratch):
    """Download the recipe's files and lay them out in `stage` as CoOp does. The small files come
    first: Google Drive may refuse a split file for a day, and each run until then would otherwise
    check and unpack the archive again (39 GB for SUN397)."""
    stage.mkdir()
    small = [file for file in recipe.files if file.unpack is None]
    archives = [file for file in recipe.files if file.unpack is not None]
    for file in small + archives:
        path = download(file, downloads, name)
        if file.unpack is None:
            shutil.copyfile(path, stage / file.name)
            continue
        print(f"{name}: unpacking {file.name}", flush=True)
        unpack(path, scratch / file.name, file.url, file.checksum is not None)
        for inside, into in file.unpack.items():
            source = scratch / file.name / inside
            if not source.exists():
                raise FetchError(f"{file.name} from {file.url} holds no {inside}: the source has "
                                 "changed its layout; please report it")
            # an archive in the archive: deleting it would not bring a new one
            if source.is_file():
                unpack(source, scratch / inside, file.url, True)
                source = scratch / inside
            place(source, stage / into)

def unreadable(folder):
    """Why `folder` does not read as `--data` reads it (every class with training images, a test
    split, every image its splits name on disk); None when it does."""
    # here, not at the top: data.py imports torch, seconds that `fetch.py --help` need not wait
    import data
    try:
        # shots=0: the whole dataset, each image of it checked
        data.make_task(str(folder), shots=0)
    except data.DataError as error:
        return str(error)
    return None

def fetch(name, root, keep_archives=False):
    """Make <root>/<folder> for dataset `name`, or say it is there already; returns the folder."""
    recipe = RECIPES[name]
    target = root / recipe.folder
    if target.is_dir():
        problem = unreadable(target)
        if problem is None:
            print(f"{name}: complete at {target}, skipped")
            return target
        if recipe.manual is None:
            raise FetchError(f"{target} is there but does not read ({problem}); it is left as it "
                             "is: move it away and run again")
    work = root / ".fetch"
    downloads = work / "downloads" / recipe.folder
    stage, scratch = work / recipe.folder, work / (recipe.folder + ".unpacked")
    try:
        with locked(work / (recipe.folder + ".lock")):
            # made by a fetch that held the lock before this one
            if recipe.manual is None and target.is_dir():
                raise FetchError(f"{target} appeared while this fetch started: run again to "
                                 "check it")
            for path in (stage, scratch):
                # a run that was killed may have left them (and their space)
                shutil.rmtree(path, ignore_errors=True)
            check_space(recipe, root, downloads)
            try:
                assemble(name, recipe, downloads, stage, scratch)
                if recipe.manual is not None:
                    add_missing(recipe, stage, target)
                elif problem := unreadable(stage):
                    unchecked = [file.name for file in recipe.files if file.checksum is None]
                    for file_name in unchecked:  # the suspects: nothing vouched for their bytes
                        (downloads / file_name).unlink(missing_ok=True)
                    deleted = (f"the downloads without a checksum ({', '.join(unchecked)}) were "
                               "deleted: run again, and ")
                    raise FetchError(f"the fetched files do not make a readable {name} folder "
                                     f"({problem}); {deleted if unchecked else ''}if this repeats "
                                     "please report it")
                else:
                    os.rename(stage, target)
            except FetchError as error:
                # a folder that the error says to save a file in stays
                if str(downloads) not in str(error):
                    remove_empty(downloads, work)
                raise
            finally:
                shutil.rmtree(stage, ignore_errors=True)
                shutil.rmtree(scratch, ignore_errors=True)
            if not keep_archives:
                shutil.rmtree(downloads, ignore_errors=True)
            remove_empty(downloads, work)
    finally:
        remove_empty(work, root)  # once no lock or download is left in it
        # the steps by hand, also when the small files could not be fetched
        if recipe.manual is not None:
            print(f"{name}: {recipe.manual.format(target=target)}")
    if recipe.manual is None:
        print(f"{name}: ready at {target}")
    return target

def add_missing(recipe, stage, target):
    """The fetched files a dataset fetched by hand lacks, added to its folder (made if need be);
    none replaced."""
    target.mkdir(parents=True, exist_ok=True)
    for file in recipe.files:
        if not (target / file.name).exists():
            os.replace(stage / file.name, target / file.name)

# --- the command ---------------------------------------------------------------------------------

def dry_run(names, root):
    """What fetching `names` would download: each file's size, checksum and URL."""
    total, unknown = 0, []
    for name in names:
        recipe = RECIPES[name]
        there = (root / recipe.folder).is_dir()
        size = sum(file.size or 0 for file in recipe.files)
        total += 0 if there else size
        if any(file.unpack and file.size is None for file in recipe.files):
            size, unknown = None, unknown + [name]
        what = "the file below, the rest by hand" if recipe.manual else human(size)
        print(f"{name}: {what}, into {root / recipe.folder}{' (there already)' if there else ''}")
        for file in recipe.files:
            size = human(file.size) if file.size or file.unpack else "small"
            checksum = ("{} {}".format(*file.checksum.split(":")) if file.checksum
                        else "no published checksum")
            print(f"    {file.name}  {size}  {checksum}\n        {file.url}")
        if recipe.manual:
            print(f"    by hand: {recipe.manual.format(target=root / recipe.folder)}")
    print(f"in all: {human(total)} to download"
          + (f", and {', '.join(unknown)}, whose size is unpublished" if unknown else ""))

def dataset_names(asked):
    import data  # as in unreadable()
    aliases = {name.lower(): name for name in RECIPES}
    for folder, (name, _) in {**data.SPLITS, **data.VARIANTS}.items():
        aliases[name.lower()] = folder
    # data.py's names for the datasets read without a split file
    aliases["fgvcaircraft"] = "fgvc_aircraft"
    names = []
    for word in asked:
        if word.lower() == "all":
            names += RECIPES
        elif word.lower() in aliases:
            names.append(aliases[word.lower()])
        else:
            raise SystemExit(f"error: no dataset named {word!r}; fetch knows: all, "
                             f"{', '.join(RECIPES)}")
    return list(dict.fromkeys(names))

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Sources, sizes, checksums and the steps by hand: "
                                            "docs/datasets.md")
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help=f"all, or any of: {', '.join(RECIPES)}")
    parser.add_argument("--root", default="./data",
                        help="the folder that gets a folder per dataset (default ./data)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be downloaded, with sizes")
    parser.add_argument("--keep-archives", action="store_true",
                        help="keep the archives once unpacked")
    args = parser.parse_args(argv)
    names, root = dataset_names(args.names), Path(args.root).expanduser()
    if root.exists() and not root.is_dir():
        raise SystemExit(f"error: --root {root} is a file, not a folder")
    if args.dry_run:
        try:
            return dry_run(names, root)
        except BrokenPipeError:  # `--dry-run all | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
    failed = []
    for name in names:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fetch(name, root, args.keep_archives)
        except FetchError as error:
            print(f"error: {name}: {error}", file=sys.stderr)
            failed.append(name)
        except OSError as error:  # a root that cannot be written, or a file in the way
            print(f"error: {name}: {error.strerror}: {error.filename}: choose another --root or "
                  "fix its permissions", file=sys.stderr)
            failed.append(name)
        except KeyboardInterrupt:
            raise SystemExit(f"\ninterrupted while fetching {name}: run again to resume") from None
        # a case this file does not foresee: still one line, and the others go on
        except Exception as error:
            print(f"error: {name}: {type(error).__name__}: {error}; please report it",
                  file=sys.stderr)
            failed.append(name)
    if failed:
        raise SystemExit(f"not fetched: {', '.join(failed)} (the errors above say why, "
                         "and what to do)")

if __name__ == "__main__":
    main()
