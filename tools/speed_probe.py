"""Probe: where Stage-2 and test time goes, and what CUDA graphs / torch.compile buy (ViT-L-14-336 @ 518)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import MVTEC_CLASSES, cuda_time, fake_batch  # noqa: E402
from forward_utils import PromptBank, anomaly_map, class_anchor_fn, image_logits  # noqa: E402
from model import AdaptedCLIP, build_clip, get_tokenizer  # noqa: E402
from train import image_adapter_step  # noqa: E402


class Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


class Fwd:
    def __init__(self, m, g):
        self.m, self.g, self.grid = m, g, m.grid

    def __call__(self, x):
        return self.g(x)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-L-14-336")
    p.add_argument("--size", type=int, default=518)
    p.add_argument("--variants", nargs="+", default=["eager", "graph", "compile", "profile"])
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    dev = torch.device("cuda")
    args = argparse.Namespace(precision="bf16")
    torch.manual_seed(0)
    clip = build_clip(a.model, "none", a.size)
    bank = PromptBank(get_tokenizer(a.model), "MVTec", MVTEC_CLASSES).to(dev)

    def fresh():
        m = AdaptedCLIP(clip).to(dev)
        m.set_backbone_dtype(torch.bfloat16)
        m.text_adapter.requires_grad_(False)
        return m

    def stage2(m, b, fwd=None):
        batch = fake_batch(b, a.size, dev)
        opt = torch.optim.Adam(m.image_adapter.parameters(), lr=5e-4, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [16000, 32000], 0.5)
        anchor_fn = class_anchor_fn(m, bank, adapt=True)
        m.train()
        return lambda: image_adapter_step(m if fwd is None else fwd, batch, opt, sched, anchor_fn, bank, args, dev)

    def test_fwd(m, b, fwd=None):
        batch = fake_batch(b, a.size, dev)
        m.eval()
        anchor_fn = class_anchor_fn(m, bank, adapt=True)
        f = m if fwd is None else fwd

        @torch.no_grad()
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                anchors = anchor_fn(batch["image"], batch["class_idx"])
                seg, det = f(batch["image"])
            anomaly_map(seg, anchors, m.grid, a.size, "Industrial")
            image_logits(det, anchors)
        return run

    def report(name, b, fn, warm=3):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t = cuda_time(fn, a.steps, warm, dev)
        print(f"{name:<40} batch {b:>2}: {b / t:7.1f} img/s  ({t * 1000:.1f} ms; first call {first:.1f} s; "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)", flush=True)

    if "eager" in a.variants:
        m = fresh()
        for b in (2, 16):
            report("stage2 eager", b, stage2(m, b))
        report("test eager", 32, test_fwd(m, 32))
    if "graph" in a.variants:
        for b in (2, 16):
            m = fresh()
            m.train()
            sample = torch.randn(b, 3, a.size, a.size, device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                torch.cuda.make_graphed_callables(m, (sample,))
            report("stage2 graphed forward+backward", b, stage2(m, b))
    if "compile" in a.variants:
        m = fresh()
        cm = torch.compile(m)
        report("test compiled forward", 32, test_fwd(m, 32, cm), warm=2)
        for b in (16, 2):
            report("stage2 compiled forward", b, stage2(m, b, cm), warm=2)
    if "graph_compiled" in a.variants:
        for b in (2, 16):
            m = fresh()
            m.train()
            wrapper = Wrap(m)
            wrapper.forward = torch.compile(wrapper.forward)
            sample = torch.randn(b, 3, a.size, a.size, device=dev)
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                g = torch.cuda.make_graphed_callables(wrapper, (sample,))
            print(f"graph over compiled: capture {time.perf_counter() - t0:.1f} s", flush=True)
            report("stage2 graph over compiled", b, stage2(m, b, Fwd(m, g)))
    if "reduce" in a.variants:
        m = fresh()
        cm = torch.compile(m, mode="reduce-overhead")
        report("test compiled reduce-overhead", 32, test_fwd(m, 32, cm), warm=3)
        for b in (2, 16):
            report("stage2 compiled reduce-overhead", b, stage2(m, b, cm), warm=3)
    if "profile" in a.variants:
        from torch.profiler import ProfilerActivity, profile
        m = fresh()
        for name, fn in [("stage2 b16", stage2(m, 16)), ("test b32", test_fwd(m, 32)), ("stage2 b2", stage2(m, 2))]:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            print(f"== {name} (3 steps)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


if __name__ == "__main__":
    main()
