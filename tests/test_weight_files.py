"""Weight files that hold fp16 tensors (OpenAI's TorchScript archives, `.half()` state dicts, fp16
`.safetensors`) load at the native and at another image size, with the tiny random CLIP."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import build_clip, get_tokenizer, load_state_dict_file

NATIVE = 84  # tiny.json: 6 x 6 patches of 14 px
RESIZED = 112  # 8 x 8 patches
POS = "visual.positional_embedding"
OPENAI_EXTRA = {"input_resolution": NATIVE, "context_length": 77, "vocab_size": 49408}
# OpenAI's files are TorchScript archives, so writing one needs the deprecated `torch.jit.script`.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def openai_fp16_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The dtypes of OpenAI's released weights: their `convert_weights` turns conv/linear weights and
    biases, MultiheadAttention's input projection, `proj` and `text_projection` to fp16, the rest
    (LayerNorms, embeddings, class embedding, logit scale) stays fp32."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):  # attention's out_proj is a Linear
            for p in (module.weight, module.bias):
                if p is not None:
                    p.data = p.data.half()
        if isinstance(module, torch.nn.MultiheadAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.half()
            module.in_proj_bias.data = module.in_proj_bias.data.half()
        for name in ("proj", "text_projection"):
            p = getattr(module, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.data = p.data.half()
    return model.state_dict()


class _Archive(torch.nn.Module):
    """Holds a state dict under its exact key names (nested submodules), plus OpenAI's three scalar
    entries, so that the scripted module's `state_dict()` is the one of OpenAI's archives."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in sd.items():
            *path, leaf = name.split(".")
            module: torch.nn.Module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
        for name, value in OPENAI_EXTRA.items():
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    sd = openai_fp16_state_dict(model)
    torch.jit.script(_Archive(sd)).save(str(path))
    return sd


def save_half_state_dict(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    sd = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(sd, path)
    return sd


def save_half_safetensors(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return sd


Saver = Callable[[torch.nn.Module, Path], dict[str, torch.Tensor]]
FORMATS: dict[str, tuple[str, Saver]] = {
    "openai_torchscript": ("tiny-openai.pt", save_torchscript),
    "half_state_dict": ("tiny-half.pt", save_half_state_dict),
    "half_safetensors": ("tiny-half.safetensors", save_half_safetensors),
}


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_clip("tiny", "none", NATIVE)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return get_tokenizer("tiny")(["a photo of a damaged bottle.", "x"])


@pytest.fixture(scope="module", params=list(FORMATS))
def weight_file(request, source, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(path, the state dict as stored in the file), written once per format."""
    name, save = FORMATS[request.param]
    path = tmp_path_factory.mktemp(request.param) / name
    return path, save(source, path)


def reference_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Independent of open_clip: the fp32 upcast, CLS row kept, the grid resized bicubic with antialias
    (left as it is at the native grid)."""
    pos = pos.float()
    old = int((pos.shape[0] - 1) ** 0.5)
    if grid == old:
        return pos
    img = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def test_openai_archive_is_shaped_like_the_real_file(source, tmp_path):
    """The fixture itself: the raw archive carries the extra scalar keys and mixed fp16/fp32 dtypes;
    `load_state_dict_file` drops the extra keys and keeps the stored dtypes."""
    stored = save_torchscript(source, tmp_path / "tiny-openai.pt")
    raw = torch.jit.load(str(tmp_path / "tiny-openai.pt"), map_location="cpu").state_dict()
    assert set(raw) == set(source.state_dict()) | set(OPENAI_EXTRA)
    assert all(raw[k].ndim == 0 and raw[k].item() == v for k, v in OPENAI_EXTRA.items())
    half = {k for k, v in stored.items() if v.dtype == torch.float16}
    for key in ("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                "visual.transformer.resblocks.0.attn.in_proj_bias", "transformer.resblocks.0.attn.out_proj.bias",
                "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.proj", "text_projection"):
        assert key in half, key
    for key in ("visual.class_embedding", POS, "positional_embedding", "token_embedding.weight",
                "visual.ln_pre.weight", "ln_final.bias", "logit_scale"):
        assert stored[key].dtype == torch.float32, key
    sd = load_state_dict_file(tmp_path / "tiny-openai.pt")
    assert set(sd) == set(source.state_dict())
    assert all(sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in stored.items())


@pytest.mark.parametrize("size", [NATIVE, RESIZED])
def test_fp16_weight_file_loads(weight_file, tokens, size):
    """Weights equal the file's values upcast to fp32 (exact), the vision positional embedding equals
    the independent reference, and the model runs."""
    path, stored = weight_file
    model = build_clip("tiny", str(path), size)
    loaded = model.state_dict()
    assert set(loaded) == set(stored)
    for k, v in stored.items():
        if k != POS:
            assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()), k
    grid = size // 14
    assert loaded[POS].shape == (grid * grid + 1, 64)
    torch.testing.assert_close(loaded[POS], reference_pos_embed(stored[POS], grid), rtol=0, atol=0)
    with torch.no_grad():
        image = model.encode_image(torch.randn(2, 3, size, size))
        text = model.encode_text(tokens)
    assert image.shape == text.shape == (2, 64)
    assert image.isfinite().all() and text.isfinite().all()


def test_half_state_dict_at_another_size_regression(source, tmp_path):
    """The reported failure: a `.half()` state dict at a non-native size raised NotImplementedError
    (no fp16 antialiased bicubic). It now loads, with the embedding bit-identical to open_clip's
    resize of the fp32 upcast."""
    stored = save_half_state_dict(source, tmp_path / "tiny-half.pt")
    assert stored[POS].dtype == torch.float16
    model = build_clip("tiny", str(tmp_path / "tiny-half.pt"), RESIZED)
    expected = {POS: stored[POS].float()}
    open_clip.model.resize_pos_embed(expected, model)
    torch.testing.assert_close(model.visual.positional_embedding, expected[POS], rtol=0, atol=0)


def test_building_with_weights_leaves_the_seeded_rng_alone(tmp_path):
    """The initialisation that a weight file overwrites draws from forked generators: after the build the
    seeded RNG is where the seed put it (so the adapters initialise the same whichever device the backbone
    is built on), while a random backbone (`none`) draws from it, as test.py's redraw from the seed needs."""
    path = tmp_path / "w.pt"
    torch.save(build_clip("tiny", "none", 56).state_dict(), path)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    build_clip("tiny", str(path), 56)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(3)
    build_clip("tiny", "none", 56)
    assert not torch.equal(torch.rand(4), expected)
