"""sweep.py on the CPU with the tiny model: 2 variants x 1 seed end to end; finished jobs skipped, failures listed;
grids of variant flags (dry runs). The sweep runs in-process; its jobs are real subprocesses."""
import shlex
import sys

import pytest

import sweep


@pytest.fixture
def run_sweep(data, monkeypatch, capsys):
    """Runs sweep.main() on the CPU; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data_flags = ["--data_root", str(data / "syn"), "--metadata_dir", str(data / "meta"), "--num_workers", "0"]
    tiny = ["--model", "tiny", "--image_size", "56", "--shot", "2", "--text_epoch", "1", "--image_epoch", "1",
            "--text_batch_size", "2", "--image_batch_size", "2", *data_flags]

    def run(out, *extra, train=tiny, more_train=()):
        monkeypatch.setattr(sys, "argv", ["sweep.py", "--seeds", "1", "--train_dataset", "Synthetic", "--test_datasets",
                                          "Synthetic", "--out", str(out), *extra, "--", *train, *more_train])
        capsys.readouterr()
        code = 0
        try:
            sweep.main()
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def test_sweep_runs_and_compares(run_sweep, data, tmp_path):
    """Both runs at once on the CPU; the evaluations get the training's data flags."""
    out = tmp_path / "sweep"
    code, stdout, stderr = run_sweep(out, "--cpu_jobs", "2")
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    assert "on the cpu" in stdout and "4 jobs ran, 0 skipped" in stdout
    command = (out / "logs" / "baseline_seed1_test_Synthetic.log").read_text().splitlines()[0]
    assert f"--metadata_dir {data / 'meta'} --num_workers 0 --data_root {data / 'syn'}" in command
    results = {out / "baseline_seed1" / "results" / "Synthetic_epoch1.json",
               out / "cross_attention_seed1" / "results" / "Synthetic_epoch1_image.json"}
    assert all(p.exists() for p in results)
    report = (out / "compare_Synthetic.md").read_text()
    assert "| mean " in report and "baseline vs cross_attention" in report
    assert (out / "logs" / "cross_attention_seed1_train.log").read_text().startswith("$ ")

    (out / "cross_attention_seed1" / "results" / "Synthetic_epoch1_image.json").unlink()
    code, stdout, _ = run_sweep(out, "--dry_run")
    assert code == 0 and stdout.count("done ") == 3 and stdout.count("todo ") == 1
    assert "todo cross_attention_seed1 test Synthetic" in stdout

    # The same --out with another training flag: the finished runs are not reported as the new ones.
    code, stdout, stderr = run_sweep(out, more_train=["--image_lr", "0.001"])
    assert code == 2 and "baseline_seed1 train:" in stderr and "--image_lr: 0.0005 then, 0.001 now" in stderr
    assert "start " not in stdout


def test_failed_jobs_are_listed_and_nothing_is_compared(run_sweep, tmp_path, monkeypatch):
    """A training job that exits 2 (a stand-in process, as a real one would after a bad --data_root): its
    run's evaluation is not started, the failure is listed with its log, nothing is compared."""
    real_build = sweep.build_runs

    def failing_training(*args, **kwargs):
        runs = real_build(*args, **kwargs)
        runs[0].jobs[0].cmd = [sys.executable, "-c", "import sys; print('error: dataset root not found'); sys.exit(2)"]
        return runs
    monkeypatch.setattr(sweep, "build_runs", failing_training)
    out = tmp_path / "sweep"
    code, stdout, stderr = run_sweep(out, "--variants", "baseline")
    assert code == 2 and "failed jobs" in stderr and "baseline_seed1 train (exit 2)" in stderr
    assert "dataset root not found" in (out / "logs" / "baseline_seed1_train.log").read_text()
    assert "start baseline_seed1 test" not in stdout and not (out / "compare_Synthetic.md").exists()


def test_flags_the_sweep_sets_are_refused(run_sweep, tmp_path):
    code, _, stderr = run_sweep(tmp_path / "sweep", train=["--seed", "3"])
    assert code == 2 and "the sweep sets --save_path, --dataset, --seed" in stderr
    code, _, stderr = run_sweep(tmp_path / "sweep", train=["--image_epochs", "3"])
    assert code == 2 and "unknown train flag(s) --image_epochs" in stderr
    assert not (tmp_path / "sweep").exists()


