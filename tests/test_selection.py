"""Honest checkpoint selection in test.py: the declared default, the --all_epochs curve, best_on_test (labelled
in every output and in compare.py's report) and heldout (chosen on held-out training images)."""
import csv
import json
import sys

import pytest
from PIL import Image

import compare
import test as test_script
from conftest import data_args, fail, has, run_main
from metrics import METRIC_NAMES
from utils.errors import UserError

LABEL = test_script.BEST_ON_TEST_LABEL


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fabricate(monkeypatch, target_best: int, heldout_best: int | None = None) -> None:
    """Every metric of every class becomes a known number: 80 at the epoch named best, 60 + epoch at the
    others; held-out images (fewer than the 12 test images) score 0.5 more. The real model still runs."""
    loaded = {}
    real_load = test_script.load_image_adapter

    def load(model, path):
        loaded["epoch"] = real_load(model, path)
        return loaded["epoch"]

    def evaluate(ds, maps, scores, masks, domain):
        held = len(ds.samples) < 12
        epoch = loaded["epoch"]
        value = (80.0 if epoch == (heldout_best if held else target_best) else 60.0 + epoch) + 0.5 * held
        return {c: dict.fromkeys(METRIC_NAMES, value) for c in ds.class_names}

    monkeypatch.setattr(test_script, "load_image_adapter", load)
    monkeypatch.setattr(test_script, "evaluate_classes", evaluate)


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


def test_best_epoch_is_the_largest_value_earliest_on_ties():
    means = {1: {"pixel_auroc": 70.0}, 2: {"pixel_auroc": 90.0}, 3: {"pixel_auroc": 90.0}, 4: {"pixel_auroc": None}}
    assert test_script.best_epoch(means, "pixel_auroc") == 2
    assert test_script.best_epoch({1: {"pixel_auroc": None}}, "pixel_auroc") is None
    with pytest.raises(UserError, match="n/a at every epoch on the test set"):
        test_script.pick_epoch({1: {"image_auroc": None}}, "image_auroc", "the test set")


def test_best_on_test_picks_the_best_epoch_and_labels_every_output(data, copy_run, monkeypatch, tmp_path, capsys):
    save = copy_run("baseline")  # epochs 1 and 2; fabricated: epoch 1 is the best on the test set
    fabricate(monkeypatch, target_best=1)
    run_main(test_script, ["--save_path", str(save), *data_args(data), "--select_epoch", "best_on_test"])
    results = save / "results"
    assert sorted(p.name for p in results.iterdir()) == [
        "Synthetic_best_on_test.csv", "Synthetic_best_on_test.json", "Synthetic_best_on_test_images.csv",
        "Synthetic_curve.csv", "Synthetic_curve.png", "test.log"]  # no unlabelled per-epoch file
    res = json.loads((results / "Synthetic_best_on_test.json").read_text())
    meta = res["meta"]
    assert (meta["epoch"], meta["epoch_selection"], meta["selection_label"], meta["select_metric"]) == (
        1, "best_on_test", LABEL, "pixel_auroc")
    assert meta["checkpoint"].endswith("image_adapter_1.pth") and res["mean"]["pixel_auroc"] == 80.0
    assert {e: m["pixel_auroc"] for e, m in meta["selection_scores"].items()} == {"1": 80.0, "2": 62.0}
    for name in ("Synthetic_best_on_test.csv", "Synthetic_best_on_test_images.csv", "Synthetic_curve.csv"):
        rows = read_csv(results / name)
        assert rows and all(r["epoch_selection"] == LABEL for r in rows), name
    assert [(r["epoch"], r["selected"]) for r in read_csv(results / "Synthetic_curve.csv")] == [("1", "1"), ("2", "0")]
    assert_png(results / "Synthetic_curve.png")
    log = (results / "test.log").read_text()
    tables = log.split("| class |")[1:]
    titles = log.split("| class |")[:-1]
    assert len(tables) == 3 and all(LABEL in title.rsplit("Synthetic | baseline", 1)[-1] for title in titles)

    out = tmp_path / "cmp"
    monkeypatch.setattr(sys, "argv", ["compare.py", str(save), "--dataset", "Synthetic", "--selected", "best_on_test",
                                      "--out", str(out), "--bootstrap", "10"])
    compare.main()
    report = (tmp_path / "cmp.md").read_text()
    assert f"**{LABEL}** (runs: {save})" in report and "| best_on_test" in report
    assert "epoch: chosen per run by test.py --select_epoch best_on_test" in report
    rows = read_csv(tmp_path / "cmp.csv")
    assert rows and all(r["epoch_selection"] == LABEL and r["epoch"] == "1" for r in rows)


