"""Shared helpers of the test suite."""
from pathlib import Path

from dataset.make_metadata import build_metadata
from dataset.synthetic import make_synthetic


def tiny_synthetic(root: Path, n_normal: int = 3) -> Path:
    """Two synthetic classes (disc, stripes) of 64 px, `n_normal` normal + 3 anomalous test images each,
    with `<root>/meta/Synthetic/{full,2}-shot.jsonl`. Returns `root`."""
    make_synthetic(str(root / "syn"), seed=0, size=64, n_normal=n_normal, n_anomalous=3, n_train=0,
                   classes=["disc", "stripes"])
    build_metadata("Synthetic", str(root / "syn"), layout="mvtec", out_dir=str(root / "meta"), shots=(2,))
    return root
