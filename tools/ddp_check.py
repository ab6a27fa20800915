"""torchrun check: one process vs N (default 2) at the real shapes (ViT-L-14-336 at 518 px, random weights).

    python tools/ddp_check.py --out results/ddp_check                   # on a machine with 2 GPUs
    python tools/ddp_check.py --model tiny --image_size 56 --device cpu --steps 3 --eval_images 30 \\
        --train_images 30 --out /tmp/ddp_check                            # CPU smoke run (gloo)

Measures, each in 1 process and under `torchrun --nproc_per_node N`:
  - the losses of the same stream of synthetic global batches (Stage 2 in fp32 and at --precision, Stage 1
    at --precision), from the same initial weights: their largest relative difference;
  - training speed (img/s at the global batch) of Stage 1 and Stage 2, median step after warm-up;
  - test.py end to end on an MVTec-sized synthetic set (results must be byte for byte equal), and
    once more in 1 process with N times the loader workers (the same CPU as the N-process run);
  - train.py end to end (1 + 1 epochs on a small synthetic set, checkpoints every 2 steps).
Prints a Markdown report and writes <out>.md and <out>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forward_utils import PromptBank, class_anchor_fn  # noqa: E402
from model import AdaptedCLIP, build_clip, get_tokenizer  # noqa: E402
from tools.benchmark import MVTEC_CLASSES, fake_batch, fake_run, make_mvtec_like  # noqa: E402
from engine import GradMean, fast_stage2, image_adapter_step, text_adapter_step  # noqa: E402
from cli import RANDOM_WEIGHTS_BANNER  # noqa: E402
from utils.distributed import close_distributed, init_distributed, is_main, rank, shard, world_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BF16_UNIT = 2.0 ** -8  # bf16's relative rounding unit: differences below it are within bf16's precision
FP32_TOLERANCE = 1e-4  # float sums in another order, amplified a little by 20 Adam steps


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-L-14-336", help="open_clip model (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=518, help="input size (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="of the timed steps; auto = bf16 on CUDA, fp32 on the CPU (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun runs (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="global batch of both stages (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="steps per stage after warm-up (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (default: %(default)s)")
    p.add_argument("--eval_images", type=int, default=1725,
                   help="images of the synthetic MVTec-like test set (0: skip the evaluation) (default: %(default)s)")
    p.add_argument("--eval_batch", type=int, default=32, help="test.py --batch_size (default: %(default)s)")
    p.add_argument("--train_images", type=int, default=64,
                   help="images of the train.py set (0: skip train.py) (default: %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="loader processes per process (default: %(default)s)")
    p.add_argument("--threads", type=int, default=4, help="OMP_NUM_THREADS of every process (default: %(default)s)")
    p.add_argument("--work_dir", default="/tmp/aaclip_ddp_check", help="synthetic data and runs (default: %(default)s)")
    p.add_argument("--out", default="results/ddp_check", help="writes <out>.md and <out>.json (default: %(default)s)")
    p.add_argument("--role", choices=["main", "steps"], default="main",
                   help="internal: 'steps' is the training-step measurement that main starts in each setting "
                        "(default: %(default)s)")
    p.add_argument("--json", default=None, help="internal: where the 'steps' role writes its numbers")
    return p


# ---------------------------------------------------------------- the 'steps' role (1 or N processes)

def local_slice(batch: dict, r: int, world: int) -> dict:
    """Rank r's contiguous slice of a global batch, as train.py's RankSlices cuts it."""
    rows = shard(len(batch["image"]), world, r)
    return {k: v[rows.start: rows.stop] for k, v in batch.items()}


def run_steps(step, n_steps: int, warmup: int, batch: int, size: int, device: torch.device) -> dict:
    """Losses of every step and seconds of the timed ones; global batch i is `fake_batch(seed=i)`."""
    losses, seconds = [], []
    for i in range(warmup + n_steps):
        local = local_slice(fake_batch(batch, size, torch.device("cpu"), seed=i), rank(), world_size())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = float(step(local))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        losses.append(loss)
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
    return {"losses": losses, "step_s": statistics.median(seconds) if seconds else None}


def steps_role(args: argparse.Namespace) -> None:
    """Stage 2 in fp32, Stage 2 and Stage 1 at the timed precision, from the same initial weights in every
    setting (the text adapter Stage 2 sees is the untrained one, so Stage 1 cannot shift Stage 2)."""
    device = init_distributed(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    model = AdaptedCLIP(build_clip(args.model, "none", args.image_size)).to(device)
    bank = PromptBank(get_tokenizer(args.model), "MVTec", MVTEC_CLASSES).to(device)
    image_init = {k: v.clone() for k, v in model.image_adapter.state_dict().items()}
    out = {"world": world_size(), "precision": precision}

    def stage2() -> dict:
        """Stage 2 at the backbone's stored precision."""
        model.image_adapter.load_state_dict(image_init)
        opt = torch.optim.Adam(model.image_adapter.parameters(), lr=5e-4, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [16000, 32000], 0.5)
        anchor_fn = class_anchor_fn(model, bank, adapt=True)
        grad_mean = GradMean(list(model.image_adapter.parameters())) if world_size() > 1 else None
        model.train()
        # As train.py: on CUDA each full slice replays a CUDA graph.
        local_batch = len(shard(args.batch, world_size(), rank()))
        terms_fn = fast_stage2(model, cuda_graph_batch=local_batch if device.type == "cuda" else None)
        return run_steps(lambda b: image_adapter_step(model, b, opt, sched, anchor_fn, device, grad_mean, terms_fn),
                         args.steps, args.warmup, args.batch, args.image_size, device)

    out["stage2_fp32"] = stage2()
    if precision == "bf16":
        model.set_backbone_dtype(torch.bfloat16)
    out["stage2"] = stage2()
    cfg = argparse.Namespace(stage1_all_levels=False, text_norm_weight=0.1)
    params = list(model.text_adapter.parameters())
    opt = torch.optim.Adam(params, lr=1e-5, betas=(0.5, 0.999))
    anchor_fn = class_anchor_fn(model, bank, adapt=True, grad=True)
    grad_mean = GradMean(params) if world_size() > 1 else None
    out["stage1"] = run_steps(lambda b: text_adapter_step(model, b, opt, anchor_fn, cfg, device, grad_mean),
                              args.steps, args.warmup, args.batch, args.image_size, device)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if is_main():
        Path(args.json).write_text(json.dumps(out))
    close_distributed()


