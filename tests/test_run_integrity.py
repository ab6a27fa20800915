"""Run integrity (the refusals are rows of test_errors.py): what a rerun may change, the manifest that traces
every number, the lock of a killed run, consistent Stage-2 files after a kill between two saves, resume
from the newest loadable epoch, temporaries of killed writers, file modes, and logs that stay readable."""
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict
import test as test_script
import train
import utils.progress
from model import build_clip
from utils.io import remove_stale_temporaries
from conftest import data_args, run_main, train_args

REPO = Path(__file__).resolve().parents[1]


def weights_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)["image_adapter"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(build_clip("tiny", "none", 56).state_dict(), path)
    return path


def test_manifest_traces_args_and_results(data, weight_file, tmp_path):
    save = tmp_path / "run"
    run_main(train, train_args(data, save) + ["--pretrained", str(weight_file)])
    saved = json.loads((save / "args.json").read_text())
    m = saved["manifest"]
    assert m["weights_sha256"] == hashlib.sha256(weight_file.read_bytes()).hexdigest()
    shot_list = data / "meta" / "Synthetic" / "2-shot.jsonl"
    assert m["metadata_sha256"] == {"Synthetic/2-shot.jsonl": hashlib.sha256(shot_list.read_bytes()).hexdigest()}
    assert m["packages"]["torch"] == torch.__version__.split("+")[0] or m["packages"]["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert m["code"]["commit"] == head.stdout.strip() and isinstance(m["code"]["modified"], bool)
    assert saved["precision"] == "fp32" and len(saved["starts"]) == 1

    run_main(test_script, ["--save_path", str(save), *data_args(data)])
    meta = json.loads((save / "results" / "Synthetic_epoch1.json").read_text())["meta"]
    test_list = data / "meta" / "Synthetic" / "full-shot.jsonl"
    assert meta["manifest"]["weights_sha256"] == m["weights_sha256"]
    assert meta["manifest"]["metadata_sha256"] == {
        "Synthetic/full-shot.jsonl": hashlib.sha256(test_list.read_bytes()).hexdigest()}
    assert meta["training_manifest"] == m


def test_a_rerun_may_extend_and_change_operational_flags(data, weight_file, tmp_path):
    """More Stage-2 epochs, other workers/checkpointing/data paths and a moved copy of the weight file."""
    moved = shutil.copy(weight_file, tmp_path / "elsewhere.pt")
    meta = shutil.copytree(data / "meta", tmp_path / "meta")
    save = tmp_path / "run"
    run_main(train, train_args(data, save) + ["--pretrained", str(weight_file)])
    run_main(train, train_args(data, save) + ["--pretrained", str(moved), "--image_epoch", "2", "--num_workers", "1",
                                              "--checkpoint_every", "2", "--metadata_dir", str(meta)])
    saved = json.loads((save / "args.json").read_text())
    assert saved["image_epoch"] == 2 and saved["pretrained"] == str(moved)
    assert [s["image_epoch"] for s in saved["starts"]] == [1, 2]
    assert (save / "image_adapter_2.pth").exists()
    run_main(test_script, ["--save_path", str(save), *data_args(data), "--pretrained", str(moved)])


def test_a_lock_left_by_a_killed_run_does_not_block(data, copy_run):
    save = copy_run("baseline")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, time\n"
                               f"f = open({str(save / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    run_main(train, train_args(data, save) + ["--image_epoch", "3"])
    assert (save / "image_adapter_3.pth").exists()
    assert (save / ".lock").read_text().strip() == str(os.getpid())


def test_kill_between_the_two_stage2_saves(data, copy_run, runs, tmp_path):
    """Either order of a kill between `image_adapter_<k>.pth` and `image_adapter.pth` ends with both files
    of every epoch, equal to the uninterrupted run's."""
    written_first = copy_run("baseline")  # the per-epoch file was written, the resume file was not
    shutil.copy(runs / "baseline" / "image_adapter_1.pth", written_first / "image_adapter.pth")
    run_main(train, train_args(data, written_first) + ["--image_epoch", "2"])
    assert_same_weights(written_first / "image_adapter_2.pth", runs / "baseline" / "image_adapter_2.pth")

    written_last = Path(shutil.copytree(runs / "baseline", tmp_path / "other"))  # an older version's order
    (written_last / "image_adapter_2.pth").unlink()
    run_main(train, train_args(data, written_last) + ["--image_epoch", "2"])
    assert_same_weights(written_last / "image_adapter_2.pth", runs / "baseline" / "image_adapter_2.pth")
    assert "wrote the missing image_adapter_2.pth" in (written_last / "train.log").read_text()
    run_main(test_script, ["--save_path", str(written_last), *data_args(data), "--all_epochs"])
    assert sorted(p.name for p in (written_last / "results").glob("*_epoch?.json")) == [
        "Synthetic_epoch1.json", "Synthetic_epoch2.json"]


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_resume_from_the_newest_loadable_epoch(damage, data, copy_run, tmp_path):
    """A damaged or deleted image_adapter.pth: Stage 2 goes on from image_adapter_2.pth (a damaged
    image_adapter_3.pth skipped) and ends where an uninterrupted run ends."""
    full = tmp_path / "full"
    run_main(train, train_args(data, full) + ["--image_epoch", "4"])
    cut = copy_run("baseline")  # 2 Stage-2 epochs
    shutil.copy(full / "image_adapter_3.pth", cut / "image_adapter_3.pth")
    (cut / "image_adapter_3.pth").write_bytes((cut / "image_adapter_3.pth").read_bytes()[:300])
    if damage == "truncated":
        (cut / "image_adapter.pth").write_bytes(b"\x00" * 10)
    else:
        (cut / "image_adapter.pth").unlink()
    run_main(train, train_args(data, cut) + ["--image_epoch", "4"])
    log = (cut / "train.log").read_text()
    assert "skipping image_adapter_3.pth" in log and "resuming from image_adapter_2.pth" in log
    for name in ("image_adapter_3.pth", "image_adapter_4.pth", "image_adapter.pth"):
        assert_same_weights(cut / name, full / name)


def test_temporaries_of_killed_writers_are_removed(data, copy_run):
    save = copy_run("baseline")
    writer = subprocess.Popen([sys.executable, "-c", "pass"])
    writer.wait()  # a PID that no longer runs
    dead = [save / f".image_adapter.pth.{writer.pid}.abc123.tmp", save / f".args.json.{writer.pid}.x_y.tmp"]
    live = save / f".image_adapter_1.pth.{os.getpid()}.zz.tmp"
    for p in [*dead, live]:
        p.write_bytes(b"partial")
    staged = save.parent / f".predictions.{writer.pid}.0a1b.partial"
    (staged / "files").mkdir(parents=True)
    run_main(train, train_args(data, save) + ["--image_epoch", "2"])
    assert not any(p.exists() for p in dead) and live.exists()
    assert remove_stale_temporaries(save.parent) == [staged] and not staged.exists()


def test_outputs_follow_the_umask(data, tmp_path):
    old = os.umask(0o027)
    try:
        save = tmp_path / "run"
        run_main(train, train_args(data, save))
        run_main(test_script, ["--save_path", str(save), *data_args(data)])
        run_main(predict, ["--save_path", str(save), "--images", str(data / "syn" / "disc" / "test" / "good"),
                           "--class_name", "disc", "--num_workers", "0", "--device", "cpu"])
    finally:
        os.umask(old)
    for name in ("text_adapter.pth", "image_adapter.pth", "image_adapter_1.pth", "args.json",
                 "results/Synthetic_epoch1.json", "predictions/scores.csv"):
        assert (save / name).stat().st_mode & 0o777 == 0o640, name


def test_logs_stay_readable(data, tmp_path, capsys, monkeypatch):
    """Off a terminal the progress bars are plain lines, and the log gives a short summary of the flags
    (args.json has them all)."""
    save = tmp_path / "run"
    run_main(train, train_args(data, save))
    assert "it/s" not in capsys.readouterr().err  # a loop shorter than the interval shows no bar
    monkeypatch.setattr(utils.progress, "INTERVAL_S", 0.0)
    run_main(train, train_args(data, save) + ["--image_epoch", "2"])
    err = capsys.readouterr().err
    assert "\r" not in err and "stage 2 epoch 2/2: 100%" in err
    log = (save / "train.log").read_text().splitlines()
    assert max(map(len, log)) < 300 and any("every setting in" in line for line in log)


def test_a_full_disk_under_the_log_file_prints_no_traceback(data, tmp_path, monkeypatch, capsys):
    """Every log line fails to reach train.log (as on a full disk): no per-message traceback on stderr,
    the console copy goes on, and the run itself finishes."""
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: FullDisk())
    save = tmp_path / "run"
    run_main(train, train_args(data, save))
    captured = capsys.readouterr()
    assert "Logging error" not in captured.err and "Traceback" not in captured.err
    assert "done: checkpoints in" in captured.out and (save / "image_adapter_1.pth").exists()
