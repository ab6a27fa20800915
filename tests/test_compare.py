"""Tests for compare.py: arm parsing, result selection, aggregation, paired tests, CLI errors and outputs."""
import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

import compare
from compare import aggregate, deltas, load_run, paired_tests, parse_arm
from metrics import METRIC_NAMES, mean_metrics
from cli import RANDOM_WEIGHTS_BANNER
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["bottle", "cable", "screw", "wood"]
SEEDS = [1, 2, 3]


def opts(text_context: str | None) -> argparse.Namespace:
    """compare.py's test options as its command line gives them."""
    return argparse.Namespace(text_context=text_context)


def write_run(run: Path, seed: int | None, per_class: dict, epoch: int = 1, context: str | None = None,
              random_weights: bool = False, dataset: str = "MVTec") -> Path:
    """A run folder as train.py + test.py leave it: args.json and one result JSON."""
    (run / "results").mkdir(parents=True, exist_ok=True)
    variant = "cross_attention" if context else "baseline"
    args = {"variant": variant} if seed is None else {"variant": variant, "seed": seed}
    (run / "args.json").write_text(json.dumps(args))
    meta = {"dataset": dataset, "epoch": epoch, "checkpoint": "x.pth",
            "variant": variant + (f"_{context}" if context else ""),
            "model": "ViT-L-14-336", "pretrained": "none" if random_weights else "openai",
            "random_weights": random_weights, "precision": "fp32", "image_size": 518}
    name = f"{dataset}_epoch{epoch}" + (f"_{context}" if context else "")
    (run / "results" / f"{name}.json").write_text(
        json.dumps({"meta": meta, "per_class": per_class, "mean": mean_metrics(per_class)}))
    return run


def values(offset: float, seed: int) -> dict:
    """Distinct, known per-class numbers; pixel_aupro is undefined for `wood` (e.g. no masks)."""
    rng = np.random.default_rng(seed)
    out = {c: {m: round(float(offset + rng.uniform(50, 90)), 3) for m in METRIC_NAMES} for c in CLASSES}
    out["wood"]["pixel_aupro"] = None
    return out


@pytest.fixture
def two_arms(tmp_path) -> dict[str, list[dict]]:
    """Baseline and cross-attention arms, three seeds each; cross = baseline's numbers + offset + noise."""
    for s in SEEDS:
        write_run(tmp_path / f"base_seed{s}", s, values(0.0, s))
        write_run(tmp_path / f"cross_seed{s}", s, values(1.0, s + 100), context="image")
    arms = {}
    for spec in (f"{tmp_path}/base_seed*", f"{tmp_path}/cross_seed*"):
        label, paths = parse_arm(spec)
        arms[label] = [load_run(p, "MVTec", None, opts("image")) for p in paths]
    return arms


def raw(arms: dict, label: str, row: str, metric: str) -> list:
    return [(r["mean"] if row == "mean" else r["per_class"][row])[metric] for r in arms[label]]


# --- arms and result selection -------------------------------------------------------------------------

def test_parse_arm_glob_label_and_natural_order(tmp_path):
    for name in ("cross_seed2", "cross_seed10", "cross_seed1", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "cross_seed3.log").write_text("")  # a file the glob also matches: not a run
    label, paths = parse_arm(f"{tmp_path}/cross_seed*")
    assert label == "cross"
    assert [p.name for p in paths] == ["cross_seed1", "cross_seed2", "cross_seed10"]
    label, paths = parse_arm(f"mine={tmp_path}/other,{tmp_path}/cross_seed1")
    assert label == "mine" and [p.name for p in paths] == ["other", "cross_seed1"]
    assert parse_arm(str(tmp_path / "other")) == ("other", [tmp_path / "other"])
    with pytest.raises(UserError, match="matches no folder"):
        parse_arm(f"{tmp_path}/nothing*")
    with pytest.raises(UserError, match="is not a folder"):
        parse_arm(str(tmp_path / "missing"))


