"""torchrun on the CPU (2 gloo processes, tiny model): training and evaluation agree with one process,
a SIGTERM'd run resumes exactly, and bad input stops every rank with one message."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import test as test_script
import train
from conftest import run_main
from utils.distributed import shard

REPO = Path(__file__).resolve().parents[1]
# One thread per process: two ranks share the two CI cores, and thread counts can change low bits.
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
LR = 5e-4  # --image_lr (the default)


def common(data):
    """12 full-shot samples: Stage 1 batches of 5 (5, 5, 2: uneven slices), Stage 2 batches of 11 (11, 1:
    rank 1's slice of the second is empty). The orthogonality term, the one that is not a mean over
    samples, weighs enough to show in the gradient."""
    return ["--model", "tiny", "--image_size", "56", "--dataset", "Synthetic", "--data_root", str(data / "syn"),
            "--metadata_dir", str(data / "meta"), "--training_mode", "full_shot", "--text_batch_size", "5",
            "--image_batch_size", "11", "--num_workers", "0", "--device", "cpu", "--precision", "fp32",
            "--text_norm_weight", "100"]


def launch(script, argv, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def torchrun(script, argv, expect=0):
    proc = launch(script, argv)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == expect, err[-3000:]
    return out, err


class Ranks:
    """The processes of a torchrun job started directly, with torchrun's environment (env:// rendezvous on
    a free port), without the launcher process: the launcher is under test only where it acts (SIGTERM
    forwarding, the exit summary), and each launcher costs two seconds of the CI's two cores."""

    def __init__(self, script: str, argv: list[str], nproc: int = 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs = [subprocess.Popen([sys.executable, script, *argv], cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                                                LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                                                MASTER_PORT=str(port)))
                      for r in range(nproc)]

    def wait(self) -> str:
        """Every rank's stdout, after checking that each exited 0."""
        outs = []
        for proc in self.procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            outs.append(out)
        return "".join(outs)


def run_ranks(script: str, argv: list[str]) -> str:
    return Ranks(script, argv).wait()


def ckpt(path):
    return torch.load(path, weights_only=True)


