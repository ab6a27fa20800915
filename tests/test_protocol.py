"""protocol.py: the plan (its sweeps' dry runs, through sweep.py in-process), the stand-ins, and the report
assembled from compare.py's outputs of hand-made runs, checked against the inputs and compare's own tables."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

import cli
import compare
import protocol
import sweep
from cli import RANDOM_WEIGHTS_BANNER
from conftest import run_main
from dataset.common import get_dataset_info, resolve_root
from dataset.synthetic import MARKER
from metrics import METRIC_NAMES, mean_metrics
from utils.stats import bootstrap_ci, bootstrap_diff_ci


def run(module, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """A script's main() in-process -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    try:
        module.main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_plans_both_directions_through_sweep(tmp_path, monkeypatch, capsys):
    """--stand_ins --dry_run: one sweep per direction, each run by sweep.py (in-process here) as a dry run;
    the stand-ins' tiny training comes first, the flags after `--` override it; nothing is written."""
    commands = []

    def sweep_in_process(cmd: list[str]) -> int:
        commands.append(cmd)
        assert Path(cmd[1]).name == "sweep.py"
        monkeypatch.setattr(sys, "argv", cmd[1:])
        sweep.main()
        return 0

    monkeypatch.setattr(protocol, "run_sweep", sweep_in_process)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "protocol"
    code, stdout, _ = run(protocol, ["--stand_ins", "--seeds", "1", "2", "--medical", "Brain", "Colon_Kvasir",
                                     "--out", str(out), "--dry_run", "--", "--image_epoch", "2"], monkeypatch, capsys)
    assert code == 0
    visa, mvtec = commands
    head, train_flags = visa[:visa.index("--")], visa[visa.index("--") + 1:]
    assert " ".join(head).endswith(f"--train_dataset VisA --test_datasets MVTec BTAD MPDD Brain Colon_Kvasir --out "
                                   f"{out / 'from_VisA'} --cpu_jobs 1 --dry_run")
    assert "--variants baseline cross_attention --seeds 1 2" in " ".join(head)
    assert train_flags == [*protocol.STAND_IN_TRAINING, "--metadata_dir", str(out / "metadata"), "--image_epoch", "2"]
    assert "--train_dataset MVTec --test_datasets VisA --out" in " ".join(mvtec)
    # sweep.py's plan: per direction 2 variants x 2 seeds, a training and one evaluation per test set each
    todo = [line for line in stdout.splitlines() if line.startswith("todo ")]
    assert len(todo) == 4 * (1 + 5) + 4 * (1 + 1)
    assert "todo cross_attention_seed2 test Colon_Kvasir:" in stdout and "todo baseline_seed1 test VisA:" in stdout
    train = next(line for line in todo if line.startswith("todo baseline_seed1 train") and "--dataset VisA" in line)
    assert train.endswith(f"--metadata_dir {out / 'metadata'} --image_epoch 2")  # the later --image_epoch wins
    assert stdout.count("then compare:") == 5 + 1
    assert not out.exists()


def test_the_default_plan_is_the_protocol():
    """VisA -> MVTec, BTAD, MPDD and every medical set; MVTec -> VisA; real runs get the flags as given."""
    directions = protocol.plan(protocol.INDUSTRIAL_TESTS, protocol.medical_sets())
    assert [(d.train, d.tests) for d in directions] == [
        ("VisA", ["MVTec", "BTAD", "MPDD", "Brain", "Liver", "Retina", "Colon_clinicDB", "Colon_colonDB",
                  "Colon_Kvasir", "Colon_cvc300"]), ("MVTec", ["VisA"])]
    args = protocol.get_parser().parse_args([])
    assert protocol.training_flags(args, ["--pretrained", "w.pt"]) == ["--pretrained", "w.pt"]


@pytest.mark.parametrize("argv,message", [
    (["--medical", "MVTec"], "--medical MVTec: not in the medical domain"),
    (["--industrial", "Brain"], "--industrial Brain: not in the industrial domain"),
    (["--industrial", "--medical"], "nothing to test the VisA-trained runs on"),
])
def test_test_sets_under_the_wrong_flag_are_refused(argv, message, tmp_path, monkeypatch, capsys):
    code, _, stderr = run(protocol, [*argv, "--out", str(tmp_path / "p"), "--stand_ins"], monkeypatch, capsys)
    assert code == 2 and stderr.startswith("error: ") and message in stderr, stderr
    assert not (tmp_path / "p").exists()


