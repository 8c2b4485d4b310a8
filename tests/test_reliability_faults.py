"""Fault injection on CPU: kill -9 (at a random moment and inside a checkpoint write), SIGTERM, a dead
or hung rank of a 2-process gloo run, a full disk and a read-only output folder. Tiny models, 32 px
images made here; the uninterrupted reference runs in-process, the faulted ones in subprocesses.

The kill inside a checkpoint write needs no hook in the product: the child runs the script through a
small wrapper (``PAUSE_IN_SAVE``) whose ``torch.save`` writes the temporary file that
``util.fileio.atomic_path`` hands it, truncates it to half (the bytes a kill mid-write leaves behind),
signals the test and sleeps until killed.
"""
import contextlib
import errno
import glob
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import main_finetune
import main_pretrain
from util.checkpoint import load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAUSE_IN_SAVE = """
import os, runpy, sys, time
import torch
target, nth, marker = os.environ["PAUSE_SAVE_OF"], int(os.environ["PAUSE_NTH"]), os.environ["PAUSE_MARKER"]
real_save, seen = torch.save, []

def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if os.path.basename(str(f)).startswith("." + target + "."):  # atomic_path's temporary file
        seen.append(f)
        if len(seen) == nth:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            with open(marker, "w") as fh:
                fh.write(str(f))
            time.sleep(600)

torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# SIGTERM at a chosen step, from inside the process: the real signal and handler, but no race with
# a fast tiny model that could finish its epoch before a signal from the test arrives.
SIGTERM_AT_STEP = """
import os, runpy, signal, sys
import util.training
epoch, step = map(int, os.environ["SIGTERM_AT"].split(","))
real_log = util.training.log_progress

def log_progress(e, it, *args):
    real_log(e, it, *args)
    if (e, it + 1) == (epoch, step):
        os.kill(os.getpid(), signal.SIGTERM)

util.training.log_progress = log_progress
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ------------------------------------------------------------------------------ helpers
def write_images(root, splits, classes=("a", "b"), size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        for i in range(n):
            folder = os.path.join(root, split, classes[i % len(classes)])
            os.makedirs(folder, exist_ok=True)
            img = cv2.GaussianBlur(rng.random(size).astype(np.float32), (0, 0), 2) * 0.5
            if i % 2:
                img[10:30, 12:36] += 0.4  # the second class is learnable
            cv2.imwrite(os.path.join(folder, f"{split}{i}.png"), (np.clip(img, 0, 1) * 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def pre_data(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("pre")), {"train": 16, "val": 4})


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("cls")), {"train": 24, "val": 8, "test": 6},
                        classes=("benign", "malignant"))


def pretrain_args(data, out, *extra, epochs=3):
    # --amp fp16 on the CPU: a GradScaler exists, so its state is checked to continue too
    return ["--model", "mae_vit_tiny_patch16", "--output_dir", str(out), "--data_path_blurred", data,
            "--batch_size", "4", "--epochs", str(epochs), "--input_size", "32", "--num_workers", "0",
            "--device", "cpu", "--warmup_epochs", "1", "--eval_freq", "1000", "--print_freq", "1",
            "--amp", "fp16", "--blr", "1e-2", *extra]


def finetune_args(data, out, *extra, epochs=3):
    return ["--data_path", data, "--output_dir", str(out), "--model", "vit_tiny_patch16", "--input_size", "32",
            "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--n_boot", "0", "--epochs", str(epochs),
            "--warmup_epochs", "1", "--print_freq", "1", "--lr", "2e-3", "--early_stops", "100", *extra]


def child_env(**extra):
    # the thread count of this process: CPU results are bit-identical only for the same count
    return dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()),
                **extra)


