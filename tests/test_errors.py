"""Bad inputs: each stops the script with exit code 2 and one `error:` message that names the file or
flag and says the fix, and leaves nothing half-written behind (checked on the folder listing).
`NotClean`: the script did not stop cleanly with such a message; `LeftBehind`: the message is right but
files were created or changed.
"""
import errno
import json
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import open_clip
import pytest
import torch

import predict
import test as test_script
import train
import train_cross_attention
from model import AdaptedCLIP, build_clip
from conftest import NotClean, assert_unchanged, data_args, fail, has, listing, run_main, train_args

REPO = Path(__file__).resolve().parents[1]


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> AdaptedCLIP:
    """An AdaptedCLIP on a tiny backbone of width 96 instead of 64."""
    cfg = json.loads((REPO / "model" / "configs" / "tiny.json").read_text())
    cfg["embed_dim"] = cfg["vision_cfg"]["width"] = cfg["text_cfg"]["width"] = 96
    path = tmp_path_factory.mktemp("cfg") / "tiny_wide_test.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return AdaptedCLIP(build_clip("tiny_wide_test", "none", 56))


# --- weights ------------------------------------------------------------------------------------------

def test_weight_file_missing(data, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    msg = fail(train, train_args(data, save) + ["--pretrained", str(tmp_path / "ViT-L-14-336px.pt")],
               monkeypatch, capsys)
    has(msg, str(tmp_path / "ViT-L-14-336px.pt"), "not found", "--pretrained")
    assert_unchanged(save, None)


def test_weight_file_corrupted(data, tmp_path, monkeypatch, capsys):
    weights, save = tmp_path / "w.pt", tmp_path / "run"
    weights.write_bytes(b"\x80\x02 not a checkpoint")
    msg = fail(train, train_args(data, save) + ["--pretrained", str(weights)], monkeypatch, capsys)
    has(msg, str(weights), "damaged", "download it again")
    assert_unchanged(save, None)


def test_weight_file_of_another_architecture(data, wide, tmp_path, monkeypatch, capsys):
    weights, save = tmp_path / "wide.pt", tmp_path / "run"
    torch.save(wide.clip.state_dict(), weights)
    msg = fail(train, train_args(data, save) + ["--pretrained", str(weights)], monkeypatch, capsys)
    has(msg, str(weights), "do not fit", "--model")
    assert_unchanged(save, None)


def test_pretrained_openai_offline(data, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", offline)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", offline)
    save = tmp_path / "run"
    argv = train_args(data, save) + ["--model", "ViT-B-32", "--image_size", "224", "--pretrained", "openai"]
    has(fail(train, argv, monkeypatch, capsys), "offline", "ViT-B-32", "--pretrained")
    assert_unchanged(save, None)


# --- dataset ------------------------------------------------------------------------------------------

def test_dataset_root_missing(data, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    argv = train_args(data, save) + ["--data_root", str(tmp_path / "nowhere")]
    has(fail(train, argv, monkeypatch, capsys), "root not found", str(tmp_path / "nowhere"), "--data_root")
    assert_unchanged(save, None)


def test_metadata_missing(data, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    argv = train_args(data, save) + ["--metadata_dir", str(tmp_path / "meta")]
    msg = fail(train, argv, monkeypatch, capsys)
    has(msg, "metadata file not found", str(tmp_path / "meta" / "Synthetic" / "2-shot.jsonl"), "make_metadata")
    assert_unchanged(save, None)


def copy_metadata(data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data / "meta", tmp_path / "meta"))


def test_bad_metadata_line(data, tmp_path, monkeypatch, capsys):
    meta, save = copy_metadata(data, tmp_path), tmp_path / "run"
    shot = meta / "Synthetic" / "2-shot.jsonl"
    lines = shot.read_text().splitlines()
    lines[2] = lines[2][:-5]  # a line cut short
    shot.write_text("\n".join(lines) + "\n")
    msg = fail(train, train_args(data, save) + ["--metadata_dir", str(meta)], monkeypatch, capsys)
    has(msg, f"{shot}:3", "invalid JSON")
    assert_unchanged(save, None)


def test_corrupted_image(data, tmp_path, monkeypatch, capsys):
    root, save = Path(shutil.copytree(data / "syn", tmp_path / "syn")), tmp_path / "run"
    first = json.loads((data / "meta" / "Synthetic" / "2-shot.jsonl").read_text().splitlines()[0])
    (root / first["image_path"]).write_bytes(b"\x89PNG\r\n garbage")
    argv = train_args(data, save) + ["--data_root", str(root), "--num_workers", "1"]
    has(fail(train, argv, monkeypatch, capsys), str(root / first["image_path"]), "corrupted")
    assert_unchanged(save, None)


def test_anomalous_sample_mask_missing(data, tmp_path, monkeypatch, capsys):
    root, save = Path(shutil.copytree(data / "syn", tmp_path / "syn")), tmp_path / "run"
    lines = (data / "meta" / "Synthetic" / "2-shot.jsonl").read_text().splitlines()
    anomalous = next(r for r in map(json.loads, lines) if r["label"] == 1)
    (root / anomalous["mask_path"]).unlink()
    msg = fail(train, train_args(data, save) + ["--data_root", str(root)], monkeypatch, capsys)
    has(msg, "mask", str(root / anomalous["mask_path"]), "not found")
    assert_unchanged(save, None)


# --- a checkpoint of the other variant, another width, truncated -------------------------------------------

def test_baseline_training_into_a_cross_attention_run(data, copy_run, monkeypatch, capsys):
    save = copy_run("cross_attention")
    before = listing(save)
    has(fail(train, train_args(data, save), monkeypatch, capsys), str(save),
        "--variant: 'cross_attention' then, 'baseline' now", "new --save_path")
    assert_unchanged(save, before)


def test_cross_attention_training_into_a_baseline_run(data, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    before = listing(save)
    has(fail(train_cross_attention, train_args(data, save), monkeypatch, capsys), str(save),
        "--variant: 'baseline' then, 'cross_attention' now", "new --save_path")
    assert_unchanged(save, before)


def test_cross_attention_checkpoint_as_baseline_text_adapter(data, runs, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    shutil.copy(runs / "cross_attention" / "text_adapter_cross_attn.pth", save / "text_adapter.pth")
    before = listing(save)
    msg = fail(test_script, ["--save_path", str(save), *data_args(data)], monkeypatch, capsys)
    has(msg, str(save / "text_adapter.pth"), "is a cross_attention checkpoint",
        "put the baseline run's text_adapter.pth there")
    assert_unchanged(save, before)


def test_baseline_checkpoint_as_cross_attention_checkpoint(data, runs, copy_run, monkeypatch, capsys):
    save = copy_run("cross_attention")
    shutil.copy(runs / "baseline" / "text_adapter.pth", save / "text_adapter_cross_attn.pth")
    before = listing(save)
    msg = fail(test_script, ["--save_path", str(save), *data_args(data)], monkeypatch, capsys)
    has(msg, str(save / "text_adapter_cross_attn.pth"), "no 'text_cross_attn'")
    assert_unchanged(save, before)


def replace_image_adapter(save: Path, wide: AdaptedCLIP) -> Path:
    path = save / "image_adapter_1.pth"
    torch.save({"epoch": 1, "image_adapter": wide.image_adapter.state_dict()}, path)
    return path


def test_image_adapter_of_another_width_test_py(data, wide, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    path = replace_image_adapter(save, wide)
    before = listing(save)
    msg = fail(test_script, ["--save_path", str(save), *data_args(data), "--epoch", "1"], monkeypatch, capsys)
    has(msg, str(path), "does not fit", "--model")
    assert_unchanged(save, before)


def test_image_adapter_of_another_width_predict(data, wide, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    path = replace_image_adapter(save, wide)
    before = listing(save)
    msg = fail(predict, ["--save_path", str(save), "--images", str(data / "syn" / "disc" / "test" / "good"),
                         "--class_name", "disc", "--device", "cpu", "--num_workers", "0", "--epoch", "1"],
               monkeypatch, capsys)
    has(msg, str(path), "does not fit", "--model")
    assert_unchanged(save, before)


@pytest.mark.parametrize("script", [test_script, predict])
def test_truncated_checkpoint(script, data, copy_run, monkeypatch, capsys):
    save = copy_run("cross_attention")
    path = save / "image_adapter_1.pth"
    path.write_bytes(path.read_bytes()[:1000])
    before = listing(save)
    argv = ["--save_path", str(save), "--epoch", "1", "--device", "cpu", "--num_workers", "0"]
    argv += data_args(data) if script is test_script else ["--images", str(data / "syn"), "--class_name", "disc"]
    has(fail(script, argv, monkeypatch, capsys), str(path), "damaged")
    assert_unchanged(save, before)


# --- flags --------------------------------------------------------------------------------------------

def test_image_size_not_a_multiple_of_the_patch_size(data, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    msg = fail(train, train_args(data, save) + ["--image_size", "50"], monkeypatch, capsys)
    has(msg, "--image_size 50", "patch size 14")
    assert_unchanged(save, None)


def test_resnet_model(data, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    has(fail(train, train_args(data, save) + ["--model", "RN50"], monkeypatch, capsys), "RN50", "ViT")
    assert_unchanged(save, None)


def test_level_beyond_the_depth(data, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    has(fail(train, train_args(data, save) + ["--levels", "4", "9"], monkeypatch, capsys), "--levels", "1..8")
    assert_unchanged(save, None)


@pytest.mark.parametrize("script", [train, predict])
def test_unwritable_output_folder(script, data, runs, tmp_path, monkeypatch, capsys):
    # Under a regular file, since chmod does not stop root (CI runs as root).
    blocker = tmp_path / "somefile"
    blocker.write_text("")
    target = blocker / "sub"
    if script is train:
        argv, flag, watched = train_args(data, target), "--save_path", tmp_path
    else:
        argv = ["--save_path", str(runs / "baseline"), "--images", str(data / "syn" / "disc" / "test" / "good"),
                "--class_name", "disc", "--out", str(target), "--device", "cpu", "--num_workers", "0"]
        flag, watched = "--out", runs / "baseline"
    before = listing(watched)
    has(fail(script, argv, monkeypatch, capsys), str(target), "cannot write", flag)
    assert_unchanged(watched, before)


def test_non_finite_map_stops_test_py_before_writing(data, copy_run, monkeypatch, capsys):
    """One inf pixel in a class's maps: test.py names the class and the count and writes no results."""
    save = copy_run("baseline")
    predict = test_script.predict

    def poisoned(*args, **kwargs):
        maps, scores, masks = predict(*args, **kwargs)
        maps[-1, 0, 0] = float("inf")
        return maps, scores, masks

    monkeypatch.setattr(test_script, "predict", poisoned)
    msg = fail(test_script, ["--save_path", str(save), *data_args(data)], monkeypatch, capsys)
    has(msg, "class 'stripes'", "1 of ", "pixel-map values are not finite (0 NaN, 1 inf)", "--precision fp32",
        "nothing was written")
    assert not list(save.glob("results/*.csv")) and not list(save.glob("results/*.json"))


def test_epoch_and_all_epochs(data, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    before = listing(save)
    msg = fail(test_script, ["--save_path", str(save), *data_args(data), "--epoch", "1", "--all_epochs"],
               monkeypatch, capsys)
    has(msg, "--epoch", "--all_epochs")
    assert_unchanged(save, before)


@pytest.mark.parametrize("script", [test_script, predict])
def test_text_context_on_a_baseline_run(script, data, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    before = listing(save)
    argv = ["--save_path", str(save), "--text_context", "none", "--device", "cpu", "--num_workers", "0"]
    argv += data_args(data) if script is test_script else ["--images", str(data / "syn"), "--class_name", "disc"]
    has(fail(script, argv, monkeypatch, capsys), "--text_context", "baseline")
    assert_unchanged(save, before)


def test_cross_attention_without_text_stage(data, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    msg = fail(train_cross_attention, train_args(data, save) + ["--text_epoch", "0"], monkeypatch, capsys)
    has(msg, "--text_epoch 0", "train.py")
    assert_unchanged(save, None)


# --- predict.py inputs --------------------------------------------------------------------------------

def test_predict_images_not_found(data, copy_run, tmp_path, monkeypatch, capsys):
    save = copy_run("baseline")
    before = listing(save)
    msg = fail(predict, ["--save_path", str(save), "--images", str(tmp_path / "nope.png"), "--class_name", "disc"],
               monkeypatch, capsys)
    has(msg, "--images", str(tmp_path / "nope.png"), "no such file")
    assert_unchanged(save, before)


def test_predict_unreadable_images_all_listed(data, copy_run, tmp_path, monkeypatch, capsys):
    save = copy_run("baseline")
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "in" / name).write_bytes(b"not an image")
    shutil.copy(data / "syn" / "disc" / "test" / "good" / "000.png", tmp_path / "in" / "ok.png")
    before = listing(save)
    msg = fail(predict, ["--save_path", str(save), "--images", str(tmp_path / "in"), "--class_name", "disc",
                         "--device", "cpu"], monkeypatch, capsys)
    has(msg, "2 of the --images", str(tmp_path / "in" / "a.png"), str(tmp_path / "in" / "b.jpg"))
    assert "ok.png" not in msg
    assert_unchanged(save, before)


def test_predict_truncated_image_found_while_decoding(data, copy_run, tmp_path, monkeypatch, capsys):
    save = copy_run("baseline")
    image = tmp_path / "cut.png"
    png = (data / "syn" / "disc" / "test" / "good" / "000.png").read_bytes()
    image.write_bytes(png[: len(png) // 2])  # the header reads fine, the pixels do not
    msg = fail(predict, ["--save_path", str(save), "--images", str(image), "--class_name", "disc", "--device", "cpu",
                         "--num_workers", "1"], monkeypatch, capsys)
    has(msg, str(image), "corrupted or truncated")
    assert not (save / "predictions" / "scores.csv").exists() and not (save / "predictions" / "scores.json").exists()


def test_real_cli_path(data, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *train_args(data, tmp_path / "run"),
                           "--pretrained", str(tmp_path / "missing.pt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: weight file {tmp_path / 'missing.pt'} not found" in proc.stderr
    assert not (tmp_path / "run").exists()
    if not proc.stderr.startswith("error:"):
        raise NotClean(f"stderr does not start with the error line:\n{proc.stderr}")


# --- reruns: a save path holds one configuration ------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny CLIP's weights as a state-dict file."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(build_clip("tiny", "none", 56).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weighted_run(data, weights, tmp_path_factory) -> Path:
    """A baseline run trained from `weights` (never changed; tests copy it)."""
    save = tmp_path_factory.mktemp("weighted") / "run"
    run_main(train, train_args(data, save) + ["--pretrained", str(weights)])
    return save


@pytest.mark.parametrize("extra,words", [
    (["--seed", "3"], ["--seed: 111 then, 3 now"]),
    (["--image_lr", "0.001"], ["--image_lr: 0.0005 then, 0.001 now"]),
    (["--shot", "1"], ["--shot: 2 then, 1 now"]),
    (["--image_epoch", "1"], ["--image_epoch: 2 then, 1 now", "only be extended", "test.py --epoch"]),
    (["--image_epoch", "2", "--text_epoch", "2"], ["--text_epoch: 1 then, 2 now", "Stage 2 has trained"]),
    (["--image_epoch", "2", "--relu", "--precision", "fp32"], ["--relu: False then, True now"]),
    (["--image_epoch", "2", "--pretrained", "openai"], ["--pretrained: 'none' then, 'openai' now"]),
])
def test_rerun_with_other_settings(extra, words, data, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    before = listing(save)
    msg = fail(train, train_args(data, save) + extra, monkeypatch, capsys)
    has(msg, f"{save} holds a run with other settings", *words, "new --save_path", str(save / "args.json"))
    assert_unchanged(save, before)


def test_rerun_without_the_weight_file(data, weighted_run, tmp_path, monkeypatch, capsys):
    save = Path(shutil.copytree(weighted_run, tmp_path / "run"))
    before = listing(save)
    msg = fail(train, train_args(data, save), monkeypatch, capsys)  # --pretrained omitted: random weights
    has(msg, "--pretrained:", "tiny.pt (sha256", "then, none (sha256 None) now")
    assert_unchanged(save, before)


def test_rerun_with_a_changed_training_list(data, copy_run, tmp_path, monkeypatch, capsys):
    save, meta = copy_run("baseline"), copy_metadata(data, tmp_path)
    shot = meta / "Synthetic" / "2-shot.jsonl"
    shot.write_text("".join(reversed(shot.read_text().splitlines(keepends=True))))
    before = listing(save)
    argv = train_args(data, save) + ["--metadata_dir", str(meta), "--image_epoch", "2"]
    has(fail(train, argv, monkeypatch, capsys), "Synthetic/2-shot.jsonl: its content changed")
    assert_unchanged(save, before)


@pytest.mark.parametrize("script", [test_script, predict])
def test_evaluation_with_other_weights(script, data, weighted_run, tmp_path, monkeypatch, capsys):
    save = Path(shutil.copytree(weighted_run, tmp_path / "run"))
    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(build_clip("tiny", "none", 56).state_dict(), other)
    before = listing(save)
    argv = ["--save_path", str(save), "--pretrained", str(other), "--device", "cpu", "--num_workers", "0"]
    argv += data_args(data) if script is test_script else ["--images", str(data / "syn" / "disc"), "--class_name",
                                                           "disc"]
    has(fail(script, argv, monkeypatch, capsys), f"--pretrained {other} (sha256", "is not the weight file",
        str(save), "pass that file")
    assert_unchanged(save, before)


def test_damaged_args_json(data, copy_run, monkeypatch, capsys):
    """A zero-byte args.json (left by older versions on a full disk) is one message, for training and testing."""
    save = copy_run("baseline")
    (save / "args.json").write_text("")
    before = listing(save)
    has(fail(train, train_args(data, save), monkeypatch, capsys), f"cannot read {save / 'args.json'}", "delete it")
    has(fail(test_script, ["--save_path", str(save), *data_args(data)], monkeypatch, capsys), "cannot read")
    assert_unchanged(save, before)


# --- one training per folder --------------------------------------------------------------------------

def test_second_training_on_a_locked_folder(data, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(save / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.seek(0); f.truncate(); f.write('4242\\n'); f.flush(); print('locked', flush=True)\n"
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = listing(save)
        msg = fail(train, train_args(data, save) + ["--image_epoch", "3"], monkeypatch, capsys)
        has(msg, "another training (PID 4242)", str(save), "another --save_path")
        assert_unchanged(save, before)
    finally:
        holder.kill()
        holder.wait()


# --- a full disk ----------------------------------------------------------------------------------------

@pytest.fixture
def disk_full_at(monkeypatch):
    """`disk_full_at(name)`: writing a file whose name is `name` fails as on a full disk, after part of it
    was written (the error of a real ENOSPC surfaces at write or at fsync); `disk_full_at(None)`: space
    was freed."""
    import utils.io
    real, full = utils.io._atomic_write, {"name": None}

    def failing(path, write):
        if Path(path).name != full["name"]:
            return real(path, write)

        def partial(f):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, partial)
    monkeypatch.setattr(utils.io, "_atomic_write", failing)
    return lambda name: full.update(name=name)


def test_disk_full_writing_args_json(data, tmp_path, disk_full_at, monkeypatch, capsys):
    save = tmp_path / "run"
    disk_full_at("args.json")
    has(fail(train, train_args(data, save), monkeypatch, capsys), f"cannot write {save / 'args.json'}",
        "No space left on device", "rerun")
    assert_unchanged(save, None)  # no zero-byte args.json, no folder


def test_disk_full_writing_a_checkpoint(data, tmp_path, disk_full_at, monkeypatch, capsys):
    save = tmp_path / "run"
    disk_full_at("image_adapter_1.pth")
    msg = fail(train, train_args(data, save), monkeypatch, capsys)
    has(msg, f"cannot write a checkpoint in {save}", "No space left on device", "run the same command to resume")
    assert sorted(p.name for p in save.iterdir()) == [".lock", "args.json", "metrics.jsonl", "text_adapter.pth",
                                                       "train.log"]
    disk_full_at(None)
    run_main(train, train_args(data, save))  # space freed: the same command resumes after Stage 1
    log = (save / "train.log").read_text()
    assert "stage 1: loaded" in log and (save / "image_adapter_1.pth").exists()


def test_disk_full_writing_results(data, copy_run, disk_full_at, monkeypatch, capsys):
    save = copy_run("baseline")
    disk_full_at("Synthetic_epoch2.json")
    before = listing(save)
    msg = fail(test_script, ["--save_path", str(save), *data_args(data)], monkeypatch, capsys)
    has(msg, f"cannot write {save / 'results' / 'Synthetic_epoch2.json'}", "No space left on device")
    assert set(listing(save)) - set(before) == {"results", "results/test.log"}  # no CSV without its JSON
    disk_full_at(None)
    run_main(test_script, ["--save_path", str(save), *data_args(data)])  # space freed: the rerun works
    assert json.loads((save / "results" / "Synthetic_epoch2.json").read_text())["meta"]["epoch"] == 2


def test_no_loadable_stage2_checkpoint(data, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    for path in save.glob("image_adapter*.pth"):
        path.write_bytes(path.read_bytes()[:500])
    before = listing(save)
    msg = fail(train, train_args(data, save) + ["--image_epoch", "3"], monkeypatch, capsys)
    has(msg, str(save / "image_adapter.pth"), "damaged", "no per-epoch checkpoint loads either", "delete")
    checkpoints = {k: v for k, v in listing(save).items() if k.endswith(".pth")}
    assert checkpoints == {k: v for k, v in before.items() if k.endswith(".pth")}  # the run started; nothing lost


def test_rerun_of_an_older_run_with_a_new_flag_changed(data, copy_run, monkeypatch, capsys):
    """An args.json written before --context_cls existed: the run used the default, so another value is a
    difference, and the default is not."""
    save = copy_run("cross_attention")
    saved = json.loads((save / "args.json").read_text())
    del saved["context_cls"]
    (save / "args.json").write_text(json.dumps(saved))
    before = listing(save)
    msg = fail(train_cross_attention, train_args(data, save) + ["--sanity_check", "--context_cls", "token"],
               monkeypatch, capsys)
    has(msg, "--context_cls: 'residual' then, 'token' now")
    assert_unchanged(save, before)
    run_main(train_cross_attention, train_args(data, save) + ["--image_epoch", "2"])  # --sanity_check is operational


@pytest.mark.parametrize("script", [test_script, predict])
def test_patch_grid_smaller_than_the_medical_blur(script, data, copy_run, tmp_path, monkeypatch, capsys):
    """56 px gives the tiny model a 4x4 patch grid; the medical blur (kernel 9) needs 5 patches a side."""
    save = copy_run("baseline")
    before = listing(save)
    if script is test_script:
        meta = copy_metadata(data, tmp_path)
        shutil.copytree(meta / "Synthetic", meta / "Brain")
        argv = ["--save_path", str(save), "--dataset", "Brain", "--data_root", str(data / "syn"), "--metadata_dir",
                str(meta), "--num_workers", "0", "--device", "cpu"]
    else:
        argv = ["--save_path", str(save), "--images", str(data / "syn" / "disc" / "test" / "good"), "--class_name",
                "disc", "--dataset", "Brain", "--device", "cpu", "--num_workers", "0"]
    has(fail(script, argv, monkeypatch, capsys), "4x4 patch grid is too small for the medical map blur (kernel 9)",
        "--image_size")
    assert_unchanged(save, before)
