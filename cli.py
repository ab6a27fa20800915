"""What every entry point shares: its flags, building the model and the data from them, reading a
trained run's saved flags, and turning user mistakes into one `error:` line."""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from dataset import ADDataset
from dataset.check import validate_dataset
from dataset.common import resolve_root
from forward_utils import PromptBank, Variant
from model import AdaptedCLIP, build_clip, get_tokenizer
from model.adapter import FP8_RECIPES
from utils.distributed import close_distributed, meet_and_close, rank, seed_everything
from utils.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from utils.errors import UserError, own_message
from utils.io import load_checkpoint, load_module_state
from utils.provenance import weights_digest
from variants import VARIANTS, read_saved_args, variant_of_run

RANDOM_WEIGHTS_BANNER = "RANDOM BACKBONE WEIGHTS (--pretrained none): these numbers say nothing about AA-CLIP"


# Flags that fix the architecture: a save path may only be resumed or evaluated with the same values
# (with the variant's `model_keys`).
ARCH_KEYS = ("variant", "model", "image_size", "quick_gelu", "relu", "levels", "text_adapt_until",
             "image_adapt_until", "surgery_until_layer")
# Flags that change how a run goes, not what it computes: a rerun into the same --save_path may change
# them (with larger epoch counts); every other flag must keep its saved value.
OPERATIONAL_KEYS = ("device", "num_workers", "cache_dir", "checkpoint_every", "save_path", "data_root", "metadata_dir",
                    "compile", "no_cuda_graph", "debug")
# Saved flags that evaluation takes from a run's args.json unless the command line gives them.
MODEL_KEYS = ARCH_KEYS[1:] + ("pretrained", "text_adapt_weight", "image_adapt_weight", "surgery_batch_mixing")


def add_model_args(p: argparse.ArgumentParser, from_run: bool = False) -> None:
    """Flags that build the backbone and the adapters (shared by train.py and test.py). `from_run`: a
    script that evaluates a trained run, whose args.json sets the saved flags' defaults."""
    about = ("the flags a run was trained with (--model, --pretrained, --image_size, the adapter flags, ...) "
             "default to its saved values in <save_path>/args.json, not to the defaults shown here"
             if from_run else None)
    g = p.add_argument_group("model", about)
    g.add_argument("--model", default="ViT-L-14-336",
                   help="open_clip model name; 'tiny' is a small test config (default: %(default)s)")
    g.add_argument("--pretrained", default="none",
                   help="CLIP weights: an OpenAI TorchScript .pt (e.g. ViT-L-14-336px.pt), a state-dict file "
                        "(.pt/.pth/.bin/.safetensors), 'openai' (open_clip download, needs internet) or "
                        "'none' (random weights, labelled as such everywhere) (default: %(default)s)")
    g.add_argument("--image_size", "--img_size", type=positive_int, default=518,
                   help="input size; the positional embedding is resized to it (default: %(default)s)")
    g.add_argument("--quick_gelu", action="store_true",
                   help="use QuickGELU, the activation the OpenAI weights were trained with; the default plain "
                        "GELU reproduces the original AA-CLIP code")
    g.add_argument("--relu", action="store_true", help="LeakyReLU after the seg/det projections")
    g.add_argument("--text_adapt_weight", type=non_negative_float, default=0.1,
                   help="text adapter mixing weight (default: %(default)s)")
    g.add_argument("--image_adapt_weight", type=non_negative_float, default=0.1,
                   help="image adapter mixing weight (default: %(default)s)")
    g.add_argument("--levels", type=positive_int, nargs="+", default=None,
                   help="vision blocks tapped for segmentation (default: every quarter of the depth, "
                        "6 12 18 24 for ViT-L)")
    g.add_argument("--text_adapt_until", type=non_negative_int, default=None,
                   help="text blocks followed by an adapter (default: depth/4, 3 for ViT-L)")
    g.add_argument("--image_adapt_until", type=non_negative_int, default=None,
                   help="vision blocks followed by an adapter (default: depth/4, 6 for ViT-L)")
    g.add_argument("--surgery_until_layer", type=non_negative_int, default=None,
                   help="V-V attention in the last (this - 1) vision blocks of the Stage-1 features "
                        "(default: 20 for ViT-L)")
    g.add_argument("--surgery_batch_mixing", action="store_true",
                   help="reproduce the original's defect: V-V attention across the images of the batch")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default: %(default)s)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast (fp32 weights and losses) or fp32; auto = bf16 on CUDA, fp32 on CPU (default: "
                        "%(default)s)")
    g.add_argument("--compile", nargs="?", choices=["auto", "on", "off"], default="auto", const="on",
                   help="torch.compile the vision blocks (one compiled block serves all; inductor's on-disk cache "
                        "makes a later run's compilation cheap). auto = on, on CUDA, with --fp8 and for a Stage 2 of "
                        f"at least {COMPILE_PAYS_AFTER_IMAGES} images (epochs x images), where it pays; off for the "
                        "default few-shot training and for evaluation, where compiling costs more than it saves "
                        "(docs/benchmarks.md). --compile alone = on (default: %(default)s)")
    g.add_argument("--fp8", choices=["none", *FP8_RECIPES], default="none",
                   help="run the frozen vision blocks' linear layers in FP8 through torchao (needs torchao and a GPU "
                        "with FP8 tensor cores: H100/H200, L4/L40): dynamic scales per tensor (tensorwise) or per row "
                        "(rowwise). Measured on an H200 at ViT-L's width: no faster than --compile on, losses within "
                        "0.5-0.9%% of bf16 (docs/benchmarks.md); an instrument, not a speed-up (default: %(default)s)")
    g.add_argument("--debug", action="store_true", help="show tracebacks for input errors")


