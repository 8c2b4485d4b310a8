"""main_pretrain.py end to end on CPU with tiny models and images made here."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import cv2
import numpy as np
import pytest
import torch

import main_pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Smooth random 'ultrasound' in train/val trees plus its gaussian-blurred copy."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for i in range(n):
            folder = root / "orig" / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            img = cv2.GaussianBlur((rng.random((40, 48)) * 255).astype(np.uint8), (0, 0), 2.5)
            cv2.imwrite(str(folder / f"{split}{i}.png"), img)
    from util.blur import BlurSpec
    from util.image_io import list_images, read_image, write_image_atomic
    for rel in list_images(root / "orig"):
        write_image_atomic(root / "blur" / rel, BlurSpec("gaussian", sigma=1.1).apply(read_image(root / "orig" / rel)))
    return root


def run(data, out, *extra, model="dmae_vit_tiny_patch16", epochs=2):
    args = ["--model", model, "--output_dir", str(out), "--data_path_blurred", str(data / "blur"),
            "--data_path_orig", str(data / "orig"), "--batch_size", "4", "--epochs", str(epochs),
            "--input_size", "32", "--num_workers", "0", "--device", "cpu", "--warmup_epochs", "1",
            "--print_freq", "2", *extra]
    main_pretrain.cli(args)
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def test_loss_decreases(data, tmp_path):
    log = run(data, tmp_path, "--lr", "2e-3", "--eval_freq", "100", epochs=12)
    losses = [entry["train_loss"] for entry in log]
    assert losses[-1] < 0.7 * losses[0], losses
    assert log[-1]["epoch"] == 11 and log[-1]["train_nonfinite_steps"] == 0


def test_a_run_inside_its_warm_up_warns_and_one_past_it_does_not(data, tmp_path):
    with pytest.warns(UserWarning, match=r"--warmup_epochs 40 is not shorter than the run \(--epochs 1\)"):
        run(data, tmp_path / "short", "--warmup_epochs", "40", "--max_steps_per_epoch", "1", epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(data, tmp_path / "ok", "--warmup_epochs", "0.5", "--max_steps_per_epoch", "1", epochs=1)
    assert not [w for w in caught if "warmup" in str(w.message)]


def test_console_gets_human_lines_with_the_run_eta_and_log_txt_the_json(data, tmp_path, capsys):
    log = run(data, tmp_path, "--eval_freq", "1", epochs=2)
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if line.lstrip().startswith("{")]  # the JSON is in log.txt only
    interval = [line for line in lines if line.startswith("epoch 0 [2/4] loss ")]
    assert len(interval) == 1 and ", eta epoch " in interval[0] and ", run " in interval[0]
    assert [line for line in lines if line.startswith("epoch 0 done: train_loss ")][0].endswith(", 1 epoch to go")
    done = [line for line in lines if line.startswith("epoch 1 done: train_loss ")]
    assert len(done) == 1 and f"val_loss {log[1]['val_loss']:.4g}" in done[0]
    assert done[0].endswith("run eta 0:00:00, 0 epochs to go")


def test_outputs_and_checkpoint_contents(data, tmp_path):
    log = run(data, tmp_path, "--eval_freq", "1", "--save_freq", "2", epochs=2)
    files = set(os.listdir(tmp_path))
    assert {"checkpoint-1.pth", "checkpoint-last.pth", "log.txt", "reconstruction-0.png",
            "reconstruction-1.png"} <= files
    assert "checkpoint-0.pth" not in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert all("val_loss" in entry and np.isfinite(entry["val_loss"]) for entry in log)
    ckpt = torch.load(tmp_path / "checkpoint-1.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["model"] == "dmae_vit_tiny_patch16"
    assert set(ckpt) >= {"model", "optimizer", "epoch", "scaler", "args"}


@pytest.mark.parametrize("model", ["convmae_convvit_tiny_patch16", "dconvmae_convvit_tiny_patch16"])
def test_convmae_families_train(data, tmp_path, model):
    log = run(data, tmp_path, "--eval_freq", "100", model=model, epochs=1)
    assert np.isfinite(log[0]["train_loss"])


def test_on_the_fly_blur_and_grey(data, tmp_path):
    args = ["--model", "dmae_vit_tiny_patch16", "--output_dir", str(tmp_path), "--data_path_orig",
            str(data / "orig"), "--blur", "gaussian", "--blur_sigma", "1.1", "--in_chans", "1",
            "--batch_size", "4", "--epochs", "1", "--input_size", "32", "--num_workers", "0",
            "--device", "cpu"]
    main_pretrain.cli(args)
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["model"]["patch_embed.proj.weight"].shape[1] == 1
    mean, std = ckpt["args"]["data_mean"], ckpt["args"]["data_std"]
    assert len(mean) == 1 and 0.2 < mean[0] < 0.8 and 0 < std[0] < 0.5


def test_resume_equals_uninterrupted_run(data, tmp_path):
    # with persistent workers: the uninterrupted run keeps its workers across epochs, the resumed
    # one starts new ones; the crops still match because each index travels with its epoch seed
    full = tmp_path / "full"
    run(data, full, "--eval_freq", "100", "--save_freq", "1", "--num_workers", "2", epochs=3)
    resumed = tmp_path / "resumed"
    log = run(data, resumed, "--resume", str(full / "checkpoint-1.pth"), "--eval_freq", "100",
              "--num_workers", "2", epochs=3)
    assert [entry["epoch"] for entry in log] == [2]
    a = torch.load(full / "checkpoint-last.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint-last.pth", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
        assert torch.equal(state["step"], b["optimizer"]["state"][key]["step"])


def test_decoded_cache_trains_exactly_as_decoding(data, tmp_path):
    plain = run(data, tmp_path / "plain", "--eval_freq", "1", epochs=2)
    cache = tmp_path / "cache"
    cached = run(data, tmp_path / "cached", "--eval_freq", "1", "--cache_dir", str(cache),
                 "--num_workers", "2", epochs=2)
    for key in ("train_loss", "val_loss"):
        assert [e[key] for e in cached] == [e[key] for e in plain], key
    built = sorted(os.listdir(cache))
    assert len(built) == 2  # one cache for the training split, one for validation
    stamps = {f: os.stat(f).st_mtime_ns for f in cache.glob("*/*")}
    # a second run reuses both caches without writing them again
    again = run(data, tmp_path / "again", "--eval_freq", "1", "--cache_dir", str(cache), epochs=1)
    assert again[0]["train_loss"] == plain[0]["train_loss"]
    assert {f: os.stat(f).st_mtime_ns for f in cache.glob("*/*")} == stamps


def test_cache_only_builds_per_blur_setting_and_exits(data, tmp_path, capsys):
    cache = tmp_path / "cache"
    base = ["--model", "dmae_vit_tiny_patch16", "--output_dir", str(tmp_path / "out"), "--data_path_orig",
            str(data / "orig"), "--blur", "gaussian", "--input_size", "32", "--num_workers", "0",
            "--device", "cpu", "--cache_dir", str(cache), "--cache_only"]
    main_pretrain.cli(base + ["--blur_sigma", "1.1"])
    assert "decoded cache ready" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out" / "log.txt")  # nothing trained
    first = set(os.listdir(cache))
    main_pretrain.cli(base + ["--blur_sigma", "2.0"])  # another blur: other arrays, other caches
    assert len(first) == 2 and len(set(os.listdir(cache)) - first) == 2
    with pytest.raises(SystemExit, match="--cache_only needs --cache_dir"):
        main_pretrain.cli(base[:-3] + ["--cache_only"])


def test_damaged_cache_ends_in_one_message_naming_it(data, tmp_path):
    cache = tmp_path / "cache"
    run(data, tmp_path / "a", "--eval_freq", "100", "--cache_dir", str(cache), epochs=1)
    chunk = sorted(cache.glob("*/chunk-00000.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])  # a disk error or an interrupted copy of the cache
    with pytest.raises(SystemExit, match=r"error: the decoded image cache file .*chunk-00000.bin is "
                                         r"truncated .*delete that folder"):
        run(data, tmp_path / "b", "--eval_freq", "100", "--cache_dir", str(cache), epochs=1)


def test_auto_resume_after_kill(data, tmp_path, repo_root):
    cmd = [sys.executable, "main_pretrain.py", "--model", "mae_vit_tiny_patch16", "--output_dir",
           str(tmp_path), "--data_path_blurred", str(data / "orig"), "--batch_size", "4",
           "--epochs", "200", "--input_size", "32", "--num_workers", "0", "--device", "cpu",
           "--eval_freq", "1000", "--auto_resume"]
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = tmp_path / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and (not log_path.exists() or len(log_path.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)  # complete and loadable
    done = ckpt["epoch"]
    cmd[cmd.index("200")] = str(done + 2)
    subprocess.run(cmd, cwd=repo_root, check=True, capture_output=True)
    epochs = [json.loads(line)["epoch"] for line in log_path.read_text().splitlines()]
    assert epochs[-2:] == [done + 1, done + 2] or epochs[-1] == done + 1
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == done + 1


def test_torchrun_two_processes_gloo(data, tmp_path, repo_root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--node_rank=0", "--master_port", str(29500 + os.getpid() % 1000), "main_pretrain.py",
           "--model", "dmae_vit_tiny_patch16", "--output", str(tmp_path), "--data_path_blurred",
           str(data / "blur"), "--data_path_orig", str(data / "orig"), "--batch_size", "2",
           "--epochs", "1", "--input_size", "32", "--num_workers", "1", "--device", "cpu",
           "--cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # local rank 0 built the decoded caches (train and val); rank 1 waited for them, or found them
    # complete (which of the two depends on timing; the waiting itself is tested in test_decoded_cache)
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 2
    ckpt = torch.load(tmp_path / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"]["world_size"] == 2
    log = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert len(log) == 1 and np.isfinite(log[0]["val_loss"])


def test_clear_errors(data, tmp_path):
    with pytest.raises(SystemExit, match="Valid names: .*dmae_vit_base_patch16"):
        run(data, tmp_path, model="dmae_vit_bas_patch16")
    with pytest.raises(SystemExit, match="pass --data_path_orig"):
        main_pretrain.cli(["--model", "dmae_vit_tiny_patch16", "--data_path_blurred", str(data / "blur"),
                           "--output_dir", str(tmp_path), "--device", "cpu"])
    (tmp_path / "blur2" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit, match="do not pair"):
        main_pretrain.cli(["--model", "dmae_vit_tiny_patch16", "--data_path_blurred", str(tmp_path / "blur2"),
                           "--data_path_orig", str(data / "orig"), "--output_dir", str(tmp_path / "o"),
                           "--device", "cpu"])


STD3 = ["--data_mean", "0.5", "0.5", "0.5", "--data_std"]


@pytest.mark.parametrize("flags, model, expected", [
    (STD3 + ["0", "0", "0"], "mae_vit_tiny_patch16", "--data_std 0.0 0.0 0.0: every value must be > 0"),
    (STD3 + ["0.2", "0", "0.2"], "mae_vit_tiny_patch16", "--data_std 0.2 0.0 0.2: every value must be > 0"),
    (["--mask_ratio", "0"], "mae_vit_tiny_patch16", "--mask_ratio 0 with mae_vit_tiny_patch16 (loss on masked"),
    (["--mask_ratio", "0", "--loss_on", "masked"], "dmae_vit_tiny_patch16", "--mask_ratio 0 with dmae"),
    (["--mask_ratio", "1"], "dmae_vit_tiny_patch16", "--mask_ratio 1.0: must be in [0, 1)"),
    (["--mask_ratio", "-0.5"], "dmae_vit_tiny_patch16", "--mask_ratio -0.5: must be in [0, 1)"),
    (["--mask_ratio", "0.9"], "dmae_vit_tiny_patch16", "keeps no patch visible of the 4 of a 32x32 input"),
    (["--accum_iter", "0"], "dmae_vit_tiny_patch16", "--accum_iter 0: must be at least 1"),
    (["--epochs", "0"], "dmae_vit_tiny_patch16", "--epochs 0: must be at least 1"),
    (["--batch_size", "0"], "dmae_vit_tiny_patch16", "--batch_size 0: must be at least 1"),
    (["--warmup_epochs", "-1"], "dmae_vit_tiny_patch16", "--warmup_epochs -1.0: must be a number >= 0"),
    (["--blr", "0"], "dmae_vit_tiny_patch16", "--blr 0.0: must be > 0"),
    (["--lr", "nan"], "dmae_vit_tiny_patch16", "--lr nan: must be > 0"),
    (["--print_freq", "0"], "dmae_vit_tiny_patch16", "--print_freq 0: must be at least 1"),
    (["--save_freq", "0"], "dmae_vit_tiny_patch16", "--save_freq 0: must be at least 1"),
    (["--max_nonfinite", "0"], "dmae_vit_tiny_patch16", "--max_nonfinite 0: must be at least 1"),
    (["--blur", "gaussian", "--blur_sigma", "0"], "dmae_vit_tiny_patch16", "gaussian blur needs sigma > 0"),
    (["--blur", "gaussian", "--blur_sigma", "1000"], "dmae_vit_tiny_patch16", "--blur_sigma 1000.0: at most 25"),
    (["--blur", "median", "--blur_kernel_size", "4"], "dmae_vit_tiny_patch16", "median blur needs an odd kernel"),
    (["--input_size", "40", "32"], "dconvmae_convvit_tiny_patch16", "--input_size 40 32: not divisible by the patch"),
])
def test_flags_that_cannot_train_are_refused_before_any_work(data, tmp_path, flags, model, expected):
    # each used to run (and exit 0 on a loss of 0 or NaN), hang, or end in a traceback
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        run(data, out, *flags, model=model, epochs=1)
    assert str(info.value).startswith("error: invalid settings, nothing was run") and expected in str(info.value)
    assert not out.exists()


def test_every_invalid_flag_is_named_at_once(data, tmp_path):
    with pytest.raises(SystemExit) as info:
        run(data, tmp_path, "--accum_iter", "0", "--mask_ratio", "1", epochs=0)
    assert [line.split(":")[0].strip() for line in str(info.value).splitlines()[1:]] == [
        "--epochs 0", "--accum_iter 0", "--mask_ratio 1.0"]


def test_mask_ratio_0_trains_a_deblurring_model_with_the_loss_on_all_patches(data, tmp_path):
    log = run(data, tmp_path, "--mask_ratio", "0", "--eval_freq", "100", epochs=1)
    assert log[0]["train_loss"] > 0 and log[0]["train_nonfinite_steps"] == 0


def test_no_full_batch_is_refused_at_start(data, tmp_path):
    # 16 training images, drop_last: a batch of 32 used to run 0 steps and still write checkpoints
    with pytest.raises(SystemExit, match="16 training images make no full batch of --batch_size 32 per process"):
        run(data, tmp_path, "--batch_size", "32", epochs=1)
    assert not list(tmp_path.glob("checkpoint-*.pth")) and not (tmp_path / "log.txt").exists()


def test_run_whose_loss_is_never_finite_fails_and_saves_nothing(data, tmp_path):
    # a std of 1e-30 overflows every normalised pixel: 4 non-finite steps per epoch, fewer than
    # --max_nonfinite, used to train 2 epochs on nothing and exit 0 with checkpoints
    with pytest.raises(SystemExit, match="epoch 0: the loss was non-finite in every one of its 4 steps"):
        run(data, tmp_path, *STD3, "1e-30", "1e-30", "1e-30", epochs=2)
    assert not list(tmp_path.glob("checkpoint-*.pth")) and not (tmp_path / "log.txt").exists()


def test_visualize_reconstruction_tool(data, tmp_path, repo_root):
    import argparse
    run(data, tmp_path / "run", "--eval_freq", "100", epochs=1, model="dconvmae_convvit_tiny_patch16")
    image = str(next((data / "orig" / "val").rglob("*.png")))
    out = tmp_path / "fig.png"
    result = subprocess.run([sys.executable, "tools/visualize_reconstruction.py",
                             str(tmp_path / "run" / "checkpoint-last.pth"), image, image, "--out", str(out)],
                            cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    fig = cv2.imread(str(out))
    assert fig.shape[0] > 2 * 32 and fig.shape[1] > 4 * 32  # two rows of four 32x32 panels
    # a published-style checkpoint: weights under 'model', args as argparse.Namespace
    from util.registry import pretrain_models
    model = pretrain_models().create("dmae_vit_tiny_patch16")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="dmae_vit_tiny_patch16",
                                                                         input_size=224, norm_pix_loss=True)},
               tmp_path / "published.pth")
    result = subprocess.run([sys.executable, "tools/visualize_reconstruction.py", str(tmp_path / "published.pth"),
                             image, "--out", str(tmp_path / "fig2.png")], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # one row of four 224-pixel panels under a 16-pixel row of column titles
    assert cv2.imread(str(tmp_path / "fig2.png")).shape[:2] == (16 + 224 + 4, 4 * 226 + 2)
