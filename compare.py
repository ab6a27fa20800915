"""Compare test.py results of several arms (e.g. baseline vs cross-attention), each one run or several seeds.

    python compare.py ckpt/baseline ckpt/cross --dataset MVTec
    python compare.py 'base=ckpt/base_seed*' cross=ckpt/cross_seed1,ckpt/cross_seed2 --dataset MVTec --epoch 5

Each ARM is `[label=]path[,path...]`; a path may be a glob, several paths are several runs (seeds) of one
arm; quote globs, or the shell turns each match into an arm of its own. The first arm is the reference for
the Δ columns and the paired tests. For every run this reads
`<run>/results/<dataset>_epoch<k><suffix>.json` as written by `python test.py --save_path <run> --dataset
<dataset>`, the suffix naming the run's variant's test options (none for the baseline, `_image` or `_none`
for cross-attention's --text_context); with `--selected best_on_test` or `--selected heldout`,
`<run>/results/<dataset>_<selected><suffix>.json` as `test.py --select_epoch <selected>` wrote it. The
report lists each result's epoch selection, and repeats in bold (and in the forest plot's title) the label
of any result whose epoch was chosen on the test set: "epoch chosen on the test set (optimistic)".

Prints Markdown tables (one per metric: classes + mean as rows, arms and Δ as columns; `mean ± std [95%
CI]` over runs, sample std, percentile bootstrap; the mean row also with a CI over classes and the number
of classes it averages) and a table of paired tests against the reference over seeds and over classes
(bootstrap CI of the mean Δ, exact sign-flip permutation, sign and Wilcoxon tests, the t-test where it is
defined, minimum detectable effect). Writes them to `<out>.md`, a long-format `<out>.csv` (arm, run,
seed, class, metric, value) and a forest plot of the per-class Δs, `<out>_forest.png`.
"""
from __future__ import annotations

import argparse
import copy
import csv
import glob
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cli import RANDOM_WEIGHTS_BANNER, add_variant_test_args, cli_main, test_flags
from metrics import METRIC_NAMES
from utils.errors import UserError
from utils.io import ensure_writable_dir, remove_stale_temporaries, write_output
from utils.stats import (CI, EXACT_MAX_N, MONTE_CARLO, bootstrap_ci, bootstrap_diff_ci, min_detectable_effect,
                         permutation_p, sign_test_p, t_test_p, wilcoxon_p)
from variants import VARIANTS, read_saved_args, variant_of_run

MEAN_ROW = "mean"
CLASS_CI_ROW = "mean: CI over classes"
Runs = list[dict]  # an arm's runs, as load_run returns them
Pairs = list[tuple[dict, dict]]  # (reference run, arm run) of the same seed


class Resampling(NamedTuple):
    """How bootstrap intervals and Monte-Carlo sign flips are drawn (--bootstrap, --seed)."""
    n_resamples: int = 10_000
    seed: int = 0


@dataclass
class Summary:
    """One arm's value of one metric in one row, over the arm's runs."""
    mean: float | None
    std: float | None  # sample std; None below 2 runs
    n: int  # runs where the metric is defined
    ci: CI | None  # percentile bootstrap over the runs (seeds)
    ci_classes: CI | None = None  # mean row: bootstrap over the classes' means
    classes: tuple[int, ...] = ()  # mean row: the distinct numbers of classes the runs' means average


@dataclass
class Delta:
    """Arm − reference of one metric in one row."""
    value: float | None  # difference of the arms' means; None where either is undefined
    ci: CI | None  # bootstrap over seeds, paired where every run has its partner seed
    ci_classes: CI | None = None  # mean row: bootstrap over the classes' Δs


