"""Draw a run's training history (`<save_path>/metrics.jsonl`, written by training after every epoch).

    python -m tools.plot_history --save_path ckpt/baseline                  # -> ckpt/baseline/curves.png
    python -m tools.plot_history --save_path ckpt/cross_attention --out curves_cross.png

One row per stage: the mean loss per epoch with each of its terms, the mean gradient norm of each trained
module group (log scale), and the learning rate. Training logs this command when it ends.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from cli import RANDOM_WEIGHTS_BANNER, cli_main
from engine import HISTORY_FILE
from utils.errors import UserError
from utils.io import write_output
from variants import read_saved_args



def read_history(save_dir: Path) -> dict[str, list[dict]]:
    """The records of `<save_dir>/metrics.jsonl` by stage, in epoch order; a torn line (a crash while
    appending) is left out, and a (stage, epoch) written twice keeps its last record."""
    path = save_dir / HISTORY_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: runs write it after every epoch since training history was added; "
                        "train (or resume) the run to get one")
    by_key: dict[tuple[str, int], dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_key[(record["stage"], record["epoch"])] = record
    stages: dict[str, list[dict]] = {}
    for (stage, _), record in sorted(by_key.items()):
        stages.setdefault(stage, []).append(record)
    if not stages:
        raise UserError(f"{path} holds no epoch yet")
    return stages


def history_figure(stages: dict[str, list[dict]], title: str) -> bytes:
    """PNG: a row per stage with panels loss (total and terms), gradient norm per group (log scale),
    learning rate, against the epoch. Drawn at the end of every training, so kept cheap (a quarter of a
    second): a fixed layout and legend place, plain tick labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow to import, only needed here
    from matplotlib.figure import Figure  # not pyplot: no global state, no display backend
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter

    title_inches = 0.3 + 0.22 * (title.count("\n") + 1)
    height = 2.6 * len(stages) + 0.5 + title_inches
    fig = Figure(figsize=(11, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(stages), 3, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / height, top=1 - title_inches / height, hspace=0.55,
                        wspace=0.25)
    for row, (stage, records) in zip(axes, stages.items()):
        epochs = [r["epoch"] for r in records]
        loss_ax, norm_ax, lr_ax = row
        loss_ax.plot(epochs, [r["loss"] for r in records], "o-", color="k", label="total")
        for name in records[-1]["loss_terms"]:
            loss_ax.plot(epochs, [r["loss_terms"].get(name) for r in records], ".--", label=name)
        for name in records[-1]["grad_norm"]:
            norm_ax.plot(epochs, [r["grad_norm"].get(name) for r in records], "o-", label=name)
        positive = [v for r in records for v in r["grad_norm"].values() if v]
        if positive and max(positive) > 10 * min(positive):  # groups of different scales: a log axis
            norm_ax.set_yscale("log")
            norm_ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # plain text: mathtext is slow
            norm_ax.yaxis.set_minor_formatter(NullFormatter())
        for i in range(len(records[-1]["lr"])):
            lr_ax.plot(epochs, [r["lr"][i] if i < len(r["lr"]) else None for r in records], "o-",
                       label=f"group {i}")
        for ax, what in ((loss_ax, "loss"), (norm_ax, "mean gradient norm"), (lr_ax, "learning rate")):
            ax.set_title(f"{stage}: {what}", fontsize="medium")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(loc="upper right", fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    return buffer.getvalue()


def plot_history(save_dir: Path, out: Path | None = None) -> Path:
    """Writes the history figure of the run in `save_dir` to `out` (default `<save_dir>/curves.png`),
    atomically; returns its path. A run with random backbone weights says so in the title."""
    out = out or save_dir / "curves.png"
    title = f"training history of {save_dir}"
    if read_saved_args(save_dir).get("pretrained") == "none":
        title += f"\n{RANDOM_WEIGHTS_BANNER}"
    write_output(history_figure(read_history(save_dir), title), out, "--out")
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_path", required=True, help="the run's folder (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="the PNG to write (default: <save_path>/curves.png)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return p


@cli_main
def main() -> None:
    args = get_parser().parse_args()
    print(f"saved {plot_history(Path(args.save_path), Path(args.out) if args.out else None)}")


if __name__ == "__main__":
    main()
