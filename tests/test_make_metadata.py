"""make_metadata as a newcomer runs it: shot counts a small set cannot fill are skipped with one line each,
the dataset root is recorded beside the lists (root.json) and found by later commands without --data_root,
and wrong input gives one `error:` line with exit code 2."""
import argparse
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import cli
from dataset import DatasetError
from dataset.check import main as check_main
from dataset.common import record_root, resolve_root
from dataset.make_metadata import build_metadata, build_parser, main
from dataset.synthetic import make_synthetic


@pytest.fixture
def syn(tmp_path) -> Path:
    """Two synthetic classes: disc with 5 test images (2 normal, 3 anomalous), nut with 4 (one normal removed)."""
    root = tmp_path / "syn"
    make_synthetic(str(root), seed=0, size=32, n_normal=2, n_anomalous=3, n_train=0, classes=["disc", "nut"])
    (root / "nut" / "test" / "good" / "001.png").unlink()
    return root


def make(syn: Path, meta: Path, *flags: str) -> int:
    return main(["--dataset", "Syn", "--root", str(syn), "--out_dir", str(meta), *flags])


def lines(text: str) -> list[str]:
    return text.splitlines()


def read_list(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def data_args(*flags: str) -> argparse.Namespace:
    """The flags a training or test script parses, for `cli.load_dataset`."""
    parser = argparse.ArgumentParser()
    cli.add_model_args(parser)
    cli.add_data_args(parser, default_dataset="Syn")
    return parser.parse_args(["--image_size", "32", *flags])


# --- shot counts -------------------------------------------------------------------------------------

def test_default_shots_on_a_small_set_write_the_full_list_and_say_what_was_skipped(syn, tmp_path, capsys):
    meta = tmp_path / "meta"
    assert make(syn, meta) == 0
    out, err = capsys.readouterr()
    assert sorted(p.name for p in (meta / "Syn").iterdir()) == ["full-shot.jsonl", "root.json"]
    assert len(read_list(meta / "Syn" / "full-shot.jsonl")) == 9
    assert f"wrote {meta / 'Syn' / 'full-shot.jsonl'} (9 samples)" in out
    assert lines(err) == [f"warning: skipped {k}-shot.jsonl: class 'nut' has only 4 test images, fewer than {k}, "
                          "as has 1 other class; at most 4 shots fit every class" for k in (8, 16, 32)]


def test_possible_shot_counts_are_written_as_if_asked_alone(syn, tmp_path, capsys):
    assert make(syn, tmp_path / "meta", "--shots", "2", "5", "4", "2") == 0
    err = capsys.readouterr().err
    # disc has 5 images: only nut is too small for 5.
    assert lines(err) == ["warning: skipped 5-shot.jsonl: class 'nut' has only 4 test images, fewer than 5; "
                          "at most 4 shots fit every class"]
    folder = tmp_path / "meta" / "Syn"
    assert sorted(p.name for p in folder.glob("*.jsonl")) == ["2-shot.jsonl", "4-shot.jsonl", "full-shot.jsonl"]
    # Skipping 5 does not change the draws of the other counts.
    alone = build_metadata("Syn", str(syn), out_dir=str(tmp_path / "alone"), shots=(2, 4))
    for path, records in alone.items():
        assert read_list(folder / path.name) == records


def test_a_skipped_count_deletes_its_list_from_an_earlier_run(syn, tmp_path, capsys):
    meta = tmp_path / "meta"
    assert make(syn, meta, "--shots", "4") == 0
    assert (meta / "Syn" / "4-shot.jsonl").is_file()
    (syn / "nut" / "test" / "good" / "000.png").unlink()  # nut: 3 images now
    capsys.readouterr()
    assert make(syn, meta, "--shots", "4") == 0
    assert lines(capsys.readouterr().err) == [
        "warning: skipped 4-shot.jsonl: class 'nut' has only 3 test images, fewer than 4; at most 3 shots fit every "
        "class; deleted the 4-shot.jsonl of an earlier run, drawn from another full list"]
    assert not (meta / "Syn" / "4-shot.jsonl").exists()


def test_help_shows_a_text_and_the_default_of_every_flag(capsys):
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert "(default: " in action.help or action.required, action.dest
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("(default: 8 16 32)", "(default: 111)", "(default: dataset/metadata)", "(default: auto",
                  "(default: the root recorded by an earlier run, else the dataset's default root", "(required)"):
        assert shown in help_text


# --- the recorded root -------------------------------------------------------------------------------

def test_root_is_recorded_absolute_beside_the_lists(syn, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--dataset", "Syn", "--root", "syn", "--out_dir", "meta", "--shots", "2"]) == 0
    recorded = json.loads((tmp_path / "meta" / "Syn" / "root.json").read_text())["root"]
    assert os.path.isabs(recorded) and Path(recorded).resolve() == syn.resolve()
    assert "recorded the dataset root in meta/Syn/root.json" in capsys.readouterr().out
    # build_metadata (which dataset.synthetic uses) records it too.
    build_metadata("Other", str(syn), out_dir=str(tmp_path / "meta"), shots=())
    assert json.loads((tmp_path / "meta" / "Other" / "root.json").read_text()) == {"root": str(syn)}


def test_a_failed_record_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "Syn").mkdir()
    record_root(tmp_path, "Syn", tmp_path / "old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        record_root(tmp_path, "Syn", tmp_path / "new")
    assert [p.name for p in (tmp_path / "Syn").iterdir()] == ["root.json"]
    assert json.loads((tmp_path / "Syn" / "root.json").read_text()) == {"root": str(tmp_path / "old")}


def test_later_data_loads_find_the_recorded_root(syn, tmp_path):
    meta = tmp_path / "meta"
    assert make(syn, meta, "--shots", "2") == 0
    args = data_args("--metadata_dir", str(meta))
    assert args.data_root is None
    full = cli.load_dataset(args, "Syn", None)
    assert (full.root, len(full), full.class_names) == (str(syn), 9, ["disc", "nut"])
    assert len(cli.load_dataset(args, "Syn", 2)) == 4
    assert check_main(["--dataset", "Syn", "--metadata_dir", str(meta)]) == 0
    # make_metadata itself: a rerun without --root reads the same folder.
    assert main(["--dataset", "Syn", "--out_dir", str(meta), "--shots", "3"]) == 0
    assert len(read_list(meta / "Syn" / "3-shot.jsonl")) == 6


def test_data_root_still_wins_over_the_recorded_root(syn, tmp_path):
    meta = tmp_path / "meta"
    assert make(syn, meta, "--shots") == 0
    copy = shutil.copytree(syn, tmp_path / "copy")
    ds = cli.load_dataset(data_args("--metadata_dir", str(meta), "--data_root", str(copy)), "Syn", None)
    assert ds.root == str(copy)


def test_without_a_record_the_default_root_is_used(syn, tmp_path, monkeypatch):
    meta = tmp_path / "meta"
    assert make(syn, meta, "--shots") == 0
    (meta / "Syn" / "root.json").unlink()
    assert resolve_root(None, meta, "Syn") == "./data/Syn"  # a dataset outside the constants: ./data/<name>
    monkeypatch.chdir(tmp_path)
    shutil.move(syn, tmp_path / "data" / "Syn")
    assert cli.load_dataset(data_args("--metadata_dir", str(meta)), "Syn", None).root == "./data/Syn"


def test_a_recorded_root_that_moved_says_where_it_was_recorded(syn, tmp_path, capsys):
    meta = tmp_path / "meta"
    assert make(syn, meta, "--shots") == 0
    moved = str(shutil.move(syn, tmp_path / "moved"))
    record = meta / "Syn" / "root.json"
    with pytest.raises(DatasetError) as error:
        cli.load_dataset(data_args("--metadata_dir", str(meta)), "Syn", None)
    assert str(error.value) == (
        f"dataset root not found: {syn} (recorded in {record} when the lists were built); pass the dataset folder "
        f"with --data_root (--root for make_metadata), or record its new place with `python -m "
        f"dataset.make_metadata --dataset Syn --root DIR --out_dir {meta}`")
    capsys.readouterr()
    assert check_main(["--dataset", "Syn", "--metadata_dir", str(meta)]) == 2
    assert lines(capsys.readouterr().err) == [f"error: {error.value}"]
    assert main(["--dataset", "Syn", "--out_dir", str(meta)]) == 2
    assert lines(capsys.readouterr().err) == [f"error: {error.value}"]
    # Either fix works.
    assert cli.load_dataset(data_args("--metadata_dir", str(meta), "--data_root", moved), "Syn", None).root == moved
    assert make(Path(moved), meta, "--shots") == 0
    assert cli.load_dataset(data_args("--metadata_dir", str(meta)), "Syn", None).root == moved


@pytest.mark.parametrize("content", ["not json", "[1]", '{"path": "x"}', '{"root": ""}'])
def test_a_damaged_record_names_the_file(syn, tmp_path, content):
    meta = tmp_path / "meta"
    assert make(syn, meta, "--shots") == 0
    (meta / "Syn" / "root.json").write_text(content)
    expected = (f'{meta / "Syn" / "root.json"}: expected {{"root": "DIR"}}, as make_metadata writes it; '
                "delete it, or rebuild")
    with pytest.raises(DatasetError, match=re.escape(expected)):
        cli.load_dataset(data_args("--metadata_dir", str(meta)), "Syn", None)


# --- input errors ------------------------------------------------------------------------------------

def _empty(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".DS_Store").touch()
    return tmp_path / "data"


def _file(tmp_path: Path) -> Path:
    (tmp_path / "data.zip").touch()
    return tmp_path / "data.zip"


def _unknown(tmp_path: Path) -> Path:
    (tmp_path / "data" / "docs").mkdir(parents=True)
    (tmp_path / "data" / "readme.txt").touch()
    return tmp_path / "data"


def _class_folder(tmp_path: Path) -> Path:
    make_synthetic(str(tmp_path / "syn"), size=32, n_normal=1, n_anomalous=1, n_train=0, classes=["disc"])
    return tmp_path / "syn" / "disc"


@pytest.mark.parametrize("make_root, flags, message", [
    (_empty, [], "dataset root {root} is empty (no classes found); download/extract the dataset there or pass "
                 "the right --root"),
    (_file, [], "dataset root {root} is a file, not a folder; pass the dataset's folder as --root"),
    (_unknown, [], "no classes found under {root}: it matches none of the layouts visa (split_csv/1cls.csv), "
                   "medad (test/good/img/ or test/Ungood/img/), btad (<class>/test/ok/ and ko/), colon (images/ "
                   "holding images), mvtec_like (<class>/test/<defect or good>/); check --root, or pass --layout"),
    (_class_folder, [], "no classes found under {root}: it matches none of the layouts visa (split_csv/1cls.csv), "
                        "medad (test/good/img/ or test/Ungood/img/), btad (<class>/test/ok/ and ko/), colon "
                        "(images/ holding images), mvtec_like (<class>/test/<defect or good>/); {root} holds test/ "
                        "itself, as one class folder does: pass the folder above it as --root"),
    (_class_folder, ["--layout", "mvtec"], "no classes found under {root} for layout mvtec: expected "
                                           "<class>/test/<defect or good>/<image> folders; {root} holds test/ itself, "
                                           "as one class folder does: pass the folder above it as --root"),
])
def test_wrong_root_is_one_error_line(tmp_path, capsys, make_root, flags, message):
    root = make_root(tmp_path)
    assert main(["--dataset", "X", "--root", str(root), "--out_dir", str(tmp_path / "meta"), *flags]) == 2
    out, err = capsys.readouterr()
    assert lines(err) == ["error: " + message.format(root=root)]
    assert not (tmp_path / "meta").exists()


def test_unwritable_out_dir_is_one_error_line(syn, tmp_path, capsys):
    (tmp_path / "meta").write_text("a file")
    assert make(syn, tmp_path / "meta") == 2
    assert lines(capsys.readouterr().err) == [
        f"error: cannot write the lists to {tmp_path / 'meta' / 'Syn'} (Not a directory); choose a writable output "
        "folder"]


@pytest.mark.parametrize("flags, message", [
    (["--shots", "0"], "argument --shots: shot counts are whole numbers >= 1, got '0'"),
    (["--shots", "4x"], "argument --shots: shot counts are whole numbers >= 1, got '4x'"),
    (["--layout", "imagenet"], "argument --layout: invalid choice: 'imagenet'"),
])
def test_bad_flags_exit_2(syn, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        make(syn, tmp_path / "meta", *flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "meta").exists()


@pytest.mark.parametrize("name", ["", "..", "a/b"])
def test_dataset_must_be_a_folder_name(syn, tmp_path, capsys, name):
    with pytest.raises(SystemExit) as exit_:
        main(["--dataset", name, "--root", str(syn), "--out_dir", str(tmp_path / "meta" / "sub")])
    assert exit_.value.code == 2
    assert f"argument --dataset: expected a folder name such as MVTec, got {name!r}" in capsys.readouterr().err
    assert not (tmp_path / "meta").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    argv = ["--dataset", "X", "--root", str(tmp_path / "missing"), "--out_dir", str(tmp_path)]
    with pytest.raises(DatasetError, match="dataset root not found"):
        main([*argv, "--debug"])
    monkeypatch.setenv("AACLIP_DEBUG", "1")
    with pytest.raises(DatasetError, match="dataset root not found"):
        main(argv)
