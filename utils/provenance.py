"""What produced a number: the code version, the package versions and the content of the inputs (weight
file, metadata lists). Every run's args.json and every results JSON carry this manifest."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "open_clip_torch", "numpy", "scipy", "scikit-learn", "pillow")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (under a second for ViT-L's 890 MB once the file is in the page cache)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_digest(pretrained: str) -> str | None:
    """SHA-256 of a local weight file; None for 'none' (random weights, fixed by the seed) and for an
    open_clip tag such as 'openai' (fixed by its name)."""
    path = Path(pretrained)
    return sha256_file(path) if pretrained != "none" and path.is_file() else None


def code_version() -> dict:
    """{"commit": HEAD's hash, "modified": whether tracked or untracked files differ from it}; the commit
    is None outside a git checkout (an unpacked archive)."""
    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "modified": None}
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "modified": None if status is None else bool(status.strip())}


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def manifest(pretrained: str, metadata_files: dict[str, Path], weights_sha256: str | None = None) -> dict:
    """The code, the packages and the inputs' hashes; `metadata_files` maps a list's name
    (`<dataset>/<k>-shot.jsonl`, which stays the same when the folder moves) to its path. Pass
    `weights_sha256` when it is already known, to hash the weight file once."""
    return {"code": code_version(), "packages": package_versions(),
            "weights_sha256": weights_sha256 if weights_sha256 is not None else weights_digest(pretrained),
            "metadata_sha256": {name: sha256_file(p) for name, p in metadata_files.items()}}