def test_rank_slices_split_each_global_batch():
    order = engine.EpochSampler(12, seed=3)
    slices = [list(engine.RankSlices(order, 5, r, 2)) for r in range(2)]
    assert [len(s) for s in slices[0]] == [3, 3, 1] and [len(s) for s in slices[1]] == [2, 2, 1]
    assert [a + b for a, b in zip(*slices)] == [order.items[i:i + 5] for i in (0, 5, 10)]
    assert list(engine.RankSlices(engine.EpochSampler(12, 3), 11, 1, 2))[1] == []
    assert engine.collate_or_none([]) is None
    assert [list(shard(7, 3, i)) for i in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


@pytest.fixture(scope="module")
def one_and_two(data, tmp_path_factory):
    """The same baseline training in one process (in-process) and in two (torchrun)."""
    out = tmp_path_factory.mktemp("one_and_two")
    argv = common(data) + ["--text_epoch", "1", "--image_epoch", "2"]
    two = Ranks("train.py", argv + ["--save_path", str(out / "two")])  # they start while this process trains
    run_main(train, argv + ["--save_path", str(out / "one")])
    two.wait()
    return out


def epoch_losses(run):
    return [line.split("loss ")[-1] for line in (run / "train.log").read_text().splitlines() if "/2: loss" in line
            or "/1: loss" in line]


def test_two_processes_train_like_one(one_and_two):
    """Same weights up to float reduction order: each rank's gradient is summed in another order than
    one process's. The optimizer moments (running means of the gradient, Adam's only scale-sensitive
    state) agree to 1e-5 relative; Adam divides the gradient by its own magnitude, so a weight whose
    gradient is near zero can move by up to a step (lr) differently; every weight stays within lr / 2."""
    one, two = one_and_two / "one", one_and_two / "two"
    assert epoch_losses(one) == epoch_losses(two) and len(epoch_losses(one)) == 3
    assert "2 processes on cpu" in (two / "train.log").read_text()
    for name, module, optimizer in [("text_adapter.pth", "text_adapter", "text_optimizer"),
                                    ("image_adapter.pth", "image_adapter", "image_optimizer")]:
        a, b = ckpt(one / name), ckpt(two / name)
        for key in a[module]:
            diff = (a[module][key] - b[module][key]).abs()
            assert diff.max() <= LR / 2 and diff.mean() < 1e-6, (name, key, float(diff.max()))
        for i, state in a[optimizer]["state"].items():
            for moment in ("exp_avg", "exp_avg_sq"):
                x, y = state[moment], b[optimizer]["state"][i][moment]
                assert (x - y).abs().max() <= 1e-5 * x.abs().max(), (name, i, moment)
    assert sorted(p.name for p in two.glob("image_adapter_*.pth")) == ["image_adapter_1.pth", "image_adapter_2.pth"]


def test_two_processes_evaluate_like_one(one_and_two, data):
    """The results JSON and the per-image scores are byte for byte one process's (3 batches of 5: rank 0
    scores 10 images, rank 1 two)."""
    argv = ["--save_path", str(one_and_two / "one"), "--dataset", "Synthetic", "--data_root", str(data / "syn"),
            "--metadata_dir", str(data / "meta"), "--num_workers", "0", "--device", "cpu", "--batch_size", "5"]
    two = Ranks("test.py", argv + ["--results_dir", str(one_and_two / "eval2")])
    # In-process on one thread (conftest), as each rank runs (ENV): thread counts can change low bits.
    run_main(test_script, argv + ["--results_dir", str(one_and_two / "eval1")])
    out = two.wait()
    assert out.count("| mean |") == 1  # rank 0 alone logs
    for name in ("Synthetic_epoch2.json", "Synthetic_epoch2_images.csv"):
        assert (one_and_two / "eval1" / name).read_bytes() == (one_and_two / "eval2" / name).read_bytes(), name
    assert "12 images on 2 processes" in (one_and_two / "eval2" / "test.log").read_text()
    assert json.loads((one_and_two / "eval2" / "Synthetic_epoch2.json").read_text())["mean"]["image_auroc"] is not None


def test_sigterm_under_torchrun_then_resume_equals_uninterrupted(data, tmp_path):
    """torchrun passes SIGTERM to both ranks; they agree on a step, save (with each rank's RNG state:
    the cross-attention's dropout differs per rank) and exit; the rerun ends bit for bit where an
    uninterrupted two-process run ends."""
    argv = common(data) + ["--text_batch_size", "3", "--image_batch_size", "5", "--text_epoch", "2",
                           "--image_epoch", "1", "--checkpoint_every", "1"]
    full = Ranks("train_cross_attention.py", argv + ["--save_path", str(tmp_path / "full")])
    cut = launch("train_cross_attention.py", argv + ["--save_path", str(tmp_path / "cut")])
    first = tmp_path / "cut" / "text_adapter_cross_attn.pth"
    t0 = time.time()
    while not first.exists():
        assert cut.poll() is None, cut.stderr.read()[-3000:]
        assert time.time() - t0 < 120
        time.sleep(0.01)
    cut.send_signal(signal.SIGTERM)
    cut.communicate(timeout=120)
    saved = ckpt(first)
    assert saved["epoch"] < 2 and len(saved.get("rng_ranks", [])) in (0, 2)
    assert "interrupted by signal 15" in (tmp_path / "cut" / "train.log").read_text()
    full.wait()
    run_ranks("train_cross_attention.py", argv + ["--save_path", str(tmp_path / "cut")])
    for name, modules in [("text_adapter_cross_attn.pth", ["text_adapter", "text_cross_attn"]),
                          ("image_adapter.pth", ["image_adapter"])]:
        a, b = ckpt(tmp_path / "full" / name), ckpt(tmp_path / "cut" / name)
        for module in modules:
            for key in a[module]:
                assert torch.equal(a[module][key], b[module][key]), (name, module, key)


def test_bad_input_stops_every_rank_with_one_message(data, tmp_path):
    """After the process group exists (train.py's batch check): one `error:` line, exit code 2 (torchrun
    reports the first rank to exit and may stop the other before it exits on its own), no traceback,
    nothing written."""
    _, err = torchrun("train.py", common(data) + ["--text_batch_size", "1", "--save_path", str(tmp_path / "run")],
                      expect=1)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--text_batch_size 1 is the global batch" in errors[0], err[-3000:]
    assert "exitcode  : 2" in err and f'File "{REPO}' not in err  # no traceback of ours
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_error_before_the_process_group_is_printed_by_rank_0_only(rank, tmp_path, monkeypatch, capsys):
    """Under torchrun, before the process group exists (test.py's save path check): every rank raises
    the same error; rank 0 prints it, the others exit 2 silently (torchrun sets RANK)."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sys, "argv", ["test.py", "--save_path", str(tmp_path / "missing"), "--device", "cpu"])
    with pytest.raises(SystemExit) as stop:
        test_script.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert ("error: --save_path" in err and "does not exist" in err) if rank == "0" else err == ""