def test_heldout_picks_the_epoch_on_held_out_training_images(data, copy_run, monkeypatch):
    """The held-out images prefer epoch 1, the test set epoch 2: epoch 1 is reported, with its own test
    numbers, and the JSON keeps the held-out scores of every epoch."""
    save = copy_run("baseline")  # trained on Synthetic 2-shot: 4 of the 12 images
    fabricate(monkeypatch, target_best=2, heldout_best=1)
    run_main(test_script, ["--save_path", str(save), *data_args(data), "--select_epoch", "heldout"])
    results = save / "results"
    res = json.loads((results / "Synthetic_heldout.json").read_text())
    meta = res["meta"]
    assert (meta["epoch"], meta["epoch_selection"]) == (1, "heldout") and res["mean"]["pixel_auroc"] == 61.0
    assert {e: m["pixel_auroc"] for e, m in meta["selection_scores"].items()} == {"1": 80.5, "2": 62.5}
    held = meta["heldout"]
    assert (held["dataset"], held["images"], held["training_list_checked"], held["overlaps_target"]) == (
        "Synthetic", 8, True, True)
    assert "minus Synthetic/2-shot.jsonl" in held["definition"]
    assert "also test images here (optimistic)" in meta["selection_label"]
    assert all(r["epoch_selection"] == meta["selection_label"] for r in read_csv(results / "Synthetic_heldout.csv"))
    assert not list(results.glob("Synthetic_epoch*")) and not list(results.glob("Synthetic_curve*"))


def test_all_epochs_curve_holds_the_per_epoch_means_and_the_default_is_declared(data, copy_run):
    save = copy_run("baseline")
    run_main(test_script, ["--save_path", str(save), *data_args(data), "--all_epochs"])
    results = save / "results"
    rows = read_csv(results / "Synthetic_curve.csv")
    assert list(rows[0]) == ["epoch", *METRIC_NAMES] and [r["epoch"] for r in rows] == ["1", "2"]
    for row in rows:
        res = json.loads((results / f"Synthetic_epoch{row['epoch']}.json").read_text())
        assert res["meta"]["epoch_selection"] == "all_epochs"
        assert {k: None if row[k] == "n/a" else float(row[k]) for k in METRIC_NAMES} == res["mean"]
    assert_png(results / "Synthetic_curve.png")
    run_main(test_script, ["--save_path", str(save), *data_args(data), "--results_dir", str(save / "last")])
    assert json.loads((save / "last" / "Synthetic_epoch2.json").read_text())["meta"]["epoch_selection"] == "last"


@pytest.mark.parametrize("flags,words", [
    (["--epoch", "1", "--select_epoch", "best_on_test"], ["--epoch 1", "--select_epoch best_on_test", "drop one"]),
    (["--all_epochs", "--select_epoch", "best_on_test"], ["evaluates every epoch already", "--all_epochs on its own"]),
])
def test_contradicting_epoch_flags(flags, words, data, runs, monkeypatch, capsys):
    has(fail(test_script, ["--save_path", str(runs / "baseline"), *data_args(data), *flags], monkeypatch, capsys),
        *words)


def test_heldout_needs_a_held_out_part(data, copy_run, monkeypatch, capsys):
    save = copy_run("baseline")
    saved = json.loads((save / "args.json").read_text())
    (save / "args.json").write_text(json.dumps({**saved, "training_mode": "full_shot"}))
    has(fail(test_script, ["--save_path", str(save), *data_args(data), "--select_epoch", "heldout"], monkeypatch,
             capsys), "full-shot list", "nothing of it is held out")
    assert not (save / "results").exists()
