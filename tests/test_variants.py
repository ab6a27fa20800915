"""The variant registry: a toy third variant (tests/toy_variant.py plus one registration) trains, tests,
predicts and compares through the normal entry points, with no edit anywhere else."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import compare
import predict
import test as test_script
import train
from conftest import data_args, train_args
from toy_variant import AnchorOffsetVariant
from variants import VARIANTS, register


def run(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *argv])
    module.main()


@pytest.fixture
def toy():
    variant = register(AnchorOffsetVariant())  # the one registration a new variant needs
    yield variant
    del VARIANTS[variant.name]


def test_a_registered_variant_runs_through_every_entry_point(toy, data, copy_run, tmp_path, monkeypatch):
    toy_run, base_run = tmp_path / "toy", copy_run("baseline")
    run(train, train_args(data, toy_run) + ["--variant", "anchor_offset"], monkeypatch)

    ckpt = torch.load(toy_run / "text_adapter_offset.pth", weights_only=True)
    assert set(ckpt) >= {"epoch", "text_adapter", "anchor_offset", "text_optimizer"}
    assert ckpt["anchor_offset"]["offset"].abs().max() > 0  # Stage 1 trained the new module
    assert json.loads((toy_run / "args.json").read_text())["variant"] == "anchor_offset"
    assert not (toy_run / "text_adapter.pth").exists()

    for save in (toy_run, base_run):
        run(test_script, data_args(data) + ["--save_path", str(save), "--epoch", "1"], monkeypatch)
    result = json.loads((toy_run / "results" / "Synthetic_epoch1.json").read_text())
    assert result["meta"]["variant"] == "anchor_offset"
    base = json.loads((base_run / "results" / "Synthetic_epoch1.json").read_text())
    assert result["per_class"] != base["per_class"]  # its own anchors, not the baseline's

    image = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    run(predict, ["--save_path", str(toy_run), "--images", str(image), "--class_name", "disc", "--device", "cpu",
                  "--num_workers", "0", "--out", str(tmp_path / "pred")], monkeypatch)
    assert json.loads((tmp_path / "pred" / "scores.json").read_text())["meta"]["variant"] == "anchor_offset"

    run(compare, [f"base={base_run}", f"toy={toy_run}", "--dataset", "Synthetic", "--out",
                  str(tmp_path / "cmp")], monkeypatch)
    report = (tmp_path / "cmp.md").read_text()
    assert "base vs toy" in report and "anchor_offset" in report
