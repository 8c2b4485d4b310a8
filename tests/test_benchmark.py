"""tools/benchmark.py runs in its tiny CPU mode, and the fast path trains like the plain one."""
import json

import cv2
import numpy as np
import torch

from tools import benchmark


def test_model_mode_reports_throughput_and_flops(tmp_path):
    out = tmp_path / "model.json"
    result = benchmark.main(["model", "--tiny", "--device", "cpu", "--json", str(out)])
    assert result["img_per_s"] > 0 and result["step_ms"] > 0
    # dmae_vit_tiny at 64 px: 16 patches, 4 visible; forward + backward is several MFLOPs
    assert 1e-3 < result["gflop_per_img"] < 1.0
    assert json.loads(out.read_text())["model"] == "dmae_vit_tiny_patch16"


def test_data_and_e2e_modes(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(tmp_path / f"{i}.png"), (rng.random((80, 90)) * 255).astype(np.uint8))
    data = benchmark.main(["data", "--tiny", "--device", "cpu", "--data_path", str(tmp_path),
                           "--blur", "gaussian", "--num_workers", "0"])
    assert data["img_per_s"] > 0 and data["blur"] == "gaussian"
    e2e = benchmark.main(["e2e", "--tiny", "--device", "cpu", "--data_path", str(tmp_path), "--num_workers", "0"])
    assert e2e["img_per_s"] > 0 and e2e["model_only_img_per_s"] > 0
    assert e2e["e2e_fraction"] == e2e["img_per_s"] / e2e["model_only_img_per_s"]
    # through the decoded cache (built on first use, in a folder of the cache's own)
    cached = benchmark.main(["data", "--tiny", "--device", "cpu", "--data_path", str(tmp_path), "--blur",
                             "gaussian", "--num_workers", "0", "--cache_dir", str(tmp_path / "cache")])
    assert cached["img_per_s"] > 0 and cached["cache"] is True
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1


def losses(precision, steps=6):
    args = benchmark.parse_args(["model", "--tiny", "--device", "cpu", "--precision", precision])
    torch.manual_seed(0)
    _, step = benchmark.build_step(args)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = []
    for i in range(steps):
        torch.manual_seed(100 + i)  # same masks for both paths
        out.append(float(step(x, x * 0.5)))
    return np.array(out)


def test_bf16_path_follows_the_fp32_loss_curve():
    fp32, bf16 = losses("fp32"), losses("bf16")
    assert fp32[-1] < fp32[0]  # it trains
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)
