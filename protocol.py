"""The zero-shot protocol in one command: train on VisA and test on MVTec, BTAD, MPDD and the medical sets;
train on MVTec and test on VisA; every variant with every seed; one comparison report with intervals.

    python protocol.py --seeds 1 2 3 --out ckpt/protocol -- --pretrained ViT-L-14-336px.pt
    python protocol.py --stand_ins --seeds 1 2 --cpu_jobs 2 --out ckpt/protocol_demo     # CPU, synthetic data

Each direction is one sweep.py (`<out>/from_<train set>`, its runs, logs and compare_<test set>.md/.csv/
_forest.png), given --variants, --seeds, --gpus, --cpu_jobs, --test_flags and the training flags after `--`.
A rerun resumes: sweep.py skips the jobs that are done. When every sweep succeeded, the comparisons are
gathered into `<out>/protocol.md` (per metric, a row per train -> test pair: each variant's mean over the
seeds of the runs' mean over classes, the difference to the first variant, each with a 95% bootstrap
interval over seeds, and links to the per-dataset reports) and `<out>/protocol_forest.png` (those
differences with their intervals).

--stand_ins writes a small synthetic dataset (dataset/synthetic.py) in the place of every dataset of the
protocol, under <out>/data/<name> with its lists in <out>/metadata/<name>, and trains the tiny random
backbone on them for one epoch per stage (flags after `--` override these): the whole protocol runs on the
CPU, to show that it runs; its numbers say nothing about AA-CLIP.
"""
from __future__ import annotations

import argparse
import csv
import io
import signal
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import RANDOM_WEIGHTS_BANNER, cli_main, split_argv
from dataset import get_dataset_info, load_constants
from dataset.make_metadata import build_metadata
from dataset.synthetic import MARKER, make_synthetic
from utils.argtypes import positive_int
from utils.errors import UserError
from utils.io import ensure_writable_dir, write_output
from utils.stats import CI, bootstrap_ci, bootstrap_diff_ci
from variants import VARIANTS

REPO = Path(__file__).resolve().parent
INDUSTRIAL_TESTS = ["MVTec", "BTAD", "MPDD"]  # besides the medical sets, the tests of the VisA-trained runs
MEAN_ROW = "mean"  # compare.py's CSV row of a run's mean over classes
# compare.py's default resampling, which sweep.py's comparisons use: the report's intervals over seeds are
# then the same numbers as the mean rows of the per-dataset reports.
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# The stand-ins: small images (the tiny model resizes them) and few of them, so that each of the protocol's
# jobs takes seconds. 70 px = a 5 x 5 patch grid, the smallest the medical test-time blur (9 x 9) accepts.
STAND_IN_SIZE = 64
STAND_IN_CLASSES = ("stripes", "carpet", "disc", "nut")  # dataset/synthetic.py's default classes
STAND_IN_TRAINING = ["--model", "tiny", "--pretrained", "none", "--image_size", "70", "--shot", "2",
                     "--text_epoch", "1", "--image_epoch", "1", "--text_batch_size", "2", "--image_batch_size", "2",
                     "--num_workers", "0"]


@dataclass
class Direction:
    """One training set and the sets its runs are tested on: one sweep."""
    train: str
    tests: list[str]

    @property
    def folder(self) -> str:
        return f"from_{self.train}"


def medical_sets() -> list[str]:
    """Every dataset of the constants in the medical domain, in their order."""
    return [name for name, info in load_constants()["datasets"].items() if info["domain"] == "Medical"]


def plan(industrial: list[str], medical: list[str]) -> list[Direction]:
    """VisA -> `industrial` (MVTec, BTAD, MPDD) and `medical`; MVTec -> VisA."""
    return [Direction("VisA", [*industrial, *medical]), Direction("MVTec", ["VisA"])]


