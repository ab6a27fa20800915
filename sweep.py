"""Train and evaluate a grid (variants x variant flags x seeds x test datasets) across the visible GPUs,
then compare.

    python sweep.py --variants baseline cross_attention --seeds 1 2 3 --train_dataset VisA \\
        --test_datasets MVTec BTAD --out ckpt/sweep -- --pretrained ViT-L-14-336px.pt
    python sweep.py ... --gpus 0 1 --test_flags="--batch_size 16" -- --pretrained ViT-L-14-336px.pt
    python sweep.py ... --grid "--context_cls residual token none" "--context_level 0 1" -- ...

Each (variant, seed) is one run in <out>/<variant>_seed<seed>: training (train.py or
train_cross_attention.py with --dataset, --seed, --save_path and the flags after `--`), then test.py on
each test dataset, with the training's --metadata_dir, --num_workers and --cache_dir (and its --data_root
when testing on the training set); --test_flags adds to them or overrides them. Runs go one per GPU
(CUDA_VISIBLE_DEVICES), as many at once as there are GPUs; without a GPU they run on the CPU (--device
cpu), --cpu_jobs at once. Each job logs to <out>/logs/<job>.log.

--grid takes variant training flags, one quoted axis each (the flag, then its values): a variant whose
training takes a gridded flag runs once per combination of the values it takes, named by them, e.g.
<out>/cross_attention_cls-token_level-1_seed<seed> (a folder name is the flag's last word and the value);
the other variants run as without a grid.

A job whose output exists is skipped: training when image_adapter_<image_epoch>.pth exists, an evaluation
when its results JSON exists (delete them to redo one). A stopped sweep (Ctrl-C, SIGTERM) lets its
trainings save; the same command resumes them. When every job succeeded, compare.py writes
<out>/compare_<dataset>.md/.csv for each test dataset: one arm per variant and grid point (labelled like
its runs, without the seed), the first variant's first point being the reference.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cli import add_variant_test_args, cli_main, get_test_parser, get_train_parser, split_argv, test_flags
from engine import check_rerun, run_config
from forward_utils import Variant
from utils.argtypes import positive_int
from utils.errors import UserError, own_message
from variants import VARIANTS

REPO = Path(__file__).resolve().parent
SET_BY_SWEEP = {"train": ("--save_path", "--dataset", "--seed"), "test": ("--save_path", "--dataset", "--results_dir")}


@dataclass
class Job:
    """One script call; done when `output` exists."""
    name: str
    cmd: list[str]
    output: Path
    log: Path


@dataclass
class Run:
    """A training and the evaluations that need it, run in order on one GPU."""
    name: str
    jobs: list[Job]


@dataclass
class Axis:
    """One --grid axis: a variant training flag and its values; `short` names it in run folders."""
    flag: str
    values: list[str]
    short: str


@dataclass
class Arm:
    """A variant with one value for each grid axis it takes: a run per seed, an arm of the comparison."""
    variant: str
    settings: list[tuple[Axis, str]]

    @property
    def name(self) -> str:
        """The variant, then `_<short>-<value>` per axis: "cross_attention_cls-token_level-1"."""
        return self.variant + "".join(f"_{axis.short}-{re.sub(r'[^A-Za-z0-9.+-]+', '-', value)}"
                                      for axis, value in self.settings)

    @property
    def flags(self) -> list[str]:
        return [x for axis, value in self.settings for x in (axis.flag, value)]


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- training flags]")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["baseline", "cross_attention"],
                   help="registered variants to train (variants.py); the first is the reference of the comparison "
                        "(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[111], help="training seeds (default: %(default)s)")
    p.add_argument("--train_dataset", default="VisA", help="training set of every run (default: %(default)s)")
    p.add_argument("--test_datasets", nargs="+", default=["MVTec"],
                   help="datasets every run is evaluated on (default: %(default)s)")
    p.add_argument("--out", default="ckpt/sweep",
                   help="folder of the runs, logs and comparisons (default: %(default)s)")
    p.add_argument("--gpus", nargs="+", default=None,
                   help="GPU ids to use, one job at a time on each (default: every visible GPU; none: the CPU)")
    p.add_argument("--cpu_jobs", type=positive_int, default=1,
                   help="without a GPU: runs at once on the CPU, each job with OMP_NUM_THREADS = cores / this "
                        "unless set (default: %(default)s)")
    p.add_argument("--test_flags", default="",
                   help='extra test.py flags for every evaluation, one string: '
                        '--test_flags="--batch_size 16 --visualize" (default: none)')
    p.add_argument("--grid", nargs="+", default=[], metavar="'--FLAG VALUE ...'",
                   help='variant training flags to grid, one quoted axis each: --grid "--context_cls residual token '
                        'none" "--context_level 0 1"; a variant whose training takes a flag runs once per '
                        "combination, each an arm of the comparison (default: none)")
    p.add_argument("--dry_run", action="store_true",
                   help="list the jobs, done or to do, with their commands, and the comparisons; run nothing")
    return p


def check_flags(flags: list[str], parser: argparse.ArgumentParser, kind: str,
                required: list[str]) -> argparse.Namespace:
    """Parses the extra `kind` flags with the script's own parser (so a typo stops the sweep before it starts)."""
    owned = [f for f in flags if f.split("=")[0] in SET_BY_SWEEP[kind]]
    if owned:
        raise UserError(f"{', '.join(owned)}: the sweep sets {', '.join(SET_BY_SWEEP[kind])} of each {kind} job; "
                        "drop them from the extra flags")
    args, unknown = parser.parse_known_args(required + flags)
    if unknown:
        raise UserError(f"unknown {kind} flag(s) {' '.join(unknown)}; see python "
                        f"{'test.py' if kind == 'test' else 'train.py'} --help")
    return args


