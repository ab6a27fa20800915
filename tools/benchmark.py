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
import functools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import test as test_script  # noqa: E402
from dataset import get_dataset_info  # noqa: E402
from forward_utils import (PromptBank, anomaly_map, class_anchor_fn, get_adapted_text_embedding,  # noqa: E402
                           image_logits, stage1_loss, stage2_loss)
from forward_utils_cross_attention import cross_attention_anchor_fn  # noqa: E402
from model import AdaptedCLIP, build_clip, get_tokenizer  # noqa: E402
from model.adapter import FP8_RECIPES  # noqa: E402
from model.adapter_cross_attention import AdaptedCLIPWithCrossAttention  # noqa: E402
from cli import RANDOM_WEIGHTS_BANNER, cli_main  # noqa: E402
from engine import fast_stage2, image_adapter_step, text_adapter_step  # noqa: E402
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


def cuda_time(fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per call, seconds of the first call: compilation and graph capture included)."""
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
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
    return statistics.median(times), first


MATMUL_KERNELS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "scaled_mm", "sm90_")
ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa", "attn", "dot_do_o", "dq_dk_dv")


def kernel_breakdown(fn, device: torch.device, steps: int = 3) -> dict:
    """GPU kernel time per call (ms) by kind, from torch.profiler: matrix products, attention, everything else
    (norms, activations, adds, casts, copies), with the five most expensive other kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    others = {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA or not e.self_device_time_total:
            continue
        name, ms = e.key.lower(), e.self_device_time_total / 1000 / steps
        # Attention first: cuDNN's attention kernels carry "sm90" in their names too.
        kind = ("attention" if any(k in name for k in ATTENTION_KERNELS)
                else "matmul" if any(k in name for k in MATMUL_KERNELS) else "other")
        kinds[kind] += ms
        if kind == "other":
            others[e.key[:60]] = ms
    top = sorted(others.items(), key=lambda kv: -kv[1])[:5]
    return {**{k: round(v, 2) for k, v in kinds.items()}, "top_other": [(k, round(v, 2)) for k, v in top]}


def sdpa_backends(device: torch.device, tokens: int, width: int, heads: int, batches: tuple[int, int]) -> dict:
    """Milliseconds of one layer's attention per SDPA backend at the real shapes: forward at the test batch,
    forward + backward at Stage 2's batch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for b, grad in ((batches[0], False), (batches[1], True)):
            q, k, v = (torch.randn(b, heads, tokens, width // heads, device=device, dtype=torch.bfloat16,
                                   requires_grad=grad) for _ in range(3))

            def step():
                y = F.scaled_dot_product_attention(q, k, v)
                if grad:
                    y.backward(torch.ones_like(y))
            try:
                with sdpa_kernel(backend), torch.set_grad_enabled(grad):
                    t, _ = cuda_time(step, 10, 3, device)
                out[f"{backend.name} batch {b} {'fwd+bwd' if grad else 'fwd'}"] = round(t * 1000, 3)
            except RuntimeError as e:
                out[f"{backend.name} batch {b}"] = f"unavailable ({str(e).splitlines()[0][:60]})"
    return out


def fake_batch(b: int, size: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, 1, size, size)
    masks[:, :, size // 3: size // 2, size // 3: size // 2] = 1
    masks[: b // 2] = 0
    return {"image": torch.randn(b, 3, size, size, generator=g).to(device), "mask": masks.to(device),
            "label": (masks.flatten(1).amax(1) > 0).long().to(device),
            "class_name": [MVTEC_CLASSES[i % len(MVTEC_CLASSES)] for i in range(b)],
            "class_idx": (torch.arange(b) % len(MVTEC_CLASSES)).to(device)}


def setup_label(precision: str, compiled: bool, fp8: str) -> str:
    return precision + ("+compile" if compiled else "") + (f"+fp8 {fp8}" if fp8 != "none" else "")


def bench_steps(model_name: str, size: int, precision: str, device: torch.device, steps: int,
                cfg: argparse.Namespace, compiled: bool = False, fp8: str = "none") -> tuple[list[dict], dict]:
    """Training steps and the test forward in one setup: a precision, the vision blocks compiled or not
    (`compile_blocks`, what --compile runs), the FP8 linears or not (--fp8). Stage 2 runs through
    `CudaGraphStage2` (what train.py runs on CUDA) and, without compilation, also eagerly from the same adapter
    weights on the same batch; the losses are kept for comparing setups step by step. Returns the rows and
    the losses (batch -> "eager" / "graph" -> per step)."""
    rows, stage2_losses = [], {}
    torch.manual_seed(0)
    clip = build_clip(model_name, "none", size)
    base = AdaptedCLIP(clip).to(device)
    cross = AdaptedCLIPWithCrossAttention(clip).to(device)
    cross.text_adapter.load_state_dict(base.text_adapter.state_dict())
    if precision == "bf16":
        base.set_backbone_dtype(torch.bfloat16)  # shared with `cross`
    if fp8 != "none":
        base.use_fp8(fp8)  # the shared backbone's linears
    if compiled:
        for m in (base, cross):
            m.compile_blocks([cfg.stage1_batch, *cfg.stage2_batches, cfg.test_batch])
    label = setup_label(precision, compiled, fp8)
    flops = model_flops(base)
    bank = PromptBank(get_tokenizer(model_name), "MVTec", MVTEC_CLASSES).to(device)
    args = argparse.Namespace(stage1_all_levels=False, text_norm_weight=0.1)

    def record(name, batch, timing, flop, fn):
        seconds, first = timing
        ips = batch / seconds
        rows.append({"benchmark": name, "precision": label, "batch": batch, "ms": seconds * 1000,
                     "img_s": ips, "tflops": flop * ips / 1e12 if flop else None, "first_s": first,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
        print(f"  {name:<28} {label} batch {batch:>2}: {ips:8.1f} img/s (first call {first:.1f} s)", flush=True)
        if cfg.profile and device.type == "cuda":
            rows[-1]["kernels_ms"] = kernel_breakdown(fn, device)
            print(f"    kernels (ms/step): {rows[-1]['kernels_ms']}", flush=True)

    def reset():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    text_start = copy.deepcopy(base.text_adapter.state_dict())
    for name, model, fn_factory in [
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
        step = functools.partial(text_adapter_step, model, batch, opt, anchor_fn, args, device)
        record(name, cfg.stage1_batch, cuda_time(step, steps, 2, device), flops["stage1"], step)

    base.text_adapter.load_state_dict(text_start)  # Stage 2 of every setup from the same weights
    base.text_adapter.requires_grad_(False)  # as after Stage 1
    anchor_fn = class_anchor_fn(base, bank, adapt=True)
    start = copy.deepcopy(base.image_adapter.state_dict())
    base.train()
    for b in cfg.stage2_batches:
        batch = fake_batch(b, size, device)
        losses = {}
        graphs = ([True] if compiled else [False, True]) if device.type == "cuda" else [False]
        for graph in graphs:
            reset()
            base.image_adapter.load_state_dict(start)
            opt = torch.optim.Adam(base.image_adapter.parameters(), lr=5e-4, betas=(0.5, 0.999))
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [16000, 32000], 0.5)
            out = losses.setdefault(graph, [])
            step = functools.partial(image_adapter_step, base, batch, opt, sched, anchor_fn, device,
                                     terms_fn=fast_stage2(base, b if graph else None))
            t = cuda_time(lambda: out.append(step()), steps, 3, device)
            record("stage 2 (CUDA graph)" if graph else "stage 2 (eager)", b, t, flops["stage2"], step)
        stage2_losses[b] = {"graph" if graph else "eager": [float(x) for x in values]
                            for graph, values in losses.items()}

    base.eval()
    reset()
    batch = fake_batch(cfg.test_batch, size, device)
    idx = batch["class_idx"]

    @torch.no_grad()
    def test_forward():
        with base.autocast():
            anchors = anchor_fn(batch["image"], idx)
            seg, det = base(batch["image"])
        anomaly_map(seg, anchors, base.grid, size, "Industrial")
        image_logits(det, anchors)

    record("test forward", cfg.test_batch, cuda_time(test_forward, steps, 2, device), flops["test"], test_forward)
    if compiled or fp8 != "none":
        return rows, stage2_losses

    reset()

    @torch.no_grad()
    def anchors_all():
        with base.autocast():
            get_adapted_text_embedding(base, bank, adapt=True)

    t, _ = cuda_time(anchors_all, steps, 2, device)
    rows.append({"benchmark": f"text anchors ({len(MVTEC_CLASSES)} classes)", "precision": label, "batch": None,
                 "ms": t * 1000, "img_s": None, "tflops": None, "first_s": None, "peak_gib": None})
    print(f"  text anchors: {t * 1000:.1f} ms", flush=True)
    return rows, stage2_losses


def loss_differences(losses: dict[str, dict[int, dict[str, list[float]]]]) -> dict[str, float]:
    """Largest relative difference over the steps between each Stage-2 loss series and the eager bf16 one of
    the same batch. losses: setup -> batch -> "eager" / "graph" -> the losses of the steps."""
    out = {}
    for setup, by_batch in losses.items():
        for b, series in by_batch.items():
            ref = losses.get("bf16", {}).get(b, {}).get("eager")
            for kind, values in series.items():
                if ref is None or (setup, kind) == ("bf16", "eager"):
                    continue
                r, v = torch.tensor(ref, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
                n = min(len(r), len(v))
                out[f"stage 2 batch {b}: {setup} ({kind}) vs bf16 eager, max relative loss difference over {n} "
                    "steps"] = float(((v[:n] - r[:n]).abs() / r[:n].abs()).max())
    return out


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


def fake_run(save: Path, model_name: str, size: int) -> Path:
    """A save path as training leaves it, with random adapters; returns a weight file of the same random backbone
    (a state dict in fp16, as OpenAI's files store most tensors)."""
    save.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = AdaptedCLIP(build_clip(model_name, "none", size))
    weights = save.parent / "random_backbone_fp16.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in m.clip.state_dict().items()}, weights)
    torch.save({"epoch": 1, "text_adapter": m.text_adapter.state_dict()}, save / "text_adapter.pth")
    torch.save({"epoch": 1, "image_adapter": m.image_adapter.state_dict()}, save / "image_adapter_1.pth")
    (save / "args.json").write_text(json.dumps({"variant": "baseline", "model": model_name, "pretrained": "none",
                                                "image_size": size}))
    return weights


def bench_eval(root: Path, precision: str, device: torch.device, workers: int, batch: int,
               weights: Path | None = None) -> dict:
    """`test.py` with its default flags on the synthetic MVTec-sized set, in process, timed end to end; the
    random backbone drawn from the seed, or read from `weights`."""
    results = root / f"results_{precision}{'_file' if weights else ''}"
    argv = ["--save_path", str(root / "run"), "--dataset", "MVTec", "--data_root", str(root / "data"),
            "--metadata_dir", str(root / "data" / "metadata"), "--num_workers", str(workers),
            "--batch_size", str(batch), "--precision", precision, "--device", str(device), "--results_dir", str(results)]
    if weights is not None:
        argv += ["--pretrained", str(weights)]
    sys.argv = ["test.py", *argv]
    t0 = time.perf_counter()
    test_script.main()
    seconds = time.perf_counter() - t0
    res = json.loads(next(results.glob("MVTec_epoch1.json")).read_text())
    return {"seconds": seconds, "mean": res["mean"], "per_class": res["per_class"]}


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def markdown(rows: list[dict], evals: dict, diffs: dict, loss_diffs: dict, device: str) -> str:
    lines = [f"Device: {device}. {RANDOM_WEIGHTS_BANNER} (speed and numerics only).", "",
             "| benchmark | setup | batch | ms/step | img/s | TFLOP/s | peak GiB | first call s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['precision']} | {r['batch'] or ''} | {r['ms']:.1f} | {_fmt(r['img_s'])} "
                     f"| {_fmt(r['tflops'])} | {_fmt(r['peak_gib'])} | {_fmt(r.get('first_s'))} |")
    lines += ["", "| full evaluation | seconds end to end |", "|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} |" for k, v in evals.items()]
    if diffs:
        lines += ["", "bf16 vs fp32, same weights and data: largest |difference| over classes (points)", "",
                  "| metric | max abs diff | mean fp32 | mean bf16 |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['max_abs']:.3f} | {v['fp32']:.2f} | {v['bf16']:.2f} |" for k, v in diffs.items()]
    for loss, by_mode in loss_diffs.items():
        ref, bf16 = by_mode["fp32"], by_mode.get("bf16")
        lines += ["", f"| {loss} loss | value | relative diff to fp32 | relative diff to bf16 |", "|---|---|---|---|"]
        lines += [f"| {mode} | {v:.5f} | {abs(v - ref) / abs(ref):.3%} | "
                  f"{'' if bf16 is None else f'{abs(v - bf16) / abs(bf16):.3%}'} |" for mode, v in by_mode.items()]
    return "\n".join(lines)


def agreement_setup(model_name: str, size: int, device: torch.device, mode: str
                    ) -> tuple[AdaptedCLIP, PromptBank, dict]:
    """One seeded model in `mode`, the MVTec prompts and a fixed batch of 8 images, for the numerics checks.
    Modes: "fp32"; "amp", bf16 autocast over the fp32-stored backbone; "bf16", the backbone stored and run in
    bf16 (what --precision bf16 runs); "fp8 <recipe>", bf16 with the FP8 linears (eager: the casts compute the
    same values compiled or not, and compiling at this batch would cost minutes)."""
    torch.manual_seed(0)
    m = AdaptedCLIP(build_clip(model_name, "none", size)).to(device).eval()
    if mode != "fp32" and mode != "amp":
        m.set_backbone_dtype(torch.bfloat16)
    if mode.startswith("fp8"):
        m.use_fp8(mode.split()[1])
    bank = PromptBank(get_tokenizer(model_name), "MVTec", MVTEC_CLASSES).to(device)
    return m, bank, fake_batch(8, size, device, seed=1)


def mode_autocast(m: AdaptedCLIP, mode: str, device: torch.device) -> torch.autocast:
    """`m.autocast()`, or for "amp" bf16 autocast over the fp32 backbone."""
    if mode == "amp":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return m.autocast()


def numerics(model_name: str, size: int, device: torch.device, modes: list[str]) -> tuple[dict, dict]:
    """Per mode, from the same weights and batch (no optimizer step): the Stage-1 and Stage-2 losses, and how far
    the anomaly maps are from fp32's (the FP8 modes' also from bf16's): pixel-wise Pearson correlation and the
    largest error against the map's spatial spread; and how alike the last level's patch tokens are (a deep
    random transformer maps all tokens close to one vector, leaving maps with little structure)."""
    losses, maps = {}, {}
    for mode in modes:
        m, bank, batch = agreement_setup(model_name, size, device, mode)
        idx = batch["class_idx"]
        with torch.no_grad(), mode_autocast(m, mode, device):
            anchors = get_adapted_text_embedding(m, bank, True)[idx]
            feats, _ = m.stage1_features(batch["image"])
            l1 = stage1_loss(feats, anchors, batch["mask"], m.grid)
            seg, det = m(batch["image"])
            l2 = stage2_loss(seg, det, anchors, batch["mask"], batch["label"], m.grid)
        losses.setdefault("stage 1", {})[mode] = float(l1)
        losses.setdefault("stage 2", {})[mode] = float(l2)
        maps[mode] = anomaly_map(seg, anchors, m.grid, size, "Industrial").double().flatten(1)
        if mode == "fp32":
            tokens = F.normalize(seg[-1].double(), dim=-1)
            collapse = float((tokens @ tokens.transpose(1, 2)).mean())
    out = {"map_std_fp32": float(maps["fp32"].std(dim=1).mean()), "patch_token_mean_cos_fp32": collapse}
    for mode in modes:
        for ref_mode in ("fp32", "bf16") if mode.startswith("fp8") else ("fp32",):
            if mode == ref_mode or ref_mode not in maps:
                continue
            ref = maps[ref_mode]
            d = (maps[mode] - ref).abs()
            corr = torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(ref, maps[mode])])
            key = f"{mode} vs {ref_mode}"
            out[f"{key}: max_abs_diff"] = float(d.amax())
            out[f"{key}: max_diff_over_std"] = float((d.amax(1) / ref.std(dim=1)).mean())
            out[f"{key}: pearson_min"] = float(corr.min())
    return losses, out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-L-14-336", help="open_clip model (default: %(default)s)")
    p.add_argument("--image_size", type=positive_int, default=518, help="input size (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda when there is one, else cpu)")
    p.add_argument("--precisions", nargs="*", default=["bf16", "fp32"],
                   help="setups with eager vision blocks: bf16: backbone stored in bf16 (what --precision bf16 runs); "
                        "amp: bf16 autocast over the fp32 backbone (numerics only); fp32 (default: %(default)s)")
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
                   help="also the bf16 setup with compiled vision blocks (what training runs on CUDA by default, "
                        "and --compile on)")
    p.add_argument("--fp8", nargs="*", choices=FP8_RECIPES, default=[],
                   help="also the bf16 setups with the FP8 linears of these recipes, compiled (--fp8), with their "
                        "losses and maps against bf16's (default: none)")
    p.add_argument("--profile", action="store_true",
                   help="also each row's GPU kernel time by kind (matrix products, attention, the rest) and one "
                        "layer's attention per SDPA backend")
    p.add_argument("--eval_from_file", action="store_true",
                   help="also time the evaluation with the (random) backbone read from a weight file, as a user's "
                        "evaluation with the OpenAI weights reads it")
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
    rows, losses = [], {}
    if not args.skip_steps:
        # Training and test rows follow the backbone's stored precision, as the scripts run: no "amp" rows.
        setups = ([(precision, False, "none") for precision in args.precisions if precision != "amp"]
                  + ([("bf16", True, "none")] if args.compile else []) + [("bf16", True, r) for r in args.fp8])
        for precision, compiled, fp8 in setups:
            try:
                new_rows, new_losses = bench_steps(args.model, args.image_size, precision, device, args.steps, args,
                                                   compiled, fp8)
            except Exception as e:  # one setup's failure (an FP8 recipe the GPU lacks) leaves the others' rows
                print(f"setup {setup_label(precision, compiled, fp8)} failed: {type(e).__name__}: {e}", flush=True)
                continue
            rows += new_rows
            losses[setup_label(precision, compiled, fp8)] = new_losses
            out.with_suffix(".partial.json").write_text(json.dumps({"rows": rows, "stage2_losses": losses}))
    stage2_agreement = loss_differences(losses)
    sdpa = {}
    if args.profile and device.type == "cuda":
        probe = AdaptedCLIP(build_clip(args.model, "none", args.image_size))
        width = probe.clip.visual.conv1.out_channels
        tokens = probe.grid[0] * probe.grid[1] + 1
        sdpa = sdpa_backends(device, tokens, width, probe.clip.visual.transformer.resblocks[0].attn.num_heads,
                             (args.test_batch, max(args.stage2_batches)))
        print(f"SDPA backends, one layer (ms): {sdpa}", flush=True)
    evals, diffs = {}, {}
    if args.eval_images:
        root = Path(args.work_dir)
        if not (root / "data" / "metadata").exists():
            t0 = time.perf_counter()
            make_mvtec_like(root / "data", args.eval_images, args.workers)
            print(f"wrote the synthetic evaluation set in {time.perf_counter() - t0:.1f} s", flush=True)
        weights = fake_run(root / "run", args.model, args.image_size)
        for precision in [p for p in args.precisions if p in ("bf16", "fp32")]:
            evals[precision] = bench_eval(root, precision, device, args.workers, args.eval_batch)
        if args.eval_from_file:
            evals["bf16, weights from a file"] = bench_eval(root, "bf16", device, args.workers, args.eval_batch,
                                                            weights)
        if {"fp32", "bf16"} <= evals.keys():
            for metric in evals["fp32"]["mean"]:
                pairs = [(evals["fp32"]["per_class"][c][metric], evals["bf16"]["per_class"][c][metric])
                         for c in evals["fp32"]["per_class"]]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if pairs:
                    diffs[metric] = {"max_abs": max(abs(a - b) for a, b in pairs),
                                     "fp32": evals["fp32"]["mean"][metric], "bf16": evals["bf16"]["mean"][metric]}
    # FP8 is compared with bf16 and fp32 whether or not their step rows were timed.
    modes = [mode for mode in ("fp32", "amp", "bf16") if mode in args.precisions
             or (args.fp8 and mode != "amp")] + [f"fp8 {r}" for r in args.fp8]
    both = "fp32" in modes and len(modes) > 1
    loss_diffs, agreement = numerics(args.model, args.image_size, device, modes) if both else ({}, {})
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
                                                    "stage2_agreement": stage2_agreement, "stage2_losses": losses,
                                                    "sdpa_ms": sdpa,
                                                    "device": device_name, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