def check_tests(industrial: list[str], medical: list[str]) -> None:
    """Each test set under the flag of its domain (the domain sets the test-time blur and image score, so a
    medical set in --industrial would not be tested as the others are), and at least one."""
    for flag, names, domain in (("--industrial", industrial, "Industrial"), ("--medical", medical, "Medical")):
        wrong = [n for n in names if get_dataset_info(n)["domain"] != domain]
        if wrong:
            raise UserError(f"{flag} {' '.join(wrong)}: not in the {domain.lower()} domain of dataset/constants.json "
                            f"(its medical sets: {' '.join(medical_sets())})")
    if not industrial and not medical:
        raise UserError("--industrial and --medical are both empty: nothing to test the VisA-trained runs on")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- training flags]")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["baseline", "cross_attention"],
                   help="variants to train; the first is the reference of every Δ (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="training seeds of every variant; intervals over seeds need 2 or more "
                        "(default: %(default)s)")
    p.add_argument("--industrial", nargs="*", default=INDUSTRIAL_TESTS, metavar="DATASET",
                   help="industrial test sets of the VisA-trained runs; none: medical tests only "
                        "(default: %(default)s)")
    p.add_argument("--medical", nargs="*", default=medical_sets(), metavar="DATASET",
                   help="medical test sets of the VisA-trained runs; none: industrial tests only "
                        "(default: every medical set of dataset/constants.json: %(default)s)")
    p.add_argument("--out", default="ckpt/protocol",
                   help="folder of the sweeps, the stand-ins and the report (default: %(default)s)")
    p.add_argument("--stand_ins", action="store_true",
                   help="run on synthetic stand-ins of every dataset, written under <out>/data, with the tiny "
                        "random backbone (default: off, the real datasets)")
    p.add_argument("--gpus", nargs="+", default=None,
                   help="passed to sweep.py: GPU ids, one job at a time on each (default: every visible GPU; "
                        "none: the CPU)")
    p.add_argument("--cpu_jobs", type=positive_int, default=1,
                   help="passed to sweep.py: without a GPU, jobs at once on the CPU (default: %(default)s)")
    p.add_argument("--test_flags", default="",
                   help='passed to sweep.py: extra test.py flags, one string: --test_flags="--batch_size 16" '
                        "(default: none)")
    p.add_argument("--dry_run", action="store_true",
                   help="list each sweep's jobs and comparisons (sweep.py --dry_run); write nothing "
                        "(default: off)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: off)")
    return p


def training_flags(args: argparse.Namespace, given: list[str]) -> list[str]:
    """The flags after `--`, behind the stand-ins' tiny training when --stand_ins (a later flag wins)."""
    if not args.stand_ins:
        return given
    return [*STAND_IN_TRAINING, "--metadata_dir", str(Path(args.out) / "metadata"), *given]


def sweep_command(args: argparse.Namespace, direction: Direction, train_flags: list[str]) -> list[str]:
    """sweep.py for one direction, into <out>/from_<train set>."""
    return [sys.executable, str(REPO / "sweep.py"), "--variants", *args.variants,
            "--seeds", *map(str, args.seeds), "--train_dataset", direction.train,
            "--test_datasets", *direction.tests, "--out", str(Path(args.out) / direction.folder),
            "--cpu_jobs", str(args.cpu_jobs), *(["--gpus", *args.gpus] if args.gpus is not None else []),
            *([f"--test_flags={args.test_flags}"] if args.test_flags else []),
            *(["--dry_run"] if args.dry_run else []), "--", *train_flags]


def stand_in(name: str) -> dict:
    """How the stand-in of dataset `name` is drawn: a seed and classes of its own (named after the name, so
    that a stand-in does not depend on which others are made); one class for a medical set, as the real
    ones have, two for an industrial one."""
    key = zlib.crc32(name.encode())
    count = 1 if get_dataset_info(name)["domain"] == "Medical" else 2
    return {"seed": key % 1000,
            "classes": [STAND_IN_CLASSES[(key + i) % len(STAND_IN_CLASSES)] for i in range(count)]}


def build_stand_ins(out: Path, datasets: list[str]) -> None:
    """A synthetic dataset per name under <out>/data/<name>, its full-shot and 2-shot lists in
    <out>/metadata/<name> with the root recorded beside them (so the jobs find it without --data_root).
    Its domain is the name's (a medical name gets the medical test-time blur and image score)."""
    for name in datasets:
        spec = stand_in(name)
        root = out / "data" / name
        make_synthetic(str(root), seed=spec["seed"], size=STAND_IN_SIZE, n_normal=3, n_anomalous=3, n_train=0,
                       classes=spec["classes"])
        build_metadata(name, str(root), layout="mvtec", out_dir=str(out / "metadata"), shots=(2,))
        print(f"stand-in {name}: synthetic {', '.join(spec['classes'])} (seed {spec['seed']}) in {root}", flush=True)


