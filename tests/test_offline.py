"""`--pretrained openai` on an offline machine fails at once with one `error:` line (open_clip's own download
retries for about a minute first), while weights in a local cache, and weight files, need no network.
The network is simulated: no test here connects anywhere or downloads anything."""
import hashlib
import socket
import sys
import threading
import time

import open_clip
import pytest
import torch
from huggingface_hub import constants as hf_constants

import train
from model import build_clip, clip
from conftest import tiny_synthetic

OFFLINE = OSError(101, "Network is unreachable")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No connection opens (each attempt is recorded in the returned list), no download is tried, the
    caches are empty folders and no proxy or offline mode is set."""
    attempts = []

    def connect(address, *args, **kwargs):
        attempts.append(address)
        raise OFFLINE

    def download(*args, **kwargs):
        raise AssertionError("open_clip's download was called")

    monkeypatch.setattr(socket, "create_connection", connect)
    for name in ("download_pretrained_from_url", "download_pretrained_from_hf", "download_pretrained"):
        monkeypatch.setattr(open_clip.pretrained, name, download)
    monkeypatch.setattr(open_clip, "download_pretrained", download)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY",
                "HTTPS_PROXY", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return attempts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("data"), n_normal=2)


def fake_hf_cache(repo: str, filename: str, content: bytes) -> str:
    """`filename` of `repo` as huggingface_hub caches a download (snapshot of the commit `refs/main` names)."""
    from pathlib import Path

    folder = Path(hf_constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return str(path)


def test_offline_fails_at_once_with_one_error_line(no_network, data, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "train.py", "--dataset", "Synthetic", "--data_root", str(data / "syn"), "--metadata_dir", str(data / "meta"),
        "--num_workers", "0", "--device", "cpu", "--shot", "2", "--save_path", str(save), "--pretrained", "openai"])
    monkeypatch.delenv("AACLIP_DEBUG", raising=False)
    built = []
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: built.append(a) or pytest.fail("model built"))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        train.main()
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for words in ("ViT-L-14-336", "offline", "huggingface.co", "not in a local cache",
                  clip.OPENAI_URLS["ViT-L-14-336"], "--pretrained /path/ViT-L-14-336px.pt"):
        assert words in err, (words, err)
    assert no_network == [("huggingface.co", 443)]  # one connection tried, to the host open_clip downloads from
    # At once: no waiting (the simulated network fails at once), and before the ViT-L model is built.
    assert elapsed < 2.0 and built == [], elapsed
    assert not save.exists()


def test_a_hanging_name_lookup_is_cut_short(no_network, monkeypatch):
    release = threading.Event()

    def hang(address, *args, **kwargs):
        release.wait(60)  # a DNS lookup that does not answer ignores the socket timeout
        raise OFFLINE

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(clip, "REACHABLE_TIMEOUT_S", 0.2)
    start = time.perf_counter()
    try:
        with pytest.raises(clip.UserError, match=r"offline \(huggingface.co not reachable within 0.2 s\)"):
            build_clip("ViT-B-32", "openai", 224)
        assert time.perf_counter() - start < 1.5
    finally:
        release.set()


def test_hf_offline_mode_needs_no_check(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(clip.UserError, match="HF_HUB_OFFLINE is set") as e:
        build_clip("ViT-B-32", "openai", 224)
    assert "--pretrained /path/ViT-B-32.pt" in str(e.value) and no_network == []


def test_the_check_goes_to_the_proxy(no_network, monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    with pytest.raises(clip.UserError, match="offline"):
        build_clip("ViT-B-32", "openai", 224)
    assert no_network == [("proxy.example", 3128)]


def test_online_still_downloads(no_network, monkeypatch):
    """A reachable host: open_clip's download runs as before, and its failure keeps its own message."""
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: socket.socket())
    calls = []

    def download(cfg, *args, **kwargs):
        calls.append(cfg["hf_hub"])
        raise OSError("connection reset")

    monkeypatch.setattr(open_clip, "download_pretrained", download)
    with pytest.raises(clip.UserError, match=r"failed \(OSError\); this machine is probably offline"):
        build_clip("ViT-B-32", "openai", 224)
    assert calls == ["timm/vit_base_patch32_clip_224.openai/"]


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_weights_in_the_hugging_face_cache_need_no_network(name, no_network):
    cached = fake_hf_cache("timm/vit_base_patch32_clip_224.openai", name, b"weights")
    assert clip._download_openai("ViT-B-32") == cached
    assert no_network == []


def test_weights_in_the_clip_cache_need_no_network(no_network, tmp_path, monkeypatch):
    """~/.cache/clip (open_clip's URL downloads, OpenAI's clip package): used when the file's SHA-256 is the
    one its URL names."""
    content = b"weights"
    sha = hashlib.sha256(content).hexdigest()
    cfg = dict(open_clip.get_pretrained_cfg("ViT-B-32", "openai"),
               url=f"https://openaipublic.azureedge.net/clip/models/{sha}/ViT-B-32.pt")
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda *a: cfg)
    path = tmp_path / "home" / ".cache" / "clip" / "ViT-B-32.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert clip._download_openai("ViT-B-32") == str(path) and no_network == []

    path.write_bytes(b"a damaged copy")
    with pytest.raises(clip.UserError, match="offline"):
        clip._download_openai("ViT-B-32")


def test_a_weight_file_needs_no_network(no_network, tmp_path):
    torch.manual_seed(0)
    model = build_clip("tiny", "none", 56)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = build_clip("tiny", str(path), 56)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert no_network == []
