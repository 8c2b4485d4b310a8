"""tools/benchmark_suite.py on CPU (tiny set, a failing run, the budget), the configuration sets, and
the lever flags of tools/benchmark.py (channels_last trains like the default layout)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tools import benchmark, benchmark_suite
from util.arguments import default_num_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = {"name": "bad model", "model": "no_such_model", "batch_size": 4, "input_size": 64, "steps": 1, "warmup": 0}


def run_suite(out, *extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_suite.py"), "--out", str(out),
                           "--device", "cpu", *extra], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return proc.stdout, records, (out / "results.md").read_text()


def test_tiny_set_records_every_run_and_a_table(tmp_path):
    stdout, records, md = run_suite(tmp_path, "--set", "tiny")
    assert [r["name"] for r in records] == [c["name"] for c in benchmark_suite.TINY]
    for r in records:
        assert r["status"] == "ok", r
        assert r["result"]["img_per_s"] > 0 and r["result"]["device"].startswith("cpu")
    levers = records[1]["result"]
    assert levers["channels_last"] is True and levers["optimizer"] == "foreach" and levers["compile_mode"] is None
    assert benchmark_suite.TABLE_HEADER in md
    rows = [line for line in md.splitlines() if line.startswith("| d")]
    assert len(rows) == 2 and rows[1].startswith("| dconvmae_convvit_tiny_patch16 | fp32 | eager | yes | foreach")
    assert "2/2 dconvmae-tiny" in stdout and "done: 2 ok" in stdout
    assert (tmp_path / "runs.log").read_text().count("=====") == 2


def test_a_failing_run_is_recorded_and_the_suite_goes_on(tmp_path):
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([BAD, benchmark_suite.TINY[0]]))
    _, records, md = run_suite(tmp_path / "out", "--configs", str(configs))
    assert [r["status"] for r in records] == ["failed", "ok"]
    assert "unknown pretraining model 'no_such_model'" in records[0]["error"]
    assert "Traceback" in records[0]["output_tail"] and records[0]["returncode"] != 0
    assert "- bad model: failed — ValueError: unknown pretraining model" in md
    assert "| dmae_vit_tiny_patch16 |" in md


def test_budget_skips_the_rest(tmp_path):
    # half a second: the first run starts and is stopped (a Python + torch start takes longer), the
    # second is skipped without starting
    stdout, records, md = run_suite(tmp_path, "--set", "tiny", "--budget_s", "0.5")
    assert records[0]["status"] in ("timeout", "ok")
    assert records[1]["status"] == "skipped" and "budget" in records[1]["error"]
    assert "skipped (budget of 0 s spent)" in stdout or "skipped (needs" in stdout
    assert f"- {benchmark_suite.TINY[1]['name']}: skipped" in md


@pytest.mark.parametrize("name", sorted(benchmark_suite.SETS))
def test_every_configuration_is_a_valid_benchmark_command(name):
    for config in benchmark_suite.SETS[name]:
        args = benchmark.parse_args(benchmark_suite.config_argv(config))
        assert args.mode == config.get("mode", "model")
        if config.get("tiny"):
            continue  # --tiny replaces the model, size and precision
        assert args.model == config.get("model", "dmae_vit_base_patch16")
        assert args.precision == config.get("precision", "bf16")
        assert args.num_workers == config.get("num_workers", default_num_workers())  # the machine's, by default
        assert args.cache_dir == config.get("cache_dir", "")
        assert args.compile_mode == config.get("compile_mode", "default")
        assert args.channels_last == config.get("channels_last", False)


def test_levers_set_runs_the_compiled_bf16_configurations_first():
    first = benchmark_suite.LEVERS[:2]
    assert {c["model"] for c in first} == {benchmark_suite.DMAE, benchmark_suite.DCONVMAE}
    assert all(c["compile"] and c["precision"] == "bf16" for c in first)
    published = [c for c in benchmark_suite.LEVERS if "published" in c["name"]]
    assert len(published) == 2 and all(c["precision"] == "fp16" and c["optimizer"] == "plain" for c in published)
    assert benchmark_suite.LEVERS[-1]["compile_mode"] == "max-autotune-no-cudagraphs"
    assert {c["name"] for c in benchmark_suite.QUICK} < {c["name"] for c in benchmark_suite.LEVERS}


def test_config_argv_and_overrides():
    argv = benchmark_suite.config_argv({"name": "x", "needs_s": 5, "mode": "data", "data_path": "/d",
                                        "compile": False, "channels_last": True, "steps": 3})
    assert argv == ["data", "--data_path", "/d", "--channels_last", "--steps", "3"]
    args = benchmark_suite.parse_args(["--set", "quick", "--steps", "7", "--override", "batch_size=128",
                                       "--override", "compile=false"])
    configs = benchmark_suite.build_configs(args)
    assert len(configs) == 4 and all(c["steps"] == 7 and c["batch_size"] == 128 for c in configs)
    assert not any("--compile" in benchmark_suite.config_argv(c) for c in configs)
    assert "device" not in configs[0]  # not given: benchmark.py's own default


# ------------------------------------------------------------------------------ lever flags
def step_losses(*flags, steps=3):
    args = benchmark.parse_args(["model", "--tiny", "--device", "cpu", "--model", "dconvmae_convvit_tiny_patch16",
                                 *flags])
    torch.manual_seed(0)
    model, step = benchmark.build_step(args)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = []
    for i in range(steps):
        torch.manual_seed(100 + i)  # the same masks in both layouts
        out.append(float(step(x, x * 0.5)))
    return model, np.array(out)


def test_channels_last_trains_like_the_default_layout():
    model, cl = step_losses("--channels_last")
    assert model.patch_embed1.proj.weight.is_contiguous(memory_format=torch.channels_last)
    _, default = step_losses()
    np.testing.assert_allclose(cl, default, rtol=1e-5)  # fp32: only the summation order differs


@pytest.mark.parametrize("optimizer", ["foreach", "plain"])
def test_optimizer_implementations_agree(optimizer):
    _, fused = step_losses("--optimizer", "fused", steps=2)
    _, other = step_losses("--optimizer", optimizer, steps=2)
    np.testing.assert_allclose(other, fused, rtol=1e-5)


def test_lever_settings_are_recorded():
    args = benchmark.parse_args(["model", "--device", "cuda", "--precision", "fp16", "--optimizer", "plain",
                                 "--compile", "--compile_mode", "max-autotune"])
    levers = benchmark.lever_settings(args)
    assert levers == {"compile_mode": "max-autotune", "channels_last": False, "optimizer": "plain",
                      "optimizer_impl": "foreach", "scaler": True, "nonfinite_check": "GradScaler"}
    args = benchmark.parse_args(["model", "--device", "cpu", "--precision", "bf16", "--scaler", "on"])
    assert benchmark.lever_settings(args)["scaler"] is True and benchmark.lever_settings(args)["compile_mode"] is None
    with pytest.raises(SystemExit):
        benchmark.parse_args(["model", "--compile_mode", "max-autotune"])  # a mode without --compile
    assert benchmark.split_steps(30) == [10, 10, 10] and benchmark.split_steps(2) == [1, 1]
    assert benchmark.split_steps(7) == [3, 2, 2]


def test_data_set_makes_its_images_and_measures_loader_and_e2e(tmp_path):
    images, cache = tmp_path / "images", tmp_path / "cache"
    stdout, records, md = run_suite(tmp_path / "out", "--set", "tiny_data", "--images", str(images),
                                    "--make_images", "6", "--cache", str(cache))
    assert [r["status"] for r in records] == ["ok", "ok"], records
    data, e2e = records[0]["result"], records[1]["result"]
    assert data["mode"] == "data" and data["cache"] is True and data["img_per_s"] > 0
    assert e2e["mode"] == "e2e" and 0 < e2e["e2e_fraction"] and e2e["cache"] is False
    assert len(list(cache.glob("*/meta.json"))) == 1  # the cache the first run built
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 6 and "6 images in" in stdout
    import cv2
    first = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert first.shape == (512, 512) and first.dtype == np.uint8 and first.std() > 10  # speckle, not flat
    assert "| tiny e2e | e2e |" in md


def test_gpu_check_script_runs_the_quick_and_data_sets(tmp_path):
    """The one prepared device command: its dry run (GPU_CHECK_LIST=1) lists both sets' commands."""
    env = {**os.environ, "GPU_CHECK_LIST": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in (tmp_path / "out" / "gpu.txt").read_text()
    for config in benchmark_suite.QUICK + benchmark_suite.DATA:
        assert config["name"] in proc.stdout
    assert "--cache_dir" in proc.stdout and "e2e --model dmae_vit_base_patch16" in proc.stdout