def run_sweep(cmd: list[str]) -> int:
    """Runs one sweep and returns its exit code. Ctrl-C reaches the sweep by itself (one process group) and
    SIGTERM is passed on, so that its trainings save before it exits; either stops the protocol after it."""
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        received.append(signum)
        if signum == signal.SIGTERM and procs:
            procs[0].send_signal(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not received:  # a signal before the start: the sweep would not get it
            procs.append(subprocess.Popen(cmd))
            code = procs[0].wait()  # a handled signal does not interrupt the wait (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        sys.exit(128 + received[0])
    return code


# --- the report -------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run of a compare.py CSV: its seed and, per row (class or mean) and metric, the value or None."""
    seed: str
    rows: dict[str, dict[str, float | None]]


@dataclass
class Cell:
    """One variant's value of one metric on one test set, over its runs."""
    mean: float | None
    ci: CI | None
    n: int  # runs where it is defined
    classes: tuple[int, ...]  # the distinct numbers of classes the runs' means average


@dataclass
class Comparison:
    """One train -> test pair: per arm its runs (the first arm is the reference), the report's files."""
    direction: Direction
    test: str
    arms: dict[str, list[Run]]
    n_classes: int
    random_weights: bool
    selections: set[str]  # how the runs' epochs were chosen (test.py --select_epoch), as compare.py wrote it
    md: Path


def read_comparison(out: Path, direction: Direction, test: str) -> Comparison:
    """The runs of <out>/from_<train>/compare_<test>.csv, as compare.py wrote them (arm, run, seed, class,
    metric, value; n/a where undefined; the epoch_selection of each run's result), and whether its report
    carries the random-weights banner."""
    stem = out / direction.folder / f"compare_{test}"
    md, table = stem.with_suffix(".md"), stem.with_suffix(".csv")
    if not md.is_file() or not table.is_file():
        raise UserError(f"{table} or {md} is missing: the sweep of {direction.train} did not compare {test}; "
                        "rerun the same command")
    arms: dict[str, dict[str, Run]] = {}
    selections = set()
    for row in csv.DictReader(io.StringIO(table.read_text())):
        selections.add(row.get("epoch_selection") or "not recorded")
        run = arms.setdefault(row["arm"], {}).setdefault(row["run"], Run(row["seed"], {}))
        run.rows.setdefault(row["class"], {})[row["metric"]] = None if row["value"] == "n/a" else float(row["value"])
    if not arms:
        raise UserError(f"{table} holds no runs; rerun the same command")
    first = next(iter(next(iter(arms.values())).values()))
    return Comparison(direction, test, {arm: list(runs.values()) for arm, runs in arms.items()},
                      len([c for c in first.rows if c != MEAN_ROW]), RANDOM_WEIGHTS_BANNER in md.read_text(),
                      selections, md)


def defined(values) -> list[float]:
    return [v for v in values if v is not None]


def summarise(runs: list[Run], metric: str) -> Cell:
    """Mean over the runs of their mean over classes, with its percentile bootstrap interval over the runs."""
    values = defined(r.rows[MEAN_ROW].get(metric) for r in runs)
    classes = tuple(sorted({len(defined(v.get(metric) for c, v in r.rows.items() if c != MEAN_ROW)) for r in runs}))
    return Cell(float(np.mean(values)) if values else None,
                bootstrap_ci(values, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED), len(values), classes)


def delta(reference: list[Run], runs: list[Run], metric: str) -> tuple[float | None, CI | None]:
    """Arm − reference of the means over runs, with a bootstrap interval over seeds, as compare.py: of the
    differences paired by seed (in seed order) when every run has its partner seed, else of each arm
    resampled on its own."""
    ref, arm = summarise(reference, metric).mean, summarise(runs, metric).mean
    value = None if ref is None or arm is None else arm - ref
    seeds = [[r.seed for r in side] for side in (reference, runs)]
    if len(reference) == len(runs) == 1:
        pairs = [(reference[0], runs[0])]
    elif sorted(seeds[0]) == sorted(seeds[1]) and "" not in seeds[0] and len(set(seeds[0])) == len(seeds[0]):
        partner = {r.seed: r for r in runs}
        pairs = [(r, partner[r.seed]) for r in sorted(reference, key=lambda r: int(r.seed))]
    else:
        return value, bootstrap_diff_ci(defined(r.rows[MEAN_ROW].get(metric) for r in runs),
                                        defined(r.rows[MEAN_ROW].get(metric) for r in reference),
                                        BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    diffs = [a - r for ref_run, run in pairs if (r := ref_run.rows[MEAN_ROW].get(metric)) is not None
             and (a := run.rows[MEAN_ROW].get(metric)) is not None]
    return value, bootstrap_ci(diffs, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)


def fmt(value: float | None, ci: CI | None, spec: str = ".2f") -> str:
    """`value [low, high]`; n/a where undefined; no interval where there is none (one run)."""
    if value is None:
        return "n/a"
    return f"{value:{spec}}" + ("" if ci is None else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def fmt_cell(cell: Cell, n_runs: int) -> str:
    """`mean [CI]`, with (n=k) where fewer than the arm's runs define it."""
    return fmt(cell.mean, cell.ci) + (f" (n={cell.n})" if cell.mean is not None and cell.n < n_runs else "")


def classes_label(cells: list[Cell], n_classes: int) -> str:
    """`4`; `3 of 4` where some class's value is n/a; `0 of 1` where none is defined."""
    counts = sorted({c for cell in cells for c in cell.classes})
    span = "–".join(map(str, sorted({counts[0], counts[-1]}))) if counts else "0"
    return span if counts == [n_classes] else f"{span} of {n_classes}"


def metric_table(comparisons: list[Comparison], metric: str, out: Path) -> str:
    """A row per train -> test pair: seeds, classes, each arm's mean [CI], each Δ [CI], the links."""
    arms = list(comparisons[0].arms)
    header = ["train → test", "seeds", "classes", *arms, *(f"Δ {a}" for a in arms[1:]), "per-dataset report"]
    rows = []
    for c in comparisons:
        cells = [summarise(c.arms[a], metric) for a in arms]
        seeds = "–".join(map(str, sorted({len(runs) for runs in c.arms.values()})))
        diffs = [fmt(*delta(c.arms[arms[0]], c.arms[a], metric), "+.2f") for a in arms[1:]]
        link = c.md.relative_to(out).as_posix()
        forest = link.removesuffix(".md") + "_forest.png"  # compare.py draws one where there is a Δ
        links = f"[md]({link})" + (f", [forest]({forest})" if (out / forest).is_file() else "")
        rows.append([f"{c.direction.train} → {c.test}", seeds, classes_label(cells, c.n_classes),
                     *(fmt_cell(cell, len(c.arms[a])) for cell, a in zip(cells, arms)), *diffs, links])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def stand_ins_of(out: Path, directions: list[Direction]) -> list[str]:
    """The datasets of the plan whose data under <out>/data is a synthetic stand-in (dataset.synthetic's
    marker): told by the data, not by --stand_ins, since a rerun without the flag skips the finished runs."""
    names = dict.fromkeys(n for d in directions for n in [d.train, *d.tests])
    return [n for n in names if (out / "data" / n / MARKER).is_file()]


def report(comparisons: list[Comparison], metrics: list[str], out: Path, stand_ins: list[str]) -> str:
    """protocol.md: what was run and how to read it, the overview plot, a table per metric."""
    arms = list(comparisons[0].arms)
    lines = [f"# Zero-shot protocol: {' vs '.join(arms)} (reference: {arms[0]})", ""]
    random = [f"{c.direction.train} → {c.test}" for c in comparisons if c.random_weights]
    if random:
        lines += [f"**{RANDOM_WEIGHTS_BANNER}** ({', '.join(random)})", ""]
    if stand_ins:
        lines += [f"**SYNTHETIC STAND-INS (--stand_ins): {', '.join(stand_ins)} are small synthetic datasets under "
                  f"{out / 'data'}, not the real datasets of those names**", ""]
    selections = sorted({s for c in comparisons for s in c.selections})
    for label in (s for s in selections if "optimistic" in s):  # test.py's label of --select_epoch best_on_test
        lines += [f"**{label}**", ""]
    lines += [f"Epochs: {', '.join(selections)} (test.py --select_epoch). Each cell: the mean over seeds of a run's "
              "mean over classes, in percent, with its 95% percentile bootstrap interval over seeds "
              f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); Δ = arm − {arms[0]}, its interval a "
              "paired bootstrap over seeds. `seeds`: runs per arm; `classes`: the classes a run's mean averages "
              "(n/a classes left out). The per-dataset reports hold the per-class tables, intervals over "
              "classes, the paired tests (exact p, MDE) and a forest plot of the per-class Δs. Intervals over "
              "few seeds are too narrow: read them with the MDE there.", ""]
    if len(arms) > 1:
        lines += ["![Δ per test set](protocol_forest.png)", ""]
    for metric in metrics:
        lines += [f"## {metric}", "", metric_table(comparisons, metric, out), ""]
    return "\n".join(lines)


def forest_plot(comparisons: list[Comparison], metrics: list[str], title: str) -> bytes:
    """PNG, a panel per metric: per train -> test pair, each arm's Δ to the reference with its interval over
    seeds (a bare dot without one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow to import, only needed here
    from matplotlib.figure import Figure  # not pyplot: no global state, no display backend

    arms = list(comparisons[0].arms)
    labels = [f"{c.direction.train} → {c.test}" for c in comparisons]
    fig = Figure(figsize=(2 + 3 * len(metrics), 1.8 + 0.3 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    offsets = np.linspace(-0.2, 0.2, len(arms) - 1) if len(arms) > 2 else [0.0]  # arms side by side in a row
    for ax, metric in zip(axes, metrics):
        ax.axvline(0.0, color="grey", linewidth=0.8)
        for i, (arm, offset) in enumerate(zip(arms[1:], offsets)):
            for y, c in enumerate(comparisons):
                value, ci = delta(c.arms[arms[0]], c.arms[arm], metric)
                if value is None:
                    continue
                ax.plot([value], [y + offset], "o", color=f"C{i}", markersize=4, label=arm if y == 0 else None)
                if ci is not None:  # a line, not xerr: the interval need not contain the Δ
                    ax.hlines(y + offset, *ci, color=f"C{i}", linewidth=1.5)
        ax.set_title(metric)
        ax.set_xlabel("Δ (percentage points)")
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    handles, names = axes[0].get_legend_handles_labels()
    by_name = dict(zip(names, handles))  # one entry per arm
    fig.legend(list(by_name.values()), list(by_name), loc="outside lower center", ncols=max(1, len(by_name)))
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_report(out: Path, directions: list[Direction]) -> list[Path]:
    """Reads every direction's comparisons and writes <out>/protocol_forest.png (with two arms or more) and
    <out>/protocol.md; returns the paths written."""
    comparisons = [read_comparison(out, d, test) for d in directions for test in d.tests]
    arms = list(comparisons[0].arms)
    for c in comparisons[1:]:
        if list(c.arms) != arms:
            raise UserError(f"{c.md} compares {', '.join(c.arms)}, {comparisons[0].md} {', '.join(arms)}: the "
                            "sweeps ran other variants; give each protocol its own --out")
    first = next(iter(comparisons[0].arms.values()))[0]
    metrics = list(first.rows[MEAN_ROW])
    title = f"Δ vs {arms[0]} (mean over classes) with 95% bootstrap intervals over seeds"
    if any(c.random_weights for c in comparisons):
        title += f"\n{RANDOM_WEIGHTS_BANNER}"
    stand_ins = stand_ins_of(out, directions)
    if stand_ins:
        title += "\nSYNTHETIC STAND-INS, not the real datasets"
    written = []
    if len(arms) > 1:  # Δs to plot
        written.append(out / "protocol_forest.png")
        write_output(forest_plot(comparisons, metrics, title), written[-1], "--out")
    written.append(out / "protocol.md")  # last: a report means that all is there
    write_output(report(comparisons, metrics, out, stand_ins), written[-1], "--out")
    return written


@cli_main
def main() -> None:
    own, given = split_argv(sys.argv[1:])
    args = get_parser().parse_args(own)
    for key in ("variants", "seeds", "industrial", "medical"):  # a repeated value would run twice into one folder
        setattr(args, key, list(dict.fromkeys(getattr(args, key))))
    check_tests(args.industrial, args.medical)
    out, directions = Path(args.out), plan(args.industrial, args.medical)
    flags = training_flags(args, given)
    if args.stand_ins and not args.dry_run:
        ensure_writable_dir(out, "--out")
        build_stand_ins(out, list(dict.fromkeys(n for d in directions for n in [d.train, *d.tests])))
    failed = []
    for direction in directions:
        cmd = sweep_command(args, direction, flags)
        print(f"protocol: {direction.train} -> {', '.join(direction.tests)}", flush=True)
        if run_sweep(cmd) != 0:
            failed.append(f"{direction.folder}: {' '.join(cmd)}")
    if failed:
        raise UserError("sweeps that failed (their errors are above; rerun the same command: finished jobs are "
                        "skipped):\n  " + "\n  ".join(failed))
    if not args.dry_run:
        print(f"protocol: wrote {', '.join(map(str, write_report(out, directions)))}")


if __name__ == "__main__":
    main()
