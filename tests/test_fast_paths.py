"""The speed paths compute what the plain path computes: Stage 2 through CUDA graphs, the compiled vision
blocks, the FP8 linears. The CUDA tests run where a GPU is (the CPU CI skips them); docs/benchmarks.md has the
same checks at the real shapes."""
import argparse
import builtins
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test as test_script

from cli import COMPILE_PAYS_AFTER_IMAGES, check_fp8, compile_for
from conftest import data_args, run_main
from engine import CudaGraphStage2, fast_stage2, image_adapter_step, stage2_terms
from forward_utils import STAGE2_TERMS, PromptBank, class_anchor_fn
from model import AdaptedCLIP, build_clip, get_tokenizer
from model.adapter import compiled
from utils.errors import UserError

SIZE = 56
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model(device: str) -> AdaptedCLIP:
    torch.manual_seed(0)
    model = AdaptedCLIP(build_clip("tiny", "none", SIZE)).to(device)
    model.text_adapter.requires_grad_(False)
    return model.train()


def test_cuda_graph_stage2_runs_other_batch_sizes_eagerly():
    """A batch of another size than the graphed one gets `stage2_terms`' eager terms and captures nothing
    (so it also runs on the CPU)."""
    model = tiny_model("cpu")
    terms_fn = CudaGraphStage2(model, batch_size=2)
    batch = fake_batches([1], "cpu")[0]
    anchors = torch.nn.functional.normalize(torch.randn(1, model.embed_dim, 2), dim=1)
    inputs = (batch["image"], anchors, batch["mask"], batch["label"])
    terms = terms_fn(*inputs)
    assert terms_fn.graphed is None
    assert list(terms) == list(STAGE2_TERMS)
    for key, value in stage2_terms(model, *inputs).items():
        torch.testing.assert_close(terms[key], value, rtol=0, atol=0)


def test_cuda_graph_capture_failure_names_the_fix(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fail)
    model = tiny_model("cpu")
    batch = fake_batches([1], "cpu")[0]
    anchors = torch.randn(1, model.embed_dim, 2)
    with pytest.raises(UserError, match=r"CUDA graph failed \(operation not permitted when stream is capturing\); "
                                        r"run the same command with --no_cuda_graph"):
        CudaGraphStage2(model, batch_size=1)(batch["image"], anchors, batch["mask"], batch["label"])


class GraphCounter:
    """A torch.compile backend that runs dynamo's captured graph as it is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> callable:
        self.graphs += 1
        return gm.forward


def stage2_outputs(model: AdaptedCLIP, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stage 2's forward and the image adapters' gradients of a loss over every output."""
    model.image_adapter.zero_grad(set_to_none=True)
    seg, det = model.image_forward(images)
    out = torch.cat([*(t.flatten() for t in seg), det.flatten()])
    (out * torch.linspace(-1, 1, out.numel())).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.image_adapter.parameters()]


def test_compiled_blocks_share_one_graph_per_kind_and_give_the_eager_values():
    """Regional compilation: dynamo captures one graph per block kind (the first block, whose input needs no
    gradient, then the rest; the adapter mixing likewise), however deep the model, not one per block; the
    compiled path's outputs and adapter gradients are the eager ones; a batch of another size runs eagerly."""
    torch._dynamo.reset()
    compiled.cache_clear()
    counter = GraphCounter()
    model = tiny_model("cpu")
    depth = model.vision_depth
    images = torch.randn(2, 3, SIZE, SIZE)
    ref, ref_grads = stage2_outputs(model, images)
    model.compile_blocks([2], backend=counter)
    out, grads = stage2_outputs(model, images)
    first = counter.graphs
    assert 0 < first <= 4 < depth
    stage2_outputs(model, images)
    stage2_outputs(model, images[:1])
    assert counter.graphs == first
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # Stage 1: the plain and the V-V blocks, one more graph each
        feats, cls = model.stage1_features(images)
        model.compiled_batch_sizes.clear()
        ref_feats, ref_cls = model.stage1_features(images)
    assert counter.graphs == first + 2
    torch.testing.assert_close(cls, ref_cls, rtol=1e-5, atol=1e-6)
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_policy():
    """--compile auto compiles on CUDA a Stage 2 long enough to pay for it, and anything with --fp8; never the
    default few-shot Stage 2, Stage 1, evaluation or the CPU. on and off force it; the batch size compiled is
    the one given."""
    def decide(setting: str, device: str, images: int = 0, fp8: str = "none") -> set[int]:
        model = tiny_model("cpu")
        compile_for(model, argparse.Namespace(compile=setting, fp8=fp8), torch.device(device), 4, images)
        return model.compiled_batch_sizes

    assert decide("auto", "cuda", images=COMPILE_PAYS_AFTER_IMAGES) == {4}
    assert decide("auto", "cuda", images=20 * 12 * 32) == set()  # VisA, 32 shots, 20 epochs
    assert decide("auto", "cuda") == set()
    assert decide("auto", "cuda", fp8="tensorwise") == {4}
    assert decide("auto", "cpu", images=10 * COMPILE_PAYS_AFTER_IMAGES) == set()
    assert decide("on", "cpu") == {4}
    assert decide("off", "cuda", images=10 * COMPILE_PAYS_AFTER_IMAGES, fp8="rowwise") == set()