def test_every_flag_has_help_with_its_default():
    for action in protocol.get_parser()._actions:
        if action.option_strings != ["-h", "--help"]:
            assert action.help and "default" in action.help.lower(), action.option_strings


def test_stand_ins_are_found_through_their_recorded_root(tmp_path):
    """A medical stand-in: one class, full-shot and 2-shot lists, its root recorded beside them."""
    protocol.build_stand_ins(tmp_path, ["Brain"])
    spec = protocol.stand_in("Brain")
    assert len(spec["classes"]) == 1 and get_dataset_info("Brain")["domain"] == "Medical"
    assert len(protocol.stand_in("VisA")["classes"]) == 2
    lines = [json.loads(x) for x in (tmp_path / "metadata" / "Brain" / "full-shot.jsonl").read_text().splitlines()]
    assert {x["class_name"] for x in lines} == set(spec["classes"]) and len(lines) == 6
    assert (tmp_path / "metadata" / "Brain" / "2-shot.jsonl").is_file()
    assert resolve_root(None, tmp_path / "metadata", "Brain") == str((tmp_path / "data" / "Brain").resolve())


# --- the report from compare.py's outputs ------------------------------------------------------------------

def per_class(classes: list[str], base: float, image: bool = True) -> dict:
    """Known values: class i gets base + i for every metric; image metrics n/a when not `image` (a test set
    whose images are all anomalous)."""
    return {c: {m: (None if m.startswith("image") and not image else base + i) for m in METRIC_NAMES}
            for i, c in enumerate(classes)}


def write_run(folder: Path, seed: int, results: dict[str, dict], random_weights: bool) -> str:
    """A run as train.py + test.py leave it: args.json and a result JSON per test set."""
    (folder / "results").mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"variant": "baseline", "seed": seed}))
    for dataset, values in results.items():
        meta = {"dataset": dataset, "epoch": 1, "variant": "baseline", "random_weights": random_weights,
                "epoch_selection": "last"}
        (folder / "results" / f"{dataset}_epoch1.json").write_text(
            json.dumps({"meta": meta, "per_class": values, "mean": mean_metrics(values)}))
    return str(folder)


# (direction, arm, seed) -> base value of its runs; seeds 1, 2 against 1, 3: pairs in one direction, none in the other
BASES = {("VisA", "baseline", 1): 60.0, ("VisA", "baseline", 2): 70.0,
         ("VisA", "cross_attention", 1): 64.0, ("VisA", "cross_attention", 2): 71.0,
         ("MVTec", "baseline", 1): 50.0, ("MVTec", "baseline", 2): 52.0,
         ("MVTec", "cross_attention", 1): 55.0, ("MVTec", "cross_attention", 3): 58.0}


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, list]:
    """Hand-made runs of both directions (the MVTec-trained ones with random weights) and compare.py's
    reports of them, where sweep.py would leave them. Tests add only the protocol's own report."""
    out = tmp_path_factory.mktemp("protocol")
    directions = [protocol.Direction("VisA", ["MVTec", "Colon_Kvasir"]), protocol.Direction("MVTec", ["VisA"])]
    for d in directions:
        arms: dict[str, list[str]] = {}
        for (train, arm, seed), base in BASES.items():
            if train == d.train:
                results = {"MVTec": per_class(["bottle", "wood"], base), "VisA": per_class(["candle", "pcb1"], base),
                           "Colon_Kvasir": per_class(["Kvasir"], base, image=False)}
                arms.setdefault(arm, []).append(write_run(out / d.folder / f"{arm}_seed{seed}", seed, results,
                                                          random_weights=train == "MVTec"))
        for test in d.tests:
            run_main(compare, [f"{arm}={','.join(paths)}" for arm, paths in arms.items()]
                     + ["--dataset", test, "--out", str(out / d.folder / f"compare_{test}")])
    return out, directions


