"""The frozen CLIP backbone: any open_clip ViT CLIP, built at a chosen image size, with weights from
an OpenAI TorchScript `.pt`, a state-dict file, open_clip's `openai` download, or none (random)."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import open_clip
import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed

from utils.errors import UserError

open_clip.add_model_config(Path(__file__).parent / "configs")

OPENAI_URLS = {
    "ViT-L-14-336": "https://openaipublic.azureedge.net/clip/models/"
    "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# Seconds `--pretrained openai` waits for a connection to the download host before it calls the machine
# offline (open_clip's own download retries for about a minute).
REACHABLE_TIMEOUT_S = 3.0
# Keys the OpenAI TorchScript archive stores beside the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads CLIP weights from an OpenAI TorchScript archive, a torch state dict (`.pt/.pth/.bin`,
    optionally wrapped in `state_dict`/`model` and with `module.` prefixes) or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"weight file {path} not found. Download the OpenAI CLIP weights (e.g. ViT-L-14-336px.pt from "
            f"{OPENAI_URLS['ViT-L-14-336']}) and pass its path with --pretrained, or use --pretrained openai "
            "when online, or --pretrained none for random weights"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif _is_torchscript(path):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/zip/safetensors raise many types for a damaged file
        raise UserError(f"cannot read weight file {path} ({type(e).__name__}: {e}); the file is damaged or not "
                        "a CLIP checkpoint: download it again") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"weight file {path} holds no state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if k not in _OPENAI_EXTRA_KEYS}
    return sd


def _hf_files(cfg: dict) -> tuple[str, list[str]] | None:
    """(repository, file names in the order open_clip tries them) when open_clip's `download_pretrained`
    fetches `cfg` from the Hugging Face Hub (its default when huggingface_hub is installed), else None."""
    hf = cfg.get("hf_hub", "")
    if not hf or not open_clip.pretrained.has_hf_hub():
        return None
    repo, filename = os.path.split(hf)
    filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
    alternatives = getattr(open_clip.pretrained, "_get_safe_alternatives", lambda name: ())
    safe = list(alternatives(filename)) if getattr(open_clip.pretrained, "_has_safetensors", False) else []
    return repo, safe + [filename]


def _sha256_matches(path: Path, url: str) -> bool:
    """Whether `path` has the SHA-256 that an openaipublic URL names (its last folder); True for others."""
    expected = url.split("/")[-2] if "openaipublic" in url else ""
    if not expected:
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(expected)


def _cached_openai(cfg: dict) -> str | None:
    """The weights' file in a local cache, which needs no network: Hugging Face's cache (where open_clip
    downloads them), or `~/.cache/clip` (open_clip's URL downloads and OpenAI's `clip` package; checksum
    checked)."""
    if "file" in cfg:
        return cfg["file"]
    hf = _hf_files(cfg)
    if hf:
        from huggingface_hub import try_to_load_from_cache

        repo, names = hf
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    url = cfg.get("url", "")
    path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if url and path.is_file() and _sha256_matches(path, url):
        return str(path)
    return None


def _download_url(cfg: dict) -> str:
    """The URL whose host open_clip's `download_pretrained(cfg)` connects to."""
    hf = _hf_files(cfg)
    if hf:
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{hf[0]}"
    return cfg.get("url", "")


