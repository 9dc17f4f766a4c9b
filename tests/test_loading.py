"""Weight files: verified download into the cache, the formats load() reads, and the errors a user can cause."""
import hashlib
import io
import os

import pytest
import torch

import clip_model
from conftest import TINY_VIT, randomize


@pytest.fixture(scope="module")
def tiny_state_dict():
    torch.manual_seed(0)
    return randomize(clip_model.CLIP(*TINY_VIT).state_dict())


@pytest.fixture
def served(tmp_path, tiny_state_dict):
    """A checkpoint 'on the server' (a file:// URL whose second-to-last segment is its SHA256)."""
    server = tmp_path / "server"
    server.mkdir()
    torch.save(tiny_state_dict, server / "tiny.pt")
    sha = hashlib.sha256((server / "tiny.pt").read_bytes()).hexdigest()
    (server / sha).mkdir()
    os.replace(server / "tiny.pt", server / sha / "tiny.pt")
    return f"file://{server}/{sha}/tiny.pt", tmp_path / "cache"


def test_download_verifies_and_caches(served, capsys):
    url, cache = served
    path = clip_model.download(url, str(cache))
    assert os.listdir(cache) == ["tiny.pt"]  # no .part left behind
    assert "downloading file:" in capsys.readouterr().err
    os.remove(url[len("file://"):])  # the server is gone: the verified cached file is used
    assert clip_model.download(url, str(cache)) == path


def test_load_by_name_downloads_and_builds(served, monkeypatch, tiny_state_dict):
    url, cache = served
    monkeypatch.setitem(clip_model.MODELS, "Tiny/1", url)
    model, _ = clip_model.load("Tiny/1", download_root=str(cache))
    assert torch.equal(model.visual.proj, tiny_state_dict["visual.proj"])


def test_wrong_checksum_leaves_nothing(served):
    url, cache = served
    bad = url.replace(url.split("/")[-2], "0" * 64)
    os.makedirs(os.path.dirname(bad[len("file://"):]))
    os.replace(url[len("file://"):], bad[len("file://"):])
    with pytest.raises(clip_model.LoadError, match="expected 0000.*discarded"):
        clip_model.download(bad, str(cache))
    assert os.listdir(cache) == []


def test_corrupt_cached_file_is_replaced(served):
    url, cache = served
    cache.mkdir()
    (cache / "tiny.pt").write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="does not match its SHA256"):
        path = clip_model.download(url, str(cache))
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == url.split("/")[-2]


def test_interrupted_download_leaves_no_partial_file(served, monkeypatch):
    url, cache = served

    class Dropped(io.BytesIO):
        headers = {"Content-Length": "10000000"}

        def read(self, n=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection reset by peer")
            return super().read(1000)

    monkeypatch.setattr(clip_model.urllib.request, "urlopen", lambda url: Dropped(b"x" * 5000))
    with pytest.raises(clip_model.LoadError, match="could not download.*copy tiny.pt into"):
        clip_model.download(url, str(cache))
    assert os.listdir(cache) == []

    def interrupted(url):
        raise KeyboardInterrupt
    monkeypatch.setattr(clip_model.urllib.request, "urlopen", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clip_model.download(url, str(cache))
    assert os.listdir(cache) == []


def test_no_network_says_how_to_work_offline(tmp_path):
    with pytest.raises(clip_model.LoadError, match="without internet, copy RN50.pt into"):
        clip_model.download(clip_model.MODELS["RN50"].replace("https://", "file:///nonexistent/"), str(tmp_path))


def test_unknown_name_lists_the_models():
    with pytest.raises(clip_model.LoadError) as error:
        clip_model.load("ViT-B/14")
    assert all(name in str(error.value) for name in clip_model.available_models())
    assert "path of a checkpoint" in str(error.value)


def test_missing_path(tmp_path):
    with pytest.raises(clip_model.LoadError, match="no file at that path"):
        clip_model.load(str(tmp_path / "missing.pt"))
    with pytest.raises(clip_model.LoadError, match="is not a file"):
        clip_model.load(str(tmp_path))


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8, b"PK\x03\x04 not really a zip"])
def test_garbage_file_is_unreadable(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(clip_model.LoadError, match="unreadable or corrupt.*download it again"):
        clip_model.load(str(tmp_path / "bad.pt"))


def test_truncated_checkpoint_is_unreadable(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(clip_model.LoadError, match="unreadable or corrupt"):
        clip_model.load(str(tmp_path / "half.pt"))


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(clip_model.LoadError, match="holds no state dict"):
        clip_model.load(str(tmp_path / "list.pt"))


@pytest.mark.parametrize("edit", ["drop", "extra", "reshape", "empty"])
def test_not_a_clip_state_dict(tmp_path, tiny_state_dict, edit):
    sd = dict(tiny_state_dict)
    if edit == "drop":
        del sd["transformer.resblocks.1.ln_2.bias"]
    elif edit == "extra":
        sd["visual.adapter.weight"] = torch.zeros(3)
    elif edit == "reshape":
        sd["ln_final.bias"] = torch.zeros(5)
    else:
        sd = {"fc.weight": torch.zeros(2, 2)}
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(clip_model.LoadError, match="not a CLIP state dict"):
        clip_model.load(str(tmp_path / "odd.pt"))
