"""Train AA-CLIP: Stage 1 (text adapters) then Stage 2 (image adapters).

    python train.py --dataset VisA --pretrained ViT-L-14-336px.pt --save_path ckpt/baseline
    torchrun --standalone --nproc_per_node 2 train.py ...   # the same run on 2 GPUs

Under torchrun each global batch (--text_batch_size, --image_batch_size) is split across the processes
and the step is that of the whole batch; rank 0 logs and writes the checkpoints. `--variant` trains a
registered variant that has no script of its own (see variants.py).
"""
from __future__ import annotations

import argparse

from cli import cli_main, get_train_parser
from engine import start_run, train_image_adapter, train_text_adapter
from variants import VARIANTS, get_variant


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The baseline's flags, or those of the variant named by --variant."""
    own = sorted(name for name, v in VARIANTS.items() if v.train_script == "train.py")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--variant", choices=own, default="baseline")
    name = pre.parse_known_args(argv)[0].variant
    parser = get_train_parser(get_variant(name), __doc__)
    parser.add_argument("--variant", choices=own, default="baseline",
                        help="the registered variant to train (default: %(default)s); variants with a script of "
                             "their own (train_cross_attention.py) train there")
    return parser.parse_args(argv)


@cli_main
def main() -> None:
    args = parse_args()
    with start_run(args, get_variant(args.variant)) as run:
        train_text_adapter(run)
        train_image_adapter(run)
        run.logger.info(f"done: checkpoints in {run.save_dir}")


if __name__ == "__main__":
    main()