def _hf_offline_mode() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids Hugging Face downloads."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to `url`'s host (or to the proxy the environment sets for it) opens within
    `timeout` seconds, name lookup included."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return True  # nothing to check: let open_clip try
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or (443 if p.scheme == "https" else 1080 if "socks" in p.scheme
                                                      else 80)
    opened = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    # A thread, because a hanging name lookup ignores the socket's timeout.
    thread = threading.Thread(target=connect, name="aaclip-reachable", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _download_openai(model_name: str) -> str:
    """open_clip's `openai` weights for `model_name`: from a local cache when they are there, else
    downloaded; an offline machine fails at once (`REACHABLE_TIMEOUT_S`) instead of after open_clip's
    retries."""
    cfg = open_clip.get_pretrained_cfg(model_name, "openai")
    if not cfg:
        raise UserError(f"open_clip has no 'openai' weights for {model_name}; pass a weight file with --pretrained")
    cached = _cached_openai(cfg)
    if cached:
        return cached
    url = OPENAI_URLS.get(model_name, cfg.get("url", ""))
    source = _download_url(cfg)
    host = urllib.parse.urlsplit(source).hostname or source
    hint = (f"Download {url or 'the OpenAI .pt file'} on a connected machine and pass its path: --pretrained "
            f"/path/{os.path.basename(url) or model_name + '.pt'}")
    if _hf_files(cfg) and _hf_offline_mode():
        raise UserError(f"cannot download the OpenAI weights for {model_name}: HF_HUB_OFFLINE is set (offline) and "
                        f"they are not in the Hugging Face cache. {hint}")
    if not _reachable(source, REACHABLE_TIMEOUT_S):
        raise UserError(f"cannot download the OpenAI weights for {model_name}: this machine is offline ({host} not "
                        f"reachable within {REACHABLE_TIMEOUT_S:g} s) and they are not in a local cache. {hint}")
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as e:  # network errors come in many types
        raise UserError(
            f"downloading the OpenAI weights for {model_name} failed ({type(e).__name__}); this machine is "
            f"probably offline. {hint}"
        ) from None


def load_clip_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Loads a CLIP state dict into `model`, resizing the vision positional embedding to the model's
    grid (bicubic, antialias, CLS kept: open_clip's `resize_pos_embed`).

    The positional embeddings are upcast to fp32 first: OpenAI's archives and `.half()` files hold fp16
    tensors, which the antialiased bicubic resize does not support (the upcast is exact). The other tensors
    keep their dtype here and `load_state_dict` casts them while copying them into the fp32 model: the same
    values, without an fp32 copy of the whole file on the CPU. Non-tensor entries are left for
    `load_state_dict` to reject."""
    sd = {k: v.float() if "positional_embedding" in k and isinstance(v, torch.Tensor) and v.is_floating_point()
          else v for k, v in state_dict.items()}
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    # open_clip's resizing asserts on another width: compare shapes first (positional embeddings
    # legitimately differ with the image size).
    wrong = [f"{k}: {tuple(sd[k].shape)} in the file, {tuple(v.shape)} in the model"
             for k, v in model.state_dict().items()
             if k in sd and "positional_embedding" not in k and sd[k].shape != v.shape]
    if wrong:
        raise UserError(f"weights in {source} do not fit the chosen architecture ({'; '.join(wrong[:2])}); "
                        "pass the --model that the weights were trained for")
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:3]
        raise UserError(
            f"weights in {source} do not fit the chosen architecture ({'; '.join(s.strip() for s in first)}); "
            "pass the --model that the weights were trained for"
        ) from None


def build_clip(
    model_name: str = "ViT-L-14-336",
    pretrained: str = "none",
    image_size: int | None = 518,
    quick_gelu: bool = False,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """Builds an open_clip CLIP (fp32, eval mode, frozen) at `image_size`.

    `pretrained`: `none` (random weights), `openai` (open_clip's download/cache), or a weight file.
    The default activation is plain GELU as in the original AA-CLIP code; `quick_gelu=True` gives the
    activation the OpenAI weights were trained with.
    `device`: where a model with weights is built; its random initialisation, which the weights
    overwrite, then costs milliseconds on a GPU instead of seconds on the CPU. Random weights
    (`none`) are always drawn on the CPU, so a seed gives the same backbone on every device.
    """
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise UserError(f"unknown model {model_name!r}; choose one of open_clip's: {', '.join(open_clip.list_models())}")
    if ("timm_model_name" in cfg.get("vision_cfg", {}) or "hf_model_name" in cfg.get("text_cfg", {})
            or not cfg["vision_cfg"].get("patch_size")):  # ResNet CLIPs have none
        raise UserError(f"{model_name} is not a plain CLIP ViT; AA-CLIP needs open_clip's own VisionTransformer")
    patch = cfg["vision_cfg"]["patch_size"]
    if image_size is not None and image_size % patch:
        raise UserError(f"--image_size {image_size} is not a multiple of {model_name}'s patch size {patch}")
    # The weights' file first: an offline machine stops before the model is built.
    path = _download_openai(model_name) if pretrained == "openai" else pretrained
    state_dict = None
    if pretrained != "none":
        with ThreadPoolExecutor(1) as pool:  # CUDA starts (a second or two) while the file is read
            started = pool.submit(torch.cuda.init) if torch.device(device).type == "cuda" else None
            state_dict = load_state_dict_file(path)
            if started is not None:
                started.result()
    # open_clip logs "No pretrained weights loaded" to stderr (before any error line), although the
    # weights are loaded below.
    logging.disable(logging.WARNING)
    build_on = torch.device("cpu" if pretrained == "none" else device)
    # A model with weights draws its (overwritten) initialisation from forked generators, so the seeded RNG
    # that initialises the adapters next is in the same state whichever device the model is built on.
    forked = [] if pretrained == "none" else [build_on] if build_on.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked, enabled=pretrained != "none"), build_on:
            model = open_clip.create_model(model_name, pretrained=None, force_image_size=image_size,
                                           force_quick_gelu=quick_gelu, device=build_on)
    finally:
        logging.disable(logging.NOTSET)
    if state_dict is not None:
        load_clip_weights(model, state_dict, str(path))
    model.eval().requires_grad_(False)
    return model


def get_tokenizer(model_name: str):
    """open_clip's tokenizer for `model_name`: `tokenizer(list_of_str) -> LongTensor [N, 77]`."""
    return open_clip.get_tokenizer(model_name)