def test_fp8_linears_follow_bf16_and_pass_gradients_to_the_adapters():
    """`use_fp8`: every linear layer of the vision blocks becomes an FP8 linear (the fused q/k/v projection
    too, sharing the block's weights); the adapted image path stays close to the bf16 one (cosine of the unit
    patch tokens), Stage 1's V-V path still runs, and the image adapters get gradients. Runs on the CPU,
    whose torch has the scaled FP8 matrix product (the GPU check is below and in docs/benchmarks.md)."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = AdaptedCLIP(build_clip("tiny", "none", SIZE))
    model.set_backbone_dtype(torch.bfloat16)
    images = torch.randn(2, 3, SIZE, SIZE)
    with model.autocast(), torch.no_grad():
        ref_seg, ref_det = model(images)
        ref_feats, _ = model.stage1_features(images)
    assert model.precision == "bf16"
    model.use_fp8("tensorwise")
    assert model.precision == "bf16+fp8 tensorwise"
    block = model.clip.visual.transformer.resblocks[0]
    linears = [block.attn.qkv_proj, block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj]
    assert {type(m).__name__ for m in linears} == {"Float8Linear"}
    assert block.attn.qkv_proj.weight is block.attn.in_proj_weight
    with model.autocast():
        seg, det = model(images)
        feats, _ = model.stage1_features(images)
    for a, b in [*zip(seg, ref_seg), *zip(feats, ref_feats)]:
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
        assert cos.min() > 0.98 and cos.mean() > 0.995
    assert not torch.equal(seg[-1], ref_seg[-1])  # the FP8 path ran
    sum(s.float().sum() for s in seg).backward()
    adapters = model.image_adapter["layer_adapters"].parameters()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_test_py_fp8_scores_close_to_its_default_and_says_so(runs, data, tmp_path):
    """`test.py --fp8 tensorwise` (bf16, as on a GPU) on a trained tiny run: every metric defined where the
    default's is, the results JSON names the FP8 precision, and the per-image scores stay within 10% (the image
    scores within 3%) of the default bf16 evaluation's (measured: 5.2% and 1.3%)."""
    pytest.importorskip("torchao")
    out = {}
    for name, extra in [("bf16", []), ("fp8", ["--fp8", "tensorwise"])]:
        run_main(test_script, ["--save_path", str(runs / "baseline"), *data_args(data), "--precision", "bf16",
                               "--results_dir", str(tmp_path / name), *extra])
        out[name] = json.loads(next((tmp_path / name).glob("*_epoch2.json")).read_text())
    assert out["bf16"]["meta"]["precision"] == "bf16" and out["fp8"]["meta"]["precision"] == "bf16+fp8 tensorwise"
    for metric, value in out["bf16"]["mean"].items():
        assert (value is None) == (out["fp8"]["mean"][metric] is None), metric
    # image_score (in [0, 1]) and map_max (about 4 here) of every image
    scores = {name: np.loadtxt(next((tmp_path / name).glob("*_images.csv")), delimiter=",", skiprows=1,
                               usecols=[3, 4]) for name in out}
    relative = np.abs(scores["fp8"] - scores["bf16"]) / np.abs(scores["bf16"])
    assert relative.max() < 0.1 and relative[:, 0].max() < 0.03