def add_data_args(p: argparse.ArgumentParser, default_dataset: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default_dataset, help="dataset name (default: %(default)s)")
    g.add_argument("--data_root", default=None,
                   help="dataset folder (default: the root make_metadata recorded in "
                        "<metadata_dir>/<dataset>/root.json, else the dataset's default root in "
                        "dataset/constants.json)")
    g.add_argument("--metadata_dir", default="dataset/metadata",
                   help="folder holding <dataset>/full-shot.jsonl and <dataset>/<k>-shot.jsonl "
                        "(made by python -m dataset.make_metadata) (default: %(default)s)")
    g.add_argument("--num_workers", type=non_negative_int, default=4,
                   help="data loader processes (default: %(default)s)")
    g.add_argument("--cache_dir", default=None,
                   help="keep decoded and resized images here as .npy, so later epochs and evaluations skip "
                        "decoding; images Stage 2 colour-jitters are decoded each time, as the jitter acts on the "
                        "full-size image (default: off)")


def get_train_parser(variant: Variant, description: str) -> argparse.ArgumentParser:
    """The flags of training `variant`: model, data, training, then the variant's own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p, default_dataset="VisA")
    g = p.add_argument_group("training")
    g.add_argument("--save_path", default=f"ckpt/{variant.name}",
                   help="checkpoint and log folder (default: %(default)s)")
    g.add_argument("--training_mode", choices=["few_shot", "full_shot"], default="few_shot",
                   help="few_shot trains on <shot>-shot.jsonl, full_shot on full-shot.jsonl (default: %(default)s)")
    g.add_argument("--shot", type=positive_int, default=32,
                   help="samples per class in few_shot mode (default: %(default)s)")
    g.add_argument("--text_epoch", type=non_negative_int, default=5,
                   help="Stage-1 epochs; 0 keeps CLIP's own text encoder (default: %(default)s)")
    g.add_argument("--image_epoch", type=non_negative_int, default=20, help="Stage-2 epochs (default: %(default)s)")
    g.add_argument("--text_batch_size", type=positive_int, default=16,
                   help="Stage-1 batch size; under torchrun the global batch, split across the processes "
                        "(default: %(default)s)")
    g.add_argument("--image_batch_size", type=positive_int, default=2,
                   help="Stage-2 batch size; under torchrun the global batch (default: %(default)s)")
    g.add_argument("--text_lr", type=positive_float, default=1e-5,
                   help="Stage-1 Adam learning rate (default: %(default)s)")
    g.add_argument("--image_lr", type=positive_float, default=5e-4,
                   help="Stage-2 Adam learning rate (default: %(default)s)")
    g.add_argument("--text_norm_weight", type=non_negative_float, default=0.1,
                   help="weight of the orthogonality term (default: %(default)s)")
    g.add_argument("--stage1_all_levels", action="store_true",
                   help="sum the Stage-1 seg loss over all levels (the original uses the last level only)")
    g.add_argument("--seed", type=int, default=111, help="random seed (default: %(default)s)")
    g.add_argument("--no_cuda_graph", action="store_true",
                   help="run Stage 2 eagerly; by default on CUDA the image forward and backward of each full "
                        "batch replay one CUDA graph (the same kernels without the launch cost; speed-ups in "
                        "docs/benchmarks.md)")
    g.add_argument("--checkpoint_every", type=non_negative_int, default=0,
                   help="also save a resumable checkpoint every N steps inside an epoch (0: only at epoch ends "
                        "and on SIGINT/SIGTERM) (default: %(default)s)")
    variant.add_train_args(p)
    return p


def get_test_parser(description: str = "") -> argparse.ArgumentParser:
    """test.py's flags (the variants' own test flags are added by `add_variant_test_args`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, from_run=True)
    add_data_args(p, default_dataset="MVTec")
    g = p.add_argument_group("evaluation")
    g.add_argument("--save_path", required=True, help="folder written by train.py or train_cross_attention.py")
    g.add_argument("--epoch", type=positive_int, default=None,
                   help="evaluate image_adapter_<epoch>.pth (default: the last epoch)")
    g.add_argument("--all_epochs", action="store_true",
                   help="evaluate every saved epoch, in numeric order, and draw the curve of their mean metrics "
                        "(<results>/<dataset>_curve.csv and .png)")
    g.add_argument("--select_epoch", choices=["last", "best_on_test", "heldout"], default="last",
                   help="the epoch reported: 'last' (the last saved epoch, or --epoch K); 'best_on_test' (the epoch "
                        "with the best --select_metric on this test set itself: optimistic, and labelled so in "
                        "every output); 'heldout' (the best --select_metric on the held-out part of the run's "
                        "training dataset, its full-shot list minus the few-shot list it trained on, then "
                        "evaluated on --dataset) (default: %(default)s)")
    from metrics import METRIC_NAMES  # here, not at the top: keeps scipy out of the training scripts' imports
    g.add_argument("--select_metric", choices=METRIC_NAMES, default="pixel_auroc",
                   help="the mean metric --select_epoch best_on_test / heldout maximises (default: %(default)s)")
    g.add_argument("--batch_size", type=positive_int, default=8,
                   help="images per forward pass (per process under torchrun) (default: %(default)s)")
    g.add_argument("--visualize", action="store_true",
                   help="save image | ground truth | anomaly map panels under <results>/vis/ (rank 0 under torchrun)")
    g.add_argument("--results_dir", default=None, help="where tables go (default: <save_path>/results)")
    return p


