"""Training history as data: metrics.jsonl (one line per stage epoch, loss terms that add up to the logged
loss, gradient norms), its resume behaviour, and the loss-curve PNGs."""
import copy
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import engine
import train
from conftest import run_main, train_args
from forward_utils import (STAGE1_TERMS, STAGE2_TERMS, calculate_seg_loss, calculate_similarity_map, image_logits,
                           orthogonality_loss, stage1_loss, stage1_loss_terms, stage2_loss, stage2_loss_terms,
                           total_loss)
from tools import plot_history
from utils.errors import UserError

FIELDS = {"stage", "epoch", "steps", "global_step", "loss", "loss_terms", "lr", "grad_norm", "grad_norm_ratio",
          "recorded_steps", "images", "images_per_s", "time_s", "finished"}


def history(save):
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def logged_losses(save):
    """(stage, epoch) -> the loss of train.log's per-epoch line."""
    found = re.findall(r"(stage \d) epoch (\d+)/\d+: loss ([\d.]+)", (save / "train.log").read_text())
    return {(stage, int(epoch)): loss for stage, epoch, loss in found}


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


def test_every_epoch_has_one_line_whose_terms_add_up_to_the_logged_loss(runs):
    """The session's cross-attention run (1 + 1 epochs, 2-shot: 4 images, batches of 2)."""
    save = runs / "cross_attention"
    lines = history(save)
    assert [(r["stage"], r["epoch"]) for r in lines] == [("stage 1", 1), ("stage 2", 1)]
    logged = logged_losses(save)
    for r, terms in zip(lines, (STAGE1_TERMS, STAGE2_TERMS)):
        assert set(r) == FIELDS and tuple(r["loss_terms"]) == terms
        assert sum(r["loss_terms"].values()) == pytest.approx(r["loss"], rel=1e-6)
        assert f"{r['loss']:.4f}" == logged[(r["stage"], r["epoch"])]
        assert (r["steps"], r["global_step"], r["recorded_steps"], r["images"]) == (2, 2, 2, 4)
        assert r["images_per_s"] > 0 and r["time_s"] > 0 and all(v > 0 for v in r["grad_norm"].values())
    stage1, stage2 = lines
    assert stage1["lr"] == [1e-5] and stage2["lr"] == [5e-4]
    assert list(stage1["grad_norm"]) == ["text_adapter", "text_cross_attn"]
    ratio = stage1["grad_norm"]["text_cross_attn"] / stage1["grad_norm"]["text_adapter"]
    assert stage1["grad_norm_ratio"] == {"text_cross_attn/text_adapter": pytest.approx(ratio)}
    assert list(stage2["grad_norm"]) == ["image_adapter"] and stage2["grad_norm_ratio"] == {}
    assert "stage 1 epoch 1: mean gradient norm text_adapter" in (save / "train.log").read_text()
    assert "ratio text_cross_attn/text_adapter" in (save / "train.log").read_text()
    assert f"loss curves: python -m tools.plot_history --save_path {save}" in (save / "train.log").read_text()


