"""Pieces of the pretraining loop: non-finite steps, checkpoint pruning, DICOM frames as samples."""
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from main_pretrain import prune_checkpoints
from util.datasets import PretrainDataset
from util.training import StopTraining, check_nonfinite, step_optimizer


def test_nonfinite_step_is_skipped_on_the_device():
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.full((4,), float("nan"))
    step_optimizer(opt, None, torch.tensor(False), fused_skip=True)
    assert torch.equal(param.detach(), torch.ones(4))  # no update, no NaN in the weights
    assert not torch.isnan(opt.state[param]["exp_avg"]).any()
    # a finite local loss with non-finite gradients (another DDP rank's NaN) is skipped too
    param.grad = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    step_optimizer(opt, None, torch.tensor(True), fused_skip=True)
    assert torch.equal(param.detach(), torch.ones(4))
    param.grad = torch.ones(4)
    step_optimizer(opt, None, torch.tensor(True), fused_skip=True)
    assert (param.detach() < 1).all()


def test_too_many_nonfinite_steps_stop_with_a_message():
    args = SimpleNamespace(max_nonfinite=3, output_dir="/runs/x")
    check_nonfinite(torch.tensor(2.0), args)
    with pytest.raises(StopTraining, match="non-finite for 3 consecutive steps.*/runs/x.*intact"):
        check_nonfinite(torch.tensor(3.0), args)


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