def natural_key(text: str) -> list:
    """Sorts `seed2` before `seed10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def default_label(paths: list[Path]) -> str:
    """The folder name of a single run; for several, their common name prefix without a trailing `_seed`."""
    names = [p.resolve().name for p in paths]
    if len(names) == 1:
        return names[0]
    prefix = re.sub(r"([_\-.]?seed)?[_\-.]*$", "", os.path.commonprefix(names))
    if not prefix:
        raise UserError(f"runs {', '.join(names)} share no name prefix; give the arm a label (label=path,...)")
    return prefix


def parse_arm(spec: str) -> tuple[str, list[Path]]:
    """`[label=]path[,path...]` with globs -> (label, run folders in natural order)."""
    label, sep, rest = spec.partition("=")
    if not sep or "/" in label:  # an `=` inside a path is not a label
        label, rest = "", spec
    paths: list[Path] = []
    for pattern in filter(None, rest.split(",")):
        if glob.has_magic(pattern):
            found = sorted((p for p in glob.glob(pattern) if Path(p).is_dir()), key=natural_key)
            if not found:
                raise UserError(f"arm '{spec}': {pattern} matches no folder")
        elif Path(pattern).is_dir():
            found = [pattern]
        else:
            raise UserError(f"arm '{spec}': {pattern} is not a folder")
        paths += [Path(p) for p in found if Path(p) not in paths]
    if not paths:
        raise UserError(f"arm '{spec}' names no run folder")
    return label or default_label(paths), paths


def load_run(path: Path, dataset: str, epoch: int | None, options: argparse.Namespace,
             selected: str | None = None) -> dict:
    """The result JSON of one run: `epoch`, or else the largest epoch present, of the results its variant
    names for the test `options` (e.g. cross-attention's --text_context); with `selected` (best_on_test,
    heldout), the result test.py's --select_epoch wrote instead. Returns {path, seed, epoch, file, meta,
    per_class, mean}."""
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    saved = read_saved_args(path)
    variant = variant_of_run(path, saved)
    options = copy.copy(options)
    variant.finish_test_args(options)
    suffix = variant.result_suffix(options)
    flags = "".join(f" {flag} {getattr(options, dest)}" for dest, flag in test_flags(variant).items())
    command = f"python test.py --save_path {path} --dataset {dataset}"
    if selected is not None:
        file, chosen = path / "results" / f"{dataset}_{selected}{suffix}.json", None
        if not file.is_file():
            raise UserError(f"no {dataset} result of --select_epoch {selected}" + (f" with{flags}" if flags else "")
                            + f" in {path / 'results'}; run: {command} --select_epoch {selected}{flags}")
    else:
        by_epoch = {int(m.group(1)): f for f in (path / "results").glob(f"{glob.escape(dataset)}_epoch*.json")
                    if (m := re.fullmatch(rf"{re.escape(dataset)}_epoch(\d+){re.escape(suffix)}\.json", f.name))}
        chosen = epoch if epoch is not None else max(by_epoch, default=None)
        if chosen not in by_epoch:
            what = f"{dataset} result" + (f" for epoch {epoch}" if epoch is not None else "") + (
                f" with{flags}" if flags else "")
            have = f" (it has epochs {sorted(by_epoch)})" if by_epoch else ""
            raise UserError(f"no {what} in {path / 'results'}{have}; run: {command}"
                            + (f" --epoch {epoch}" if epoch is not None else "") + flags)
        file = by_epoch[chosen]
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e}); rerun test.py for {path}") from None
    if not {"per_class", "mean"} <= data.keys():
        raise UserError(f"{file} lacks per_class or mean; rerun test.py for {path}")
    meta = data.get("meta", {})
    return {"path": path, "seed": saved.get("seed"), "epoch": meta.get("epoch") if chosen is None else chosen,
            "file": file, "meta": meta, "per_class": data["per_class"], "mean": data["mean"]}


def run_rows(run: dict) -> dict[str, dict[str, float | None]]:
    """Per-class metrics plus the JSON's mean row."""
    return {**run["per_class"], MEAN_ROW: run["mean"]}


def check_classes(arms: dict[str, list[dict]]) -> list[str]:
    """The reference run's classes; every run must have the same ones, or deltas compare different sets."""
    reference = next(iter(arms.values()))[0]
    classes = list(reference["per_class"])
    for runs in arms.values():
        for run in runs:
            if set(run["per_class"]) != set(classes):
                diff = sorted(set(run["per_class"]) ^ set(classes))
                raise UserError(f"{run['file']} and {reference['file']} differ in classes {diff}; "
                                f"evaluate all runs on the same classes")
    return classes


def defined(values: Iterable[float | None]) -> list[float]:
    """The values that are not n/a."""
    return [v for v in values if v is not None]


