"""predict.py gives test.py's raw per-image scores and maps, for both variants (tiny random CLIP)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import cli
import predict
import test as test_script
from dataset import ADDataset, load_image
from forward_utils import PromptBank
from model import get_tokenizer
from conftest import data_args, run_main

CLASS = "disc"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_inputs_are_preprocessed_as_the_test_loader_does(data):
    ds = ADDataset(str(data / "syn"), str(data / "meta" / "Synthetic" / "full-shot.jsonl"), image_size=56)
    for i in (0, len(ds) - 1):
        assert torch.equal(load_image(str(data / "syn" / ds.samples[i]["image_path"]), 56), ds[i]["image"])


def load_run_model(variant, runs, data, ds):
    """test.py's own set-up of a run's model (epoch 1) and the anchors of `ds`'s classes, on the CPU."""
    args = test_script.parse_args(["--save_path", str(runs / variant), *data_args(data), "--precision", "fp32"])
    model, text_trained = cli.load_model(args, torch.device("cpu"))
    cli.load_image_adapter(model, cli.epoch_checkpoints(runs / variant)[1])
    model.eval()
    bank = PromptBank(get_tokenizer("tiny"), "Synthetic", ds.class_names)
    return model, args.variant.anchor_fn(model, bank, args, "test", text_trained)


def maps_of_test_predict(variant, runs, data):
    """Maps and scores of `test.predict` for the class's images, with test.py's own model set-up."""
    ds = ADDataset(str(data / "syn"), str(data / "meta" / "Synthetic" / "full-shot.jsonl"), image_size=56,
                   class_names=[CLASS])
    model, anchor_fn = load_run_model(variant, runs, data, ds)
    maps, scores, _ = test_script.predict(model, DataLoader(ds, batch_size=4), anchor_fn, "Industrial",
                                          torch.device("cpu"), "test")
    return {str(data / "syn" / s["image_path"]): (m, s_) for s, m, s_ in zip(ds.samples, maps, scores)}


def test_regions_labelled_by_the_loader_workers_give_the_same_metrics(runs, data):
    """test.py's loader (two worker processes) labels each mask's regions; `predict` returns them as int32
    labels whose nonzero pixels are the dataset's masks, and the per-class metrics from them equal those from
    the plain boolean masks, whose regions AUPRO labels itself on the CPU."""
    ds = ADDataset(str(data / "syn"), str(data / "meta" / "Synthetic" / "full-shot.jsonl"), image_size=56)
    model, anchor_fn = load_run_model("baseline", runs, data, ds)
    loader, _ = test_script.shard_loader(ds, 4, 2, torch.device("cpu"), start=True)
    maps, scores, regions = test_script.predict(model, loader, anchor_fn, "Industrial", torch.device("cpu"), "test")
    masks = torch.stack([ds[i]["mask"][0] != 0 for i in range(len(ds))])
    assert regions.dtype == torch.int32 and torch.equal(regions > 0, masks) and int(regions.amax()) >= 1
    from_workers = test_script.evaluate_classes(ds, maps, scores, regions, "Industrial")
    assert from_workers == test_script.evaluate_classes(ds, maps, scores, masks, "Industrial")
    assert all(r["pixel_aupro"] is not None for r in from_workers.values())


@pytest.mark.parametrize("variant", ["baseline", "cross_attention"])
def test_predict_equals_test_py(variant, runs, data, tmp_path, monkeypatch, capsys):
    run_main(test_script, ["--save_path", str(runs / variant), *data_args(data), "--epoch", "1", "--results_dir",
                           str(tmp_path / "results")])
    suffix = "_image" if variant == "cross_attention" else ""
    expected = {str(data / "syn" / r["image_path"]): r
                for r in read_csv(tmp_path / "results" / f"Synthetic_epoch1{suffix}_images.csv")
                if r["class_name"] == CLASS}

    real_overlay, shown = predict.overlay, {}

    def record(image, amap, lo, hi):
        shown[len(shown)] = amap
        return real_overlay(image, amap, lo, hi)

    monkeypatch.setattr(predict, "overlay", record)
    capsys.readouterr()
    run_main(predict, ["--save_path", str(runs / variant), "--images", str(data / "syn" / CLASS / "test"),
                       "--class_name", CLASS, "--dataset", "Synthetic", "--out", str(tmp_path), "--batch_size", "3",
                       "--epoch", "1", "--num_workers", "0", "--device", "cpu"])
    assert "RANDOM BACKBONE WEIGHTS" in capsys.readouterr().out
    rows = read_csv(tmp_path / "scores.csv")
    assert sorted(r["image_path"] for r in rows) == sorted(expected) and len(rows) == 6
    for r in rows:
        for key in ("image_score", "map_max"):
            assert float(r[key]) == pytest.approx(float(expected[r["image_path"]][key]), abs=1e-5), (r, key)
        assert (tmp_path / r["overlay"]).is_file()
    meta = json.loads((tmp_path / "scores.json").read_text())["meta"]
    assert meta["random_weights"] is True and meta["variant"] == variant + suffix

    reference = maps_of_test_predict(variant, runs, data)
    for i, r in enumerate(rows):
        ref_map, ref_score = reference[r["image_path"]]
        np.testing.assert_allclose(shown[i], ref_map.numpy(), rtol=0, atol=1e-5)
        assert float(r["image_score"]) == pytest.approx(float(ref_score), abs=1e-5)


def test_any_format_and_size(runs, tmp_path):
    rng = np.random.default_rng(0)
    images = {"gray.png": rng.integers(0, 256, (37, 90), dtype=np.uint8),
              "rgba.png": rng.integers(0, 256, (50, 40, 4), dtype=np.uint8),
              "deep.png": rng.integers(0, 65536, (64, 64), dtype=np.uint16),
              "sub/a.png": rng.integers(0, 256, (120, 33, 3), dtype=np.uint8),
              "sub/a.jpg": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)}
    for name, array in images.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "in" / name)
    assert Image.open(tmp_path / "in" / "deep.png").mode == "I;16"
    run_main(predict, ["--save_path", str(runs / "baseline"), "--images", str(tmp_path / "in"),
                       "--class_name", "metal_nut", "--out", str(tmp_path / "out"), "--batch_size", "2",
                       "--num_workers", "1", "--device", "cpu", "--color_range", "0", "5"])
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert [r["image_path"] for r in rows] == [str(tmp_path / "in" / n) for n in sorted(images)]
    assert len({r["overlay"] for r in rows}) == 5
    for r in rows:
        with Image.open(r["image_path"]) as original, Image.open(tmp_path / "out" / r["overlay"]) as shown:
            assert shown.size == original.size and shown.mode == "RGB"
        assert 0 <= float(r["image_score"]) <= 1
    meta = json.loads((tmp_path / "out" / "scores.json").read_text())["meta"]
    assert (meta["prompt_name"], meta["domain"], meta["epoch"]) == ("metal nut", "Industrial", 2)


@pytest.mark.parametrize("script", [test_script, predict])
def test_random_backbone_is_the_trained_one(script, runs, data, tmp_path):
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        if script is test_script:
            run_main(script, ["--save_path", str(runs / "baseline"), *data_args(data),
                              "--results_dir", str(tmp_path)])
            results.append(read_csv(tmp_path / "Synthetic_epoch2_images.csv"))
        else:
            run_main(script, ["--save_path", str(runs / "baseline"), "--images", str(data / "syn" / CLASS),
                         "--class_name", CLASS, "--out", str(tmp_path), "--num_workers", "0"])
            results.append(read_csv(tmp_path / "scores.csv"))
    assert results[0] == results[1]
