"""The speed paths compute what the plain path computes: Stage 2 through CUDA graphs, the compiled image
forward. The CUDA tests run where a GPU is (the CPU CI skips them); docs/benchmarks.md has the same checks
at the real shapes."""
import copy

import pytest
import torch

from engine import CompiledForward, CudaGraphForward, fast_image_forward, image_adapter_step
from forward_utils import PromptBank, class_anchor_fn
from model import AdaptedCLIP, build_clip, get_tokenizer
from utils.errors import UserError

SIZE = 56
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model(device: str) -> AdaptedCLIP:
    torch.manual_seed(0)
    model = AdaptedCLIP(build_clip("tiny", "none", SIZE)).to(device)
    model.text_adapter.requires_grad_(False)
    return model.train()


def test_cuda_graph_forward_runs_other_batch_sizes_eagerly():
    """A batch of another size than the graphed one is `model(images)` itself and captures nothing (so it
    also runs on the CPU)."""
    model = tiny_model("cpu")
    forward = CudaGraphForward(model, model, batch_size=2)
    images = torch.randn(1, 3, SIZE, SIZE)
    seg, det = forward(images)
    ref_seg, ref_det = model(images)
    assert forward.graphed is None
    torch.testing.assert_close(det, ref_det, rtol=0, atol=0)
    for a, b in zip(seg, ref_seg):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graph_capture_failure_names_the_fix(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fail)
    model = tiny_model("cpu")
    forward = CudaGraphForward(model, model, batch_size=1)
    with pytest.raises(UserError, match=r"CUDA graph failed \(operation not permitted when stream is capturing\); "
                                        r"run the same command with --no_cuda_graph"):
        forward(torch.randn(1, 3, SIZE, SIZE))


def test_compiled_forward_serves_the_first_batch_size_of_each_grad_mode():
    """`CompiledForward`: the first batch size seen with and without grad goes through the compiled
    function, other sizes run eagerly (no recompilation), and both give `image_forward`'s result."""
    m = tiny_model("cpu")
    forward = CompiledForward(m)
    calls = []

    def recording(image):
        calls.append((image.shape[0], torch.is_grad_enabled()))
        return m.image_forward(image)

    forward.compiled = recording
    images = {b: torch.randn(b, 3, SIZE, SIZE) for b in (1, 2)}
    for b, grad in [(2, True), (1, True), (2, True), (1, False), (2, False)]:
        with torch.set_grad_enabled(grad):
            seg, det = forward(images[b])
            ref_seg, ref_det = m.image_forward(images[b])
        torch.testing.assert_close(det, ref_det, rtol=0, atol=0)
        torch.testing.assert_close(seg, ref_seg, rtol=0, atol=0)
    assert calls == [(2, True), (2, True), (1, False)]


def stage2_run(model: AdaptedCLIP, start: dict, batches: list[dict], forward) -> tuple[list[float], dict]:
    """Stage-2 steps from the adapter weights `start`; returns the losses and the final weights."""
    device = torch.device("cuda")
    model.image_adapter.load_state_dict(start)
    bank = PromptBank(get_tokenizer("tiny"), "MVTec", ["bottle", "screw"]).to(device)
    # SGD: the update is proportional to the gradient, so the comparison sees the gradients' differences
    # (Adam would turn rounding-level differences of near-zero gradients into lr-sized steps).
    opt = torch.optim.SGD(model.image_adapter.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [16000, 32000], 0.5)
    anchor_fn = class_anchor_fn(model, bank, adapt=True)
    losses = [float(image_adapter_step(model, b, opt, sched, anchor_fn, device, image_forward=forward))
              for b in batches]
    return losses, copy.deepcopy(model.image_adapter.state_dict())


def fake_batches(sizes: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for b in sizes:
        mask = (torch.rand(b, 1, SIZE, SIZE, generator=g) > 0.9).float()
        mask[0] = 0
        out.append({"image": torch.randn(b, 3, SIZE, SIZE, generator=g).cuda(), "mask": mask.cuda(),
                    "label": (mask.flatten(1).amax(1) > 0).long().cuda(),
                    "class_idx": torch.arange(b).remainder(2).cuda()})
    return out


@cuda
def test_cuda_graph_stage2_steps_equal_eager_steps():
    """Six fp32 Stage-2 steps (the last with a smaller batch, which runs eagerly) through the graphs give
    the eager run's losses and weights (up to the fused attention backward's nondeterministic summation order)."""
    model = tiny_model("cuda")
    start = copy.deepcopy(model.image_adapter.state_dict())
    batches = fake_batches([2, 2, 2, 2, 2, 1])
    eager_losses, eager_state = stage2_run(model, start, batches, None)
    forward = fast_image_forward(model, cuda_graph_batch=2)
    graph_losses, graph_state = stage2_run(model, start, batches, forward)
    assert forward.graphed is not None
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    for k in eager_state:
        torch.testing.assert_close(graph_state[k], eager_state[k], rtol=1e-5, atol=1e-6)


@cuda
def test_compiled_image_forward_equals_eager():
    model = tiny_model("cuda").eval()
    images = torch.randn(3, 3, SIZE, SIZE, device="cuda")
    with torch.no_grad():
        ref_seg, ref_det = model.image_forward(images)
        forward = fast_image_forward(model, compile=True)
        seg, det = forward(images)
    assert forward.batch == {False: 3}
    torch.testing.assert_close(det, ref_det, rtol=1e-4, atol=1e-5)
    for a, b in zip(seg, ref_seg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