def aggregate(arms: dict[str, Runs], metrics: list[str], resampling: Resampling = Resampling()
              ) -> dict[str, dict[str, dict[str, Summary]]]:
    """arm -> row (classes, mean) -> metric -> Summary over the arm's runs. The mean row also gets a CI
    over the classes (of the per-class means) and how many classes the runs' means average."""
    classes = check_classes(arms)
    out: dict[str, dict[str, dict[str, Summary]]] = {}
    for label, runs in arms.items():
        out[label] = {}
        for row in [*classes, MEAN_ROW]:
            out[label][row] = {}
            for metric in metrics:
                values = defined(run_rows(run)[row].get(metric) for run in runs)
                out[label][row][metric] = Summary(float(np.mean(values)) if values else None,
                                                  float(np.std(values, ddof=1)) if len(values) > 1 else None,
                                                  len(values), bootstrap_ci(values, *resampling))
        for metric in metrics:
            mean = out[label][MEAN_ROW][metric]
            mean.ci_classes = bootstrap_ci(defined(out[label][c][metric].mean for c in classes), *resampling)
            mean.classes = tuple(sorted({len(defined(run["per_class"][c].get(metric) for c in classes))
                                         for run in runs}))
    return out


def pair_runs(reference: Runs, runs: Runs) -> tuple[Pairs, list[str]]:
    """Runs of two arms paired by the `seed` in their args.json -> (pairs, notes on runs left out).
    One run on each side is paired as is."""
    if len(reference) == 1 and len(runs) == 1:
        return [(reference[0], runs[0])], []
    notes = [f"left out {run['path']} (no seed in its args.json)"
             for run in reference + runs if run["seed"] is None]
    seeds = []
    for side in (reference, runs):
        by_seed: dict[int, dict] = {}
        for run in (r for r in side if r["seed"] is not None):
            if run["seed"] in by_seed:
                raise UserError(f"{by_seed[run['seed']]['path']} and {run['path']} both have seed {run['seed']}; "
                                f"pairing by seed needs distinct seeds within an arm")
            by_seed[run["seed"]] = run
        seeds.append(by_seed)
    common = sorted(set(seeds[0]) & set(seeds[1]))
    notes += [f"left out {run['path']} (seed {seed}: no run with that seed in the other arm)"
              for side in seeds for seed, run in side.items() if seed not in common]
    return [(seeds[0][s], seeds[1][s]) for s in common], notes


def paired_differences(pairs: Pairs, row: str, metric: str) -> np.ndarray:
    """Arm − reference in `row` (a class or the mean) for each pair of runs where both are defined."""
    return np.array([a - r for ref, run in pairs if (r := run_rows(ref)[row].get(metric)) is not None
                     and (a := run_rows(run)[row].get(metric)) is not None], dtype=float)


def class_differences(pairs: Pairs, classes: list[str], metric: str) -> np.ndarray:
    """Per class, arm − reference averaged over the pairs where both are defined (a class with none is
    left out)."""
    per_class = (paired_differences(pairs, c, metric) for c in classes)
    return np.array([d.mean() for d in per_class if d.size], dtype=float)


def delta_ci(runs: Runs, ref_runs: Runs, pairs: Pairs, paired: bool, row: str, metric: str,
             resampling: Resampling) -> CI | None:
    """CI over seeds of the difference of the arms' means: a bootstrap of the paired differences when every
    run has its partner seed (seed-to-seed variation cancels); else each arm's runs resampled on their
    own, so that the interval is about the same Δ as the table shows, not the paired runs' alone."""
    if paired:
        return bootstrap_ci(paired_differences(pairs, row, metric), *resampling)
    return bootstrap_diff_ci(defined(run_rows(r)[row].get(metric) for r in runs),
                             defined(run_rows(r)[row].get(metric) for r in ref_runs), *resampling)


