"""Compare test.py results of several arms (e.g. baseline vs cross-attention), each one run or several seeds.

    python compare.py ckpt/baseline ckpt/cross --dataset MVTec
    python compare.py 'base=ckpt/base_seed*' cross=ckpt/cross_seed1,ckpt/cross_seed2 --dataset MVTec --epoch 5

Each ARM is `[label=]path[,path...]`; a path may be a glob, several paths are several runs (seeds) of one
arm; quote globs, or the shell turns each match into an arm of its own. The first arm is the reference for
the Δ columns and the paired tests. For every run this reads
`<run>/results/<dataset>_epoch<k><suffix>.json` as written by `python test.py --save_path <run> --dataset
<dataset>`, the suffix naming the run's variant's test options (none for the baseline, `_image` or `_none`
for cross-attention's --text_context).

Prints Markdown tables (one per metric: classes + mean as rows, arms and Δ as columns; `mean ± std` over
runs, sample std) and a table of paired tests against the reference, and writes them to `<out>.md` plus a
long-format `<out>.csv` (arm, run, seed, class, metric, value).
"""
from __future__ import annotations

import argparse
import copy
import csv
import glob
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from cli import RANDOM_WEIGHTS_BANNER, add_variant_test_args, cli_main, test_flags
from metrics import METRIC_NAMES
from utils.errors import UserError
from variants import VARIANTS, read_saved_args, variant_of_run

MEAN_ROW = "mean"
Stat = tuple[float | None, float | None, int]  # mean over runs, sample std (None below 2 runs), runs defined


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


def load_run(path: Path, dataset: str, epoch: int | None, options: argparse.Namespace) -> dict:
    """The result JSON of one run: `epoch`, or else the largest epoch present, of the results its variant
    names for the test `options` (e.g. cross-attention's --text_context). Returns {path, seed, epoch, file,
    meta, per_class, mean}."""
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    saved = read_saved_args(path)
    variant = variant_of_run(path, saved)
    options = copy.copy(options)
    variant.finish_test_args(options)
    suffix = variant.result_suffix(options)
    by_epoch = {int(m.group(1)): f for f in (path / "results").glob(f"{glob.escape(dataset)}_epoch*.json")
                if (m := re.fullmatch(rf"{re.escape(dataset)}_epoch(\d+){re.escape(suffix)}\.json", f.name))}
    chosen = epoch if epoch is not None else max(by_epoch, default=None)
    if chosen not in by_epoch:
        flags = "".join(f" {flag} {getattr(options, dest)}" for dest, flag in test_flags(variant).items())
        what = f"{dataset} result" + (f" for epoch {epoch}" if epoch is not None else "") + (
            f" with{flags}" if flags else "")
        have = f" (it has epochs {sorted(by_epoch)})" if by_epoch else ""
        command = f"python test.py --save_path {path} --dataset {dataset}" + (
            f" --epoch {epoch}" if epoch is not None else "") + flags
        raise UserError(f"no {what} in {path / 'results'}{have}; run: {command}")
    file = by_epoch[chosen]
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e}); rerun test.py for {path}") from None
    if not {"per_class", "mean"} <= data.keys():
        raise UserError(f"{file} lacks per_class or mean; rerun test.py for {path}")
    return {"path": path, "seed": saved.get("seed"), "epoch": chosen, "file": file, "meta": data.get("meta", {}),
            "per_class": data["per_class"], "mean": data["mean"]}


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


def aggregate(arms: dict[str, list[dict]], metrics: list[str]) -> dict[str, dict[str, dict[str, Stat]]]:
    """arm -> row (classes, mean) -> metric -> (mean over runs, sample std, number of runs where defined)."""
    rows = check_classes(arms) + [MEAN_ROW]
    out: dict[str, dict[str, dict[str, Stat]]] = {}
    for label, runs in arms.items():
        out[label] = {}
        for row in rows:
            out[label][row] = {}
            for metric in metrics:
                values = [v for run in runs if (v := run_rows(run)[row].get(metric)) is not None]
                mean = float(np.mean(values)) if values else None
                std = float(np.std(values, ddof=1)) if len(values) > 1 else None
                out[label][row][metric] = (mean, std, len(values))
    return out


