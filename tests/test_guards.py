"""Guards on every published number, each against an independent computation.

The references here are written from docs/spec/aa-clip-baseline.md and share no code with the project: a
float64 AA-CLIP built from open_clip's own modules and the checkpoints' raw weight matrices (prompts,
anchors, adapter mixing, image forward, V-V Stage-1 features, maps, image scores), numpy losses, scipy's
Gaussian filter, PIL for images and masks, scikit-learn for the metrics. They check the evaluation plumbing
(`--all_epochs`, `--epoch`, saved non-default settings, a run without Stage 1, predict.py), the industrial
image score on scores that do not separate the labels, `stage2_loss`, the anchors of Stage 1, Stage 2 and
test time for mixed-class batches, the adapted text path with its adapters on, the cross-attention context
in training and at test time, and mask resizing at real sizes.
"""
import csv
import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.special import logsumexp
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import engine
import predict
import test as test_script
import train
import train_cross_attention
from conftest import data_args, run_main, train_args
from dataset import ADDataset
from dataset.loader import AugmentParams
from forward_utils import PromptBank, class_anchor_fn, get_adapted_text_embedding, stage2_loss
from metrics import metrics_eval
from model import AdaptedCLIP, build_clip, get_tokenizer
from model.adapter_cross_attention import CrossAttentionModule
from variants import VARIANTS

# ---------------------------------------------------------------- the spec's data (§4, §6, §7)
NORMAL_STATES = ["{}", "a {}", "the {}"]
ABNORMAL_STATES = ["a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage"]
TEMPLATES = ["{}.", "a photo of {}."]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64)
KERNEL_RADIUS, SIGMA = 3, 1.0  # industrial blur: kernel 7, sigma 1
CLASSES = ("disc", "stripes")

# Non-default settings: evaluation must take them from args.json (the defaults would give other numbers). The
# larger learning rate makes the two Stage-2 epochs' scores differ by far more than the tolerances.
CUSTOM_FLAGS = ["--image_lr", "0.005", "--text_adapt_weight", "0.3", "--image_adapt_weight", "0.25", "--relu",
                "--levels", "1", "3", "5", "8", "--text_adapt_until", "2", "--image_adapt_until", "3"]
# Batches of 3 out of the 4 training samples (2 per class): the first batch of every epoch mixes the classes.
BATCH_FLAGS = ["--text_batch_size", "3", "--image_batch_size", "3"]


# ---------------------------------------------------------------- float64 reference AA-CLIP
def leaky(x):
    return F.leaky_relu(x, 0.01)


def mix(x, weight_matrix, w):
    """§2 residual mixing: a = LeakyReLU(x W^T), a * ||x|| / ||a||, w a + (1 - w) x."""
    a = leaky(x @ weight_matrix.T)
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
    return w * a + (1 - w) * x


def projection(sd, prefix, x):
    """SimpleProj from its raw weights: `fc.weight` (plain Linear) or `fc.0.weight` (Linear + LeakyReLU)."""
    if f"{prefix}.fc.weight" in sd:
        return x @ sd[f"{prefix}.fc.weight"].T
    return leaky(x @ sd[f"{prefix}.fc.0.weight"].T)


def reference_clip(saved):
    """The run's random backbone (training seeds torch with --seed, then builds it), in float64."""
    torch.manual_seed(saved["seed"])
    clip = open_clip.create_model(saved["model"], pretrained=None, force_image_size=saved["image_size"],
                                  force_quick_gelu=saved["quick_gelu"])
    return clip.double().eval().requires_grad_(False)


def as_double(sd):
    return {k: v.detach().double() for k, v in sd.items()}


def load_state(path, key):
    return as_double(torch.load(path, map_location="cpu", weights_only=True)[key])


def sentences(name, states):
    return [t.format(s.format(name)) for s in states for t in TEMPLATES]


TOKENIZE = open_clip.get_tokenizer("tiny")


def ref_text_embeddings(clip, texts, text_sd, w):
    """§2 adapted text path on open_clip's own blocks (all 77 positions, causal mask); `text_sd` None is
    CLIP's own encode_text. The adapters are `text_sd`'s `i.fc.0.weight`, the last entry the projection."""
    tokens = TOKENIZE(texts)
    x = clip.token_embedding(tokens) + clip.positional_embedding
    n_adapters = None if text_sd is None else len(text_sd) - 1
    for i, block in enumerate(clip.transformer.resblocks):
        x = block(x, attn_mask=clip.attn_mask)
        if text_sd is not None and i < n_adapters:
            x = mix(x, text_sd[f"{i}.fc.0.weight"], w)
    x = clip.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(dim=-1)]
    if text_sd is None:
        return x @ clip.text_projection
    return leaky(x @ text_sd[f"{n_adapters}.fc.0.weight"].T)