def deltas(arms: dict[str, Runs], agg: dict[str, dict[str, dict[str, Summary]]],
           resampling: Resampling = Resampling()) -> dict[str, dict[str, dict[str, Delta]]]:
    """Non-reference arm -> row -> metric -> Delta: the difference of the arms' means with its bootstrap CI
    over seeds; the mean row also with a CI over the classes' Δs."""
    classes = check_classes(arms)
    (reference, ref_runs), *others = arms.items()
    out: dict[str, dict[str, dict[str, Delta]]] = {}
    for label, runs in others:
        pairs, left_out = pair_runs(ref_runs, runs)
        out[label] = {}
        for row, cells in agg[label].items():
            out[label][row] = {}
            for metric, cell in cells.items():
                ref = agg[reference][row][metric].mean
                value = None if cell.mean is None or ref is None else cell.mean - ref
                out[label][row][metric] = Delta(value, delta_ci(runs, ref_runs, pairs, not left_out, row, metric,
                                                                resampling))
        for metric, mean in out[label][MEAN_ROW].items():
            mean.ci_classes = bootstrap_ci(defined(out[label][c][metric].value for c in classes), *resampling)
    return out


def summarise_differences(d: np.ndarray, resampling: Resampling) -> dict:
    """Mean, bootstrap CI, exact and t-test p-values and minimum detectable effect of paired differences."""
    return {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else None,
            "ci": bootstrap_ci(d, *resampling), "perm_p": permutation_p(d, resampling.seed),
            "sign_p": sign_test_p(d), "wilcoxon_p": wilcoxon_p(d, resampling.seed), "t_p": t_test_p(d),
            "mde": min_detectable_effect(float(np.std(d, ddof=1)) if d.size > 1 else 0.0, d.size)}


def paired_tests(arms: dict[str, Runs], metrics: list[str], resampling: Resampling = Resampling()
                 ) -> tuple[list[dict], list[str]]:
    """Each non-reference arm against the reference, per metric, at two levels: over seeds (per paired
    seed, the difference of the runs' mean rows) and over classes (per class, the difference averaged over
    the paired seeds). Pooling (seed, class) pairs instead would count the classes of one run as
    independent samples and overstate the evidence. Returns (rows, notes)."""
    classes = check_classes(arms)
    (ref_label, reference), *others = arms.items()
    rows, notes = [], []
    for label, runs in others:
        pairs, arm_notes = pair_runs(reference, runs)
        notes += [f"{label} vs {ref_label}: {n}" for n in arm_notes]
        for metric in metrics:
            for over, d in (("seeds", paired_differences(pairs, MEAN_ROW, metric)),
                            ("classes", class_differences(pairs, classes, metric))):
                rows.append({"arm": label, "reference": ref_label, "metric": metric, "over": over,
                             **summarise_differences(d, resampling)})
    return rows, notes


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def fmt_ci(ci: CI | None, spec: str = ".2f") -> str:
    return "n/a" if ci is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def fmt_summary(cell: Summary, n_runs: int) -> str:
    """`mean ± std [CI]` (a single run: the value); (n=k) where fewer runs than the arm's define it."""
    if n_runs == 1 or cell.mean is None:
        return fmt(cell.mean)
    text = fmt(cell.mean) + ("" if cell.std is None else f" ± {fmt(cell.std)}") + (
        "" if cell.ci is None else f" {fmt_ci(cell.ci)}")
    return text if cell.n == n_runs else f"{text} (n={cell.n})"


def fmt_delta(cell: Delta) -> str:
    if cell.value is None or cell.ci is None:
        return fmt(cell.value, "+.2f")
    return f"{cell.value:+.2f} {fmt_ci(cell.ci, '+.2f')}"