def test_load_run_picks_largest_epoch_numerically(tmp_path):
    run = tmp_path / "run"
    write_run(run, 1, values(0.0, 1), epoch=2)
    write_run(run, 1, values(5.0, 1), epoch=10)
    assert load_run(run, "MVTec", None, opts("image"))["epoch"] == 10
    picked = load_run(run, "MVTec", 2, opts("image"))
    assert picked["epoch"] == 2 and picked["per_class"] == values(0.0, 1)
    assert load_run(run, "MVTec", None, opts("image"))["seed"] == 1


def test_load_run_cross_attention_text_context(tmp_path):
    run = tmp_path / "cross"
    write_run(run, 1, values(0.0, 1), context="image")
    write_run(run, 1, values(3.0, 1), context="none")
    assert load_run(run, "MVTec", None, opts("image"))["file"].name == "MVTec_epoch1_image.json"
    assert load_run(run, "MVTec", None, opts("none"))["per_class"] == values(3.0, 1)


def test_missing_result_names_folder_and_command(tmp_path):
    run = write_run(tmp_path / "run", 1, values(0.0, 1), epoch=3)
    with pytest.raises(UserError) as e:
        load_run(run, "MVTec", 5, opts("image"))
    assert str(run / "results") in str(e.value)
    assert f"python test.py --save_path {run} --dataset MVTec --epoch 5" in str(e.value)
    assert "[3]" in str(e.value)  # the epochs it does have
    with pytest.raises(UserError, match="--dataset VisA"):
        load_run(run, "VisA", None, opts("image"))


def test_cli_missing_result_exits_2_without_traceback(tmp_path):
    good = write_run(tmp_path / "good", 1, values(0.0, 1))
    empty = tmp_path / "empty"
    (empty / "results").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(REPO / "compare.py"), str(good), str(empty), "--dataset", "MVTec",
                           "--out", str(tmp_path / "cmp")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and str(empty) in proc.stderr
    assert "python test.py --save_path" in proc.stderr and "Traceback" not in proc.stderr


# --- aggregation ---------------------------------------------------------------------------------------

def test_aggregate_mean_std_and_deltas(two_arms):
    agg = aggregate(two_arms, METRIC_NAMES)
    assert list(agg) == ["base", "cross"] and list(agg["base"]) == CLASSES + ["mean"]
    for label in agg:
        for row in CLASSES + ["mean"]:
            for metric in METRIC_NAMES:
                mean, std, n = agg[label][row][metric]
                got = raw(two_arms, label, row, metric)
                if None in got:
                    assert (mean, std, n) == (None, None, 0)
                    continue
                assert n == 3
                assert mean == pytest.approx(np.mean(got))
                assert std == pytest.approx(np.std(got, ddof=1))
    delta = deltas(agg)
    assert list(delta) == ["cross"]
    for row in CLASSES + ["mean"]:
        for metric in METRIC_NAMES:
            got = delta["cross"][row][metric]
            base, cross = raw(two_arms, "base", row, metric), raw(two_arms, "cross", row, metric)
            assert got is None if None in base else got == pytest.approx(np.mean(cross) - np.mean(base))
    assert delta["cross"]["wood"]["pixel_aupro"] is None


# --- paired tests --------------------------------------------------------------------------------------

