"""The context ablations (--context_cls, --context_level, --cross_attn_after) and the tanh gate: the sanity check
over the whole grid, the saved flags that rebuild a run's model, and old runs without them."""
import itertools
import json

import pytest
import torch

from cli import build_model, get_test_parser, get_train_parser, load_model, make_bank, parse_run_args
from conftest import train_args
from train_cross_attention import sanity_check
from utils.errors import UserError
from variants import get_variant

CPU = torch.device("cpu")
ABLATION_KEYS = ("cross_attn_gate", "context_cls", "context_level", "cross_attn_after")
PLAN = {"cross_attn_gate": "none", "context_cls": "residual", "context_level": 0, "cross_attn_after": 0}


def train_namespace(data, tmp_path, *flags: str):
    variant = get_variant("cross_attention")
    return get_train_parser(variant, "").parse_args(train_args(data, tmp_path / "run") + list(flags)), variant


@pytest.fixture(scope="module")
def bank(data, tmp_path_factory):
    args, _ = train_namespace(data, tmp_path_factory.mktemp("bank"))
    return make_bank(args, CPU)


def test_sanity_check_passes_for_every_combination(data, bank, tmp_path):
    """3 CLS modes x 2 levels x 2 positions, ungated, and each CLS mode gated (closed gate: the weights' zero
    gradients, then the opened gate's)."""
    grid = [(c, lv, after, "none") for c, lv, after in itertools.product(("residual", "token", "none"), (0, 1), (0, 1))]
    grid += [(c, 1, 1, "tanh") for c in ("residual", "token", "none")]
    for context_cls, level, after, gate in grid:
        args, variant = train_namespace(data, tmp_path, "--context_cls", context_cls, "--context_level", str(level),
                                        "--cross_attn_after", str(after), "--cross_attn_gate", gate)
        torch.manual_seed(0)
        model = build_model(args, variant, CPU)
        report = sanity_check(model, bank, args, CPU)
        setting = (context_cls, level, after, gate)
        assert report[0].startswith("[info]") and f"--context_cls {context_cls}" in report[0], setting
        assert all(line.startswith("[ok]") for line in report[1:]), (setting, report)
        grads = [line for line in report if "gradient" in line]
        assert len(grads) == (8 if gate == "none" else 9 + 7), (setting, grads)
        assert all(p.grad is None for p in model.parameters()), setting
        if gate == "tanh":
            assert float(model.text_cross_attn.gate.detach()) == 0, setting


def test_sanity_check_fails_on_a_context_without_its_cls(data, bank, tmp_path, monkeypatch):
    """The check can fail: a residual context that lost its CLS is not the level's Stage-1 features."""
    args, variant = train_namespace(data, tmp_path, "--sanity_check")
    model = build_model(args, variant, CPU)
    monkeypatch.setattr(model, "image_context", lambda image, feats=None: model.context_parts(image, feats)[0])
    with pytest.raises(UserError, match=r"\[FAIL\] context \(residual\) rebuilt is the level-2 Stage-1 features"):
        sanity_check(model, bank, args, CPU)


def test_saved_flags_rebuild_the_same_model(tmp_path):
    """test.py and predict.py rebuild a run's model from its args.json."""
    saved = {"variant": "cross_attention", "model": "tiny", "image_size": 56, "cross_attn_gate": "tanh",
             "context_cls": "token", "context_level": 1, "cross_attn_after": 2}
    (tmp_path / "args.json").write_text(json.dumps(saved))
    args = parse_run_args(get_test_parser, ["--save_path", str(tmp_path), "--device", "cpu"])
    model = build_model(args, args.variant, CPU)
    assert (model.context_cls, model.context_level, model.cross_attn_after) == ("token", 1, 2)
    assert "gate" in model.text_cross_attn.state_dict()


def test_an_old_run_loads_with_the_plan_defaults(copy_run, bank):
    """A run whose args.json predates the ablation flags: the plan's model, its checkpoint loads unchanged."""
    save = copy_run("cross_attention")
    saved = json.loads((save / "args.json").read_text())
    assert {k: saved[k] for k in ABLATION_KEYS} == PLAN  # the session's run was trained with the defaults
    (save / "args.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in ABLATION_KEYS}))
    args = parse_run_args(get_test_parser, ["--save_path", str(save)])
    assert {k: getattr(args, k) for k in ABLATION_KEYS} == PLAN
    model, trained = load_model(args, CPU)
    assert trained and (model.context_cls, model.context_level, model.cross_attn_after) == ("residual", 0, 0)
    assert model.text_cross_attn.gate is None