# ---------------------------------------------------------------- the 'main' role

def launch(script: str, argv: list[str], nproc: int, env: dict) -> float:
    """Runs `script` in 1 process (on the first GPU) or under torchrun; returns the wall seconds."""
    if nproc == 1:
        cmd = [sys.executable, script, *argv]
        env = dict(env, CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
               *argv]
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        print(proc.stdout[-6000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def eval_times(results: Path) -> tuple[float, float]:
    """(images read and scored, metrics) seconds from test.log's last timing line."""
    line = [ln for ln in (results / "test.log").read_text().splitlines() if "images read and scored" in ln][-1]
    scored, metrics = re.search(r"read and scored in ([\d.]+) s, metrics in ([\d.]+) s", line).groups()
    return float(scored), float(metrics)


def final_adapter(run: Path) -> dict:
    return torch.load(run / "image_adapter.pth", map_location="cpu", weights_only=True)["image_adapter"]


def epoch_losses(run: Path) -> list[str]:
    return [ln.split("loss ")[-1] for ln in (run / "train.log").read_text().splitlines()
            if re.search(r"epoch \d+/\d+: loss", ln)]


def max_metric_diff(a: Path, b: Path) -> float:
    """Largest |difference| between two test.py result files over every class and metric (points)."""
    x, y = json.loads(a.read_text())["per_class"], json.loads(b.read_text())["per_class"]
    if x.keys() != y.keys():
        return float("inf")
    return max((abs(x[c][m] - y[c][m]) for c in x for m in x[c] if x[c][m] is not None), default=0.0)


def main_role(args: argparse.Namespace) -> None:
    n = args.nproc
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    cuda = args.device != "cpu" and torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    lines = [f"# torchrun check: 1 process vs {n} ({device_name}, {args.model} at {args.image_size} px)", "",
             f"{RANDOM_WEIGHTS_BANNER} (speed and agreement only). Global batch {args.batch}, {args.steps} timed steps "
             f"after {args.warmup} warm-up; {args.workers} loader workers and {args.threads} threads per process.", ""]
    report: dict = {"device": device_name, "argv": sys.argv}

    # training steps
    steps = {}
    for nproc in (1, n):
        path = work / f"steps_{nproc}.json"
        common = ["--role", "steps", "--json", str(path), "--model", args.model, "--image_size", str(args.image_size),
                  "--device", args.device, "--precision", args.precision, "--batch", str(args.batch),
                  "--steps", str(args.steps), "--warmup", str(args.warmup)]
        launch("tools/ddp_check.py", common, nproc, env)
        steps[nproc] = json.loads(path.read_text())
    report["steps"] = steps
    one, many = steps[1], steps[n]
    prec = one["precision"]
    checks = [(f"Stage 2 losses, fp32 ({args.warmup + args.steps} steps)",
               max_rel_diff(one["stage2_fp32"]["losses"], many["stage2_fp32"]["losses"]), FP32_TOLERANCE),
              (f"Stage 2 losses, {prec}", max_rel_diff(one["stage2"]["losses"], many["stage2"]["losses"]),
               BF16_UNIT if prec == "bf16" else FP32_TOLERANCE),
              (f"Stage 1 losses, {prec}", max_rel_diff(one["stage1"]["losses"], many["stage1"]["losses"]),
               BF16_UNIT if prec == "bf16" else FP32_TOLERANCE)]
    lines += ["## Agreement", "", f"| check | 1 vs {n} processes | tolerance | verdict |", "|---|---|---|---|"]
    lines += [f"| {name}: max relative difference | {d:.2e} | {tol:.1e} | {'PASS' if d <= tol else 'FAIL'} |"
              for name, d, tol in checks]
    speed = [(f"Stage 1 (baseline, {prec}), img/s", args.batch / one["stage1"]["step_s"],
              args.batch / many["stage1"]["step_s"]),
             (f"Stage 2 ({prec}), img/s", args.batch / one["stage2"]["step_s"], args.batch / many["stage2"]["step_s"])]

    # evaluation
    if args.eval_images:
        data = work / "eval_data"
        if not (data / "metadata").exists():
            make_mvtec_like(data, args.eval_images, args.workers)
        fake_run(work / "run", args.model, args.image_size)
        n_images = sum(1 for _ in open(data / "metadata" / "MVTec" / "full-shot.jsonl"))
        evals = {}
        for label, nproc, workers in [("1", 1, args.workers), (str(n), n, args.workers),
                                      (f"1, {n}x workers", 1, n * args.workers)]:
            results = work / f"eval_{label.replace(', ', '_').replace(' ', '')}"
            argv = ["--save_path", str(work / "run"), "--dataset", "MVTec", "--data_root", str(data),
                    "--metadata_dir", str(data / "metadata"), "--num_workers", str(workers), "--batch_size",
                    str(args.eval_batch), "--device", args.device, "--results_dir", str(results)]
            wall = launch("test.py", argv, nproc, env)
            scored, metrics = eval_times(results)
            evals[label] = {"wall_s": wall, "scored_s": scored, "metrics_s": metrics, "dir": results}
        # The metrics' float64 cumulative sums run in parallel on the GPU, so even two 1-process runs differ
        # in the last bits (1e-14 points measured on an H200); the maps themselves must be identical.
        diff = max_metric_diff(evals["1"]["dir"] / "MVTec_epoch1.json", evals[str(n)]["dir"] / "MVTec_epoch1.json")
        same_scores = ((evals["1"]["dir"] / "MVTec_epoch1_images.csv").read_bytes()
                       == (evals[str(n)]["dir"] / "MVTec_epoch1_images.csv").read_bytes())
        lines += [f"| evaluation metrics ({n_images} images): max abs difference (points) | {diff:.1e} | 1e-9 | "
                  f"{'PASS' if diff <= 1e-9 else 'FAIL'} |",
                  f"| per-image scores (MVTec_epoch1_images.csv) byte-equal | {same_scores} | "
                  f"equal | {'PASS' if same_scores else 'FAIL'} |"]
        same = {"metrics_max_abs_diff": diff, "per_image_scores_equal": same_scores}
        speed += [(f"evaluation, images read and scored ({n_images} images, batch {args.eval_batch}), img/s",
                   n_images / evals["1"]["scored_s"], n_images / evals[str(n)]["scored_s"]),
                  ("evaluation end to end (model build, scoring, metrics, files), s",
                   evals["1"]["wall_s"], evals[str(n)]["wall_s"])]
        extra = evals[f"1, {n}x workers"]
        report["eval"] = {k: {kk: vv for kk, vv in v.items() if kk != "dir"} for k, v in evals.items()}
        report["eval_equal"] = same

    # train.py end to end
    if args.train_images:
        data = work / "train_data"
        if not (data / "metadata").exists():
            make_mvtec_like(data, args.train_images, args.workers)
        walls, runs = {}, {}
        for nproc in (1, n):
            runs[nproc] = work / f"train_{nproc}"
            argv = ["--model", args.model, "--image_size", str(args.image_size), "--dataset", "MVTec",
                    "--data_root", str(data), "--metadata_dir", str(data / "metadata"), "--training_mode",
                    "full_shot", "--text_epoch", "1", "--image_epoch", "1", "--text_batch_size", str(args.batch),
                    "--image_batch_size", str(args.batch), "--checkpoint_every", "2", "--num_workers",
                    str(args.workers), "--device", args.device, "--precision", args.precision,
                    "--save_path", str(runs[nproc])]
            subprocess.run(["rm", "-rf", str(runs[nproc])], check=True)
            walls[nproc] = launch("train.py", argv, nproc, env)
        delta = max(float((a - b).abs().max()) for a, b in zip(final_adapter(runs[1]).values(),
                                                                   final_adapter(runs[n]).values()))
        losses = {k: epoch_losses(v) for k, v in runs.items()}
        speed.append(("train.py end to end (1 + 1 epochs, checkpoints every 2 steps), s", walls[1], walls[n]))
        report["train_py"] = {"wall_s": walls, "epoch_losses": losses, "max_abs_weight_diff": delta}

    lines += ["", "## Speed", "", f"| measurement | 1 process | {n} processes | speed-up |", "|---|---|---|---|"]
    for name, a, b in speed:
        ratio = a / b if name.endswith(", s") else b / a
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {ratio:.2f}x |")
    if args.eval_images:
        lines += ["", f"Evaluation in 1 process with {n * args.workers} loader workers (the CPU of the "
                      f"{n}-process run): {n_images / extra['scored_s']:.1f} img/s scored, "
                      f"{extra['wall_s']:.1f} s end to end. "
                      f"Metrics on rank 0: {evals['1']['metrics_s']:.1f} s (1 process), "
                      f"{evals[str(n)]['metrics_s']:.1f} s ({n} processes)."]
    if args.train_images:
        lines += ["", f"train.py epoch losses (stage 1, stage 2): 1 process {losses[1]}, {n} processes {losses[n]}; "
                      f"final image adapters differ by at most {delta:.2e}."]
    peak = [f"{k} process(es): {v['peak_gib']:.1f} GiB" for k, v in steps.items() if "peak_gib" in v]
    if peak:
        lines += ["", "Peak GPU memory of the step measurement (rank 0): " + ", ".join(peak) + "."]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))


def main() -> None:
    args = get_parser().parse_args()
    if args.role == "steps":
        steps_role(args)
    else:
        main_role(args)


if __name__ == "__main__":
    main()