def hand_pairs(arms: dict, seeds: list[int], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(cross, base) values over (seed, class), built independently of compare.py."""
    base = {r["seed"]: r for r in arms["base"]}
    cross = {r["seed"]: r for r in arms["cross"]}
    pairs = [(cross[s]["per_class"][c][metric], base[s]["per_class"][c][metric]) for s in seeds for c in CLASSES]
    pairs = [p for p in pairs if None not in p]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def test_paired_tests_match_scipy(two_arms):
    rows, notes = paired_tests(two_arms, METRIC_NAMES)
    assert notes == [] and [r["metric"] for r in rows] == METRIC_NAMES
    for row in rows:
        cross, base = hand_pairs(two_arms, SEEDS, row["metric"])
        assert row["pairing"] == "pairs over (seed, class)"
        assert row["n"] == len(cross) == (9 if row["metric"] == "pixel_aupro" else 12)
        assert row["mean_diff"] == pytest.approx(np.mean(cross - base))
        assert row["wilcoxon_p"] == pytest.approx(scipy.stats.wilcoxon(cross - base).pvalue)
        assert row["t_p"] == pytest.approx(scipy.stats.ttest_rel(cross, base).pvalue)


def test_paired_tests_leave_out_unmatched_seeds(two_arms, tmp_path):
    odd = write_run(tmp_path / "cross_seed7", 7, values(1.0, 7), context="image")
    two_arms["cross"][2] = load_run(odd, "MVTec", None, opts("image"))
    rows, notes = paired_tests(two_arms, ["image_auroc"])
    cross, base = hand_pairs(two_arms, [1, 2], "image_auroc")
    assert rows[0]["n"] == 8
    assert rows[0]["t_p"] == pytest.approx(scipy.stats.ttest_rel(cross, base).pvalue)
    assert any("seed 3" in n and "base_seed3" in n for n in notes)
    assert any("seed 7" in n and "cross_seed7" in n for n in notes)


def test_one_run_per_arm_pairs_over_classes(two_arms):
    arms = {"base": two_arms["base"][:1], "cross": two_arms["cross"][:1]}
    (row,) = paired_tests(arms, ["image_ap"])[0]
    cross, base = hand_pairs(arms, [1], "image_ap")
    assert row["pairing"] == "pairs over classes (one run per arm)" and row["n"] == len(CLASSES)
    assert row["wilcoxon_p"] == pytest.approx(scipy.stats.wilcoxon(cross - base).pvalue)
    assert "pairs over classes (one run per arm)" in compare.report(arms, ["image_ap"], "MVTec", None, opts("image"))


def test_identical_arms_give_p_one(two_arms):
    rows, _ = paired_tests({"base": two_arms["base"], "same": two_arms["base"]}, ["pixel_auroc"])
    assert (rows[0]["mean_diff"], rows[0]["wilcoxon_p"], rows[0]["t_p"]) == (0.0, 1.0, 1.0)


# --- end to end ----------------------------------------------------------------------------------------

def test_main_writes_tables_csv_and_random_weights_banner(tmp_path, monkeypatch, capsys):
    for s in SEEDS:
        write_run(tmp_path / f"base_seed{s}", s, values(0.0, s), random_weights=s == 2)
        write_run(tmp_path / f"cross_seed{s}", s, values(1.0, s + 100), context="image")
    out = tmp_path / "out" / "cmp"
    monkeypatch.setattr(sys, "argv", ["compare.py", f"{tmp_path}/base_seed*", f"x={tmp_path}/cross_seed*",
                                      "--dataset", "MVTec", "--metrics", "image_auroc", "pixel_aupro",
                                      "--out", str(out)])
    compare.main()
    printed = capsys.readouterr().out
    md = (tmp_path / "out" / "cmp.md").read_text()
    for text in (printed, md):
        assert RANDOM_WEIGHTS_BANNER in text and "RANDOM BACKBONE WEIGHTS" in text
        assert "## image_auroc" in text and "## pixel_aupro" in text and "## pixel_ap\n" not in text
        assert "Δ x |" in text and "±" in text and "n/a" in text
    with open(tmp_path / "out" / "cmp.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["arm", "run", "seed", "class", "metric", "value"]
    assert len(rows) == 2 * 3 * (len(CLASSES) + 1) * 2  # arms × seeds × (classes + mean) × metrics
    wood = [r for r in rows if r["class"] == "wood" and r["metric"] == "pixel_aupro"]
    assert {r["value"] for r in wood} == {"n/a"}
    first = next(r for r in rows if r["arm"] == "x" and r["seed"] == "2" and r["class"] == "cable"
                 and r["metric"] == "image_auroc")
    assert float(first["value"]) == values(1.0, 102)["cable"]["image_auroc"]
