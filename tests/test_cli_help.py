"""The training scripts' command lines: --help explains every flag, in groups, with its default, and
answers without importing torch; the option vocabulary of util/arguments.py agrees with the code."""
import argparse
import importlib
import itertools
import os
import re
import subprocess
import sys

import pytest

import models_convmae  # noqa: F401  (registers the models; it imports models_mae and models_vit)
from util import arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("main_pretrain", "main_finetune", "main_linprobe")
HEAVY = ("torch", "timm", "cv2", "numpy", "scipy", "PIL", "mmengine")
GROUPS = {"model", "data", "optimisation", "outputs", "checkpoints", "distributed / launch"}


def help_in_a_fresh_process(script):
    """``python SCRIPT --help`` as a user runs it; returns its text and the heavy modules it imported."""
    code = (f"import runpy, sys\nsys.argv = ['{script}.py', '--help']\n"
            f"try:\n    runpy.run_path('{script}.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY:', ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text, heavy = proc.stdout.rsplit("HEAVY:", 1)
    return text, heavy.strip()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_text_in_groups_without_importing_torch(script):
    text, heavy = help_in_a_fresh_process(script)
    assert heavy == ""  # parsed before torch, timm, OpenCV ... are imported
    parser = importlib.import_module(script).get_args_parser()
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS and a.option_strings]
    for action in shown:
        assert action.help and len(action.help) >= 12, action.option_strings
        for flag in action.option_strings:
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), flag
    titles = {group.title for group in parser._action_groups if group._group_actions}
    expected = GROUPS | ({"evaluation"} if script != "main_pretrain" else set())
    assert expected <= titles
    # defaults are shown: every option with a default (not None / "" / an on-off flag) says it
    formatter = arguments.HelpFormatter("prog")
    for action in shown:
        if action.nargs != 0 and action.default not in (None, ""):
            assert "default" in formatter._get_help_string(action), action.option_strings
    if script == "main_pretrain":
        assert "[0, 1) (default: 0.75)" in " ".join(text.split())  # --mask_ratio, as the user reads it


def test_defaults_are_shown_readably():
    parser = arguments.make_parser("Summary.\n\n    example command\n\nLeft out.")
    parser.add_argument("--size", type=int, nargs="+", default=[224], help="input size")
    parser.add_argument("--frac", type=float, default=0.5, help="a fraction in %%")
    parser.add_argument("--path", default="", help="a path")
    parser.add_argument("--flag", action="store_true", help="a flag")
    parser.add_argument("--lr", type=float, default=None, help="rate (default: computed)")
    text = " ".join(parser.format_help().split())
    assert "input size (default: 224)" in text and "a fraction in % (default: 0.5)" in text
    assert "a path --flag" in text and "a flag" in text and "(default: False)" not in text
    assert "rate (default: computed)" in text and "(default: None)" not in text
    assert "Summary. example command" in text and "Left out" not in text


def expand(pattern: str):
    """Shell-style brace expansion of one name pattern: a{b,c}d -> abd, acd."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return {"".join(combo) for combo in itertools.product(*choices)}


def names_in(listing: str):
    token = r"(?:\w|\{[^}]*\})*"
    return set().union(*(expand(m) for m in re.findall(token + "_patch" + token, listing)))


def test_model_help_lists_exactly_the_registered_models():
    from util.registry import finetune_models, pretrain_models

    pretrain = names_in(arguments.PRETRAIN_MODELS)
    with_suffix = {f"{n}_dec512d8b" for n in pretrain if "_tiny_" not in n}
    assert pretrain | with_suffix == set(pretrain_models().names())
    assert names_in(arguments.CLASSIFIER_MODELS) == set(finetune_models().names())
    assert any("_tiny_" in n for n in names_in(arguments.CLASSIFIER_MODELS))


def test_option_choices_agree_with_the_code():
    from models_mae import LOSS_REGIONS
    from util.blur import METHODS
    from util.cls_datasets import GROUP_BY, RANDAUGMENT
    from util.metrics import METRIC_NAMES

    assert arguments.LOSS_REGIONS == LOSS_REGIONS and arguments.GROUP_BY == GROUP_BY
    assert arguments.RANDAUGMENT == RANDAUGMENT and set(arguments.SELECT_METRICS.values()) <= set(METRIC_NAMES)
    assert METHODS == ("gaussian", "mean", "median", "motion", "defocus", "srad")


def test_classification_scripts_share_their_data_and_evaluation_flags():
    finetune = importlib.import_module("main_finetune").get_args_parser()
    linprobe = importlib.import_module("main_linprobe").get_args_parser()

    def flags(parser, title, with_help=True):
        group = next(g for g in parser._action_groups if g.title == title)
        return [(a.option_strings, a.default, a.help if with_help else None) for a in group._group_actions]

    assert flags(finetune, "data") == flags(linprobe, "data")
    shared = flags(linprobe, "evaluation", with_help=False)
    assert shared == flags(finetune, "evaluation", with_help=False)[:len(shared)]
    assert {"--group_by", "--groups", "--threshold", "--target_sensitivity", "--target_specificity"} <= {
        f for option_strings, _, _ in shared for f in option_strings}


@pytest.mark.parametrize("cores,local,expected", [(2, None, 2), (2, "2", 1), (64, None, 10), (16, "8", 2),
                                                  (1, "4", 0), (8, "bad", 8)])
def test_num_workers_default_fits_the_machine(monkeypatch, cores, local, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)  # torchrun's processes on this machine
    assert arguments.default_num_workers() == expected
    from tools import benchmark

    for script in SCRIPTS:
        assert importlib.import_module(script).get_args_parser().parse_args([]).num_workers == expected, script
    assert benchmark.parse_args(["data"]).num_workers == expected


def test_tools_explain_every_argument_and_the_default_blur():
    import blurred_images
    from tools import visualize_reconstruction

    for parser in (blurred_images.get_args_parser(), visualize_reconstruction.get_args_parser()):
        for action in parser._actions:
            if action.help != argparse.SUPPRESS:
                assert action.help and len(action.help) >= 12, (parser.prog, action.dest)
    blur_help = " ".join(blurred_images.get_args_parser().format_help().split())
    assert "blur method (default: gaussian, as published)" in blur_help
    recon_help = " ".join(visualize_reconstruction.get_args_parser().format_help().split())
    assert "'none' turns that off" in recon_help and "original (sharp) images" in recon_help
