"""Every flag of every script has a help text that states its default, and numeric flags refuse
nonsense at parse time."""
import argparse
import sys

import pytest

import analyze_attention
import cli
import compare
import predict
import protocol
import sweep
import train
from dataset import check, make_metadata, synthetic
from tools import benchmark, ddp_check, plot_history, proxy
from variants import VARIANTS


def parsers() -> dict[str, argparse.ArgumentParser]:
    found = {f"train {v.name}": cli.get_train_parser(v, "") for v in VARIANTS.values()}
    found["test"] = cli.get_test_parser()
    cli.add_variant_test_args(found["test"])
    for name, module in [("predict", predict), ("analyze_attention", analyze_attention), ("sweep", sweep),
                         ("compare", compare), ("benchmark", benchmark), ("ddp_check", ddp_check),
                         ("plot_history", plot_history), ("protocol", protocol)]:
        found[name] = module.get_parser()
    for name, module in [("make_metadata", make_metadata), ("check", check), ("synthetic", synthetic),
                         ("proxy", proxy)]:
        found[name] = module.build_parser()
    return found


@pytest.mark.parametrize("name", list(parsers()))
def test_every_flag_has_help_with_its_default(name):
    missing = []
    for action in parsers()[name]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = (action.help or "").lower()
        if not text:
            missing.append(f"{action.option_strings}: no help")
        elif not action.required and action.default not in (None, False) and "default" not in text:
            missing.append(f"{action.option_strings}: default {action.default!r} not stated")
    assert not missing, missing


@pytest.mark.parametrize("script", ["test", "predict", "analyze_attention"])
def test_evaluation_scripts_say_the_run_sets_the_model_defaults(script):
    assert "default to its saved values in <save_path>/args.json" in " ".join(parsers()[script].format_help().split())


@pytest.mark.parametrize("flag,value,message", [
    ("--image_size", "0", "0 is not a positive integer"),
    ("--image_size", "-56", "-56 is not a positive integer"),
    ("--text_batch_size", "0", "0 is not a positive integer"),
    ("--image_batch_size", "-2", "-2 is not a positive integer"),
    ("--num_workers", "-1", "-1 is not an integer >= 0"),
    ("--text_lr", "0", "0 is not a positive finite number"),
    ("--image_lr", "nan", "nan is not a positive finite number"),
    ("--image_lr", "inf", "inf is not a positive finite number"),
    ("--text_epoch", "-1", "-1 is not an integer >= 0"),
    ("--image_epoch", "-3", "-3 is not an integer >= 0"),
    ("--shot", "0", "0 is not a positive integer"),
    ("--text_norm_weight", "-0.1", "-0.1 is not a finite number >= 0"),
    ("--checkpoint_every", "x", "'x' is not an integer"),
])
def test_numeric_training_flags_are_checked_at_parse_time(flag, value, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", flag, value, "--save_path", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as stop:
        train.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,argv,flag", [
    ("test", ["--save_path", "x", "--batch_size", "0"], "--batch_size"),
    ("test", ["--save_path", "x", "--epoch", "-1"], "--epoch"),
    ("predict", ["--save_path", "x", "--images", "a", "--class_name", "c", "--num_workers", "-2"], "--num_workers"),
    ("analyze_attention", ["--save_path", "x", "--num_images", "0"], "--num_images"),
    ("sweep", ["--cpu_jobs", "0"], "--cpu_jobs"),
    ("train cross_attention", ["--cross_attn_dropout", "1.5"], "--cross_attn_dropout"),
    ("train cross_attention", ["--cross_attn_heads", "0"], "--cross_attn_heads"),
    ("synthetic", ["--size", "0"], "--size"),
])
def test_numeric_flags_of_other_scripts(name, argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        parsers()[name].parse_args(argv)
    assert stop.value.code == 2 and f"error: argument {flag}" in capsys.readouterr().err
