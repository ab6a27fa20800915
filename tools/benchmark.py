"""Speed, memory and bf16 numerics at the real shapes (ViT-L-14-336 at 518 px, random weights).

    python tools/benchmark.py --compile --out results/benchmark  # on a CUDA machine
    python tools/benchmark.py --model tiny --image_size 112 --steps 3 --eval_images 40   # CPU smoke run

Times training steps and the test forward with CUDA events after warm-up (median of --steps), and a whole
evaluation (MVTec-sized synthetic set written to disk, every metric) end to end, in fp32 and bf16. Stage 2 runs
eagerly and through CUDA graphs (train.py's default on CUDA) and their losses are compared; --compile adds
Stage 2 and the test forward with the image forward compiled.
Prints a Markdown table and writes <out>.md / <out>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import test as test_script  # noqa: E402
from dataset import get_dataset_info  # noqa: E402
from forward_utils import (PromptBank, anomaly_map, class_anchor_fn, get_adapted_text_embedding,  # noqa: E402
                           image_logits, stage1_loss, stage2_loss)
from forward_utils_cross_attention import cross_attention_anchor_fn  # noqa: E402
from model import AdaptedCLIP, build_clip, get_tokenizer  # noqa: E402
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention  # noqa: E402
from cli import RANDOM_WEIGHTS_BANNER, cli_main  # noqa: E402
from engine import fast_image_forward, image_adapter_step, text_adapter_step  # noqa: E402
from utils.argtypes import non_negative_int, positive_int  # noqa: E402

MVTEC_CLASSES = list(get_dataset_info("MVTec")["classes"])


def block_flops(width: int, tokens: int, value_only: bool = False) -> float:
    """Multiply-adds x 2 of one pre-norm transformer block on one sequence (MLP ratio 4)."""
    qkv = (1 if value_only else 3) * width * width
    linear = 2 * tokens * (qkv + width * width + 8 * width * width)
    attention = 2 * 2 * tokens * tokens * width
    return linear + attention


def model_flops(model: AdaptedCLIP) -> dict[str, float]:
    """Analytic FLOPs per image: test forward, Stage 1 (shared trunk, plain and V-V branches) and Stage 2
    (forward plus activation gradients, about one more forward; no weight gradients)."""
    width = model.clip.visual.conv1.out_channels
    tokens = model.grid[0] * model.grid[1] + 1
    depth, s = model.vision_depth, model.surgery_start
    forward = depth * block_flops(width, tokens)
    stage1 = s * block_flops(width, tokens) + (depth - s) * (block_flops(width, tokens)
                                                              + block_flops(width, tokens, value_only=True))
    return {"test": forward, "stage1": stage1, "stage2": 2 * forward}


def cuda_time(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fake_batch(b: int, size: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, 1, size, size)
    masks[:, :, size // 3: size // 2, size // 3: size // 2] = 1
    masks[: b // 2] = 0
    return {"image": torch.randn(b, 3, size, size, generator=g).to(device), "mask": masks.to(device),
            "label": (masks.flatten(1).amax(1) > 0).long().to(device),
            "class_name": [MVTEC_CLASSES[i % len(MVTEC_CLASSES)] for i in range(b)],
            "class_idx": (torch.arange(b) % len(MVTEC_CLASSES)).to(device)}


def bench_steps(model_name: str, size: int, precision: str, device: torch.device, steps: int,
                cfg: argparse.Namespace, compiled: bool = False) -> tuple[list[dict], dict]:
    """Training steps and the test forward at one precision. Stage 2 runs eagerly and through
    `CudaGraphForward` (what train.py runs on CUDA) from the same adapter weights on the same batch, and
    the losses of the two are compared step by step. `compiled`: only the rows `--compile` changes (Stage 2
    and the test forward, with the image forward compiled). Returns the rows and the loss agreement."""
    rows, agreement = [], {}
    torch.manual_seed(0)
    clip = build_clip(model_name, "none", size)
    base = AdaptedCLIP(clip).to(device)
    cross = AdaptedCLIPWithCrossAttention(clip).to(device)
    cross.text_adapter.load_state_dict(base.text_adapter.state_dict())
    if precision == "bf16":
        base.set_backbone_dtype(torch.bfloat16)  # shared with `cross`
    label = precision + ("+compile" if compiled else "")
    flops = model_flops(base)
    bank = PromptBank(get_tokenizer(model_name), "MVTec", MVTEC_CLASSES).to(device)
    args = argparse.Namespace(stage1_all_levels=False, text_norm_weight=0.1)

    def record(name, batch, seconds, flop):
        ips = batch / seconds
        rows.append({"benchmark": name, "precision": label, "batch": batch, "ms": seconds * 1000,
                     "img_s": ips, "tflops": flop * ips / 1e12 if flop else None,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
        print(f"  {name:<28} {label} batch {batch:>2}: {ips:8.1f} img/s", flush=True)

    def reset():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    text_start = copy.deepcopy(base.text_adapter.state_dict())
    for name, model, fn_factory in [] if compiled else [
        ("stage 1 baseline", base, lambda m: class_anchor_fn(m, bank, adapt=True, grad=True)),
        ("stage 1 cross-attention", cross, lambda m: cross_attention_anchor_fn(m, bank, "image")),
    ]:
        reset()
        batch = fake_batch(cfg.stage1_batch, size, device)
        params = [*model.text_adapter.parameters()] + (
            [*model.text_cross_attn.parameters()] if model is cross else [])
        opt = torch.optim.Adam(params, lr=1e-5, betas=(0.5, 0.999))
        anchor_fn = fn_factory(model)
        model.train()
        t = cuda_time(lambda: text_adapter_step(model, batch, opt, anchor_fn, args, device), steps, 2, device)
        record(name, cfg.stage1_batch, t, flops["stage1"])

    base.text_adapter.load_state_dict(text_start)  # Stage 2 from the same weights with and without --compile
    base.text_adapter.requires_grad_(False)  # as after Stage 1
    anchor_fn = class_anchor_fn(base, bank, adapt=True)
    start = copy.deepcopy(base.image_adapter.state_dict())
    base.train()
    for b in cfg.stage2_batches:
        batch = fake_batch(b, size, device)
        losses = {}
        graphs = [True] if compiled else ([False, True] if device.type == "cuda" else [False])
        for graph in graphs:
            reset()
            base.image_adapter.load_state_dict(start)
            opt = torch.optim.Adam(base.image_adapter.parameters(), lr=5e-4, betas=(0.5, 0.999))
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [16000, 32000], 0.5)
            forward = fast_image_forward(base, compiled, b if graph else None)  # a fresh compilation per size
            out = losses.setdefault(graph, [])
            t = cuda_time(lambda: out.append(image_adapter_step(base, batch, opt, sched, anchor_fn, device,
                                                                image_forward=forward)), steps, 3, device)
            record("stage 2 (CUDA graph)" if graph else "stage 2 (eager)", b, t, flops["stage2"])
        for graph, values in losses.items():
            kind = ("graph + compile" if compiled else "CUDA graph") if graph else "eager"
            agreement[f"stage 2 batch {b} losses ({kind})"] = [float(x) for x in values]
        if len(losses) == 2:
            eager, graphed = (torch.stack(losses[k]).double().cpu() for k in (False, True))
            agreement[f"stage 2 batch {b}: CUDA graph vs eager, max relative loss difference over "
                      f"{len(eager)} steps"] = float(((graphed - eager).abs() / eager.abs()).max())

    base.eval()
    reset()
    batch = fake_batch(cfg.test_batch, size, device)
    idx = batch["class_idx"]
    forward = fast_image_forward(base, compiled)

    @torch.no_grad()
    def test_forward():
        with base.autocast():
            anchors = anchor_fn(batch["image"], idx)
            seg, det = forward(batch["image"])
        anomaly_map(seg, anchors, base.grid, size, "Industrial")
        image_logits(det, anchors)

    record("test forward", cfg.test_batch, cuda_time(test_forward, steps, 2, device), flops["test"])
    if compiled:
        return rows, agreement

    reset()

    @torch.no_grad()
    def anchors_all():
        with base.autocast():
            get_adapted_text_embedding(base, bank, adapt=True)

    t = cuda_time(anchors_all, steps, 2, device)
    rows.append({"benchmark": f"text anchors ({len(MVTEC_CLASSES)} classes)", "precision": label, "batch": None,
                 "ms": t * 1000, "img_s": None, "tflops": None, "peak_gib": None})
    print(f"  text anchors: {t * 1000:.1f} ms", flush=True)
    return rows, agreement


def _write_sample(job: tuple[str, int, int, bool]) -> None:
    path, size, seed, anomalous = job
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, 3)
    img = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    if anomalous:
        y, x, r = rng.integers(size // 5, 4 * size // 5, 2).tolist() + [int(rng.integers(size // 30, size // 10))]
        yy, xx = np.ogrid[:size, :size]
        mask = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        img[mask] = rng.integers(0, 255, 3)
        Image.fromarray((mask * 255).astype(np.uint8)).save(path.replace("/test/bad/", "/ground_truth/bad/")
                                                            .replace(".png", "_mask.png"))
    Image.fromarray(img).save(path)


def make_mvtec_like(root: Path, n_images: int, workers: int) -> Path:
    """An MVTec-layout set with the real class names and counts near MVTec's (115 images a class),
    700-1024 px PNGs, and its metadata. Returns the metadata folder."""
    per_class = max(2, n_images // len(MVTEC_CLASSES))
    jobs, records = [], []
    rng = np.random.default_rng(0)
    for c in MVTEC_CLASSES:
        size = int(rng.choice([700, 800, 900, 1024]))
        for kind in ("good", "bad"):
            (root / c / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / c / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            anomalous = i % 3 != 0
            kind = "bad" if anomalous else "good"
            rel = f"{c}/test/{kind}/{i:03d}.png"
            jobs.append((str(root / rel), size, len(jobs), anomalous))
            records.append({"image_path": rel, "label": int(anomalous), "class_name": c,
                            "mask_path": rel.replace("/test/bad/", "/ground_truth/bad/").replace(".png", "_mask.png")
                            if anomalous else ""})
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_sample, jobs, chunksize=8))
    meta = root / "metadata"
    (meta / "MVTec").mkdir(parents=True, exist_ok=True)
    (meta / "MVTec" / "full-shot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return meta


def fake_run(save: Path, model_name: str, size: int) -> None:
    """A save path as training leaves it, with random adapters."""
    save.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = AdaptedCLIP(build_clip(model_name, "none", size))
    torch.save({"epoch": 1, "text_adapter": m.text_adapter.state_dict()}, save / "text_adapter.pth")
    torch.save({"epoch": 1, "image_adapter": m.image_adapter.state_dict()}, save / "image_adapter_1.pth")
    (save / "args.json").write_text(json.dumps({"variant": "baseline", "model": model_name, "pretrained": "none",
                                                "image_size": size}))


def bench_eval(root: Path, precision: str, device: torch.device, workers: int, batch: int) -> dict:
    """`test.py` on the synthetic MVTec-sized set, in process, timed end to end."""
    argv = ["--save_path", str(root / "run"), "--dataset", "MVTec", "--data_root", str(root / "data"),
            "--metadata_dir", str(root / "data" / "metadata"), "--num_workers", str(workers),
            "--batch_size", str(batch), "--precision", precision, "--device", str(device),
            "--results_dir", str(root / f"results_{precision}")]
    sys.argv = ["test.py", *argv]
    t0 = time.perf_counter()
    test_script.main()
    seconds = time.perf_counter() - t0
    res = json.loads(next((root / f"results_{precision}").glob("MVTec_epoch1.json")).read_text())
    return {"seconds": seconds, "mean": res["mean"], "per_class": res["per_class"]}


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def markdown(rows: list[dict], evals: dict, diffs: dict, loss_diffs: dict, device: str) -> str:
    lines = [f"Device: {device}. {RANDOM_WEIGHTS_BANNER} (speed and numerics only).", "",
             "| benchmark | precision | batch | ms/step | img/s | TFLOP/s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['precision']} | {r['batch'] or ''} | {r['ms']:.1f} | {_fmt(r['img_s'])} "
                     f"| {_fmt(r['tflops'])} | {_fmt(r['peak_gib'])} |")
    lines += ["", "| full evaluation | seconds end to end |", "|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} |" for k, v in evals.items()]
    if diffs:
        lines += ["", "bf16 vs fp32, same weights and data: largest |difference| over classes (points)", "",
                  "| metric | max abs diff | mean fp32 | mean bf16 |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['max_abs']:.3f} | {v['fp32']:.2f} | {v['bf16']:.2f} |" for k, v in diffs.items()]
    for loss, by_mode in loss_diffs.items():
        ref = by_mode["fp32"]
        lines += ["", f"| {loss} loss | value | relative diff to fp32 |", "|---|---|---|"]
        lines += [f"| {mode} | {v:.5f} | {abs(v - ref) / abs(ref):.3%} |" for mode, v in by_mode.items()]
    return "\n".join(lines)


def set_mode(m: AdaptedCLIP, mode: str, device: torch.device) -> torch.autocast:
    """Stores the backbone for `mode` and returns its autocast: "amp" is bf16 autocast over the fp32-stored
    backbone, "bf16" the backbone stored and run in bf16 (what --precision bf16 runs)."""
    m.set_backbone_dtype(torch.bfloat16 if mode == "bf16" else torch.float32)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32", cache_enabled=False)


def agreement_setup(model_name: str, size: int, device: torch.device) -> tuple[AdaptedCLIP, PromptBank, dict]:
    """One seeded model, the MVTec prompts and a fixed batch of 8 images, for the numerics checks."""
    torch.manual_seed(0)
    m = AdaptedCLIP(build_clip(model_name, "none", size)).to(device).eval()
    bank = PromptBank(get_tokenizer(model_name), "MVTec", MVTEC_CLASSES).to(device)
    return m, bank, fake_batch(8, size, device, seed=1)


def loss_agreement(model_name: str, size: int, device: torch.device, modes: list[str]) -> dict:
    """Stage-1 and Stage-2 losses of the same weights and batch per mode (no optimizer step)."""
    m, bank, batch = agreement_setup(model_name, size, device)
    idx = batch["class_idx"]
    out = {}
    with torch.no_grad():
        for mode in modes:
            with set_mode(m, mode, device):
                anchors = get_adapted_text_embedding(m, bank, True)[idx]
                feats, _ = m.stage1_features(batch["image"])
                l1 = stage1_loss(feats, anchors, batch["mask"], m.grid)
                seg, det = m(batch["image"])
                l2 = stage2_loss(seg, det, anchors, batch["mask"], batch["label"], m.grid)
            out.setdefault("stage 1", {})[mode] = float(l1)
            out.setdefault("stage 2", {})[mode] = float(l2)
    return out


def map_agreement(model_name: str, size: int, device: torch.device, modes: list[str]) -> dict:
    """Why metrics can move between fp32 and bf16 on a random backbone: the anomaly maps' error against
    their spatial spread, and how alike the last level's patch tokens are (a deep random transformer
    maps all tokens close to one vector, leaving maps with little structure)."""
    m, bank, batch = agreement_setup(model_name, size, device)
    idx = batch["class_idx"]
    maps = {}
    with torch.no_grad():
        for mode in modes:
            with set_mode(m, mode, device):
                anchors = get_adapted_text_embedding(m, bank, True)[idx]
                seg, _ = m(batch["image"])
            maps[mode] = anomaly_map(seg, anchors, m.grid, size, "Industrial").double().flatten(1)
            if mode == "fp32":
                tokens = torch.nn.functional.normalize(seg[-1].double(), dim=-1)
                collapse = float((tokens @ tokens.transpose(1, 2)).mean())
    ref = maps["fp32"]
    spread = ref.std(dim=1)
    out = {"map_std_fp32": float(spread.mean()), "patch_token_mean_cos_fp32": collapse}
    for mode in modes:
        if mode != "fp32":
            d = (maps[mode] - ref).abs()
            corr = torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(ref, maps[mode])])
            out[f"{mode}_max_abs_diff"] = float(d.amax())
            out[f"{mode}_max_diff_over_std"] = float((d.amax(1) / spread).mean())
            out[f"{mode}_pearson_min"] = float(corr.min())
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-L-14-336", help="open_clip model (default: %(default)s)")
    p.add_argument("--image_size", type=positive_int, default=518, help="input size (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda when there is one, else cpu)")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"],
                   help="bf16: backbone stored in bf16 (what --precision bf16 runs); amp: bf16 autocast over the "
                        "fp32 backbone; fp32 (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=10,
                   help="timed steps per benchmark (median) (default: %(default)s)")
    p.add_argument("--stage1_batch", type=positive_int, default=16, help="Stage-1 batch (default: %(default)s)")
    p.add_argument("--stage2_batches", type=positive_int, nargs="+", default=[2, 16],
                   help="Stage-2 batches (default: %(default)s)")
    p.add_argument("--test_batch", type=positive_int, default=32, help="test forward batch (default: %(default)s)")
    p.add_argument("--eval_images", type=non_negative_int, default=1725,
                   help="images of the full evaluation, 0 skips it (default: %(default)s)")
    p.add_argument("--eval_batch", type=positive_int, default=32,
                   help="test.py --batch_size of the full evaluation (default: %(default)s)")
    p.add_argument("--workers", type=non_negative_int, default=min(16, os.cpu_count() or 1),
                   help="loader processes (default: the CPU count, at most 16)")
    p.add_argument("--work_dir", default="/tmp/aaclip_bench",
                   help="where the synthetic set is written (default: %(default)s)")
    p.add_argument("--skip_steps", action="store_true", help="only the full evaluation")
    p.add_argument("--compile", action="store_true",
                   help="also time Stage 2 and the test forward in bf16 with the image forward compiled (--compile)")
    p.add_argument("--out", default="results/benchmark", help="writes <out>.md and <out>.json (default: %(default)s)")
    return p


@cli_main
def main() -> None:
    p = get_parser()
    args = p.parse_args()
    device = torch.device(args.device)
    print(RANDOM_WEIGHTS_BANNER, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, stage2_agreement = [], {}
    if not args.skip_steps:
        # Training and test rows follow the backbone's stored precision, as the scripts run: no "amp" rows.
        runs = ([(precision, False) for precision in args.precisions if precision != "amp"]
                + ([("bf16", True)] if args.compile else []))
        for precision, compiled in runs:
            new_rows, agreement = bench_steps(args.model, args.image_size, precision, device, args.steps, args,
                                              compiled)
            rows += new_rows
            stage2_agreement.update({f"{precision}, {k}": v for k, v in agreement.items()})
            out.with_suffix(".partial.json").write_text(json.dumps({"rows": rows, "stage2": stage2_agreement}))
            for b in args.stage2_batches:
                eager = stage2_agreement.get(f"bf16, stage 2 batch {b} losses (eager)")
                fast = stage2_agreement.get(f"bf16, stage 2 batch {b} losses (graph + compile)")
                if eager and fast:
                    e, f = torch.tensor(eager, dtype=torch.float64), torch.tensor(fast, dtype=torch.float64)
                    stage2_agreement[f"bf16, stage 2 batch {b}: CUDA graph + compile vs eager, max relative loss "
                                     f"difference over {len(e)} steps"] = float(((f - e).abs() / e.abs()).max())
    evals, diffs = {}, {}
    if args.eval_images:
        root = Path(args.work_dir)
        if not (root / "data" / "metadata").exists():
            t0 = time.perf_counter()
            make_mvtec_like(root / "data", args.eval_images, args.workers)
            print(f"wrote the synthetic evaluation set in {time.perf_counter() - t0:.1f} s", flush=True)
        fake_run(root / "run", args.model, args.image_size)
        for precision in [p for p in args.precisions if p in ("bf16", "fp32")]:
            evals[precision] = bench_eval(root, precision, device, args.workers, args.eval_batch)
        if {"fp32", "bf16"} <= evals.keys():
            for metric in evals["fp32"]["mean"]:
                pairs = [(evals["fp32"]["per_class"][c][metric], evals["bf16"]["per_class"][c][metric])
                         for c in evals["fp32"]["per_class"]]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if pairs:
                    diffs[metric] = {"max_abs": max(abs(a - b) for a, b in pairs),
                                     "fp32": evals["fp32"]["mean"][metric], "bf16": evals["bf16"]["mean"][metric]}
    modes = [mode for mode in ("fp32", "amp", "bf16") if mode in args.precisions]
    both = "fp32" in modes and len(modes) > 1
    loss_diffs = loss_agreement(args.model, args.image_size, device, modes) if both else {}
    agreement = map_agreement(args.model, args.image_size, device, modes) if both else {}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = markdown(rows, evals, diffs, loss_diffs, device_name)
    if agreement:
        text += "\n\nAnomaly maps, fp32 vs bf16 (8 images): " + ", ".join(f"{k} {v:.4g}" for k, v in agreement.items())
    if stage2_agreement:
        text += "\n\nStage 2 paths from the same weights on the same batch:\n" + "\n".join(
            f"- {k}: {v:.3g}" for k, v in stage2_agreement.items() if isinstance(v, float))
    print(text)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "evals": {k: v["seconds"] for k, v in evals.items()},
                                                    "metric_diffs": diffs, "losses": loss_diffs, "map_agreement": agreement,
                                                    "stage2_agreement": stage2_agreement,
                                                    "device": device_name, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