# Images a training stage runs through before compiling its vision blocks pays for a cold compilation (about
# 20 s on an H200 against about 1 ms saved per Stage-2 image: docs/benchmarks.md, run 8).
COMPILE_PAYS_AFTER_IMAGES = 20_000


def compile_for(model: AdaptedCLIP, args: argparse.Namespace, device: torch.device, batch_size: int,
                images: int = 0) -> bool:
    """Compiles the model's vision blocks for batches of `batch_size` images where --compile says so and
    returns whether it did. `auto` compiles on CUDA with --fp8 (whose casts want fusing), and a stage that runs
    through at least `COMPILE_PAYS_AFTER_IMAGES` images (`images`: its epochs x images; 0 for Stage 1, whose
    baseline gains nothing, and for evaluation)."""
    on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda"
                                  and (args.fp8 != "none" or images >= COMPILE_PAYS_AFTER_IMAGES))
    if on:
        model.compile_blocks([batch_size])
    return on


def resolve_precision(precision: str, device: torch.device) -> str:
    """`--precision auto`: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def build_model(args: argparse.Namespace, variant: Variant, device: torch.device) -> AdaptedCLIP:
    """The frozen CLIP with the variant's fresh adapters on `device`, as the flags say. The precision is
    settled here, once: a bf16 backbone is stored in bf16 and everything downstream reads
    `model.autocast()`."""
    clip = build_clip(args.model, args.pretrained, args.image_size, args.quick_gelu, device)
    try:
        model = variant.model_cls(
            clip, text_adapt_weight=args.text_adapt_weight, image_adapt_weight=args.image_adapt_weight,
            levels=args.levels, relu=args.relu, text_adapt_until=args.text_adapt_until,
            image_adapt_until=args.image_adapt_until, surgery_until_layer=args.surgery_until_layer,
            surgery_batch_mixing=args.surgery_batch_mixing, **variant.model_kwargs(args),
        )
    except UserError as e:
        if str(e).startswith(("levels", "surgery_until_layer")):  # block numbers beyond this backbone's depth
            raise UserError(f"{e} for {args.model}; fix --levels / --surgery_until_layer") from None
        raise
    if resolve_precision(args.precision, device) == "bf16":
        model.set_backbone_dtype(torch.bfloat16)
    model.to(device)
    if args.fp8 != "none":
        check_fp8(device)
        model.use_fp8(args.fp8)
    return model


def check_fp8(device: torch.device) -> None:
    """A UserError for --fp8 on a GPU without FP8 tensor cores (before Ada/Hopper, compute capability 8.9)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError(f"--fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or higher: L4, L40, H100, "
                        f"H200); {torch.cuda.get_device_name(device)} has none. Drop --fp8")