def deltas(agg: dict[str, dict[str, dict[str, Stat]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Non-reference arm -> row -> metric -> arm mean − reference mean (None where either is undefined)."""
    reference, *others = agg
    return {label: {row: {metric: None if stat[0] is None or agg[reference][row][metric][0] is None
                          else stat[0] - agg[reference][row][metric][0]
                          for metric, stat in cells.items()}
                    for row, cells in agg[label].items()}
            for label in others}


def pair_runs(reference: list[dict], runs: list[dict]) -> tuple[list[tuple[dict, dict]], str, list[str]]:
    """Runs of two arms paired by the `seed` in their args.json -> (pairs, pairing name, notes).
    One run on each side is paired as is."""
    if len(reference) == 1 and len(runs) == 1:
        return [(reference[0], runs[0])], "pairs over classes (one run per arm)", []
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
    return [(seeds[0][s], seeds[1][s]) for s in common], "pairs over (seed, class)", notes


def test_differences(arm: np.ndarray, reference: np.ndarray) -> tuple[float | None, float | None]:
    """Two-sided Wilcoxon signed-rank and paired t-test p-values (None where undefined)."""
    import scipy.stats  # slow to import (~1.5 s) and only needed here: keeps --help and errors quick

    d = arm - reference
    if d.size == 0:
        return None, None
    if not d.any():  # no difference at all: scipy's answer is nan or an error, the honest one is p = 1
        return 1.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # small-sample and zero-variance warnings
        try:
            w = float(scipy.stats.wilcoxon(d).pvalue)
        except ValueError:
            w = float("nan")
        t = float(scipy.stats.ttest_rel(arm, reference).pvalue) if d.size > 1 else float("nan")
    return (None if np.isnan(w) else w), (None if np.isnan(t) else t)


def paired_tests(arms: dict[str, list[dict]], metrics: list[str]) -> tuple[list[dict], list[str]]:
    """Each non-reference arm against the reference, per metric, over per-class values of paired runs
    (the mean row is left out: it is not an independent pair). Returns (rows, notes)."""
    classes = check_classes(arms)
    (ref_label, reference), *others = arms.items()
    rows, notes = [], []
    for label, runs in others:
        pairs, pairing, arm_notes = pair_runs(reference, runs)
        notes += [f"{label} vs {ref_label}: {n}" for n in arm_notes]
        for metric in metrics:
            values = [(run["per_class"][c].get(metric), ref["per_class"][c].get(metric))
                      for ref, run in pairs for c in classes]
            defined = np.array([v for v in values if None not in v], dtype=float).reshape(-1, 2)
            arm_v, ref_v = defined[:, 0], defined[:, 1]
            wilcoxon_p, t_p = test_differences(arm_v, ref_v)
            rows.append({"arm": label, "reference": ref_label, "metric": metric, "pairing": pairing,
                         "n": int(arm_v.size), "mean_diff": float(np.mean(arm_v - ref_v)) if arm_v.size else None,
                         "wilcoxon_p": wilcoxon_p, "t_p": t_p})
    return rows, notes


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def fmt_stat(stat: Stat, n_runs: int) -> str:
    mean, std, n = stat
    if n_runs == 1 or mean is None:
        return fmt(mean)
    text = fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"
    return text if n == n_runs else f"{text} (n={n})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Padded so that it also reads as a table in a terminal; numeric columns right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = [bool(rows) and all(re.match(r"[+\-]?\d|n/a", r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if right else "-") for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def report(arms: dict[str, list[dict]], metrics: list[str], dataset: str, epoch: int | None,
           options: argparse.Namespace) -> str:
    """The whole comparison as Markdown."""
    agg = aggregate(arms, metrics)
    delta = deltas(agg)
    reference = next(iter(arms))
    random_runs = [str(r["path"]) for runs in arms.values() for r in runs if r["meta"].get("random_weights")]
    lines = [f"# {dataset}: " + " vs ".join(arms) + f" (reference: {reference})", ""]
    if random_runs:
        lines += [f"**{RANDOM_WEIGHTS_BANNER}** (runs: {', '.join(random_runs)})", ""]
    given = ", ".join(f"{k} {v}" for k, v in vars(options).items() if v is not None) or "each variant's defaults"
    lines += [f"epoch: {'largest present' if epoch is None else epoch}; test options: {given}; values in percent, "
              f"`mean ± std` over runs (sample std), Δ = arm − {reference}", ""]
    lines += [markdown_table(["arm", "run", "seed", "variant", "epoch", "result"],
                             [[label, str(r["path"]), str(r["seed"]), str(r["meta"].get("variant", "?")),
                               str(r["epoch"]), r["file"].name] for label, runs in arms.items() for r in runs]), ""]
    for metric in metrics:
        header = ["class", *arms, *(f"Δ {label}" for label in delta)]
        rows = [[row, *(fmt_stat(agg[label][row][metric], len(runs)) for label, runs in arms.items()),
                 *(fmt(delta[label][row][metric], "+.2f") for label in delta)] for row in agg[reference]]
        lines += [f"## {metric}", "", markdown_table(header, rows), ""]
    if len(arms) > 1:
        tests, notes = paired_tests(arms, metrics)
        lines += [f"## Paired tests vs {reference} (per-class values; Wilcoxon signed-rank drops zero differences)",
                  "", markdown_table(["arm", "metric", "pairing", "n", "mean Δ", "Wilcoxon p", "t-test p"],
                                     [[t["arm"], t["metric"], t["pairing"], str(t["n"]), fmt(t["mean_diff"], "+.2f"),
                                       fmt(t["wilcoxon_p"], ".3g"), fmt(t["t_p"], ".3g")] for t in tests]), ""]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines)


def write_csv(arms: dict[str, list[dict]], metrics: list[str], path: Path) -> None:
    """Long format, one row per (run, class or mean, metric); undefined values as n/a."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "run", "seed", "class", "metric", "value"])
        for label, runs in arms.items():
            for run in runs:
                for row, values in run_rows(run).items():
                    for metric in metrics:
                        value = values.get(metric)
                        w.writerow([label, run["path"], "" if run["seed"] is None else run["seed"], row, metric,
                                    "n/a" if value is None else repr(float(value))])


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arms", nargs="+", metavar="ARM",
                   help="[label=]path[,path...]: run folders (globs allowed) of one arm; several = seeds. Label "
                        "default: the folder name, or the runs' common prefix. The first arm is the reference")
    p.add_argument("--dataset", required=True, help="dataset whose results to compare, e.g. MVTec")
    p.add_argument("--epoch", type=int, default=None,
                   help="compare this epoch's results (default: the largest epoch evaluated, per run)")
    p.add_argument("--metrics", nargs="+", choices=METRIC_NAMES, default=METRIC_NAMES, metavar="METRIC",
                   help=f"metrics to compare, in this order (default: all of {', '.join(METRIC_NAMES)})")
    p.add_argument("--out", default=None,
                   help="writes <out>.md and <out>.csv (default: results/compare_<dataset>)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    add_variant_test_args(p)  # which of a run's results to read, as test.py named them
    return p


@cli_main
def main() -> None:
    args = get_parser().parse_args()
    options = argparse.Namespace(**{dest: getattr(args, dest) for variant in VARIANTS.values()
                                    for dest in test_flags(variant)})
    arms: dict[str, list[dict]] = {}
    for spec in args.arms:
        label, paths = parse_arm(spec)
        if label in arms:
            raise UserError(f"two arms are labelled '{label}'; name them with label=path")
        arms[label] = [load_run(p, args.dataset, args.epoch, options) for p in paths]
    text = report(arms, args.metrics, args.dataset, args.epoch, options)
    print(text)
    out = Path(args.out or f"results/compare_{args.dataset}")
    out.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = out.parent / f"{out.name}.md", out.parent / f"{out.name}.csv"
    md.write_text(text)
    write_csv(arms, args.metrics, csv_path)
    print(f"saved {md} and {csv_path}")


if __name__ == "__main__":
    main()