def mean_label(agg: dict[str, dict[str, dict[str, Summary]]], metric: str, n_classes: int) -> str:
    """`mean (4 classes)`; `mean (3 of 4 classes)` where n/a classes are left out; per arm, as
    `mean (base 4, cross 3–4 of 4 classes)`, where the arms' runs differ in that."""
    counts = {label: rows[MEAN_ROW][metric].classes for label, rows in agg.items()}
    spans = {label: "–".join(map(str, sorted({c[0], c[-1]}))) if c else "0" for label, c in counts.items()}
    of = "" if all(c == (n_classes,) for c in counts.values()) else f" of {n_classes}"
    if len(set(spans.values())) == 1:
        return f"{MEAN_ROW} ({next(iter(spans.values()))}{of} classes)"
    return f"{MEAN_ROW} (" + ", ".join(f"{label} {span}" for label, span in spans.items()) + f"{of} classes)"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Padded so that it also reads as a table in a terminal; numeric columns right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = [bool(rows) and all(re.match(r"\[?[+\-]?\d|n/a", r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if right else "-") for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def metric_table(arms: dict[str, Runs], agg: dict[str, dict[str, dict[str, Summary]]],
                 delta: dict[str, dict[str, dict[str, Delta]]], metric: str) -> str:
    """Classes, the mean and the mean's CI over classes as rows; arms, then Δs as columns."""
    classes = check_classes(arms)

    def cells(row: str) -> list[str]:
        return [*(fmt_summary(agg[label][row][metric], len(runs)) for label, runs in arms.items()),
                *(fmt_delta(delta[label][row][metric]) for label in delta)]

    rows = [[c, *cells(c)] for c in classes] + [
        [mean_label(agg, metric, len(classes)), *cells(MEAN_ROW)],
        [CLASS_CI_ROW, *(fmt_ci(agg[label][MEAN_ROW][metric].ci_classes) for label in arms),
         *(fmt_ci(delta[label][MEAN_ROW][metric].ci_classes, "+.2f") for label in delta)]]
    return markdown_table(["class", *arms, *(f"Δ {label}" for label in delta)], rows)


def tests_section(arms: dict[str, Runs], metrics: list[str], resampling: Resampling) -> list[str]:
    """The paired tests against the reference as Markdown lines: what each column means, the table, notes."""
    tests, notes = paired_tests(arms, metrics, resampling)
    reference = next(iter(arms))
    if any(2 <= t["n"] < 6 for t in tests):
        notes.append("below 6 pairs the exact tests cannot reach p < 0.05: their smallest two-sided p is 2/2^n "
                     "(0.5 for 2 pairs, 0.25 for 3)")
    if any(t["n"] > EXACT_MAX_N for t in tests):
        notes.append(f"perm and Wilcoxon p over more than {EXACT_MAX_N} pairs: Monte-Carlo over {MONTE_CARLO} "
                     f"random sign patterns (seed {resampling.seed}), (hits + 1) / (draws + 1)")
    header = ["arm", "metric", "over", "n", "mean Δ", "95% CI", "perm p", "sign p", "Wilcoxon p", "t p", "MDE"]
    rows = [[t["arm"], t["metric"], t["over"], str(t["n"]), fmt(t["mean_diff"], "+.2f"), fmt_ci(t["ci"], "+.2f"),
             *(fmt(t[key], ".3g") for key in ("perm_p", "sign_p", "wilcoxon_p", "t_p")), fmt(t["mde"])]
            for t in tests]
    return [f"## Paired tests vs {reference}", "",
            "- over seeds: one difference per seed both arms have (of the runs' mean rows); over classes: one per "
            "class (averaged over those seeds). 95% CI: percentile bootstrap of the mean Δ.",
            "- All p two-sided. perm: exact sign-flip permutation test of the mean Δ (all 2^n sign patterns); "
            "sign: exact binomial sign test; Wilcoxon: signed-rank, exact by the same enumeration (zeros "
            "dropped, ties mid-ranked); t: paired t-test. n/a below 2 pairs (t: below 3, or with equal nonzero "
            "differences, where t would be infinite).",
            "- MDE: the true mean Δ a paired t-test at α = 0.05 detects with 80% power, for this n and the observed "
            "SD of the differences (noncentral t; n/a below 3 pairs or without spread).",
            "", markdown_table(header, rows), "", *(f"- {n}" for n in notes), *([""] if notes else [])]


def random_weight_runs(arms: dict[str, Runs]) -> list[str]:
    """Runs whose results came from a random backbone."""
    return [str(r["path"]) for runs in arms.values() for r in runs if r["meta"].get("random_weights")]


def selection_labels(arms: dict[str, Runs]) -> dict[str, list[str]]:
    """The epoch-selection labels of the runs' results (test.py --select_epoch, e.g. "epoch chosen on the
    test set (optimistic)"), each with the runs it applies to."""
    labels: dict[str, list[str]] = {}
    for runs in arms.values():
        for r in runs:
            if label := r["meta"].get("selection_label"):
                labels.setdefault(label, []).append(str(r["path"]))
    return labels


def report(arms: dict[str, Runs], agg: dict[str, dict[str, dict[str, Summary]]],
           delta: dict[str, dict[str, dict[str, Delta]]], dataset: str, epoch: int | None,
           options: argparse.Namespace, resampling: Resampling = Resampling(), selected: str | None = None) -> str:
    """The whole comparison as Markdown, from `aggregate` and `deltas`; `selected`: the results are those
    of test.py's --select_epoch `selected`."""
    reference = next(iter(arms))
    metrics = list(agg[reference][MEAN_ROW])
    lines = [f"# {dataset}: " + " vs ".join(arms) + f" (reference: {reference})", ""]
    if random_runs := random_weight_runs(arms):
        lines += [f"**{RANDOM_WEIGHTS_BANNER}** (runs: {', '.join(random_runs)})", ""]
    for label, runs in selection_labels(arms).items():
        lines += [f"**{label}** (runs: {', '.join(runs)})", ""]
    given = ", ".join(f"{k} {v}" for k, v in vars(options).items() if v is not None) or "each variant's defaults"
    which = (f"chosen per run by test.py --select_epoch {selected}" if selected else
             "largest present" if epoch is None else epoch)
    lines += [f"epoch: {which}; test options: {given}; values in percent, "
              f"`mean ± std [95% CI]` over runs (sample std; percentile bootstrap, {resampling.n_resamples} "
              f"resamples, seed {resampling.seed}); Δ = arm − {reference} [95% CI over seeds: paired bootstrap; "
              f"unpaired where some run has no partner seed]; `{CLASS_CI_ROW}`: bootstrap over the per-class means "
              "(Δs); the mean row counts the classes it averages (n/a left out)", ""]
    lines += [markdown_table(["arm", "run", "seed", "variant", "epoch", "epoch selection", "result"],
                             [[label, str(r["path"]), str(r["seed"]), str(r["meta"].get("variant", "?")),
                               str(r["epoch"]), str(r["meta"].get("epoch_selection", "not recorded")), r["file"].name]
                              for label, runs in arms.items() for r in runs]), ""]
    for metric in metrics:
        lines += [f"## {metric}", "", metric_table(arms, agg, delta, metric), ""]
    if len(arms) > 1:
        lines += tests_section(arms, metrics, resampling)
    return "\n".join(lines)


def forest_plot(delta: dict[str, dict[str, dict[str, Delta]]], classes: list[str], metrics: list[str],
                title: str) -> bytes:
    """PNG, a panel per metric: each non-reference arm's per-class Δ with its 95% CI over seeds, then the
    mean's Δ with its CI over seeds and over classes. A Δ without an interval (one run) is a bare dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow to import, only needed here
    from matplotlib.figure import Figure  # not pyplot: no global state, no display backend

    labels = [*classes, "mean, CI over seeds", "mean, CI over classes"]
    fig = Figure(figsize=(2 + 3.2 * len(metrics), 1.5 + 0.3 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    offsets = np.linspace(-0.2, 0.2, len(delta)) if len(delta) > 1 else [0.0]  # arms side by side in a row
    for ax, metric in zip(axes, metrics):
        ax.axvline(0.0, color="grey", linewidth=0.8)
        for i, ((label, rows), offset) in enumerate(zip(delta.items(), offsets)):
            mean = rows[MEAN_ROW][metric]
            points = [(rows[c][metric].value, rows[c][metric].ci) for c in classes] + [
                (mean.value, mean.ci), (mean.value, mean.ci_classes)]
            ys = [y + offset for y, (value, _) in enumerate(points) if value is not None]
            ax.plot([value for value, _ in points if value is not None], ys, "o", color=f"C{i}", markersize=4,
                    label=label)
            for y, (value, ci) in enumerate(points):
                if value is not None and ci is not None:  # a line, not xerr: the CI need not contain the Δ
                    ax.hlines(y + offset, *ci, color=f"C{i}", linewidth=1.5)
        ax.axhline(len(classes) - 0.5, color="grey", linewidth=0.5, linestyle=":")  # classes | mean
        ax.set_title(metric)
        ax.set_xlabel("Δ (percentage points)")
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    handles, names = axes[0].get_legend_handles_labels()  # one entry per arm, not one per panel
    fig.legend(handles, names, loc="outside lower center", ncols=len(names))
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_csv(arms: dict[str, Runs], metrics: list[str], path: Path) -> None:
    """Long format, one row per (run, class or mean, metric) with the result's epoch and how it was
    selected (test.py --select_epoch); undefined values as n/a."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["arm", "run", "seed", "epoch", "epoch_selection", "class", "metric", "value"])
    for label, runs in arms.items():
        for run in runs:
            selection = run["meta"].get("selection_label") or run["meta"].get("epoch_selection", "not recorded")
            for row, values in run_rows(run).items():
                for metric in metrics:
                    value = values.get(metric)
                    w.writerow([label, run["path"], "" if run["seed"] is None else run["seed"], run["epoch"],
                                selection, row, metric, "n/a" if value is None else repr(float(value))])
    write_output(text.getvalue(), path, "--out")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arms", nargs="+", metavar="ARM",
                   help="[label=]path[,path...]: run folders (globs allowed) of one arm; several = seeds. Label "
                        "default: the folder name, or the runs' common prefix. The first arm is the reference")
    p.add_argument("--dataset", required=True, help="dataset whose results to compare, e.g. MVTec")
    p.add_argument("--epoch", type=int, default=None,
                   help="compare this epoch's results (default: the largest epoch evaluated, per run)")
    p.add_argument("--selected", choices=["best_on_test", "heldout"], default=None,
                   help="compare the results test.py --select_epoch best_on_test / heldout wrote, each run at the "
                        "epoch it chose; best_on_test results are labelled 'epoch chosen on the test set "
                        "(optimistic)' in the report (default: the per-epoch results, see --epoch)")
    p.add_argument("--metrics", nargs="+", choices=METRIC_NAMES, default=METRIC_NAMES, metavar="METRIC",
                   help=f"metrics to compare, in this order (default: all of {', '.join(METRIC_NAMES)})")
    p.add_argument("--bootstrap", type=int, default=Resampling().n_resamples, metavar="N",
                   help="resamples of every percentile-bootstrap 95%% interval (default: %(default)s)")
    p.add_argument("--seed", type=int, default=Resampling().seed,
                   help="seed of the bootstrap and of the Monte-Carlo sign flips beyond "
                        f"{EXACT_MAX_N} pairs, so that a report can be reproduced (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="writes <out>.md, <out>.csv and <out>_forest.png (default: results/compare_<dataset>)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    add_variant_test_args(p)  # which of a run's results to read, as test.py named them
    return p


@cli_main
def main() -> None:
    args = get_parser().parse_args()
    if args.bootstrap < 1:
        raise UserError(f"--bootstrap {args.bootstrap}: give at least 1 resample (thousands for a stable interval)")
    if args.selected and args.epoch is not None:
        raise UserError(f"--epoch {args.epoch} and --selected {args.selected} contradict each other; drop one")
    resampling = Resampling(args.bootstrap, args.seed)
    options = argparse.Namespace(**{dest: getattr(args, dest) for variant in VARIANTS.values()
                                    for dest in test_flags(variant)})
    arms: dict[str, Runs] = {}
    for spec in args.arms:
        label, paths = parse_arm(spec)
        if label in arms:
            raise UserError(f"two arms are labelled '{label}'; name them with label=path")
        arms[label] = [load_run(p, args.dataset, args.epoch, options, args.selected) for p in paths]
    agg = aggregate(arms, args.metrics, resampling)
    delta = deltas(arms, agg, resampling)
    text = report(arms, agg, delta, args.dataset, args.epoch, options, resampling, args.selected)
    print(text)
    out = Path(args.out or f"results/compare_{args.dataset}")
    ensure_writable_dir(out.parent, "--out")
    remove_stale_temporaries(out.parent)
    md, csv_path = out.parent / f"{out.name}.md", out.parent / f"{out.name}.csv"
    write_output(text, md, "--out")  # atomically: a reader never sees half a report
    write_csv(arms, args.metrics, csv_path)
    saved = [md, csv_path]
    if delta:  # one arm: no Δ to plot
        reference = next(iter(arms))
        title = f"{args.dataset}: Δ vs {reference} with 95% bootstrap intervals"
        if random_weight_runs(arms):
            title += f"\n{RANDOM_WEIGHTS_BANNER}"
        for label in selection_labels(arms):
            title += f"\n{label}"
        saved.append(out.parent / f"{out.name}_forest.png")
        write_output(forest_plot(delta, check_classes(arms), args.metrics, title), saved[-1], "--out")
    print("saved " + ", ".join(map(str, saved)))


if __name__ == "__main__":
    main()
