"""predict.py publishes its outputs all at once: a run that fails (an image that cannot be decoded, a full
disk, a failing move, Ctrl-C) leaves the output folder exactly as it was (not created, or unchanged), with
one `error:` line that names the file; a rerun then works. Tiny random CLIP, one trained baseline run."""
import errno
import hashlib
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
import utils.io
from conftest import run_main

CLASS = "disc"


# --- helpers ------------------------------------------------------------------------------------------

def fail(argv, monkeypatch, capsys) -> str:
    """Runs predict.py with `argv`; returns stderr from `error:` on, after checking exit code 2 and exactly
    one `error:` line (the progress bar may come before it), without a traceback."""
    monkeypatch.setattr(sys, "argv", ["predict.py", *argv])
    monkeypatch.delenv("AACLIP_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        predict.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.replace("\r", "\n").splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1 and err.count("error:") == 1, err
    assert "Traceback" not in err, err
    return err[err.index("error: "):]


def snapshot(path: Path) -> dict | None:
    """Every entry under `path` with its size, mtime and content hash; None when `path` does not exist."""
    if not path.exists():
        return None
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def leftovers(folder: Path) -> list[str]:
    """Staging folders or temporary files of a run, anywhere under `folder`."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".partial", ".tmp")))


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(runs) -> Path:
    """The session's baseline run (predict.py only reads it)."""
    return runs / "baseline"


@pytest.fixture
def images(tmp_path):
    """Four good images (PNG and JPEG, several sizes)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, size in enumerate((40, 64, 33, 80)):
        array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if i % 2:
            (folder / f"img{i}.jpg").write_bytes(jpeg(array))
        else:
            Image.fromarray(array).save(folder / f"img{i}.png")
    return folder


def argv(run_dir, images, out, *extra):
    return ["--save_path", str(run_dir), "--images", str(images), "--class_name", CLASS, "--out", str(out),
            "--device", "cpu", "--num_workers", "0", "--batch_size", "1", *extra]


@pytest.fixture
def previous(run_dir, images, tmp_path, monkeypatch):
    """An output folder holding a successful run's outputs and a file of the user's."""
    out = tmp_path / "out"
    run_main(predict, argv(run_dir, images, out))
    (out / "notes.txt").write_text("mine")
    return out


# --- unreadable images --------------------------------------------------------------------------------

@pytest.mark.parametrize("existing", [False, True], ids=["new_out", "existing_out"])
def test_truncated_image_among_good_ones_writes_nothing(existing, run_dir, images, previous, tmp_path, monkeypatch,
                                                        capsys):
    out = previous if existing else tmp_path / "fresh" / "out"
    cut = jpeg(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (images / "img1b_cut.jpg").write_bytes(cut[: len(cut) // 2])
    (images / "img2b_text.png").write_bytes(b"not an image")
    with Image.open(images / "img1b_cut.jpg") as img:
        img.verify()  # the header and verify() pass: only decoding finds it
    monkeypatch.setattr(predict, "load_model", lambda *a: pytest.fail("the model was built before the check"))
    before, around = snapshot(out), snapshot(tmp_path)
    err = fail(argv(run_dir, images, out), monkeypatch, capsys)
    assert "2 of the --images" in err and "corrupted or truncated" in err
    assert str(images / "img1b_cut.jpg") in err and str(images / "img2b_text.png") in err
    assert "img0.png" not in err
    assert snapshot(out) == before and snapshot(tmp_path) == around


@pytest.mark.parametrize("existing", [False, True], ids=["new_out", "existing_out"])
def test_image_failing_mid_run_writes_nothing(existing, run_dir, images, previous, tmp_path, monkeypatch, capsys):
    """An image that breaks after the check (the case that left overlays behind): the run stops in the
    loader after writing earlier overlays to the staging folder, and none of them is published."""
    out = previous if existing else tmp_path / "fresh" / "out"
    cut = jpeg(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (images / "img9_cut.jpg").write_bytes(cut[: len(cut) // 2])  # sorted last: three overlays come first
    monkeypatch.setattr(predict, "check_readable", lambda *a, **k: None)
    written = []
    real_write = utils.io.atomic_write_bytes
    monkeypatch.setattr(utils.io, "atomic_write_bytes",
                        lambda data, path: (written.append(path), real_write(data, path)))
    before, around = snapshot(out), snapshot(tmp_path)
    err = fail(argv(run_dir, images, out), monkeypatch, capsys)
    assert str(images / "img9_cut.jpg") in err and "truncated" in err
    assert len(written) == 4  # the overlays of the good images were written (into the staging folder)
    assert snapshot(out) == before and snapshot(tmp_path) == around


# --- write errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("when", [3, 6], ids=["third_overlay", "scores_json"])
@pytest.mark.parametrize("where", ["new_nested", "existing"])
def test_disk_full_while_writing(when, where, run_dir, images, previous, tmp_path, monkeypatch, capsys):
    out = previous if where == "existing" else tmp_path / "a" / "b" / "out"
    calls = []
    real_write = utils.io.atomic_write_bytes

    def write(data, path):
        calls.append(Path(path))
        if len(calls) == when:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(data, path)

    monkeypatch.setattr(utils.io, "atomic_write_bytes", write)
    before, around = snapshot(out), snapshot(tmp_path)
    err = fail(argv(run_dir, images, out), monkeypatch, capsys)
    failed = calls[-1]
    named = out / ("scores.json" if when == 6 else f"overlays/{failed.name}")
    assert failed.name == named.name and f"cannot write {named} (No space left on device)" in err, err
    assert snapshot(out) == before and snapshot(tmp_path) == around and not leftovers(tmp_path)
    if where == "new_nested":
        assert not (tmp_path / "a").exists()

    monkeypatch.setattr(utils.io, "atomic_write_bytes", real_write)  # space again: the same command works
    run_main(predict, argv(run_dir, images, out))
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"img{i}.png" for i in range(4)]
    assert len((out / "scores.csv").read_text().splitlines()) == 5 and (out / "scores.json").is_file()
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard_links", "no_hard_links"])
def test_failing_move_into_an_existing_folder_puts_everything_back(hard_links, run_dir, images, previous, tmp_path,
                                                                   monkeypatch, capsys):
    """A move that fails half-way through publishing (after a new file and one that replaced an old one):
    the replaced file comes back, the new one goes (the old files kept as hard links, or moved aside where
    the file system has none)."""
    if not hard_links:
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(utils.io.os, "link", no_link)
    (previous / "overlays" / "img0.png").unlink()  # one file new, the others replace old ones
    before, around = snapshot(previous), snapshot(tmp_path)
    real_replace, moves = os.replace, []

    def replace(src, dst, **kwargs):
        if Path(dst).is_relative_to(previous) and ".partial" not in str(dst):
            moves.append(dst)
            if len(moves) == 3:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(utils.io.os, "replace", replace)
    err = fail(argv(run_dir, images, previous, "--color_range", "0", "1"), monkeypatch, capsys)
    assert f"cannot write {previous / 'overlays' / 'img2.png'} (Input/output error)" in err and "left as it was" in err
    monkeypatch.setattr(utils.io.os, "replace", real_replace)
    assert snapshot(previous) == before and snapshot(tmp_path) == around and not leftovers(tmp_path)


def test_ctrl_c_leaves_nothing(run_dir, images, previous, tmp_path, monkeypatch):
    calls = []
    real_write = utils.io.atomic_write_bytes

    def write(data, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(data, path)

    monkeypatch.setattr(utils.io, "atomic_write_bytes", write)
    monkeypatch.setattr(sys, "argv", ["predict.py", *argv(run_dir, images, previous)])
    before, around = snapshot(previous), snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        predict.main()
    assert snapshot(previous) == before and snapshot(tmp_path) == around and not leftovers(tmp_path)


# --- success ------------------------------------------------------------------------------------------

def test_rerun_replaces_its_files_and_keeps_the_others(run_dir, images, previous, tmp_path, monkeypatch):
    old = snapshot(previous)
    shutil.copy(images / "img0.png", images / "img5.png")
    run_main(predict, argv(run_dir, images, previous, "--color_range", "0", "1"))
    new = snapshot(previous)
    assert new["notes.txt"] == old["notes.txt"]
    assert set(new) == set(old) | {"overlays/img5.png"}
    assert new["overlays/img0.png"][2] != old["overlays/img0.png"][2]  # another colour range
    assert len((previous / "scores.csv").read_text().splitlines()) == 6
    mask = os.umask(0)
    os.umask(mask)
    for name in ("scores.csv", "scores.json", "overlays/img5.png"):
        assert (previous / name).stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    assert not leftovers(tmp_path)