def test_data_root_goes_only_to_tests_on_the_training_set(run_sweep, data, tmp_path):
    code, stdout, _ = run_sweep(tmp_path / "sweep", "--test_datasets", "Synthetic", "MVTec", "--dry_run")
    tests = {line.split(":")[0]: line for line in stdout.splitlines() if " test " in line.split(":")[0]}
    assert code == 0 and len(tests) == 4
    for name, line in tests.items():
        assert f"--metadata_dir {data / 'meta'}" in line
        assert (f"--data_root {data / 'syn'}" in line) == name.endswith("Synthetic"), line


def test_runner_skips_done_jobs_and_stops_a_run_at_its_first_failure(tmp_path, capsys):
    """Jobs as stand-in processes: a done job is skipped (its command never runs), a run stops at a failed
    job, the other run goes on."""
    def job(name, code, done=False):
        output = tmp_path / f"{name}.out"
        if done:
            output.write_text("")
        script = f"import pathlib, sys; pathlib.Path({str(output)!r}).write_text('x'); sys.exit({code})"
        return sweep.Job(name, [sys.executable, "-c", script], output, tmp_path / "logs" / f"{name}.log")

    runs = [sweep.Run("a", [job("a_train", 0, done=True), job("a_test", 0)]),
            sweep.Run("b", [job("b_train", 3), job("b_test", 0)])]
    outcome = sweep.Runner([None]).run_all(runs)
    assert outcome.skipped == ["a_train"] and outcome.ran == ["a_test"]
    assert outcome.failed == [f"b_train (exit 3): {tmp_path / 'logs' / 'b_train.log'}"]
    assert (tmp_path / "a_train.out").read_text() == "" and not (tmp_path / "b_test.out").exists()
    assert "skip a_train" in capsys.readouterr().out


def test_grid_runs_one_arm_per_point_named_by_its_values(run_sweep, tmp_path):
    """--grid on the variants that take its flags: runs named by the values, each flag in its training command,
    one compare arm per point; the baseline runs once."""
    out = tmp_path / "sweep"
    code, stdout, stderr = run_sweep(out, "--grid", "--context_cls residual token none", "--context_level 0 1",
                                     "--dry_run")
    assert code == 0, stderr
    points = [(c, lv) for c in ("residual", "token", "none") for lv in ("0", "1")]
    names = ["baseline"] + [f"cross_attention_cls-{c}_level-{lv}" for c, lv in points]
    trains = [shlex.split(line.split(": ", 1)[1]) for line in stdout.splitlines() if line.startswith("todo ")
              and line.split(":")[0].endswith(" train")]
    assert [cmd[cmd.index("--save_path") + 1] for cmd in trains] == [str(out / f"{n}_seed1") for n in names]
    assert "--context_cls" not in trains[0] and trains[0][1].endswith("train.py")
    for cmd, (context_cls, level) in zip(trains[1:], points):
        assert cmd[1].endswith("train_cross_attention.py")
        assert cmd[cmd.index("--context_cls") + 1] == context_cls and cmd[cmd.index("--context_level") + 1] == level
    compares = [shlex.split(line.removeprefix("then compare: ")) for line in stdout.splitlines()
                if line.startswith("then compare: ")]
    assert len(compares) == 1
    arms = compares[0][2:compares[0].index("--dataset")]
    assert arms == [f"{n}={out / f'{n}_seed1'}" for n in names]
    assert not out.exists()


def test_grid_without_a_grid_keeps_the_plain_names(run_sweep, tmp_path):
    code, stdout, _ = run_sweep(tmp_path / "sweep", "--dry_run")
    compare = next(line for line in stdout.splitlines() if line.startswith("then compare: "))
    assert code == 0 and f"baseline={tmp_path / 'sweep' / 'baseline_seed1'} " in compare
    assert f"cross_attention={tmp_path / 'sweep' / 'cross_attention_seed1'} " in compare


@pytest.mark.parametrize("extra,train,message", [
    (["--variants", "baseline", "--grid", "--context_cls token none"], [], "no variant of --variants (baseline) takes it"),
    (["--grid", "context_cls token"], [], "an axis is a flag and its values"),
    (["--grid", "--context_level 0 1"], ["--context_level", "1"], "--context_level: set by --grid"),
    (["--grid", "--context_cls both"], [], "argument --context_cls: invalid choice: 'both'"),
])
def test_bad_grids_are_refused_before_anything_runs(run_sweep, tmp_path, extra, train, message):
    code, _, stderr = run_sweep(tmp_path / "sweep", *extra, "--dry_run", train=train)
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "sweep").exists()
