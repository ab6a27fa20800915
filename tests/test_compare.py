"""Tests for compare.py: arm parsing, result selection, aggregation, bootstrap intervals, exact tests and the
minimum detectable effect (against scipy and hand-made cases), paired tests, CLI errors and outputs."""
import argparse
import csv
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from PIL import Image

import compare
import utils.stats
from compare import Resampling, aggregate, deltas, load_run, paired_tests, parse_arm
from metrics import METRIC_NAMES, mean_metrics
from cli import RANDOM_WEIGHTS_BANNER
from utils.errors import UserError
from utils.io import atomic_write_bytes, atomic_write_text
from utils.stats import (EXACT_MAX_N, MONTE_CARLO, bootstrap_ci, bootstrap_diff_ci, min_detectable_effect,
                         permutation_p, sign_test_p, t_test_p, wilcoxon_p)

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


def test_cli_missing_result_exits_2_without_traceback(tmp_path, monkeypatch, capsys):
    good = write_run(tmp_path / "good", 1, values(0.0, 1))
    empty = tmp_path / "empty"
    (empty / "results").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["compare.py", str(good), str(empty), "--dataset", "MVTec", "--out",
                                      str(tmp_path / "cmp")])
    monkeypatch.delenv("AACLIP_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        compare.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("error: ") and str(empty) in err
    assert "python test.py --save_path" in err and "Traceback" not in err
    assert not list(tmp_path.glob("cmp*"))


# --- aggregation ---------------------------------------------------------------------------------------

def test_aggregate_mean_std_and_deltas(two_arms):
    agg = aggregate(two_arms, METRIC_NAMES)
    assert list(agg) == ["base", "cross"] and list(agg["base"]) == CLASSES + ["mean"]
    for label in agg:
        for row in CLASSES + ["mean"]:
            for metric in METRIC_NAMES:
                cell = agg[label][row][metric]
                got = raw(two_arms, label, row, metric)
                if None in got:
                    assert (cell.mean, cell.std, cell.n, cell.ci) == (None, None, 0, None)
                    continue
                assert cell.n == 3
                assert cell.mean == pytest.approx(np.mean(got))
                assert cell.std == pytest.approx(np.std(got, ddof=1))
                eps = 1e-9  # a mean of equal values may round below them
                assert min(got) - eps <= cell.ci[0] <= cell.mean <= cell.ci[1] <= max(got) + eps
    delta = deltas(two_arms, agg)
    assert list(delta) == ["cross"]
    for row in CLASSES + ["mean"]:
        for metric in METRIC_NAMES:
            got = delta["cross"][row][metric].value
            base, cross = raw(two_arms, "base", row, metric), raw(two_arms, "cross", row, metric)
            assert got is None if None in base else got == pytest.approx(np.mean(cross) - np.mean(base))
    assert delta["cross"]["wood"]["pixel_aupro"].value is None


def scipy_percentile_ci(samples: tuple, statistic, seed: int) -> tuple[float, float]:
    """scipy's percentile bootstrap with B = 20000 and its own random stream."""
    ci = scipy.stats.bootstrap(samples, statistic, n_resamples=20_000, method="percentile",
                               rng=np.random.default_rng(seed)).confidence_interval
    return ci.low, ci.high


def mean_diff(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def test_bootstrap_ci_matches_scipy_and_hand_cases():
    rng = np.random.default_rng(3)
    for x in (rng.normal(1, 2, 8), rng.exponential(5, 12)):  # symmetric and skewed
        sem = np.std(x, ddof=1) / np.sqrt(x.size)
        assert bootstrap_ci(x, 20_000, 7) == pytest.approx(scipy_percentile_ci((x,), np.mean, 99), abs=0.15 * sem)
    a, b = rng.normal(2, 1, 5), rng.normal(0, 3, 4)
    sem = np.sqrt(np.var(a, ddof=1) / a.size + np.var(b, ddof=1) / b.size)
    assert bootstrap_diff_ci(a, b, 20_000, 7) == pytest.approx(scipy_percentile_ci((a, b), mean_diff, 99),
                                                               abs=0.15 * sem)
    # two values: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 and 97.5 % points are 0, 1
    assert bootstrap_ci([0.0, 1.0], 10_000, 0) == (0.0, 1.0)
    assert bootstrap_ci([4.0, 4.0, 4.0], 100, 0) == (4.0, 4.0)
    assert bootstrap_ci([5.0], 100, 0) is None and bootstrap_ci([], 100, 0) is None
    assert bootstrap_diff_ci([1.0, 2.0], [3.0], 100, 0) is None
    assert bootstrap_ci(a, 1000, 1) == bootstrap_ci(a, 1000, 1) != bootstrap_ci(a, 1000, 2)  # seeded


def test_mean_rows_have_intervals_over_seeds_and_classes(two_arms):
    agg = aggregate(two_arms, ["image_auroc", "pixel_aupro"], Resampling(20_000, 5))
    delta = deltas(two_arms, agg, Resampling(20_000, 5))
    for metric in ("image_auroc", "pixel_aupro"):
        classes = [c for c in CLASSES if None not in raw(two_arms, "base", c, metric)]
        base_means = np.array([np.mean(raw(two_arms, "base", c, metric)) for c in classes])
        cross_means = np.array([np.mean(raw(two_arms, "cross", c, metric)) for c in classes])
        by_seed = np.array(raw(two_arms, "cross", "mean", metric)) - np.array(raw(two_arms, "base", "mean", metric))
        for got, data in ((agg["base"]["mean"][metric].ci_classes, base_means),
                          (delta["cross"]["mean"][metric].ci_classes, cross_means - base_means),
                          (delta["cross"]["mean"][metric].ci, by_seed)):  # seeds paired: 1-1, 2-2, 3-3
            sem = np.std(data, ddof=1) / np.sqrt(data.size)
            assert got == pytest.approx(scipy_percentile_ci((data,), np.mean, 1), abs=0.15 * sem)
    assert agg["base"]["mean"]["pixel_aupro"].classes == (3,) and agg["base"]["mean"]["image_auroc"].classes == (4,)


def test_delta_ci_is_unpaired_when_a_run_has_no_partner(two_arms, tmp_path):
    odd = write_run(tmp_path / "cross_seed7", 7, values(1.0, 7), context="image")
    two_arms["cross"][2] = load_run(odd, "MVTec", None, opts("image"))
    agg = aggregate(two_arms, ["image_ap"], Resampling(20_000, 0))
    got = deltas(two_arms, agg, Resampling(20_000, 0))["cross"]["bottle"]["image_ap"]
    cross, base = np.array(raw(two_arms, "cross", "bottle", "image_ap")), np.array(raw(two_arms, "base", "bottle",
                                                                                       "image_ap"))
    assert got.value == pytest.approx(cross.mean() - base.mean())  # all runs, as the arms' columns show
    sem = np.sqrt(np.var(cross, ddof=1) / 3 + np.var(base, ddof=1) / 3)
    assert got.ci == pytest.approx(scipy_percentile_ci((cross, base), mean_diff, 4), abs=0.15 * sem)


def test_mean_row_states_its_classes(two_arms):
    agg = aggregate(two_arms, ["pixel_aupro"])
    table = compare.metric_table(two_arms, agg, deltas(two_arms, agg), "pixel_aupro")
    assert "| mean (3 of 4 classes) |" in table and "| mean: CI over classes |" in table
    arms = {"base": two_arms["base"], "cross": two_arms["cross"]}
    agg = aggregate(arms, ["image_auroc"])
    assert compare.mean_label(agg, "image_auroc", 4) == "mean (4 classes)"
    agg["cross"]["mean"]["image_auroc"].classes = (3, 4)  # one cross run with an n/a class
    assert compare.mean_label(agg, "image_auroc", 4) == "mean (base 4, cross 3–4 of 4 classes)"


# --- exact tests, t-test, minimum detectable effect ----------------------------------------------------

SAMPLES = [[1.0, 1.0], [1.0, 2.0, 3.0], [0.5, -0.2, 1.3, 0.0, 0.7], [1.0, 1.0, 1.0, -1.0, 2.0, 2.0],
           [0.5, -0.5, 0.5, 1.0, 1.5, -2.0, 2.5, 3.0], [2.3, -0.4, 1.1, 0.9, -1.7, 3.2, 0.2, 1.5, -0.3, 0.8, 2.2, 1.4]]


@pytest.mark.parametrize("d", SAMPLES)
def test_exact_tests_match_scipy(d):
    d = np.array(d)

    def paired_mean(x, y, axis):
        return np.mean(x - y, axis=axis)

    exact = scipy.stats.permutation_test((d, np.zeros_like(d)), paired_mean, permutation_type="samples",
                                         n_resamples=np.inf).pvalue
    assert permutation_p(d, 0) == pytest.approx(exact, rel=1e-12)
    nonzero = d[d != 0]
    assert sign_test_p(d) == pytest.approx(scipy.stats.binomtest(int((nonzero > 0).sum()), nonzero.size).pvalue)
    if np.unique(np.abs(nonzero)).size == nonzero.size:  # scipy's exact Wilcoxon table assumes no ties
        assert wilcoxon_p(d, 0) == pytest.approx(scipy.stats.wilcoxon(nonzero, method="exact").pvalue)
    else:  # ties: against a brute-force enumeration of signs over the mid-ranks
        ranks = scipy.stats.rankdata(np.abs(nonzero))
        observed = abs(np.sign(nonzero) @ ranks)
        sums = [abs(np.dot(s, ranks)) for s in itertools.product([-1, 1], repeat=ranks.size)]
        assert wilcoxon_p(d, 0) == pytest.approx(np.mean(np.array(sums) >= observed - 1e-9))


def test_monte_carlo_sign_flips_beyond_exact_limit(monkeypatch):
    d = np.random.default_rng(0).normal(0.4, 1, EXACT_MAX_N + 1)
    mc = permutation_p(d, 0)
    assert mc == permutation_p(d, 0) != permutation_p(d, 1)  # seeded
    monkeypatch.setattr(utils.stats, "EXACT_MAX_N", d.size)
    exact = permutation_p(d, 0)
    assert abs(mc - exact) < 4 * np.sqrt(exact * (1 - exact) / MONTE_CARLO)
    monkeypatch.undo()
    assert permutation_p(np.full(EXACT_MAX_N + 5, 1.0), 0) == 1 / (MONTE_CARLO + 1)  # never 0


def test_t_test_only_where_defined():
    d = np.array(SAMPLES[-1])
    assert t_test_p(d) == pytest.approx(scipy.stats.ttest_1samp(d, 0.0).pvalue)
    assert t_test_p(np.array([1.0, 2.0, 4.0])) == pytest.approx(scipy.stats.ttest_1samp([1.0, 2.0, 4.0], 0).pvalue)
    assert t_test_p(np.array([1.0, 1.0])) is None  # n = 2: scipy says p = 0 (t = inf); too few pairs
    assert t_test_p(np.array([0.7, 1.5])) is None
    assert t_test_p(np.array([0.3, 0.3, 0.3])) is None  # no spread: t infinite, not evidence
    assert t_test_p(np.zeros(4)) == 1.0  # no difference at all


def test_too_few_pairs_are_not_available():
    for d in (np.array([]), np.array([2.0])):
        assert permutation_p(d, 0) is sign_test_p(d) is wilcoxon_p(d, 0) is t_test_p(d) is None
        assert min_detectable_effect(1.0, d.size) is None
    assert permutation_p(np.array([1.0, 1.0]), 0) == 0.5  # 2 of 4 sign patterns reach |sum| = 2
    assert sign_test_p(np.zeros(3)) == wilcoxon_p(np.zeros(3), 0) == permutation_p(np.zeros(3), 0) == 1.0


def test_min_detectable_effect_against_independent_computations():
    # simulation of the paired t-test at the MDE: rejects in 80% of samples
    n, sd = 5, 2.0
    mde = min_detectable_effect(sd, n)
    d = np.random.default_rng(0).normal(mde, sd, (40_000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / np.sqrt(n))
    assert np.mean(np.abs(t) > scipy.stats.t.ppf(0.975, n - 1)) == pytest.approx(0.8, abs=0.01)
    # G*Power: effect size dz = 0.5 needs 34 pairs for power 0.8 (33 are not enough)
    assert min_detectable_effect(1.0, 34) < 0.5 < min_detectable_effect(1.0, 33)
    # many pairs: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n)
    normal = (scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)) * 3.0 / np.sqrt(5000)
    assert min_detectable_effect(3.0, 5000) == pytest.approx(normal, rel=1e-3)
    assert min_detectable_effect(2.0, 10) == pytest.approx(2 * min_detectable_effect(1.0, 10))
    assert min_detectable_effect(0.0, 10) is None and min_detectable_effect(1.0, 2) is None


# --- paired tests --------------------------------------------------------------------------------------

def hand_levels(arms: dict, seeds: list[int], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-seed differences of the mean rows, per-class differences averaged over the seeds), built
    independently of compare.py."""
    base = {r["seed"]: r for r in arms["base"]}
    cross = {r["seed"]: r for r in arms["cross"]}
    by_seed = np.array([cross[s]["mean"][metric] - base[s]["mean"][metric] for s in seeds])
    by_class = [[cross[s]["per_class"][c][metric] - base[s]["per_class"][c][metric] for s in seeds
                 if None not in (cross[s]["per_class"][c][metric], base[s]["per_class"][c][metric])]
                for c in CLASSES]
    return by_seed, np.array([np.mean(d) for d in by_class if d])


def check_row(row: dict, d: np.ndarray) -> None:
    """A paired-tests row against scipy on the same differences."""
    assert row["n"] == d.size and row["mean_diff"] == pytest.approx(d.mean())
    assert row["perm_p"] == pytest.approx(scipy.stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue)
    assert row["sign_p"] == pytest.approx(scipy.stats.binomtest(int((d > 0).sum()), d.size).pvalue)
    assert row["wilcoxon_p"] == pytest.approx(scipy.stats.wilcoxon(d, method="exact").pvalue)
    if d.size >= 3:
        assert row["t_p"] == pytest.approx(scipy.stats.ttest_1samp(d, 0.0).pvalue)
        assert row["mde"] == pytest.approx(min_detectable_effect(np.std(d, ddof=1), d.size))
    else:
        assert row["t_p"] is None and row["mde"] is None


def test_paired_tests_match_scipy(two_arms):
    rows, notes = paired_tests(two_arms, METRIC_NAMES)
    assert notes == [] and [(r["metric"], r["over"]) for r in rows] == [(m, o) for m in METRIC_NAMES
                                                                        for o in ("seeds", "classes")]
    for row in rows:
        by_seed, by_class = hand_levels(two_arms, SEEDS, row["metric"])
        check_row(row, by_seed if row["over"] == "seeds" else by_class)
        assert row["n"] == (3 if row["over"] == "seeds" else 3 if row["metric"] == "pixel_aupro" else 4)


def test_paired_tests_leave_out_unmatched_seeds(two_arms, tmp_path):
    odd = write_run(tmp_path / "cross_seed7", 7, values(1.0, 7), context="image")
    two_arms["cross"][2] = load_run(odd, "MVTec", None, opts("image"))
    (seeds, classes), notes = paired_tests(two_arms, ["image_auroc"])
    by_seed, by_class = hand_levels(two_arms, [1, 2], "image_auroc")
    check_row(seeds, by_seed)
    check_row(classes, by_class)
    assert seeds["n"] == 2 and seeds["t_p"] is None
    assert any("seed 3" in n and "base_seed3" in n for n in notes)
    assert any("seed 7" in n and "cross_seed7" in n for n in notes)


def test_one_run_per_arm_pairs_over_classes(two_arms):
    arms = {"base": two_arms["base"][:1], "cross": two_arms["cross"][:1]}
    (seeds, classes), _ = paired_tests(arms, ["image_ap"])
    assert seeds["n"] == 1 and all(seeds[k] is None for k in ("ci", "perm_p", "sign_p", "wilcoxon_p", "t_p", "mde"))
    check_row(classes, hand_levels(arms, [1], "image_ap")[1])
    agg = aggregate(arms, ["image_ap"])
    text = compare.report(arms, agg, deltas(arms, agg), "MVTec", None, opts("image"))
    assert table_row(text, "| cross | image_ap | seeds")[3:] == ["1", f"{seeds['mean_diff']:+.2f}"] + ["n/a"] * 6


def table_row(text: str, start: str) -> list[str]:
    """The cells of the Markdown table line that starts with `start`."""
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_identical_arms_give_p_one(two_arms):
    rows, _ = paired_tests({"base": two_arms["base"], "same": two_arms["base"]}, ["pixel_auroc"])
    for row in rows:
        assert (row["mean_diff"], row["perm_p"], row["sign_p"], row["wilcoxon_p"], row["t_p"]) == (0, 1, 1, 1, 1)
        assert row["ci"] == (0.0, 0.0) and row["mde"] is None  # no spread: nothing to size an effect by


def test_two_seeds_print_na_not_zero(tmp_path):
    """Issue 11: a constant offset over two seeds gave t-test p = 0."""
    for s in (1, 2):
        write_run(tmp_path / f"base_seed{s}", s, values(0.0, s))
        shifted = {c: {m: None if v is None else v + 2.0 for m, v in row.items()} for c, row in values(0.0, s).items()}
        write_run(tmp_path / f"cross_seed{s}", s, shifted, context="image")
    arms = {label: [load_run(p, "MVTec", None, opts("image")) for p in paths]
            for label, paths in map(parse_arm, (f"{tmp_path}/base_seed*", f"{tmp_path}/cross_seed*"))}
    agg = aggregate(arms, ["image_auroc"])
    text = compare.report(arms, agg, deltas(arms, agg), "MVTec", None, opts("image"))
    assert table_row(text, "| cross | image_auroc | seeds")[3:] == ["2", "+2.00", "[+2.00, +2.00]", "0.5", "0.5", "0.5", "n/a", "n/a"]
    assert "smallest two-sided p is 2/2^n" in text


def test_report_notes_monte_carlo_beyond_exact_limit(tmp_path):
    classes = [f"c{i:02d}" for i in range(EXACT_MAX_N + 2)]
    rng = np.random.default_rng(0)
    for name, offset in (("a", 0.0), ("b", 1.0)):
        write_run(tmp_path / name, 1, {c: {"image_auroc": offset + rng.uniform(50, 90)} for c in classes})
    arms = {name: [load_run(tmp_path / name, "MVTec", None, opts(None))] for name in ("a", "b")}
    agg = aggregate(arms, ["image_auroc"])
    text = compare.report(arms, agg, deltas(arms, agg), "MVTec", None, opts(None), Resampling(500, 3))
    assert f"Monte-Carlo over {MONTE_CARLO} random sign patterns (seed 3)" in text
    assert f"| b   | image_auroc | classes | {len(classes)} |" in text


# --- files ---------------------------------------------------------------------------------------------

def test_atomic_write_leaves_no_temporary_and_a_readable_file(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text("Δ old", target)
    atomic_write_text("Δ new ±", target)
    assert target.read_text(encoding="utf-8") == "Δ new ±" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(b"x", tmp_path / "missing" / "f.png")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_help_shows_resampling_flags_and_defaults():
    text = " ".join(compare.get_parser().format_help().split())  # argparse wraps lines anywhere
    assert "--bootstrap N" in text and "(default: 10000)" in text
    assert "--seed SEED" in text and "(default: 0)" in text


def test_bootstrap_flag_must_be_positive(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", 1, values(0.0, 1))
    monkeypatch.setattr(sys, "argv", ["compare.py", str(run), "--dataset", "MVTec", "--bootstrap", "0",
                                      "--out", str(tmp_path / "cmp")])
    with pytest.raises(SystemExit) as e:
        compare.main()
    assert e.value.code == 2 and "--bootstrap 0" in capsys.readouterr().err


def test_unwritable_out_is_one_error_line(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", 1, values(0.0, 1))
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(sys, "argv", ["compare.py", str(run), "--dataset", "MVTec", "--out",
                                      str(tmp_path / "file" / "cmp")])
    with pytest.raises(SystemExit) as e:
        compare.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "choose another --out" in err


# --- end to end ----------------------------------------------------------------------------------------

def test_main_writes_tables_csv_forest_plot_and_random_weights_banner(tmp_path, monkeypatch, capsys):
    for s in SEEDS:
        write_run(tmp_path / f"base_seed{s}", s, values(0.0, s), random_weights=s == 2)
        write_run(tmp_path / f"cross_seed{s}", s, values(1.0, s + 100), context="image")
    out = tmp_path / "out" / "cmp"
    argv = ["compare.py", f"{tmp_path}/base_seed*", f"x={tmp_path}/cross_seed*", "--dataset", "MVTec",
            "--metrics", "image_auroc", "pixel_aupro", "--out", str(out), "--bootstrap", "2000", "--seed", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    printed = capsys.readouterr().out
    md = (tmp_path / "out" / "cmp.md").read_text()
    for text in (printed, md):
        assert RANDOM_WEIGHTS_BANNER in text and "RANDOM BACKBONE WEIGHTS" in text
        assert "## image_auroc" in text and "## pixel_aupro" in text and "## pixel_ap\n" not in text
        assert "Δ x |" in text and "±" in text and "n/a" in text
        assert "2000 resamples, seed 1" in text and "| mean (3 of 4 classes) |" in text
        assert "| perm p | sign p | Wilcoxon p |" in text and " MDE |" in text
    with open(tmp_path / "out" / "cmp.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["arm", "run", "seed", "epoch", "epoch_selection", "class", "metric", "value"]
    assert len(rows) == 2 * 3 * (len(CLASSES) + 1) * 2  # arms × seeds × (classes + mean) × metrics
    wood = [r for r in rows if r["class"] == "wood" and r["metric"] == "pixel_aupro"]
    assert {r["value"] for r in wood} == {"n/a"}
    first = next(r for r in rows if r["arm"] == "x" and r["seed"] == "2" and r["class"] == "cable"
                 and r["metric"] == "image_auroc")
    assert float(first["value"]) == values(1.0, 102)["cable"]["image_auroc"]
    png = tmp_path / "out" / "cmp_forest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.width > 400 and image.height > 200
    assert sorted(p.name for p in out.parent.iterdir()) == ["cmp.csv", "cmp.md", "cmp_forest.png"]  # no temporaries
    compare.main()  # same seed, same report
    assert capsys.readouterr().out == printed and (tmp_path / "out" / "cmp.md").read_text() == md