def metadata_file(args: argparse.Namespace, dataset: str, shot: int | None) -> Path:
    name = "full-shot.jsonl" if shot is None else f"{shot}-shot.jsonl"
    return Path(args.metadata_dir) / dataset / name


def load_dataset(args: argparse.Namespace, dataset: str, shot: int | None, **kwargs) -> ADDataset:
    root = resolve_root(args.data_root, args.metadata_dir, dataset)
    validate_dataset(root, metadata_file(args, dataset, shot))  # reads file headers only: ~0.1 ms a file
    return ADDataset(root, str(metadata_file(args, dataset, shot)), image_size=args.image_size,
                     cache_dir=args.cache_dir, **kwargs)


def training_shot(args: argparse.Namespace) -> int | None:
    return args.shot if args.training_mode == "few_shot" else None


def make_bank(args: argparse.Namespace, device: torch.device) -> PromptBank:
    """Prompts of every class of the training set."""
    ds = load_dataset(args, args.dataset, training_shot(args))
    return PromptBank(get_tokenizer(args.model), args.dataset, ds.class_names).to(device)


def test_flags(variant: Variant) -> dict[str, str]:
    """The variant's test flags: destination -> option."""
    probe = argparse.ArgumentParser(add_help=False)
    variant.add_test_args(probe)
    return {a.dest: a.option_strings[0] for a in probe._actions}


def add_variant_test_args(parser: argparse.ArgumentParser) -> None:
    """Every registered variant's test flags, a group each (a flag two variants share is added once)."""
    parser.conflict_handler = "resolve"
    for variant in VARIANTS.values():
        variant.add_test_args(parser.add_argument_group(f"{variant.name} runs"))


def parse_run_args(make_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None = None
                   ) -> argparse.Namespace:
    """Parses the flags of a script that evaluates a trained run (`--save_path`), the timm way: read the
    run's args.json, make its model flags the parser's defaults, parse again, so the command line still
    wins. Sets `args.variant` (the run's `Variant`), `args.seed` (training's, which rebuilds a random
    backbone) and the variant's own model flags; every registered variant's test flags are accepted, but
    only the run's own may be given."""
    parser = make_parser()
    add_variant_test_args(parser)
    first, _ = parser.parse_known_args(argv)
    save_dir = Path(first.save_path)
    if not save_dir.is_dir():
        raise UserError(f"--save_path {save_dir} does not exist; train first or fix the path")
    saved = read_saved_args(save_dir)
    variant = variant_of_run(save_dir, saved)
    parser.set_defaults(**{k: saved[k] for k in MODEL_KEYS if k in saved})
    args = parser.parse_args(argv)
    own = test_flags(variant)
    for other in VARIANTS.values():
        for dest, flag in test_flags(other).items():
            if dest not in own and getattr(args, dest) is not None:
                raise UserError(f"{flag} is for {other.name} runs; {save_dir} holds a {variant.name} run: "
                                "drop the flag")
    train_defaults = get_train_parser(variant, "")
    for key in ("seed", *variant.model_keys):
        setattr(args, key, saved.get(key, train_defaults.get_default(key)))
    variant.finish_test_args(args)
    args.variant = variant
    args.training_manifest = saved.get("manifest")
    return args