def table_row(report: str, metric: str, pair: str) -> list[str]:
    section = report.split(f"## {metric}\n")[1].split("\n## ")[0]
    line = next(x for x in section.splitlines() if x.startswith(f"| {pair} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def mean_row(compare_md: str, metric: str) -> list[str]:
    """compare.py's mean row of `metric`: the arms' `mean ± std [CI]` cells and the Δ cell."""
    section = compare_md.split(f"## {metric}\n")[1].split("\n## ")[0]
    line = next(x for x in section.splitlines() if x.startswith("| mean ("))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def cell(value: float, ci, spec: str = ".2f") -> str:
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def test_report_values_are_the_inputs_and_compares_mean_rows(compared):
    out, directions = compared
    assert protocol.write_report(out, directions) == [out / "protocol_forest.png", out / "protocol.md"]
    text = (out / "protocol.md").read_text()
    # VisA -> MVTec: class values base, base + 1, so a run's mean is base + 0.5; pairs by seed
    row = table_row(text, "pixel_auroc", "VisA → MVTec")
    base, cross = [60.5, 70.5], [64.5, 71.5]
    assert row[1:4] == ["2", "2", cell(65.5, bootstrap_ci(base, 10_000, 0))]
    assert row[4] == cell(68.0, bootstrap_ci(cross, 10_000, 0))
    assert row[5] == cell(2.5, bootstrap_ci([4.0, 1.0], 10_000, 0), "+.2f")  # seed 1's Δ, then seed 2's
    assert row[6] == "[md](from_VisA/compare_MVTec.md), [forest](from_VisA/compare_MVTec_forest.png)"
    ours = table_row(text, "image_ap", "VisA → MVTec")
    theirs = mean_row((out / "from_VisA" / "compare_MVTec.md").read_text(), "image_ap")
    assert [re.sub(r" ± [\d.]+", "", c) for c in theirs] == ours[3:6]
    # a test set without normal images: image metrics n/a, the classes that define them 0 of 1
    assert table_row(text, "image_auroc", "VisA → Colon_Kvasir")[2:6] == ["0 of 1", "n/a", "n/a", "n/a"]
    assert table_row(text, "pixel_ap", "VisA → Colon_Kvasir")[2] == "1"
    # MVTec -> VisA: seeds 1, 2 against 1, 3 have no partner each: an unpaired interval, as compare.py's
    row = table_row(text, "pixel_aupro", "MVTec → VisA")
    assert row[5] == cell(5.5, bootstrap_diff_ci([55.5, 58.5], [50.5, 52.5], 10_000, 0), "+.2f")
    assert row[5] == mean_row((out / "from_MVTec" / "compare_VisA.md").read_text(), "pixel_aupro")[2]
    # labels: random weights only where compare.py put the banner; every metric; the plot
    banner = next(x for x in text.splitlines() if RANDOM_WEIGHTS_BANNER in x)
    assert banner.endswith("(MVTec → VisA)") and "STAND-INS" not in text and "Epochs: last " in text
    assert [x[3:] for x in text.splitlines() if x.startswith("## ")] == METRIC_NAMES
    assert (out / "protocol_forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stand_ins_are_labelled_by_their_data_and_a_missing_comparison_is_an_error(compared, tmp_path):
    """The label comes from the data (a rerun without --stand_ins skips the finished runs of stand-ins)."""
    out, directions = compared
    out = Path(shutil.copytree(out, tmp_path / "protocol"))
    for name in ("VisA", "Colon_Kvasir"):
        (out / "data" / name).mkdir(parents=True)
        (out / "data" / name / MARKER).touch()
    protocol.write_report(out, directions)
    banner = next(x for x in (out / "protocol.md").read_text().splitlines() if "STAND-INS" in x)
    assert banner.startswith("**SYNTHETIC STAND-INS (--stand_ins): VisA, Colon_Kvasir are small synthetic")
    with pytest.raises(protocol.UserError, match="the sweep of VisA did not compare BTAD"):
        protocol.write_report(out, [protocol.Direction("VisA", ["MVTec", "BTAD"])])


def test_split_argv():
    assert cli.split_argv(["--seeds", "1", "--", "--pretrained", "w"]) == (["--seeds", "1"], ["--pretrained", "w"])
    assert cli.split_argv(["--dry_run"]) == (["--dry_run"], [])
