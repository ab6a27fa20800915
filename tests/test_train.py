"""train.py / train_cross_attention.py / test.py end to end on tiny synthetic data (in-process)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import engine
import test as test_script
import train
import train_cross_attention
from conftest import data_args


def common(data):
    return ["--model", "tiny", "--image_size", "56", "--dataset", "Synthetic", "--data_root", str(data / "syn"),
            "--metadata_dir", str(data / "meta"), "--shot", "2", "--text_batch_size", "2",
            "--image_batch_size", "2", "--num_workers", "0", "--device", "cpu"]


def run(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *argv])
    module.main()


def state(path):
    ckpt = torch.load(path, weights_only=True)
    return {k: v for k, v in ckpt.items() if k != "epoch" and not k.endswith(("_optimizer", "_scheduler"))}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name]), f"{k}.{name}"


@pytest.mark.parametrize("module,text_ckpt", [(train, "text_adapter.pth"),
                                              (train_cross_attention, "text_adapter_cross_attn.pth")])
def test_interrupted_and_resumed_run_equals_uninterrupted(data, tmp_path, monkeypatch, module, text_ckpt):
    full, parts = tmp_path / "full", tmp_path / "parts"
    run(module, common(data) + ["--save_path", str(full), "--text_epoch", "2", "--image_epoch", "2"], monkeypatch)
    for text_epoch, image_epoch in [(1, 0), (2, 1), (2, 2)]:
        run(module, common(data) + ["--save_path", str(parts), "--text_epoch", str(text_epoch),
                                    "--image_epoch", str(image_epoch)], monkeypatch)
    assert_same_state(state(full / text_ckpt), state(parts / text_ckpt))
    assert_same_state(state(full / "image_adapter.pth"), state(parts / "image_adapter.pth"))
    assert torch.load(parts / "image_adapter.pth", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in parts.glob("image_adapter_*.pth")) == ["image_adapter_1.pth", "image_adapter_2.pth"]
    keys = set(torch.load(full / text_ckpt, weights_only=True))
    expected = {"epoch", "text_adapter", "text_optimizer"}
    if module is train_cross_attention:
        expected.add("text_cross_attn")
    assert keys == expected
    assert "loaded" not in (full / "train.log").read_text()  # an uninterrupted run never resumes
    log = (parts / "train.log").read_text()
    assert "stage 1 epoch 2/2" in log and "loaded" in log


def test_evaluation_of_both_variants(data, copy_run, monkeypatch, capsys):
    base, cross = copy_run("baseline"), copy_run("cross_attention")
    run(test_script, data_args(data) + ["--save_path", str(base), "--all_epochs", "--visualize"], monkeypatch)
    out = capsys.readouterr().out
    assert "RANDOM BACKBONE WEIGHTS" in out and "| mean |" in out
    results = base / "results"
    for epoch in (1, 2):
        res = json.loads((results / f"Synthetic_epoch{epoch}.json").read_text())
        assert res["meta"]["random_weights"] is True and set(res["per_class"]) == {"disc", "stripes"}
        assert all(0 <= v <= 100 for m in res["per_class"].values() for v in m.values() if v is not None)
    assert len(list((results / "vis" / "Synthetic_epoch2" / "disc").glob("*.png"))) == 6
    for context in ("image", "none"):
        run(test_script, data_args(data) + ["--save_path", str(cross), "--text_context", context], monkeypatch)
        res = json.loads((cross / "results" / f"Synthetic_epoch1_{context}.json").read_text())
        assert res["meta"]["variant"] == f"cross_attention_{context}"


def test_epoch_checkpoints_in_numeric_order(tmp_path):
    for k in (10, 2, 1):
        (tmp_path / f"image_adapter_{k}.pth").write_bytes(b"")
    assert list(cli.epoch_checkpoints(tmp_path)) == [1, 2, 10]


def test_signal_mid_epoch_saves_and_resumes_exactly(data, tmp_path, monkeypatch):
    """A stop request after the 3rd Stage-1 step saves a mid-epoch checkpoint and exits 130; the rerun
    ends with the weights of an uninterrupted run."""
    argv = common(data) + ["--training_mode", "full_shot", "--text_epoch", "2", "--image_epoch", "1"]
    run(train_cross_attention, argv + ["--save_path", str(tmp_path / "full")], monkeypatch)

    real_step, calls = engine.text_adapter_step, []

    def step_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            engine.STOP.signum = signal.SIGINT
        return real_step(*a, **k)

    monkeypatch.setattr(engine, "text_adapter_step", step_then_signal)
    with pytest.raises(SystemExit) as exit_info:
        run(train_cross_attention, argv + ["--save_path", str(tmp_path / "cut")], monkeypatch)
    assert exit_info.value.code == 128 + signal.SIGINT
    ckpt = torch.load(tmp_path / "cut" / "text_adapter_cross_attn.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 3)
    assert not (tmp_path / "cut" / "image_adapter.pth").exists()
    engine.STOP.signum = None
    monkeypatch.setattr(engine, "text_adapter_step", real_step)
    run(train_cross_attention, argv + ["--save_path", str(tmp_path / "cut")], monkeypatch)
    for name in ("text_adapter_cross_attn.pth", "image_adapter.pth"):
        assert_same_state(state(tmp_path / "full" / name), state(tmp_path / "cut" / name))


def start_training(argv: list[str]) -> subprocess.Popen:
    """`train.py` in a process of its own, on one thread (two of them share the two CI cores)."""
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=Path(train.__file__).parent,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def every_step(data):
    """Full-shot training, 2 epochs per stage, a checkpoint after every step."""
    return common(data) + ["--training_mode", "full_shot", "--text_epoch", "2", "--image_epoch", "2",
                           "--checkpoint_every", "1"]


def test_real_interrupt_then_resume_equals_uninterrupted(data, tmp_path, monkeypatch):
    """Real `train.py` processes stopped by SIGTERM (graceful save) and by kill -9 (resume from the last
    checkpoint, written every step here), then rerun, end bit for bit where an uninterrupted run ends. The
    in-process runs use one thread (conftest), as the processes do: thread counts can change low bits."""
    cuts = {how: tmp_path / how for how in ("SIGTERM", "SIGKILL")}
    procs = {how: start_training(every_step(data) + ["--save_path", str(cut)]) for how, cut in cuts.items()}
    for how, proc in procs.items():
        wait_for(cuts[how] / "text_adapter.pth", proc)
        proc.send_signal(getattr(signal, how))
    for how, proc in procs.items():
        proc.wait(timeout=120)
        assert proc.returncode in ((128 + signal.SIGTERM, 0) if how == "SIGTERM" else (-signal.SIGKILL, 0))
    run(train, every_step(data) + ["--save_path", str(tmp_path / "full")], monkeypatch)
    for cut in cuts.values():
        run(train, every_step(data) + ["--save_path", str(cut)], monkeypatch)
        assert "loaded" in (cut / "train.log").read_text()
        for name in ("text_adapter.pth", "image_adapter.pth"):
            assert_same_state(state(tmp_path / "full" / name), state(cut / name))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    """A NaN loss in Stage 2 stops the run with the step number; the checkpoint of the last finished
    epoch is left as it was."""
    argv = common(data) + ["--save_path", str(tmp_path / "run"), "--text_epoch", "1", "--image_epoch", "2"]
    run(train, [*argv[:-1], "1"], monkeypatch)
    good = (tmp_path / "run" / "image_adapter.pth").read_bytes()
    real_step, calls = engine.image_adapter_step, []

    def nan_on_second_call(*a, **k):
        calls.append(1)
        loss = real_step(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(engine, "image_adapter_step", nan_on_second_call)
    with pytest.raises(SystemExit) as exit_info:
        run(train, argv, monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "loss is nan at epoch 2 step 2" in err and "image_adapter.pth is kept" in err
    assert (tmp_path / "run" / "image_adapter.pth").read_bytes() == good
    assert not (tmp_path / "run" / "image_adapter_2.pth").exists()
