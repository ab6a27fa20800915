"""sweep.py on the CPU with the tiny model: 2 variants x 1 seed, finished jobs skipped, failures listed.
The sweep runs in-process; its jobs are real subprocesses."""
import sys

import pytest

import sweep
from conftest import tiny_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("data"))


@pytest.fixture
def run_sweep(data, monkeypatch, capsys):
    """Runs sweep.main() on the CPU; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data_flags = ["--data_root", str(data / "syn"), "--metadata_dir", str(data / "meta"), "--num_workers", "0"]
    tiny = ["--model", "tiny", "--image_size", "56", "--shot", "2", "--text_epoch", "1", "--image_epoch", "1",
            "--text_batch_size", "2", "--image_batch_size", "2", *data_flags]

    def run(out, *extra, train=tiny):
        monkeypatch.setattr(sys, "argv", ["sweep.py", "--seeds", "1", "--train_dataset", "Synthetic", "--test_datasets",
                                          "Synthetic", "--out", str(out), f"--test_flags={' '.join(data_flags)}",
                                          *extra, "--", *train])
        capsys.readouterr()
        code = 0
        try:
            sweep.main()
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def test_sweep_runs_skips_and_compares(run_sweep, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, stderr = run_sweep(out)
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    assert "on the cpu" in stdout and "4 jobs ran, 0 skipped" in stdout
    results = {out / "baseline_seed1" / "results" / "Synthetic_epoch1.json",
               out / "cross_attention_seed1" / "results" / "Synthetic_epoch1_image.json"}
    assert all(p.exists() for p in results)
    report = (out / "compare_Synthetic.md").read_text()
    assert "| mean " in report and "baseline vs cross_attention" in report
    assert (out / "logs" / "cross_attention_seed1_train.log").read_text().startswith("$ ")
    checkpoint = out / "baseline_seed1" / "image_adapter_1.pth"
    mtime = checkpoint.stat().st_mtime_ns

    (out / "cross_attention_seed1" / "results" / "Synthetic_epoch1_image.json").unlink()
    code, stdout, stderr = run_sweep(out)
    assert code == 0, stderr[-2000:]
    assert "1 jobs ran, 3 skipped" in stdout and "start cross_attention_seed1 test Synthetic" in stdout
    assert checkpoint.stat().st_mtime_ns == mtime and all(p.exists() for p in results)

    code, stdout, _ = run_sweep(out, "--dry_run")
    assert code == 0 and stdout.count("done ") == 4 and "todo" not in stdout


def test_failed_jobs_are_listed_and_nothing_is_compared(run_sweep, data, tmp_path):
    out = tmp_path / "sweep"
    bad = ["--model", "tiny", "--image_size", "56", "--data_root", str(tmp_path / "missing"), "--metadata_dir",
           str(data / "meta"), "--num_workers", "0"]
    code, _, stderr = run_sweep(out, "--variants", "baseline", train=bad)
    assert code == 2 and "failed jobs" in stderr and "baseline_seed1 train (exit 2)" in stderr
    assert "dataset root not found" in (out / "logs" / "baseline_seed1_train.log").read_text()
    assert not (out / "compare_Synthetic.md").exists()


def test_flags_the_sweep_sets_are_refused(run_sweep, tmp_path):
    code, _, stderr = run_sweep(tmp_path / "sweep", train=["--seed", "3"])
    assert code == 2 and "the sweep sets --save_path, --dataset, --seed" in stderr
    code, _, stderr = run_sweep(tmp_path / "sweep", train=["--image_epochs", "3"])
    assert code == 2 and "unknown train flag(s) --image_epochs" in stderr
    assert not (tmp_path / "sweep").exists()