def test_fp8_errors_name_the_fix(monkeypatch):
    model = tiny_model("cpu")
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(UserError, match=r"--fp8 needs torchao: pip install torchao"):
        model.use_fp8("tensorwise")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(UserError, match=r"--fp8 needs a GPU with FP8 tensor cores .*NVIDIA A100 has none\. Drop --fp8"):
        check_fp8(torch.device("cuda"))


def stage2_run(model: AdaptedCLIP, start: dict, batches: list[dict], terms_fn) -> tuple[list[float], dict]:
    """Stage-2 steps from the adapter weights `start`; returns the losses and the final weights."""
    device = torch.device("cuda")
    model.image_adapter.load_state_dict(start)
    bank = PromptBank(get_tokenizer("tiny"), "MVTec", ["bottle", "screw"]).to(device)
    # SGD: the update is proportional to the gradient, so the comparison sees the gradients' differences
    # (Adam would turn rounding-level differences of near-zero gradients into lr-sized steps).
    opt = torch.optim.SGD(model.image_adapter.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [16000, 32000], 0.5)
    anchor_fn = class_anchor_fn(model, bank, adapt=True)
    losses = [float(image_adapter_step(model, b, opt, sched, anchor_fn, device, terms_fn=terms_fn))
              for b in batches]
    return losses, copy.deepcopy(model.image_adapter.state_dict())


def fake_batches(sizes: list[int], device: str = "cuda") -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for b in sizes:
        mask = (torch.rand(b, 1, SIZE, SIZE, generator=g) > 0.9).float()
        mask[0] = 0
        out.append({"image": torch.randn(b, 3, SIZE, SIZE, generator=g).to(device), "mask": mask.to(device),
                    "label": (mask.flatten(1).amax(1) > 0).long().to(device),
                    "class_idx": torch.arange(b).remainder(2).to(device)})
    return out


@cuda
def test_cuda_graph_stage2_steps_equal_eager_steps():
    """Six fp32 Stage-2 steps (the last with a smaller batch, which runs eagerly) through the graphs give
    the eager run's losses and weights (up to the fused attention backward's nondeterministic summation order)."""
    model = tiny_model("cuda")
    start = copy.deepcopy(model.image_adapter.state_dict())
    batches = fake_batches([2, 2, 2, 2, 2, 1])
    eager_losses, eager_state = stage2_run(model, start, batches, None)
    terms_fn = fast_stage2(model, cuda_graph_batch=2)
    graph_losses, graph_state = stage2_run(model, start, batches, terms_fn)
    assert terms_fn.graphed is not None
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    for k in eager_state:
        torch.testing.assert_close(graph_state[k], eager_state[k], rtol=1e-5, atol=1e-6)


@cuda
def test_compiled_blocks_under_cuda_graphs_equal_eager_steps():
    """Inductor-compiled blocks replayed from Stage 2's CUDA graphs: the eager run's losses and weights."""
    model = tiny_model("cuda")
    start = copy.deepcopy(model.image_adapter.state_dict())
    batches = fake_batches([2, 2, 2, 2, 1])
    eager_losses, eager_state = stage2_run(model, start, batches, None)
    model.compile_blocks([2])
    terms_fn = fast_stage2(model, cuda_graph_batch=2)
    losses, state = stage2_run(model, start, batches, terms_fn)
    model.compiled_batch_sizes.clear()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    for k in eager_state:
        torch.testing.assert_close(state[k], eager_state[k], rtol=1e-4, atol=1e-5)


@cuda
def test_fp8_stage2_on_the_gpu_follows_bf16():
    """The FP8 path on FP8 tensor cores as --fp8 trains: compiled, replayed from Stage 2's CUDA graphs, with a
    token count (2 x 17) that FP8 matrix products cannot take for the frozen weights' unused gradient. Its
    losses stay within 2% of the bf16 steps' from the same weights and batches."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")
    model = tiny_model("cuda")
    model.set_backbone_dtype(torch.bfloat16)
    start = copy.deepcopy(model.image_adapter.state_dict())
    batches = fake_batches([2, 2, 2, 1])
    ref_losses, _ = stage2_run(model, start, batches, None)
    model.use_fp8("tensorwise")
    model.compile_blocks([2])
    losses, _ = stage2_run(model, start, batches, fast_stage2(model, cuda_graph_batch=2))
    model.compiled_batch_sizes.clear()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=0)

