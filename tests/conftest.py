"""What the test modules share: one synthetic dataset and one pair of trained tiny runs per session.

Tests never change `data` or `runs`; a test that writes into a run works on `copy_run(name)`.
"""
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import train
import train_cross_attention
from dataset.make_metadata import build_metadata
from dataset.synthetic import make_synthetic


# One intra-op thread: the tiny models gain nothing from two, and while a test's subprocesses hold the other
# core, a second thread that waits on the first makes small operations many times slower.
torch.set_num_threads(1)


def tiny_synthetic(root: Path, n_normal: int = 3) -> Path:
    """Two synthetic classes (disc, stripes) of 64 px, `n_normal` normal + 3 anomalous test images each,
    with `<root>/meta/Synthetic/{full,2}-shot.jsonl`. Returns `root`."""
    make_synthetic(str(root / "syn"), seed=0, size=64, n_normal=n_normal, n_anomalous=3, n_train=0,
                   classes=["disc", "stripes"])
    build_metadata("Synthetic", str(root / "syn"), layout="mvtec", out_dir=str(root / "meta"), shots=(2,))
    return root


def data_args(data: Path) -> list[str]:
    """The flags that point a script at `data` on the CPU."""
    return ["--dataset", "Synthetic", "--data_root", str(data / "syn"), "--metadata_dir", str(data / "meta"),
            "--num_workers", "0", "--device", "cpu"]


def train_args(data: Path, save: Path) -> list[str]:
    """A tiny 2-shot training (56 px, batches of 2, one epoch per stage) into `save`."""
    return data_args(data) + ["--model", "tiny", "--image_size", "56", "--shot", "2", "--text_batch_size", "2",
                              "--image_batch_size", "2", "--text_epoch", "1", "--image_epoch", "1",
                              "--save_path", str(save)]


class NotClean(AssertionError):
    """The script did not stop with exit code 2 and an `error:` message free of tracebacks."""


class LeftBehind(AssertionError):
    """The failed run created or changed files."""


def fail(module, argv: list[str], monkeypatch, capsys) -> str:
    """Runs `module.main()` with `argv` and returns its error message (from `error:` on)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    monkeypatch.delenv("AACLIP_DEBUG", raising=False)
    capsys.readouterr()
    try:
        module.main()
    except SystemExit as e:
        err = capsys.readouterr().err
        if e.code != 2 or "error:" not in err or "Traceback" in err:
            raise NotClean(f"exit code {e.code}, stderr:\n{err}") from None
        return err[err.index("error:"):]
    except Exception as e:
        raise NotClean(f"{type(e).__name__} escaped: {e}") from e
    raise NotClean("the run succeeded")


def listing(path: Path) -> dict | None:
    """Every entry under `path` (files with size and mtime); None when `path` does not exist."""
    if not path.exists():
        return None
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in path.rglob("*")}


def assert_unchanged(path: Path, before: dict | None) -> None:
    after = listing(path)
    if after != before:
        new = sorted(set(after or {}) - set(before or {}))
        changed = sorted(k for k in set(after or {}) & set(before or {}) if after[k] != before[k])
        raise LeftBehind(f"{path}: created {new}, changed {changed}")


def has(msg: str, *words: str) -> None:
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"


def run_main(module: ModuleType, argv: list[str]) -> None:
    """Runs a script's `main()` in-process with `argv`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [module.__name__ + ".py", *argv])
        module.main()


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """`tiny_synthetic`: 2 classes of 3 normal + 3 anomalous test images (12 in all)."""
    return tiny_synthetic(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def runs(data, tmp_path_factory) -> Path:
    """`<runs>/baseline` (Stage 1: 1 epoch, Stage 2: 2 epochs) and `<runs>/cross_attention` (1 + 1, with
    --sanity_check), trained with `train_args`."""
    out = tmp_path_factory.mktemp("runs")
    run_main(train, train_args(data, out / "baseline") + ["--image_epoch", "2"])
    run_main(train_cross_attention, train_args(data, out / "cross_attention") + ["--sanity_check"])
    return out


@pytest.fixture
def copy_run(runs, tmp_path):
    """`copy_run(name)`: a copy of `<runs>/<name>` that the test may change."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(runs / name, tmp_path / name))
    return copy
