"""Pieces of the pretraining loop: non-finite steps, checkpoint pruning, DICOM frames as samples."""
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from main_pretrain import prune_checkpoints, train_one_epoch
from util.datasets import PretrainDataset
from util.training import NonFiniteGuard, StopTraining, step_optimizer


def test_nonfinite_step_is_skipped_on_the_device():
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.full((4,), float("nan"))
    step_optimizer(opt, None, torch.tensor(False))
    assert torch.equal(param.detach(), torch.ones(4))  # no update, no NaN in the weights
    assert not torch.isnan(opt.state[param]["exp_avg"]).any()
    # a finite local loss with non-finite gradients (another DDP rank's NaN) is skipped too
    param.grad = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    step_optimizer(opt, None, torch.tensor(True))
    assert torch.equal(param.detach(), torch.ones(4))
    param.grad = torch.ones(4)
    step_optimizer(opt, None, torch.tensor(True))
    assert (param.detach() < 1).all()


class ScriptedLoss(torch.nn.Module):
    """A stand-in pretraining model whose losses follow a script (NaN = a non-finite step)."""

    def __init__(self, losses):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.losses = iter(losses)

    def forward(self, inputs, targets, mask_ratio):
        return self.weight * next(self.losses), None, None


def run_epochs(losses_per_epoch, guard, print_freq=100):
    """The real pretraining epoch loop over the scripted losses; returns the epochs that finished."""
    model = ScriptedLoss([loss for epoch in losses_per_epoch for loss in epoch])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    args = SimpleNamespace(device="cpu", amp="none", max_steps_per_epoch=0, accum_iter=1, print_freq=print_freq,
                           distributed=False, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=len(losses_per_epoch),
                           mask_ratio=0.75, output_dir="/runs/x")
    finished = []
    for epoch, losses in enumerate(losses_per_epoch):
        batches = [(torch.zeros(1, 1), None, 0)] * len(losses)
        train_one_epoch(model, batches, optimizer, None, epoch, args, lambda x: x, None, {}, guard)
        finished.append(epoch)
    return finished


NAN = float("nan")


def test_nonfinite_steps_are_counted_across_epochs():
    # 3 at the end of epoch 0 and 2 at the start of epoch 1 make 5 in a row (the count used to
    # restart with every epoch, so no run with short epochs ever stopped)
    finished = []
    with pytest.raises(StopTraining, match="non-finite for 5 consecutive steps.*/runs/x"):
        finished = run_epochs([[1.0, NAN, NAN, NAN], [NAN, NAN, 1.0, 1.0]], NonFiniteGuard(5, "cpu", "/runs/x"))
    assert finished == []
    assert run_epochs([[1.0, NAN, NAN, NAN], [NAN, 1.0, NAN, NAN]], NonFiniteGuard(5, "cpu", "/runs/x")) == [0, 1]


def test_limit_reached_between_log_intervals_still_stops():
    # as on CUDA: the count is read only at log intervals (here: the last step, which is finite);
    # the limit was reached in between, so the run must stop all the same
    guard = NonFiniteGuard(3, "cpu", "/runs/x")
    guard.check_every_step = False
    with pytest.raises(StopTraining, match="non-finite for 3 consecutive steps"):
        run_epochs([[1.0, NAN, NAN, NAN, 1.0, 1.0]], guard)
    guard = NonFiniteGuard(3, "cpu", "/runs/x")
    guard.check_every_step = False
    assert run_epochs([[1.0, NAN, NAN, 1.0, NAN, NAN, 1.0]], guard) == [0]


def test_cpu_guard_stops_at_the_step_that_reaches_the_limit():
    guard = NonFiniteGuard(2, "cpu", "/runs/x")  # one CPU process: every step is checked (no sync cost)
    guard.step(torch.tensor(False))
    with pytest.raises(StopTraining):
        guard.step(torch.tensor(False))