def start(script, args, log_path, wrapper=None, env=None):
    cmd = [sys.executable] + ([wrapper] if wrapper else []) + [script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


def wait_until(condition, proc, timeout=120, what=""):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def printed(log_path, text):
    return lambda: os.path.exists(log_path) and text in open(log_path).read()


def kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def check_checkpoints_complete(out):
    """Every checkpoint file under its final name loads with weights_only=True and is whole; what a
    kill inside a write leaves is only atomic_path's hidden temporary file. Returns last's epoch."""
    for path in glob.glob(os.path.join(out, "checkpoint-*.pth")):
        ckpt = load_checkpoint_file(path)  # CheckpointError if truncated or unsafe
        assert {"model", "epoch", "args"} <= set(ckpt), path
    for name in os.listdir(out):
        assert name.startswith(".") or not name.endswith(".tmp.pth"), name
    last = os.path.join(out, "checkpoint-last.pth")
    return load_checkpoint_file(last)["epoch"] if os.path.exists(last) else None


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def without_speed(entry):
    return {k: v for k, v in entry.items() if k != "train_images_per_sec"}


def assert_same_final_state(a_dir, b_dir):
    """Weights, optimizer moments and step counters, GradScaler state and epoch: bit-identical."""
    a = torch.load(os.path.join(a_dir, "checkpoint-last.pth"), weights_only=True)
    b = torch.load(os.path.join(b_dir, "checkpoint-last.pth"), weights_only=True)
    assert a["epoch"] == b["epoch"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert a["scaler"] == b["scaler"]


@pytest.fixture(scope="module")
def pretrain_reference(pre_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre_ref")
    main_pretrain.cli(pretrain_args(pre_data, out, "--save_freq", "1"))
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["scaler"] and ckpt["scaler"]["_growth_tracker"] == 12  # the scaler really ran: 3 x 4 steps
    return out


# ------------------------------------------------------------------------------ kill -9
def test_pretrain_kill_at_random_point_and_inside_checkpoint_write_then_auto_resume(pre_data, pretrain_reference,
                                                                                     tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(pre_data, out, "--save_freq", "1", "--auto_resume")
    # 1. kill -9 at a random step (seeded: reproducible) of the first epoch
    proc = start("main_pretrain.py", args, tmp_path / "1.log")
    wait_until(printed(tmp_path / "1.log", f"epoch 0 [{random.Random(9).randint(1, 4)}/4]"), proc, what="the kill step")
    kill9(proc)
    check_checkpoints_complete(out)
    # 2. auto-resume, then kill -9 while checkpoint-1.pth is half written. checkpoint-last.pth is
    # written after the numbered file, so it still holds epoch 0 and the resume writes
    # checkpoint-1.pth (in the opposite order the resume went past epoch 1 and never wrote it).
    marker, wrapper = tmp_path / "paused", tmp_path / "pause_in_save.py"
    wrapper.write_text(PAUSE_IN_SAVE)
    proc = start("main_pretrain.py", args, tmp_path / "2.log", wrapper=str(wrapper),
                 env=child_env(PAUSE_SAVE_OF="checkpoint-1.pth", PAUSE_NTH="1", PAUSE_MARKER=str(marker)))
    wait_until(marker.exists, proc, what="the write of checkpoint-1.pth")
    kill9(proc)
    half_written = marker.read_text()
    assert os.path.exists(half_written) and os.path.basename(half_written).startswith(".checkpoint-1.pth.")
    assert check_checkpoints_complete(out) == 0  # checkpoint-last.pth: epoch 0, whole
    assert not (out / "checkpoint-1.pth").exists()
    # 3. auto-resume to the end (in-process): the same final state as the uninterrupted run
    main_pretrain.cli(args)
    assert check_checkpoints_complete(out) == 2
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "checkpoint-*.pth"))) == \
        ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth"]
    assert load_checkpoint_file(out / "checkpoint-1.pth")["epoch"] == 1
    assert_same_final_state(pretrain_reference, out)
    assert without_speed(read_log(out)[-1]) == without_speed(read_log(pretrain_reference)[-1])  # loss, lr


def test_finetune_kill_at_random_point_and_inside_checkpoint_write_then_auto_resume(cls_data, tmp_path):
    reference = tmp_path / "reference"
    main_finetune.cli(finetune_args(cls_data, reference))
    out = tmp_path / "run"
    args = finetune_args(cls_data, out, "--auto_resume")
    proc = start("main_finetune.py", args, tmp_path / "1.log")
    # kill -9 at a random (seeded) step of the first epoch; a timed sleep instead let a fast,
    # idle machine finish the whole run before the kill
    step = random.Random(7).randint(1, 6)
    wait_until(printed(tmp_path / "1.log", f"epoch 0 [{step}/6]"), proc, what="the kill step")
    kill9(proc)
    check_checkpoints_complete(out)
    marker, wrapper = tmp_path / "paused", tmp_path / "pause_in_save.py"
    wrapper.write_text(PAUSE_IN_SAVE)
    before = check_checkpoints_complete(out)
    proc = start("main_finetune.py", args, tmp_path / "2.log", wrapper=str(wrapper),
                 env=child_env(PAUSE_SAVE_OF="checkpoint-last.pth", PAUSE_NTH="1", PAUSE_MARKER=str(marker)))
    wait_until(marker.exists, proc, what="the checkpoint write")
    kill9(proc)
    assert check_checkpoints_complete(out) == before
    main_finetune.cli(args)
    assert check_checkpoints_complete(out) == 2
    assert_same_final_state(reference, out)
    ref_log, log = read_log(reference), read_log(out)
    assert log[-1] == ref_log[-1]  # the test-split metrics of the best model
    assert [(e["train_loss"], e["val_loss"]) for e in log if e.get("epoch") == 2] == \
        [(e["train_loss"], e["val_loss"]) for e in ref_log if e.get("epoch") == 2]
    best_ref = torch.load(reference / "checkpoint-best.pth", weights_only=True)
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best["epoch"] == best_ref["epoch"] and all(torch.equal(best["model"][k], v)
                                                      for k, v in best_ref["model"].items())


# ------------------------------------------------------------------------------ SIGTERM
@pytest.mark.parametrize("script", ["main_pretrain.py", "main_finetune.py"])
def test_sigterm_saves_a_checkpoint_and_exits_0_then_auto_resume_continues(script, pre_data, cls_data, tmp_path):
    out = tmp_path / "run"
    if script == "main_pretrain.py":
        args, steps, cli = pretrain_args(pre_data, out, "--auto_resume"), 4, main_pretrain.cli
    else:
        args, steps, cli = finetune_args(cls_data, out, "--auto_resume"), 6, main_finetune.cli
    wrapper = tmp_path / "sigterm_at_step.py"
    wrapper.write_text(SIGTERM_AT_STEP)
    proc = start(script, args, tmp_path / "run.log", wrapper=str(wrapper), env=child_env(SIGTERM_AT="1,2"))
    assert proc.wait(timeout=120) == 0, open(tmp_path / "run.log").read()[-3000:]
    assert "SIGTERM received during epoch 1: saved checkpoint-last.pth" in open(tmp_path / "run.log").read()
    # The partial epoch is saved labelled as epoch 0, so the resume runs epoch 1 again from the
    # weights as they were at the signal. Exact equality with an uninterrupted run is therefore not
    # expected (the partial epoch's steps stay in the weights); the closest property: the epoch
    # counter continues at 1 and the optimizer has made exactly the steps done before the signal.
    ckpt = load_checkpoint_file(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 0
    done = int(next(iter(ckpt["optimizer"]["state"].values()))["step"])
    assert done == steps + 2
    cli(args)
    log = read_log(out)
    assert [e["epoch"] for e in log if "train_loss" in e] == [0, 1, 2]
    final = load_checkpoint_file(out / "checkpoint-last.pth")
    assert final["epoch"] == 2 and int(next(iter(final["optimizer"]["state"].values()))["step"]) == done + 2 * steps


# ------------------------------------------------------------------------------ a dead or hung rank
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_two_ranks(script, args, tmp_path):
    """The two processes of a 2-rank run as a scheduler starts them (srun/mpirun: no torchrun agent
    that would kill the survivor for us)."""
    port, procs = free_port(), []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(start(script, args, tmp_path / f"rank{rank}.log", env=env))
    return procs


@pytest.mark.parametrize("script,fault", [("main_pretrain.py", "hang"), ("main_finetune.py", "kill")])
def test_dead_or_hung_rank_stops_the_other_with_a_clear_error(script, fault, pre_data, cls_data, tmp_path):
    timeout = 3
    if script == "main_pretrain.py":
        args = pretrain_args(pre_data, tmp_path / "out", "--dist_timeout", str(timeout), epochs=50)
        progress = "epoch 1 [1/2]"
    else:
        args = finetune_args(cls_data, tmp_path / "out", "--dist_timeout", str(timeout), epochs=50)
        progress = "epoch 1 [1/3]"
    procs = start_two_ranks(script, args, tmp_path)
    try:
        wait_until(printed(tmp_path / "rank0.log", progress), procs[0], what="training under 2 processes")
        # hang: SIGSTOP is a frozen node (no connection error, only the timeout can end the wait)
        procs[1].send_signal(signal.SIGSTOP if fault == "hang" else signal.SIGKILL)
        faulted = time.time()
        rc = procs[0].wait(timeout=timeout + 40)
        elapsed = time.time() - faulted
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = open(tmp_path / "rank0.log").read()
    assert rc == 1, output[-3000:]
    assert elapsed < timeout + 30
    message = output.strip().splitlines()[-1]
    assert message.startswith("error on rank 0: lost contact with the other processes"), output[-3000:]
    assert "--auto_resume" in message and str(tmp_path / "out") in message
    assert "Traceback" not in output
    assert check_checkpoints_complete(tmp_path / "out") >= 0


# ------------------------------------------------------------------------------ disk full, read-only
@contextlib.contextmanager
def file_size_limit(max_bytes):
    """RLIMIT_FSIZE: a write past ``max_bytes`` fails (EFBIG) as on a full disk; torch.save then
    fails just as it does with ENOSPC. Portable: no mount, no root."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not the default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_is_intact(script, pre_data, cls_data, tmp_path):
    out = tmp_path / "run"
    if script == "pretrain":
        cli, args = main_pretrain.cli, lambda e: pretrain_args(pre_data, out, "--auto_resume", epochs=e)
    else:
        cli, args = main_finetune.cli, lambda e: finetune_args(cls_data, out, "--auto_resume", epochs=e)
    cli(args(1))
    previous = (out / "checkpoint-last.pth").read_bytes()
    with file_size_limit(len(previous) // 2), pytest.raises(SystemExit) as info:
        cli(args(2))
    message = str(info.value)
    assert "could not write" in message and str(out) in message and "MiB free" in message, message
    assert "is intact" in message and "--auto_resume" in message
    assert (out / "checkpoint-last.pth").read_bytes() == previous
    assert not [name for name in os.listdir(out) if name.endswith(".tmp.pth")]  # no partial file left


@contextlib.contextmanager
def read_only(folder):
    """A read-only folder: a read-only tmpfs where mounting is allowed (tests often run as root,
    for whom chmod does not stop writes), else chmod for a normal user."""
    os.makedirs(folder)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield lambda: None
        finally:
            os.chmod(folder, 0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to mount: cannot make a read-only folder")
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_read_only_output_folder_fails_at_start_naming_it(pre_data, tmp_path):
    out = tmp_path / "ro"
    with read_only(out) as make_read_only:
        if os.geteuid() == 0:  # first a checkpoint to keep, then the folder becomes read-only
            main_pretrain.cli(pretrain_args(pre_data, out, epochs=1))
            previous = (out / "checkpoint-last.pth").read_bytes()
            make_read_only()
        for cli, args in ((main_pretrain.cli, pretrain_args(pre_data, out, "--auto_resume", epochs=2)),
                          (main_finetune.cli, finetune_args(pre_data, out, epochs=1))):
            with pytest.raises(SystemExit) as info:
                cli(args)
            assert f"cannot write to the output folder {out}" in str(info.value)
            assert os.strerror(errno.EROFS if os.geteuid() == 0 else errno.EACCES) in str(info.value)
        if os.geteuid() == 0:
            assert (out / "checkpoint-last.pth").read_bytes() == previous


# ------------------------------------------------------------------------------ no orphans after kill -9
# The decoded-cache build with its pool workers stuck in their task. As a sitecustomize module, every
# Python process of the run (the training process, the fork server and so its workers) installs it
# at start-up, and the task pickled by name resolves to it in the workers.
CACHE_BUILD_STUCK = """
import time
import util.decoded_cache

def _worker_task(task):
    time.sleep(600)

util.decoded_cache._worker_task = _worker_task
"""


def session_processes(session):
    """(pid, command line) of the live processes of a session (/proc: Linux)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if fields[0] != "Z" and int(fields[3]) == session:  # state, ..., session id
            found.append((int(pid), cmdline))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals and /proc are Linux's")
@pytest.mark.parametrize("workers", ["DataLoader", "decoded-cache pool"])
def test_kill_9_of_the_training_process_leaves_no_process_behind(workers, pre_data, tmp_path):
    # The fork server, its workers and the resource tracker used to outlive the killed process
    # (parent 1, 0.5-0.8 GB each), for ever: the workers keep the fork server's pipe open.
    args = pretrain_args(pre_data, tmp_path / "out", "--num_workers", "2", epochs=1000)
    env = child_env()
    if workers == "decoded-cache pool":
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(CACHE_BUILD_STUCK)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), ROOT])
        args += ["--cache_dir", str(tmp_path / "cache"), "--cache_only"]
    # its own session: every process it starts, directly or not, keeps the session id
    proc = subprocess.Popen([sys.executable, "main_pretrain.py", *args], cwd=ROOT, env=env,
                            stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        forked = lambda: [p for p, cmdline in session_processes(proc.pid) if "multiprocessing.forkserver" in cmdline]
        expected = 3 if workers == "DataLoader" else 2  # the fork server and its workers (the pool: 1 chunk)
        wait_until(lambda: len(forked()) >= expected, proc, what=f"the {workers} workers")
        assert len(session_processes(proc.pid)) >= expected + 2  # + the training process and resource tracker
        kill9(proc)
        deadline = time.time() + 15
        while session_processes(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        survivors = session_processes(proc.pid)
        assert not survivors, f"still running after the kill: {survivors}"
    finally:
        for pid, _ in session_processes(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ damaged checkpoint-last.pth
def test_auto_resume_from_a_damaged_last_checkpoint_names_the_newest_intact_one(pre_data, tmp_path):
    out = tmp_path / "out"
    main_pretrain.cli(pretrain_args(pre_data, out, "--save_freq", "1", epochs=3))
    last = out / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. a disk error, or a copy cut short
    (out / "checkpoint-2.pth").write_bytes(b"\0" * 1000)
    with pytest.raises(SystemExit) as info:
        main_pretrain.cli(pretrain_args(pre_data, out, "--save_freq", "1", "--auto_resume", epochs=4))
    intact = out / "checkpoint-1.pth"
    assert f"{last}: not a readable PyTorch checkpoint (truncated or corrupt" in str(info.value)
    assert (f"The newest intact numbered checkpoint is {intact}: continue from it with --resume {intact}"
            in str(info.value))
    # and that advice works: epochs 2 and 3 are trained from it
    main_pretrain.cli(pretrain_args(pre_data, out, "--save_freq", "1", "--resume", str(intact), epochs=4))
    assert [entry["epoch"] for entry in read_log(out)] == [0, 1, 2, 2, 3]
    assert load_checkpoint_file(last)["epoch"] == 3


def test_auto_resume_from_a_damaged_last_checkpoint_without_numbered_ones_says_so(cls_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(os.urandom(1000))
    with pytest.raises(SystemExit) as info:
        main_finetune.cli(finetune_args(cls_data, out, "--auto_resume", epochs=1))
    assert f"{out / 'checkpoint-last.pth'}: not a PyTorch checkpoint (truncated or corrupt" in str(info.value)
    assert f"{out} holds no intact numbered checkpoint (checkpoint-N.pth)" in str(info.value)