def epoch_checkpoints(save_dir: Path) -> dict[int, Path]:
    """`image_adapter_<k>.pth` files by k; a lone `image_adapter.pth` counts as its own epoch."""
    found = {int(m.group(1)): p for p in save_dir.glob("image_adapter_*.pth")
             if (m := re.fullmatch(r"image_adapter_(\d+)\.pth", p.name))}
    if not found and (save_dir / "image_adapter.pth").exists():
        found[int(load_checkpoint(save_dir / "image_adapter.pth")["epoch"])] = save_dir / "image_adapter.pth"
    if not found:
        raise UserError(f"no image_adapter*.pth in {save_dir}; train Stage 2 first (train.py --image_epoch > 0)")
    return dict(sorted(found.items()))


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[AdaptedCLIP, bool]:
    """The run's model with its trained text side loaded; returns (model, Stage 1 ran?). A run without
    the variant's text checkpoint (trained with --text_epoch 0) keeps the variant's untrained text path."""
    save_dir, variant = Path(args.save_path), args.variant
    seed_everything(args.seed)  # with --pretrained none, training's seed redraws its random backbone
    with ThreadPoolExecutor(1) as pool:  # hashing the weight file overlaps building the model
        digest = pool.submit(weights_digest, args.pretrained)
        model = build_model(args, variant, device)
        args.weights_sha256 = check_weights(args, digest.result())
    path = save_dir / variant.text_ckpt
    if not path.exists():
        if variant.needs_text_stage:
            raise UserError(f"{path} not found: a {variant.name} run needs its Stage-1 checkpoint; copy it back "
                            "or retrain")
        return model, False
    ckpt = load_checkpoint(path)
    foreign = {key: other.name for other in VARIANTS.values() for key in other.text_modules
               if key in ckpt and key not in variant.text_modules}
    if foreign:
        key, owner = next(iter(foreign.items()))
        raise UserError(f"{path} is a {owner} checkpoint (it holds {key}); put the {variant.name} run's "
                        f"{variant.text_ckpt} there, or evaluate it in a {owner} run")
    for key, module in variant.modules(model).items():
        load_module_state(module, ckpt, key, path)
    return model, True


def check_weights(args: argparse.Namespace, digest: str | None) -> str | None:
    """`digest`, the --pretrained file's SHA-256 (`weights_digest`: None for 'none' or an open_clip tag); a
    `UserError` when the run (`args.training_manifest`) was trained on a weight file with other bytes. A
    moved copy is fine."""
    trained = (args.training_manifest or {}).get("weights_sha256")
    if trained is not None and digest != trained:
        found = f"sha256 {digest[:12]}" if digest else "not a weight file"
        raise UserError(f"--pretrained {args.pretrained} ({found}) is not the weight file {args.save_path} was trained "
                        f"with (sha256 {trained[:12]}); pass that file with --pretrained")
    return digest


def load_image_adapter(model: AdaptedCLIP, path: Path) -> int:
    ckpt = load_checkpoint(path)
    load_module_state(model.image_adapter, ckpt, "image_adapter", path)
    return int(ckpt["epoch"])


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(a script's own flags, the training flags after `--`) of sweep.py and protocol.py."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def cli_main(main: Callable[[], Any]) -> Callable[[], None]:
    """Wraps a script's `main`: a `UserError` (DatasetError included) becomes one `error: ...` line and exit
    code 2.

    Set the environment variable AACLIP_DEBUG=1 (or pass --debug) to see the traceback instead.
    Under torchrun an error that every rank raised (see `UserError.all_ranks`) is printed by rank 0 only,
    and the ranks meet before they exit; any other error names its rank. Every rank exits 2.
    """

    @functools.wraps(main)
    def wrapper() -> None:
        debug = "--debug" in sys.argv or os.environ.get("AACLIP_DEBUG") == "1"
        try:
            main()
        except UserError as e:
            if debug:
                raise
            shared = getattr(e, "all_ranks", None)
            shared = not dist.is_initialized() if shared is None else shared
            this_rank = rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
            if this_rank == 0 or not shared:
                where = f"(rank {this_rank}) " if this_rank and not shared else ""
                print(f"error: {where}{own_message(e)}", file=sys.stderr)
            if shared:
                meet_and_close()
            sys.exit(2)
        except SystemExit:  # a stop request: every rank leaves at the same step
            close_distributed()
            raise
        close_distributed()

    return wrapper