def test_epoch_without_a_finite_step_stops_even_below_the_limit():
    with pytest.raises(StopTraining, match="epoch 0: the loss was non-finite in every one of its 3 steps"):
        run_epochs([[NAN, NAN, NAN]], NonFiniteGuard(20, "cpu", "/runs/x"))


def test_keep_last_prunes_only_our_numbered_files(tmp_path):
    for epoch in (9, 19, 29, 39):
        (tmp_path / f"checkpoint-{epoch}.pth").write_bytes(b"x")
    (tmp_path / "checkpoint-last.pth").write_bytes(b"x")
    (tmp_path / "notes-1.pth").write_bytes(b"x")
    outside = tmp_path.parent / f"{tmp_path.name}-keep.pth"
    outside.write_bytes(b"precious")
    os.symlink(outside, tmp_path / "checkpoint-1.pth")  # a link must never be followed or removed
    prune_checkpoints(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1.pth", "checkpoint-29.pth", "checkpoint-39.pth",
                                            "checkpoint-last.pth", "notes-1.pth"]
    assert outside.read_bytes() == b"precious"


def test_dicom_cine_frames_are_samples(tmp_path):
    from pydicom.data import get_testdata_file
    cine = get_testdata_file("examples_ybr_color.dcm")  # a 30-frame colour ultrasound cine
    (tmp_path / "train" / "us").mkdir(parents=True)
    shutil.copy(cine, tmp_path / "train" / "us" / "cine.dcm")
    ds = PretrainDataset(str(tmp_path / "train"), input_size=32, in_chans=1, train=False)
    assert len(ds) == 30
    first, _, skipped = ds[0]
    last, _, _ = ds[29]
    assert first.shape == (1, 32, 32) and skipped == 0
    assert not torch.equal(first, last)  # different frames, not the first one 30 times


def test_a_warm_up_that_lasts_the_whole_run_is_named_with_the_lr_it_reaches():
    from util.training import schedule_problem

    def problem(start, epochs, warmup):
        return schedule_problem(SimpleNamespace(start_epoch=start, epochs=epochs, warmup_epochs=warmup, lr=1e-3))

    message = problem(0, 1, 40)  # the published warm-up in a 1-epoch run: the lr stays below 3 % of --lr
    assert "--warmup_epochs 40 is not shorter than the run (--epochs 1)" in message
    assert "from 0% to at most 2% of 1.000e-03" in message and "--warmup_epochs 0.1" in message
    assert "from 60% to at most 100%" in problem(30, 50, 50)  # resumed at epoch 30, warm-up = run
    assert problem(0, 100, 40) is None and problem(39, 41, 40) is None
    assert "nothing left to train" in problem(10, 10, 1)


def test_run_eta_counts_this_epoch_and_the_later_ones_at_the_mean_step_time(monkeypatch):
    from util import training

    assert training.format_duration(3723) == "1:02:03" and training.format_duration(90061) == "1 d 1:01:01"
    assert training.format_duration(float("nan")) == "?" and math.isnan(training.eta_seconds(5.0, 0, 10))
    clock = iter([100.0, 160.0])  # the run's first step at t = 100 s; asked at t = 160 s
    monkeypatch.setattr(training.time, "time", lambda: next(clock))
    run = training.RunProgress(end_epoch=10)
    run.start_epoch(2, steps=50)  # resumed at epoch 2: epochs 2-9 are this run's
    run.steps_done = 30  # 2 s per step so far
    # 20 steps left in epoch 2, then 7 epochs of 50: 370 steps x 2 s
    assert run.eta(steps_left_in_epoch=20) == 740.0
    assert run.epochs_to_go() == 7
    stopping = training.RunProgress(end_epoch=5, early_stop=True)
    assert "early stop" in stopping.describe_eta(0)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from util import training

    class Console:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            pass

        def flush(self):
            pass

    monkeypatch.setattr(training.sys, "stderr", Console(False))
    assert training.progress_bar(10, "epoch 0") is None
    monkeypatch.setattr(training.sys, "stderr", Console(True))
    bar = training.progress_bar(10, "epoch 0")
    assert bar is not None and bar.total == 10
    bar.close()