def visible_gpus() -> list[str]:
    """The GPU ids a child may be given with CUDA_VISIBLE_DEVICES."""
    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def shared_data_flags(train_flags: list[str], parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """The data flags of the training that its evaluations need too: "all" (--metadata_dir, --num_workers,
    --cache_dir, as given) for every test job, "root" (--data_root) only for a test on the training set, as a
    root is one dataset's folder. Flags in --test_flags come later on the command line and win."""
    given = check_flags(train_flags, parser, "train", [])
    flags = {"all": [], "root": []}
    for dest in ("metadata_dir", "num_workers", "cache_dir"):
        value = getattr(given, dest)
        if value != parser.get_default(dest):
            flags["all"] += [f"--{dest}", str(value)]
    if given.data_root is not None:
        flags["root"] = ["--data_root", given.data_root]
    return flags


def parse_grid(specs: list[str]) -> list[Axis]:
    """--grid's axes: each spec is a flag and its values ("--context_level 0 1"). An axis's short name is the
    flag's last word ("level"), or the whole flag name where two axes share it."""
    axes = []
    for spec in specs:
        words = shlex.split(spec)
        if len(words) < 2 or not words[0].startswith("--"):
            raise UserError(f"--grid {spec!r}: an axis is a flag and its values, e.g. --grid \"--context_cls residual "
                            "token\"")
        axes.append(Axis(words[0], list(dict.fromkeys(words[1:])), words[0][2:].rsplit("_", 1)[-1]))
    flags = [a.flag for a in axes]
    if len(set(flags)) < len(flags):
        raise UserError(f"--grid names a flag twice ({' '.join(flags)}); give each flag one axis with all its values")
    for axis in axes:
        if sum(a.short == axis.short for a in axes) > 1:
            axis.short = axis.flag[2:]
    return axes


def build_arms(variants: list[str], axes: list[Axis], train_flags: list[str]) -> list[Arm]:
    """Every variant once per combination of the values of the axes its training takes (once when it takes
    none). `build_runs` checks each arm's flags with its script's parser."""
    gridded = [f for f in train_flags if f.split("=")[0] in {a.flag for a in axes}]
    if gridded:
        raise UserError(f"{', '.join(gridded)}: set by --grid; drop it from the training flags after --")
    arms = []
    for variant in variants:
        parser = get_train_parser(VARIANTS[variant], "")
        own = [a for a in axes if a.flag in parser._option_string_actions]
        for values in itertools.product(*(a.values for a in own)):
            arms.append(Arm(variant, list(zip(own, values))))
    unused = [a.flag for a in axes if not any(a is axis for arm in arms for axis, _ in arm.settings)]
    if unused:
        raise UserError(f"--grid {', '.join(unused)}: no variant of --variants ({', '.join(variants)}) takes it")
    names = [arm.name for arm in arms]
    if len(set(names)) < len(names):
        raise UserError(f"--grid values give two runs one folder name ({', '.join(names)}); use values that differ "
                        "in letters, digits, '.', '+' or '-'")
    return arms


def build_runs(args: argparse.Namespace, arms: list[Arm], train_flags: list[str], test_flags: list[str],
               test_args: argparse.Namespace, cpu: bool) -> list[Run]:
    """Every (seed, arm) run with its jobs, each arm's training flags checked with its script's parser (a bad
    value stops the sweep before it starts); on the CPU the scripts get --device cpu (a later --device in the
    extra flags wins)."""
    out, logs = Path(args.out), Path(args.out) / "logs"
    device = ["--device", "cpu"] if cpu else []
    epochs = {arm.name: check_flags(train_flags + arm.flags, get_train_parser(VARIANTS[arm.variant], ""), "train",
                                    []).image_epoch for arm in arms}
    if min(epochs.values()) < 1:
        raise UserError("--image_epoch 0 trains no image adapter: nothing to evaluate")
    shared = shared_data_flags(train_flags, get_train_parser(VARIANTS[args.variants[0]], ""))
    runs = []
    for seed in args.seeds:
        for arm in arms:
            variant = VARIANTS[arm.variant]
            name, save = f"{arm.name}_seed{seed}", out / f"{arm.name}_seed{seed}"
            last = test_args.epoch if test_args.epoch is not None else epochs[arm.name]
            options = copy.copy(test_args)
            variant.finish_test_args(options)
            suffix = variant.result_suffix(options)
            script = variant.train_script
            own = ["--variant", arm.variant] if script == "train.py" and arm.variant != "baseline" else []
            jobs = [Job(f"{name} train", [sys.executable, str(REPO / script), *own, "--dataset", args.train_dataset,
                                          "--seed", str(seed), "--save_path", str(save), *device, *train_flags,
                                          *arm.flags],
                        save / f"image_adapter_{epochs[arm.name]}.pth", logs / f"{name}_train.log")]
            for dataset in args.test_datasets:
                jobs.append(Job(f"{name} test {dataset}",
                                [sys.executable, str(REPO / "test.py"), "--save_path", str(save), "--dataset", dataset,
                                 *device, *shared["all"], *(shared["root"] if dataset == args.train_dataset else []),
                                 *test_flags],
                                save / "results" / f"{dataset}_epoch{last}{suffix}.json",
                                logs / f"{name}_test_{dataset}.log"))
            runs.append(Run(name, jobs))
            if jobs[0].output.exists():
                check_finished_training(jobs[0], variant, torch.device("cpu" if cpu else "cuda"))
    return runs


def check_finished_training(job: Job, variant: Variant, device: torch.device) -> None:
    """A finished training is skipped only when its run was trained with the job's flags: the check a rerun
    of train.py makes (`engine.check_rerun`: every result-affecting flag, the weights by hash, the training
    list by content), so that a sweep rerun with other flags into the same --out stops with the differences
    instead of reporting the old runs' results as the new ones."""
    argv = job.cmd[2:]
    if argv[:1] == ["--variant"]:
        argv = argv[2:]
    args = get_train_parser(variant, "").parse_args(argv)
    try:
        check_rerun(Path(args.save_path), run_config(args, variant, device), variant)
    except UserError as e:
        raise UserError(f"{job.name}: {own_message(e)}") from None


class Runner:
    """Runs each `Run`'s jobs in order on one GPU slot, the slots in parallel; stops starting jobs after
    SIGINT/SIGTERM (which the running jobs also get: trainings save and stop)."""

    def __init__(self, slots: list[str | None], cpu_threads: int | None = None):
        self.slots = slots
        self.cpu_threads = cpu_threads
        self.outcome = Outcome()
        self.stopping = threading.Event()
        self.signum = 0
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()

    def run_all(self, runs: list[Run]) -> Outcome:
        queue = list(runs)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            threads = [threading.Thread(target=self._worker, args=(slot, queue)) for slot in self.slots]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.outcome

    def _on_signal(self, signum: int, _frame) -> None:
        self.signum = signum
        self.stopping.set()
        with self.lock:
            for proc in self.running:
                if signum == signal.SIGTERM:  # Ctrl-C reaches the jobs by itself, a SIGTERM only the sweep
                    proc.send_signal(signum)
        print(f"sweep: stopping on signal {signum}; running jobs save and exit, rerun the same command to resume",
              flush=True)

    def _worker(self, slot: str | None, queue: list[Run]) -> None:
        while not self.stopping.is_set():
            with self.lock:
                if not queue:
                    return
                run = queue.pop(0)
            for job in run.jobs:
                if not self._execute(job, slot):
                    break

    def _execute(self, job: Job, slot: str | None) -> bool:
        """Runs `job` unless its output exists; True when it is done."""
        if job.output.exists():
            print(f"skip {job.name}: {job.output} exists", flush=True)
            self.outcome.skipped.append(job.name)
            return True
        if self.stopping.is_set():
            return False
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        elif self.cpu_threads:
            env.setdefault("OMP_NUM_THREADS", str(self.cpu_threads))
        job.log.parent.mkdir(parents=True, exist_ok=True)
        print(f"start {job.name} on {'cpu' if slot is None else f'gpu {slot}'}, log {job.log}", flush=True)
        t0 = time.perf_counter()
        with open(job.log, "a") as log:
            log.write(f"$ {shlex.join(job.cmd)}\n")
            log.flush()
            with self.lock:
                proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                self.running.add(proc)
            code = proc.wait()
            with self.lock:
                self.running.discard(proc)
        if code == 0 and job.output.exists():
            print(f"done {job.name} in {time.perf_counter() - t0:.0f} s", flush=True)
            self.outcome.ran.append(job.name)
            return True
        if self.stopping.is_set():
            print(f"stopped {job.name} (exit {code})", flush=True)
            return False
        why = f"exit {code}" if code else f"exit 0 but no {job.output}"
        print(f"FAILED {job.name} ({why}), see {job.log}", flush=True)
        self.outcome.failed.append(f"{job.name} ({why}): {job.log}")
        return False


def compare_commands(args: argparse.Namespace, arms: list[Arm], test_args: argparse.Namespace) -> list[list[str]]:
    """compare.py per test dataset, one arm per variant and grid point (its seeds' runs)."""
    out = Path(args.out)
    specs = [f"{arm.name}=" + ",".join(str(out / f"{arm.name}_seed{s}") for s in args.seeds) for arm in arms]
    flags = {dest: flag for variant in VARIANTS.values() for dest, flag in test_flags(variant).items()}
    given = [x for dest, flag in flags.items() if getattr(test_args, dest) is not None
             for x in (flag, str(getattr(test_args, dest)))]
    epoch = ["--epoch", str(test_args.epoch)] if test_args.epoch is not None else []
    return [[sys.executable, str(REPO / "compare.py"), *specs, "--dataset", d, "--out", str(out / f"compare_{d}"),
             *given, *epoch] for d in args.test_datasets]


@cli_main
def main() -> None:
    own, train_flags = split_argv(sys.argv[1:])
    args = get_parser().parse_args(own)
    for key in ("variants", "seeds", "test_datasets"):  # a repeated value would run twice into one folder
        setattr(args, key, list(dict.fromkeys(getattr(args, key))))
    test_flags = shlex.split(args.test_flags)
    test_parser = get_test_parser()
    add_variant_test_args(test_parser)
    test_args = check_flags(test_flags, test_parser, "test", ["--save_path", args.out])
    gpus = args.gpus if args.gpus is not None else visible_gpus()
    arms = build_arms(args.variants, parse_grid(args.grid), train_flags)
    runs = build_runs(args, arms, train_flags, test_flags, test_args, cpu=not gpus)
    if args.dry_run:
        for job in (j for r in runs for j in r.jobs):
            print(f"{'done' if job.output.exists() else 'todo'} {job.name}: {shlex.join(job.cmd)}")
        for cmd in compare_commands(args, arms, test_args):
            print(f"then compare: {shlex.join(cmd)}")
        return
    print(f"sweep: {len(runs)} runs on {', '.join(f'gpu {g}' for g in gpus) if gpus else 'the cpu'}", flush=True)
    runner = (Runner(gpus) if gpus else
              Runner([None] * args.cpu_jobs, cpu_threads=max(1, (os.cpu_count() or 1) // args.cpu_jobs)))
    outcome = runner.run_all(runs)
    print(f"sweep: {len(outcome.ran)} jobs ran, {len(outcome.skipped)} skipped (done before), "
          f"{len(outcome.failed)} failed", flush=True)
    if outcome.failed:
        raise UserError("failed jobs (rerun the same command to retry them; finished jobs are skipped):\n  "
                        + "\n  ".join(outcome.failed))
    if runner.signum:
        sys.exit(128 + runner.signum)
    for cmd in compare_commands(args, arms, test_args):
        if subprocess.call(cmd) != 0:
            raise UserError(f"compare.py failed: {shlex.join(cmd)}")


if __name__ == "__main__":
    main()
