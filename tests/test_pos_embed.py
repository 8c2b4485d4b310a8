"""Position-embedding resampling equals the published MAE / ConvMAE interpolation.

The expected values are computed here, independently of util/pos_embed.py, by the steps of the
published ``interpolate_pos_embed`` (facebookresearch/mae util/pos_embed.py, and the same code in
ConvMAE's segmentation checkpoint loader): keep the prefix (class) tokens, reshape the grid tokens
to (1, D, gh, gw), ``F.interpolate(mode='bicubic', align_corners=False)`` without anti-aliasing,
flatten back, concatenate.
"""
import pytest
import torch
import torch.nn.functional as F

from models_vit import create_model
from util.checkpoint import load_weights
from util.pos_embed import resample_pos_embed


def published_interpolation(pos_embed, old_grid, new_grid, num_extra_tokens):
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(-1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, grid), dim=1)


@pytest.mark.parametrize("prefix", [1, 0])
@pytest.mark.parametrize("new_grid", [(32, 32), (8, 8), (20, 24)])  # SEG 512 crop, shrink, non-square
def test_resample_is_the_published_interpolation(prefix, new_grid):
    torch.manual_seed(0)
    pos_embed = torch.randn(1, prefix + 14 * 14, 16)
    got = resample_pos_embed(pos_embed, new_grid, num_prefix_tokens=prefix)
    want = published_interpolation(pos_embed, (14, 14), new_grid, prefix)
    assert got.shape == (1, prefix + new_grid[0] * new_grid[1], 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if prefix:
        assert torch.equal(got[:, :prefix], pos_embed[:, :prefix])  # class token kept as it is


def test_antialiased_option_is_timms_default_and_differs():
    from timm.layers import resample_abs_pos_embed
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 14 * 14, 16)
    aa = resample_pos_embed(pos_embed, (32, 32), num_prefix_tokens=1, antialias=True)
    torch.testing.assert_close(aa, resample_abs_pos_embed(pos_embed, [32, 32], num_prefix_tokens=1),
                               rtol=0, atol=1e-6)
    published = resample_pos_embed(pos_embed, (32, 32), num_prefix_tokens=1)
    assert (aa - published).abs().max() > 1e-2  # the two really are different resizes


def test_same_grid_is_returned_unchanged():
    pos_embed = torch.randn(1, 1 + 4 * 4, 8)
    assert resample_pos_embed(pos_embed, (4, 4), num_prefix_tokens=1) is pos_embed


@pytest.mark.parametrize("name,prefix", [("vit_tiny_patch16", 1), ("convvit_tiny_patch16", 0)])
def test_loading_a_checkpoint_at_another_size_resamples_as_published(name, prefix):
    """The path fine-tuning (--finetune) and the segmentation backbones take: load_weights."""
    torch.manual_seed(0)
    source = create_model(name, img_size=48, num_classes=2)  # 3x3 grid
    torch.nn.init.normal_(source.pos_embed)
    target = create_model(name, img_size=(80, 112), num_classes=2)  # 5x7 grid
    report = load_weights(target, source.state_dict())
    assert any(entry.startswith("pos_embed") for entry in report.interpolated)
    want = published_interpolation(source.pos_embed.detach(), (3, 3), (5, 7), prefix)
    torch.testing.assert_close(target.pos_embed.detach(), want, rtol=0, atol=1e-6)