def ref_anchors(clip, class_name, text_sd, w):
    """§4: normalise each prompt embedding, average per group, normalise -> [D, 2] (normal, abnormal)."""
    name = class_name.replace("_", " ")
    cols = []
    for states in (NORMAL_STATES, ABNORMAL_STATES):
        emb = F.normalize(ref_text_embeddings(clip, sentences(name, states), text_sd, w), dim=-1)
        cols.append(F.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(cols, dim=1)


def default_levels(depth):
    return [depth // 4 * (i + 1) for i in range(4)]


def embed(clip, images):
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(len(images), 1, -1), x], dim=1) + v.positional_embedding
    return v.ln_pre(x)


def ref_image_forward(clip, images, image_sd, w, levels):
    """§2 adapted image path on open_clip's blocks -> (seg tokens per level [B, N, D], det token [B, D])."""
    v = clip.visual
    n_adapters = len([k for k in image_sd if k.startswith("layer_adapters.")])
    x = embed(clip, images)
    taps = []
    for i in range(max(levels)):
        x = v.transformer.resblocks[i](x)
        if i < n_adapters:
            x = mix(x, image_sd[f"layer_adapters.{i}.fc.0.weight"], w)
        if i + 1 in levels:
            taps.append(v.ln_post(x[:, 1:]))
    seg = [F.normalize(projection(image_sd, f"seg_proj.{k}", t), dim=-1) for k, t in enumerate(taps)]
    det = F.normalize(projection(image_sd, "det_proj", taps[-1]), dim=-1).mean(dim=1)
    return seg, det


