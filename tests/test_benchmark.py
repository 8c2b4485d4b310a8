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


def losses(precision, *extra, steps=6):
    args = benchmark.parse_args(["model", "--tiny", "--device", "cpu", "--precision", precision, *extra])
    assert args.precision == precision  # --tiny must not replace an explicit precision
    torch.manual_seed(0)
    _, step = benchmark.build_step(args)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = []
    for i in range(steps):
        torch.manual_seed(100 + i)  # same masks for both paths
        out.append(float(step(x, x * 0.5)))
    return np.array(out)


def assert_same_curve(curve, reference):
    assert reference[-1] < reference[0]  # it trains
    # bf16 keeps ~3 significant digits; the loss itself is computed in fp32
    np.testing.assert_allclose(curve, reference, rtol=2e-3)
    # and it learns as fast: the drop over the steps agrees too (a path that skipped its updates
    # would stay within rtol of step 0 but not of the drop)
    np.testing.assert_allclose(curve[0] - curve[-1], reference[0] - reference[-1], rtol=0.1)


def test_bf16_path_follows_the_fp32_loss_curve():
    assert_same_curve(losses("bf16"), losses("fp32"))


def test_compiled_bf16_path_follows_the_eager_fp32_loss_curve(monkeypatch):
    """The optimised path of training on a GPU (bf16 autocast + fused AdamW + torch.compile, the
    default of main_pretrain.py on CUDA) against plain eager fp32, here with inductor's CPU backend."""
    import torch._inductor.config as inductor_config
    # inductor draws the masking noise with its own generator; the eager one gives the same masks
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    assert_same_curve(losses("bf16", "--compile"), losses("fp32"))