def test_plot_history_command(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "history.png"
    monkeypatch.setattr(sys, "argv", ["plot_history.py", "--save_path", str(runs / "baseline"), "--out", str(out)])
    plot_history.main()
    assert f"saved {out}" in capsys.readouterr().out
    assert_png(out)
    with pytest.raises(UserError, match="metrics.jsonl not found"):
        plot_history.plot_history(tmp_path)


def test_a_resumed_run_writes_each_epoch_once(data, copy_run, monkeypatch):
    """Epoch 3 checkpoints mid-way, writes its line, then fails to save its end: the rerun resumes mid-epoch
    with the sums saved there, drops the line and writes the whole epoch's once."""
    save = copy_run("baseline")  # Stage 1: 1 epoch, Stage 2: 2 epochs of 2 steps
    real_save = engine.save_checkpoint

    def full_disk_at_epoch_end(ckpt, path, epoch):
        if epoch is not None:
            raise UserError("no space left")
        real_save(ckpt, path, epoch)

    monkeypatch.setattr(engine, "save_checkpoint", full_disk_at_epoch_end)
    with pytest.raises(SystemExit):
        run_main(train, train_args(data, save) + ["--image_epoch", "3", "--checkpoint_every", "1"])
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    assert [(r["stage"], r["epoch"]) for r in history(save)][-1] == ("stage 2", 3)  # written, not checkpointed
    assert torch.load(save / "image_adapter.pth", weights_only=True)["history"]["steps"] == 1
    run_main(train, train_args(data, save) + ["--image_epoch", "3"])
    lines = history(save)
    assert [(r["stage"], r["epoch"]) for r in lines] == [("stage 1", 1), *(("stage 2", e) for e in (1, 2, 3))]
    last = lines[-1]
    assert (last["recorded_steps"], last["images"]) == (2, 4)  # both halves of the interrupted epoch
    assert sum(last["loss_terms"].values()) == pytest.approx(last["loss"], rel=1e-6)
    assert f"{last['loss']:.4f}" == logged_losses(save)[("stage 2", 3)]


def test_gradient_norms_equal_an_independent_computation():
    """One step of a hand-built two-group model: the recorded norms are the norms of the gradients the
    optimizer applies, the step is the one it takes without recording, the terms are the loss's."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"first": nn.Linear(5, 3), "second": nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))})
    twin = copy.deepcopy(model)
    x = torch.randn(6, 5)

    def terms_of(m):
        hidden = m["first"](x)
        return {"fit": m["second"](hidden).pow(2).mean(), "decay": 0.1 * hidden.pow(2).mean()}

    groups = {name: list(m.parameters()) for name, m in model.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    record = engine.StageHistory("stage 1", ("fit", "decay"), groups, optimizer, None)
    terms = terms_of(model)
    engine._backward_and_step(total_loss(terms), {"image": x}, optimizer, None, record, terms)

    twin_terms = terms_of(twin)
    grads = torch.autograd.grad(total_loss(twin_terms), list(twin.parameters()))
    expected = {}
    for name, m in twin.items():
        own = [g for p, g in zip(twin.parameters(), grads) if any(p is q for q in m.parameters())]
        expected[name] = float(torch.cat([g.flatten() for g in own]).double().norm())
    line = record.finish_epoch(1, 1, float(total_loss(twin_terms).detach()))
    assert line["grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert line["grad_norm_ratio"] == {"second/first": pytest.approx(expected["second"] / expected["first"])}
    assert line["loss_terms"] == pytest.approx({k: float(v.detach()) for k, v in twin_terms.items()}, rel=1e-6)
    for p, g in zip(twin.parameters(), grads):
        p.grad = g
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    twin_optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_the_losses_split_into_terms_are_bit_for_bit_the_former_formulas():
    """stage1_loss and stage2_loss, now sums of their terms, equal the single expressions they replaced."""
    torch.manual_seed(1)
    feats = [torch.randn(2, 4, 8) for _ in range(3)]
    anchors = F.normalize(torch.randn(2, 8, 2), dim=1)
    mask = (torch.rand(2, 1, 6, 6) > 0.7).float()

    def seg(levels):
        return sum(calculate_seg_loss(calculate_similarity_map(f, anchors, (2, 2), 6), mask) for f in levels)

    for all_levels in (False, True):
        terms = stage1_loss_terms(feats, anchors, mask, (2, 2), all_levels, 0.3)
        former = seg(feats if all_levels else feats[-1:]) + 0.3 * orthogonality_loss(anchors.float())
        assert tuple(terms) == STAGE1_TERMS
        assert torch.equal(stage1_loss(feats, anchors, mask, (2, 2), all_levels, 0.3), former)
    det, label = torch.randn(2, 8), torch.tensor([0, 1])
    terms = stage2_loss_terms(feats, det, anchors, mask, label, (2, 2))
    assert tuple(terms) == STAGE2_TERMS
    former = F.cross_entropy(image_logits(det, anchors), label) + seg(feats)
    assert torch.equal(stage2_loss(feats, det, anchors, mask, label, (2, 2)), former)