def vv_block(block, x):
    """§3 V-V attention block: softmax(v v^T / sqrt(d_head)) v per head, with the block's own weights."""
    h = block.ln_1(x)
    c, heads = x.shape[-1], block.attn.num_heads
    v = h @ block.attn.in_proj_weight[2 * c:].T + block.attn.in_proj_bias[2 * c:]
    v = v.view(*v.shape[:2], heads, c // heads).transpose(1, 2)
    att = (v @ v.transpose(-1, -2) / (c // heads) ** 0.5).softmax(dim=-1)
    o = (att @ v).transpose(1, 2).reshape(x.shape)
    x = x + block.attn.out_proj(o)
    return x + block.mlp(block.ln_2(x))


def ref_stage1_features(clip, images, level, first_vv):
    """§3 Stage-1 features at one level: plain blocks before `first_vv` (0-based), V-V from there on,
    normalize(ln_post(patches) @ proj) + normalize(plain CLS embedding)."""
    v = clip.visual
    x = plain = embed(clip, images)
    for block in v.transformer.resblocks:
        plain = block(plain)
    cls = v.ln_post(plain[:, 0]) @ v.proj
    for i in range(level):
        block = v.transformer.resblocks[i]
        x = block(x) if i < first_vv else vv_block(block, x)
    return F.normalize(v.ln_post(x[:, 1:]) @ v.proj, dim=-1) + F.normalize(cls, dim=-1)[:, None]


def bilinear_matrix(n_in, n_out):
    """Linear interpolation weights with align_corners=True: output i samples input position i (n_in-1)/(n_out-1)."""
    a = np.zeros((n_out, n_in))
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    a[np.arange(n_out), lo] = 1 - frac
    a[np.arange(n_out), lo + 1] = frac
    return a


def ref_maps(seg, anchors, grid, size):
    """§5 test maps: (S1 + 1 - S0) / 2 per level, Gaussian blur (reflect), bilinear upsampling, summed.
    anchors: [B, D, 2] float64 -> [B, size, size] numpy."""
    a = bilinear_matrix(grid, size)
    total = 0
    for f in seg:
        s = 100 * torch.einsum("bnd,bdk->bnk", f, anchors)
        m = ((s[..., 1] + 1 - s[..., 0]) / 2).reshape(-1, grid, grid).numpy()
        m = np.stack([gaussian_filter(x, SIGMA, mode="mirror", truncate=KERNEL_RADIUS / SIGMA) for x in m])
        total = total + a @ m @ a.T
    return total


def ref_scores(det, anchors):
    """§7 raw image score (det . T_abnormal + 1) / 2."""
    return ((torch.einsum("bd,bd->b", det, anchors[:, :, 1]) + 1) / 2).numpy()


def ref_image(path, size):
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float64) / 255).permute(2, 0, 1)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def ref_mask(path, size):
    binary = (np.asarray(Image.open(path).convert("L")) != 0).astype(np.uint8)
    return np.asarray(Image.fromarray(binary).resize((size, size), Image.NEAREST)) != 0


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Reference:
    """A trained run recomputed in float64 from its args.json and raw checkpoint weights."""

    def __init__(self, run: Path):
        self.run = run
        self.saved = json.loads((run / "args.json").read_text())
        self.clip = reference_clip(self.saved)
        text = run / "text_adapter.pth"
        self.text_sd = load_state(text, "text_adapter") if text.exists() else None
        depth = len(self.clip.visual.transformer.resblocks)
        self.levels = self.saved["levels"] or default_levels(depth)
        self.grid = self.saved["image_size"] // self.clip.visual.conv1.kernel_size[0]
        self._anchors = {}

    def anchors(self, class_name, text_sd="final"):
        if text_sd != "final":
            return ref_anchors(self.clip, class_name, text_sd, self.saved["text_adapt_weight"])
        if class_name not in self._anchors:
            self._anchors[class_name] = ref_anchors(self.clip, class_name, self.text_sd,
                                                    self.saved["text_adapt_weight"])
        return self._anchors[class_name]

    def forward(self, images, image_sd):
        return ref_image_forward(self.clip, images, image_sd, self.saved["image_adapt_weight"], self.levels)

    def outputs(self, paths, class_name, epoch):
        """Raw image scores [N] and maps [N, S, S] of image files of one class, with epoch `epoch`'s weights."""
        size = self.saved["image_size"]
        images = torch.stack([ref_image(p, size) for p in paths])
        seg, det = self.forward(images, load_state(self.run / f"image_adapter_{epoch}.pth", "image_adapter"))
        anchors = self.anchors(class_name).expand(len(paths), -1, -1)
        return ref_scores(det, anchors), ref_maps(seg, anchors, self.grid, size)

    def evaluate(self, data, epoch):
        """Per image path: (class, label, raw score, map max); per class: the spec's metrics (percent)."""
        size = self.saved["image_size"]
        samples = read_jsonl(data / "meta" / "Synthetic" / "full-shot.jsonl")
        per_image, per_class = {}, {}
        for name in CLASSES:
            rows = [s for s in samples if s["class_name"] == name]
            scores, maps = self.outputs([data / "syn" / s["image_path"] for s in rows], name, epoch)
            masks = np.stack([ref_mask(data / "syn" / s["mask_path"], size) if s["mask_path"]
                              else np.zeros((size, size), bool) for s in rows])
            labels = np.array([int(s["label"]) for s in rows])
            for s, score, m in zip(rows, scores, maps):
                per_image[s["image_path"]] = (name, int(s["label"]), float(score), float(m.max()))
            per_class[name] = spec_metrics(maps, scores, labels, masks)
        return per_image, per_class


@functools.lru_cache
def reference_of(run: Path) -> Reference:
    return Reference(run)


def f1_max(labels, scores):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(f1.max())


def min_max(x):
    return (x - x.min()) / (x.max() - x.min())


def spec_metrics(maps, scores, labels, masks, domain="Industrial"):
    """§7 per class, in float64: min-max maps and scores over the class; image score 0.5 max(map) + 0.5 s
    (industrial) or max(map) (medical); scikit-learn metrics, in percent."""
    maps = min_max(np.asarray(maps, np.float64))
    peak = maps.reshape(len(maps), -1).max(axis=1)
    image = 0.5 * peak + 0.5 * min_max(np.asarray(scores, np.float64)) if domain == "Industrial" else peak
    pixels, truth = maps.reshape(-1), np.asarray(masks).reshape(-1)
    return {"image_auroc": 100 * roc_auc_score(labels, image), "image_ap": 100 * average_precision_score(labels, image),
            "image_f1_max": 100 * f1_max(labels, image),
            "pixel_auroc": 100 * roc_auc_score(truth, pixels), "pixel_ap": 100 * average_precision_score(truth, pixels),
            "pixel_f1_max": 100 * f1_max(truth, pixels)}


# ---------------------------------------------------------------- trained runs, their steps recorded
class StepRecorder:
    """Records every Stage-1 / Stage-2 step of a training: its batch, the trained weights before the step,
    the loss the step returns, the anchors it asked its variant for and the contexts the cross-attention
    received; calls outside a step (test time) go to `outside`. Hooks only the step functions, the variants'
    anchor functions and the cross-attention module, never the maths under test."""

    def __init__(self):
        self.stage1, self.stage2 = [], []
        self.outside = {"anchors": [], "contexts": []}
        self.current = None
        self._inside_anchor_fn = False

    def _target(self):
        return self.current if self.current is not None else self.outside

    def _step(self, steps, real, snapshot):
        def step(model, batch, *a, **k):
            self.current = {"batch": batch, **snapshot(model), "anchors": [], "contexts": []}
            try:
                loss = real(model, batch, *a, **k)
            finally:
                record, self.current = self.current, None
            steps.append(dict(record, loss=float(loss)))
            return loss
        return step

    def _anchor_fn(self, real):
        def make(variant, *a, **k):
            fn = real(variant, *a, **k)

            def anchors(images, class_idx, *a2, **k2):
                outer = not self._inside_anchor_fn
                self._inside_anchor_fn = True
                try:
                    out = fn(images, class_idx, *a2, **k2)
                finally:
                    self._inside_anchor_fn = not outer
                if outer:
                    self._target()["anchors"].append(out.detach().double())
                return out
            return anchors
        return make

    def install(self, mp):
        mp.setattr(engine, "text_adapter_step", self._step(
            self.stage1, engine.text_adapter_step, lambda m: {"text_sd": as_double(m.text_adapter.state_dict())}))
        mp.setattr(engine, "image_adapter_step", self._step(
            self.stage2, engine.image_adapter_step, lambda m: {"image_sd": as_double(m.image_adapter.state_dict())}))
        owners = {k for v in VARIANTS.values() for k in type(v).__mro__ if "anchor_fn" in vars(k)}
        for klass in owners:
            mp.setattr(klass, "anchor_fn", self._anchor_fn(vars(klass)["anchor_fn"]))
        real_cross = CrossAttentionModule.forward

        def cross(module, x, context, *a, **k):
            self._target()["contexts"].append(context.detach().double())
            return real_cross(module, x, context, *a, **k)
        mp.setattr(CrossAttentionModule, "forward", cross)


def recorded_training(module, argv):
    """Trains with `argv`, every step recorded; the loss-curve figure a finished run draws (seconds of
    matplotlib, no number in it) is skipped."""
    rec = StepRecorder()
    with pytest.MonkeyPatch.context() as mp:
        rec.install(mp)
        run_main(module, argv)
    return rec


@pytest.fixture(scope="module")
def custom(data, tmp_path_factory):
    """A baseline run with non-default adapter settings, Stage 1: 1 epoch, Stage 2: 2 epochs, its steps
    recorded: (run folder, StepRecorder)."""
    save = tmp_path_factory.mktemp("guards") / "custom"
    rec = recorded_training(train, train_args(data, save) + ["--image_epoch", "2", *BATCH_FLAGS, *CUSTOM_FLAGS])
    return save, rec


@pytest.fixture(scope="module")
def no_text(data, tmp_path_factory):
    """A baseline run without Stage 1 (--text_epoch 0), steps recorded."""
    save = tmp_path_factory.mktemp("guards") / "no_text"
    rec = recorded_training(train, train_args(data, save) + ["--text_epoch", "0", *BATCH_FLAGS])
    return save, rec


@pytest.fixture(scope="module")
def cross(data, tmp_path_factory):
    """A cross-attention run trained without --sanity_check, steps and contexts recorded."""
    save = tmp_path_factory.mktemp("guards") / "cross"
    rec = recorded_training(train_cross_attention, train_args(data, save) + BATCH_FLAGS)
    return save, rec


SCORE_TOL = 2e-6  # raw image scores: float32 pipeline vs float64 reference (5e-7 seen), and the CSV's 6 decimals
MAP_TOL = 2e-4  # map maxima (sums of differences of logits of order 100: 6e-5 seen)
METRIC_TOL = 1e-3  # percent (2e-4 seen: float32 near-ties among the pixels)


def assert_results_equal_reference(results: Path, name: str, reference, data, epoch):
    """`<name>.json` and `<name>_images.csv` hold the reference's numbers of `epoch`'s weights."""
    per_image, per_class = reference.evaluate(data, epoch)
    rows = read_csv(results / f"{name}_images.csv")
    assert sorted(r["image_path"] for r in rows) == sorted(per_image)
    for r in rows:
        cls, label, score, peak = per_image[r["image_path"]]
        assert (r["class_name"], int(r["label"])) == (cls, label)
        assert float(r["image_score"]) == pytest.approx(score, abs=SCORE_TOL), r
        assert float(r["map_max"]) == pytest.approx(peak, abs=MAP_TOL), r
    res = json.loads((results / f"{name}.json").read_text())
    assert res["meta"]["epoch"] == epoch and Path(res["meta"]["checkpoint"]).name == f"image_adapter_{epoch}.pth"
    for cls, expected in per_class.items():
        for key, value in expected.items():
            assert res["per_class"][cls][key] == pytest.approx(value, abs=METRIC_TOL), (cls, key)
    return per_image


# ---------------------------------------------------------------- evaluation plumbing
def test_custom_run_has_non_default_settings(custom):
    saved = json.loads((custom[0] / "args.json").read_text())
    assert (saved["text_adapt_weight"], saved["image_adapt_weight"], saved["relu"], saved["levels"],
            saved["text_adapt_until"], saved["image_adapt_until"]) == (0.3, 0.25, True, [1, 3, 5, 8], 2, 3)


def test_all_epochs_reports_each_epochs_own_weights(custom, data, tmp_path, monkeypatch):
    """--all_epochs: every epoch's table and per-image scores are those of its own checkpoint, evaluated with
    the run's saved (non-default) settings; the two epochs differ. The per-epoch curve of the class means,
    where test.py writes one, holds each epoch's own means."""
    run, _ = custom
    monkeypatch.setattr(test_script, "curve_png", lambda *a, **k: b"", raising=False)  # a figure: no numbers
    run_main(test_script, ["--save_path", str(run), *data_args(data), "--all_epochs", "--results_dir", str(tmp_path)])
    reference = reference_of(run)
    scores = {epoch: assert_results_equal_reference(tmp_path, f"Synthetic_epoch{epoch}", reference, data, epoch)
              for epoch in (1, 2)}
    gap = max(abs(scores[1][p][2] - scores[2][p][2]) for p in scores[1])
    assert gap > 100 * SCORE_TOL, "the two epochs' weights give the same scores: the test would see nothing"
    curve = tmp_path / "Synthetic_curve.csv"
    if curve.exists():
        rows = {int(r["epoch"]): r for r in read_csv(curve)}
        assert sorted(rows) == [1, 2]
        for epoch, row in rows.items():
            per_class = reference.evaluate(data, epoch)[1]
            for key in per_class["disc"]:
                mean = np.mean([m[key] for m in per_class.values()])
                assert float(row[key]) == pytest.approx(mean, abs=METRIC_TOL), (epoch, key)


def test_epoch_flag_evaluates_that_epoch(custom, data, tmp_path):
    run, _ = custom
    run_main(test_script, ["--save_path", str(run), *data_args(data), "--epoch", "1", "--results_dir", str(tmp_path)])
    assert_results_equal_reference(tmp_path, "Synthetic_epoch1", reference_of(run), data, 1)
    assert not (tmp_path / "Synthetic_epoch2.json").exists()


@pytest.mark.parametrize("epoch", [1, 2, None])
def test_predict_epoch_flag(custom, data, tmp_path, epoch):
    """predict.py --epoch K gives the raw scores and map maxima of image_adapter_K.pth (default: the last)."""
    run, _ = custom
    folder = data / "syn" / "stripes" / "test"
    run_main(predict, ["--save_path", str(run), "--images", str(folder), "--class_name", "stripes", "--dataset",
                       "Synthetic", "--out", str(tmp_path), "--num_workers", "0", "--device", "cpu",
                       *(["--epoch", str(epoch)] if epoch else [])])
    rows = read_csv(tmp_path / "scores.csv")
    used = epoch or 2
    assert json.loads((tmp_path / "scores.json").read_text())["meta"]["epoch"] == used
    reference = reference_of(run)
    paths = [Path(r["image_path"]) for r in rows]
    assert len(paths) == 6
    scores, maps = reference.outputs(paths, "stripes", used)
    other, _ = reference.outputs(paths, "stripes", 3 - used)
    assert np.abs(scores - other).max() > 100 * SCORE_TOL
    for r, score, m in zip(rows, scores, maps):
        assert float(r["image_score"]) == pytest.approx(score, abs=SCORE_TOL), r
        assert float(r["map_max"]) == pytest.approx(m.max(), abs=MAP_TOL), r


def test_run_without_stage1_uses_clips_own_text_path(no_text, data, tmp_path):
    """--text_epoch 0: Stage 2 trains, and test.py and predict.py evaluate, on the anchors of CLIP's own
    encode_text (text_projection, no adapters)."""
    run, rec = no_text
    assert not (run / "text_adapter.pth").exists()
    reference = reference_of(run)
    assert reference.text_sd is None
    assert len(rec.stage2) == 2 and not rec.stage1
    for step in rec.stage2:
        check_stage2_step(reference, step)
    run_main(test_script, ["--save_path", str(run), *data_args(data), "--results_dir", str(tmp_path / "results")])
    assert_results_equal_reference(tmp_path / "results", "Synthetic_epoch1", reference, data, 1)
    run_main(predict, ["--save_path", str(run), "--images", str(data / "syn" / "disc" / "test"), "--class_name", "disc",
                       "--dataset", "Synthetic", "--out", str(tmp_path / "pred"), "--num_workers", "0",
                       "--device", "cpu"])
    rows = read_csv(tmp_path / "pred" / "scores.csv")
    scores, _ = reference.outputs([Path(r["image_path"]) for r in rows], "disc", 1)
    np.testing.assert_allclose([float(r["image_score"]) for r in rows], scores, rtol=0, atol=SCORE_TOL)


# ---------------------------------------------------------------- the industrial image score (§7)
def overlapping_class(seed, n=12, size=6):
    """Maps, image scores, labels and masks of one class whose map maxima and image scores each rank some
    normal image above some anomalous one, on other scales than [0, 1]."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2))
    maps = rng.random((n, size, size)) * 3 + 2
    masks = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, size - 2, 2)
        masks[i, r:r + 2, c:c + 3] = True
        maps[i][masks[i]] += 1.5 * rng.random()
    scores = 0.45 + 0.1 * rng.random(n) + 0.03 * labels
    return maps, scores, labels, masks


def test_industrial_image_score_on_overlapping_scores():
    maps, scores, labels, masks = overlapping_class(6)
    peak = maps.reshape(len(maps), -1).max(axis=1)
    # Neither part separates the labels, and every plausible misreading of the formula changes the numbers.
    assert 0.5 < roc_auc_score(labels, peak) < 1 and 0.5 < roc_auc_score(labels, scores) < 1
    expected = spec_metrics(maps, scores, labels, masks)
    norm_peak = min_max(maps).reshape(len(maps), -1).max(axis=1)
    variants = {"scores not min-maxed": 0.5 * norm_peak + 0.5 * scores,
                "maps not min-maxed": 0.5 * peak + 0.5 * min_max(scores),
                "map mean": 0.5 * min_max(maps).reshape(len(maps), -1).mean(axis=1) + 0.5 * min_max(scores),
                "other weights": 0.3 * norm_peak + 0.7 * min_max(scores),
                "map max only": norm_peak, "score only": scores}
    for what, wrong in variants.items():
        assert abs(100 * roc_auc_score(labels, wrong) - expected["image_auroc"]) > 0.5 or \
            abs(100 * average_precision_score(labels, wrong) - expected["image_ap"]) > 0.5, what
    for domain in ("Industrial", "Medical"):
        got = metrics_eval(torch.from_numpy(maps), torch.from_numpy(scores), torch.from_numpy(labels),
                           torch.from_numpy(masks), domain)
        want = spec_metrics(maps, scores, labels, masks, domain)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (domain, key)


def test_evaluate_classes_normalises_each_class_on_its_own():
    """test.py's per-class evaluation with interleaved classes on very different scales: each class's maps
    and scores are min-max normalised over that class only, and each class gets its own labels and masks."""
    a, b = overlapping_class(5, n=8), overlapping_class(6, n=8)
    b = (b[0] * 10 - 7, b[1] * 3 + 1, b[2], b[3])
    order = [("a", i) for i in range(8)] + [("b", i) for i in range(8)]
    order = [order[i] for i in np.random.default_rng(0).permutation(16)]
    parts = {"a": a, "b": b}
    samples = [{"class_name": c, "label": int(parts[c][2][i])} for c, i in order]
    maps = torch.from_numpy(np.stack([parts[c][0][i] for c, i in order])).float()
    scores = torch.tensor([parts[c][1][i] for c, i in order], dtype=torch.float32)
    masks = torch.from_numpy(np.stack([parts[c][3][i] for c, i in order]))
    ds = SimpleNamespace(samples=samples, class_names=["a", "b"], has_masks=True)
    got = test_script.evaluate_classes(ds, maps, scores, masks, "Industrial")
    for c in ("a", "b"):
        want = spec_metrics(*(np.asarray(x, np.float64) for x in parts[c][:2]), parts[c][2], parts[c][3])
        for key, value in want.items():
            assert got[c][key] == pytest.approx(value, abs=1e-3), (c, key)


# ---------------------------------------------------------------- stage2_loss (§5, §6)
def np_seg_loss(logits, mask):
    """Softmax over the 2 channels, focal (gamma 2, one-hot clamped to [1e-5, 1 - 1e-5], pt + 1e-5, mean
    over pixels) + dice(p0, 1 - m) + dice(p1, m). logits [B, 2, H, W], mask [B, H, W]."""
    p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    onehot = np.clip(np.stack([1 - mask, mask], axis=1), 1e-5, 1 - 1e-5)
    pt = (onehot * p).sum(axis=1) + 1e-5
    focal = np.mean(-((1 - pt) ** 2) * np.log(pt))

    def dice(x, y):
        return 1 - np.mean((2 * (x * y).sum((1, 2)) + 1) / (x.sum((1, 2)) + y.sum((1, 2)) + 1))

    return focal + dice(p[:, 0], 1 - mask) + dice(p[:, 1], mask)


def np_stage2_loss(seg, det, anchors, mask, label, grid):
    """Cross-entropy of det . T (no temperature) + seg loss of every level on the bilinearly upsampled
    (align_corners=True) logits 100 P T, patches in row-major order."""
    size = mask.shape[-1]
    rows, cols = bilinear_matrix(grid[0], size), bilinear_matrix(grid[1], size)
    total = 0.0
    for f in seg:
        logits = 100 * np.einsum("bnd,bdk->bkn", f, anchors).reshape(len(f), 2, *grid)
        total += np_seg_loss(rows @ logits @ cols.T, mask[:, 0])
    z = np.einsum("bd,bdk->bk", det, anchors)
    ce = np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), label])
    return ce + total


def test_stage2_loss_hand_computed_uniform_case():
    """Zero features: every probability is 1/2 and the logits of the image are 0, so by hand: CE = ln 2;
    per level focal = -(1/2 - 1e-5)^2 ln(1/2 + 1e-5) (pt = 1/2 + 1e-5 at every pixel), dice of the normal
    channel (2 * 1.5 + 1) / (2 + 3 + 1) -> 1/3, of the abnormal channel (2 * 0.5 + 1) / (2 + 1 + 1) -> 1/2."""
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    seg = [torch.zeros(1, 4, 3) for _ in range(2)]
    anchors = F.normalize(torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(0)), dim=1)
    loss = stage2_loss(seg, torch.zeros(1, 3), anchors, mask, torch.tensor([1]), (2, 2))
    focal = -((0.5 - 1e-5) ** 2) * np.log(0.5 + 1e-5)
    assert loss.item() == pytest.approx(np.log(2) + 2 * (focal + 1 / 3 + 1 / 2), rel=1e-6)


def test_stage2_loss_against_float64_reimplementation():
    """A non-square grid, per-sample anchors, both labels, two levels, logits of order 1."""
    g = torch.Generator().manual_seed(4)
    seg = [0.03 * torch.randn(2, 6, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    det = torch.randn(2, 5, generator=g, dtype=torch.float64)
    anchors = F.normalize(torch.randn(2, 5, 2, generator=g, dtype=torch.float64), dim=1)
    mask = (torch.rand(2, 1, 7, 7, generator=g) > 0.6).double()
    label = torch.tensor([1, 0])
    got = stage2_loss([s.float() for s in seg], det.float(), anchors.float(), mask.float(), label, (2, 3))
    want = np_stage2_loss([s.numpy() for s in seg], det.numpy(), anchors.numpy(), mask.numpy(), label.numpy(), (2, 3))
    assert got.item() == pytest.approx(want, rel=1e-5)
    # the inputs are not degenerate: dropping a level or the labels' order changes the loss
    assert abs(want - np_stage2_loss([seg[-1].numpy()], det.numpy(), anchors.numpy(), mask.numpy(), label.numpy(),
                                     (2, 3))) > 0.1
    assert abs(want - np_stage2_loss([s.numpy() for s in seg], det.numpy(), anchors.numpy(), mask.numpy(),
                                     1 - label.numpy(), (2, 3))) > 0.1


# ---------------------------------------------------------------- anchors and losses of the training steps
def batch_anchors(reference, batch, text_sd="final"):
    return torch.stack([reference.anchors(c, text_sd) for c in batch["class_name"]])


def check_stage2_step(reference, step):
    """One recorded Stage-2 step: the anchors it used are each image's class anchors as test time makes
    them (recomputed); its loss is the float64 loss of the reference forward (the weights before the step)
    against those anchors and the batch's masks and labels."""
    batch = step["batch"]
    anchors = batch_anchors(reference, batch)
    assert len(step["anchors"]) == 1
    torch.testing.assert_close(step["anchors"][0], anchors, rtol=0, atol=1e-5)
    seg, det = reference.forward(batch["image"].double(), step["image_sd"])
    want = np_stage2_loss([f.numpy() for f in seg], det.numpy(), anchors.numpy(), batch["mask"].double().numpy(),
                          batch["label"].numpy(), (reference.grid, reference.grid))
    assert step["loss"] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_stage2_steps_use_the_test_anchors_for_mixed_class_batches(custom):
    """Every Stage-2 step (non-default settings), in batches that mix the classes: anchors and loss as
    `check_stage2_step` recomputes them."""
    run, rec = custom
    reference = reference_of(run)
    assert len(rec.stage2) == 4  # 2 epochs x (3 + 1 samples)
    assert any(len(set(s["batch"]["class_name"])) == 2 for s in rec.stage2)
    assert any(len(set(s["batch"]["label"].tolist())) == 2 for s in rec.stage2)
    for step in rec.stage2:
        check_stage2_step(reference, step)


def np_stage1_loss(feats, anchors, mask, grid, text_norm_weight):
    """§5/§6 Stage 1 (the original's behaviour): the seg loss of the last level only + weight * orthogonality."""
    size = mask.shape[-1]
    a = bilinear_matrix(grid, size)
    logits = 100 * np.einsum("bnd,bdk->bkn", feats, anchors).reshape(len(feats), 2, grid, grid)
    ortho = np.mean((anchors[:, :, 0] * anchors[:, :, 1]).sum(axis=1)) ** 2
    return np_seg_loss(a @ logits @ a.T, mask[:, 0]) + text_norm_weight * ortho


def test_stage1_steps_anchors_and_loss_for_mixed_class_batches(custom):
    """Every Stage-1 step: each image's anchors are its class's adapted anchors with the text weights of
    that step (classes mixed in a batch), and the step's loss is the float64 Stage-1 loss of the V-V
    features of its images."""
    run, rec = custom
    reference = reference_of(run)
    assert len(rec.stage1) == 2 and any(len(set(s["batch"]["class_name"])) == 2 for s in rec.stage1)
    depth = len(reference.clip.visual.transformer.resblocks)
    for step in rec.stage1:
        batch = step["batch"]
        anchors = batch_anchors(reference, batch, step["text_sd"])
        assert len(step["anchors"]) == 1
        torch.testing.assert_close(step["anchors"][0], anchors, rtol=0, atol=1e-5)
        feats = ref_stage1_features(reference.clip, batch["image"].double(), reference.levels[-1],
                                    first_vv=depth // 4 - 1)
        want = np_stage1_loss(feats.numpy(), anchors.numpy(), batch["mask"].double().numpy(), reference.grid,
                              reference.saved["text_norm_weight"])
        assert step["loss"] == pytest.approx(want, rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------- the adapted text path, adapters on
def test_adapted_text_path_with_adapters_on():
    """encode_text(adapt=True) and the anchors (test-time table and Stage-1 per batch) against the residual
    mixing recomputed on open_clip's text blocks, with a large mixing weight and 2 of 4 blocks adapted."""
    torch.manual_seed(0)
    clip = build_clip("tiny", "none", 56)
    model = AdaptedCLIP(clip, text_adapt_weight=0.4, text_adapt_until=2)
    ref_clip = reference_clip({"seed": 0, "model": "tiny", "image_size": 56, "quick_gelu": False})
    text_sd = as_double(model.text_adapter.state_dict())
    assert len(text_sd) == 3
    texts = ["a photo of a damaged disc.", "the stripes.", "x"]
    tokens = get_tokenizer("tiny")(texts)
    with torch.no_grad():
        got = model.encode_text(tokens, adapt=True).double()
    want = ref_text_embeddings(ref_clip, texts, text_sd, 0.4)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (want - ref_text_embeddings(ref_clip, texts, None, 0.4)).abs().max() > 0.1  # the adapters matter

    bank = PromptBank(get_tokenizer("tiny"), "Synthetic", list(CLASSES))
    expected = torch.stack([ref_anchors(ref_clip, c, text_sd, 0.4) for c in CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(get_adapted_text_embedding(model, bank).double(), expected, rtol=0, atol=1e-5)
    class_idx = torch.tensor([1, 0, 1])
    test_time = class_anchor_fn(model, bank)(None, class_idx)
    stage1 = class_anchor_fn(model, bank, grad=True)(None, class_idx)
    torch.testing.assert_close(test_time.double(), expected[class_idx], rtol=0, atol=1e-5)
    torch.testing.assert_close(stage1.detach().double(), expected[class_idx], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the cross-attention context
def test_cross_attention_context_in_training_equals_test_time(cross, data, tmp_path):
    """Without --sanity_check: the context of every Stage-1 and Stage-2 step, and at test time, is the
    first level's Stage-1 features of those images (V-V from that level's block on, CLS residual),
    recomputed independently."""
    run, rec = cross
    reference = reference_of(run)
    level = reference.levels[0]

    def expected(images):
        return ref_stage1_features(reference.clip, images.double(), level, first_vv=level - 1)

    steps = rec.stage1 + rec.stage2
    assert len(rec.stage1) == len(rec.stage2) == 2
    for step in steps:
        assert len(step["contexts"]) == 1  # one anchor computation per step
        torch.testing.assert_close(step["contexts"][0], expected(step["batch"]["image"]), rtol=0, atol=2e-5)

    test_time = StepRecorder()
    with pytest.MonkeyPatch.context() as mp:
        test_time.install(mp)
        run_main(test_script, ["--save_path", str(run), *data_args(data), "--results_dir", str(tmp_path)])
    samples = read_jsonl(data / "meta" / "Synthetic" / "full-shot.jsonl")
    images = torch.stack([ref_image(data / "syn" / s["image_path"], 56) for s in samples])
    torch.testing.assert_close(torch.cat(test_time.outside["contexts"]), expected(images), rtol=0, atol=2e-5)


# ---------------------------------------------------------------- mask resizing at real sizes
def test_mask_resize_1024_to_518_is_nearest_of_the_nonzero_rule(tmp_path):
    """A 1024 x 768 grey mask (values 0, 1, 7, 200) to a 518 px input, in the test path and the training
    path (no geometric change): `convert("L") != 0`, then the source pixel under each output pixel's centre.
    Bilinear would blur the 1-px stripes, and a threshold above 0 would drop the faint values."""
    rng = np.random.default_rng(7)
    h, w, s = 768, 1024, 518
    mask = np.zeros((h, w), np.uint8)
    mask[::2] = 7
    mask[:, 1::3] = 1
    mask[200:600, 100:500] = rng.choice(np.array([0, 1, 200], np.uint8), (400, 400))
    # Output rows and columns 129 and 388 sample exactly between two source pixels (e.g. row centre
    # 129.5 * 768 / 518 = 192): which one PIL takes depends on its fixed-point rounding, so both are equal.
    for a, b in ((191, 192), (575, 576)):
        mask[b] = mask[a]
    for a, b in ((255, 256), (767, 768)):
        mask[:, b] = mask[:, a]
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "m.jsonl").write_text(json.dumps(
        {"image_path": "img.png", "mask_path": "mask.png", "label": 1, "class_name": "x"}) + "\n")

    def nearest(n_in):
        return np.ceil((np.arange(s) + 0.5) * n_in / s).astype(int) - 1

    expected = (mask[nearest(h)][:, nearest(w)] != 0).astype(np.float32)
    bilinear = np.asarray(Image.fromarray((mask != 0).astype(np.float32)).resize((s, s), Image.BILINEAR))
    assert (np.abs(bilinear - expected) > 0.25).mean() > 0.05  # the two resamplers are told apart here
    ds = ADDataset(str(tmp_path), str(tmp_path / "m.jsonl"), image_size=s)
    np.testing.assert_array_equal(ds[0]["mask"][0].numpy(), expected)
    train_ds = ADDataset(str(tmp_path), str(tmp_path / "m.jsonl"), image_size=s, augment=True)
    np.testing.assert_array_equal(train_ds.load(0, AugmentParams())["mask"][0].numpy(), expected)
