"""Pretraining data: paired crops, on-the-fly blur, pairing errors, corrupt files."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from util.blur import BlurSpec
from util.datasets import DatasetError, PretrainDataset, SeededSampler, collate_skip_bad, sample_crop_box


def write_tree(root, n=6, size=(60, 80), seed=0, colour=False):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = os.path.join(root, "train", "c%d" % (i % 2))
        os.makedirs(folder, exist_ok=True)
        shape = size + ((3,) if colour else ())
        img = cv2.GaussianBlur((rng.random(shape) * 255).astype(np.uint8), (0, 0), 2)
        path = os.path.join(folder, f"img{i}.png")
        cv2.imwrite(path, img)
        paths.append(path)
    return paths


def test_paired_crops_are_aligned_and_vary(tmp_path):
    write_tree(tmp_path / "a")
    # identical files in both trees: a correctly shared crop/flip gives identical tensors
    ds = PretrainDataset(str(tmp_path / "a" / "train"), orig_root=str(tmp_path / "a" / "train"),
                         input_size=32)
    seen = set()
    for epoch_seed in range(5):
        for i in range(len(ds)):
            inp, tgt, _ = ds[(i, epoch_seed)]
            assert torch.equal(inp, tgt)
            seen.add(tuple(inp[0, :2, :2].flatten().tolist()))
    assert len(seen) > 20  # different samples and epochs get different crops


def crops_through_loader(ds, seed, num_workers, persistent=False, epochs=1):
    sampler = SeededSampler(range(len(ds)))
    loader = DataLoader(ds, batch_size=1, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_skip_bad, persistent_workers=persistent)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch, seed + epoch)
        out.append([b[0][0] for b in loader])
    return out


def test_crops_follow_epoch_seed_and_index_not_workers(tmp_path):
    write_tree(tmp_path / "a", n=4)
    ds = PretrainDataset(str(tmp_path / "a" / "train"), input_size=16)
    # every item is the same file: crops differ only through the random stream
    ds.samples = [ds.samples[0]] * 8
    [outs] = crops_through_loader(ds, seed=5, num_workers=0)
    assert len({tuple(o.flatten().tolist()) for o in outs}) == len(outs)  # no two samples share a crop
    # the same seed gives the same crops whatever the number of workers
    [two_workers] = crops_through_loader(ds, seed=5, num_workers=2)
    assert all(torch.equal(x, y) for x, y in zip(outs, two_workers))
    # persistent workers (started once) still see each epoch's seed
    epochs = crops_through_loader(ds, seed=5, num_workers=2, persistent=True, epochs=2)
    assert all(torch.equal(x, y) for x, y in zip(outs, epochs[0]))
    [next_epoch] = crops_through_loader(ds, seed=6, num_workers=0)
    assert all(torch.equal(x, y) for x, y in zip(next_epoch, epochs[1]))
    assert sum(torch.equal(x, y) for x, y in zip(outs, next_epoch)) < 2


def test_pixels_are_compact_and_normalise_like_float_inputs(tmp_path):
    paths = write_tree(tmp_path / "a", n=3)
    write_tree(tmp_path / "c", n=1, colour=True)
    ds = PretrainDataset(str(tmp_path / "a" / "train"), input_size=16, train=False)
    grey, _, _ = ds[0]
    assert grey.dtype == torch.uint8 and grey.shape == (1, 16, 16)  # 12x fewer bytes than RGB float
    colour, _, _ = PretrainDataset(str(tmp_path / "c" / "train"), input_size=16, train=False,
                                   keep_channels=True)[0]
    assert colour.dtype == torch.uint8 and colour.shape == (3, 16, 16)
    # the crop is resized as the published pipeline did it: PIL's bicubic on the uint8 image
    from PIL import Image
    from util.datasets import PixelNormaliser, center_box
    top, left, h, w = center_box(60, 80, (16, 16))
    published = np.asarray(Image.open(paths[0]).crop((left, top, left + w, top + h)).resize((16, 16), Image.BICUBIC))
    assert np.abs(grey[0].numpy().astype(int) - published.astype(int)).max() <= 1
    # a batch mixing grey and colour files is stacked as RGB; the normaliser expands grey on the device
    batch, _, _ = collate_skip_bad([(grey, None, 0), (colour, None, 0)])
    assert batch.shape == (2, 3, 16, 16) and torch.equal(batch[0, 2], grey[0])
    norm = PixelNormaliser((0.5, 0.4, 0.3), (0.2, 0.25, 0.5), "cpu")
    expected = (grey.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    torch.testing.assert_close(norm(grey[None])[0], expected)
    torch.testing.assert_close(norm(batch)[0], expected)
    with pytest.raises(ValueError, match="2 channels for a 3-channel model"):
        norm(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))


def test_on_the_fly_blur_equals_offline_copy(tmp_path, repo_root):
    write_tree(tmp_path / "orig", colour=True)
    subprocess.run([sys.executable, os.path.join(repo_root, "blurred_images.py"), "--src_dir",
                    str(tmp_path / "orig"), "--dst_dir", str(tmp_path / "blur"), "--method", "gaussian",
                    "--sigma", "1.1", "--workers", "1"], check=True, capture_output=True, cwd=repo_root)
    paired = PretrainDataset(str(tmp_path / "blur" / "train"), orig_root=str(tmp_path / "orig" / "train"),
                             input_size=32, train=False)
    online = PretrainDataset(str(tmp_path / "orig" / "train"), blur=BlurSpec("gaussian", sigma=1.1),
                             input_size=32, train=False)
    for i in range(len(paired)):
        raw_paired, raw_online = paired.load_pair(i), online.load_pair(i)
        assert np.array_equal(raw_paired[0], raw_online[0])  # the blurred input, bit for bit
        assert np.array_equal(raw_paired[1], raw_online[1])  # the sharp target, grey like the input
        assert torch.equal(paired[i][0], online[i][0])


def test_unpaired_trees_fail_at_start_with_examples(tmp_path):
    write_tree(tmp_path / "orig", n=6)
    write_tree(tmp_path / "blur", n=4)
    with pytest.raises(DatasetError, match=r"2 originals have no blurred copy, e\.g\. .*img4\.png"):
        PretrainDataset(str(tmp_path / "blur" / "train"), orig_root=str(tmp_path / "orig" / "train"))


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "train" / "c").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "c" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="no images found under .*empty"):
        PretrainDataset(str(tmp_path / "empty" / "train"))


def test_corrupt_file_is_skipped_or_fatal_when_strict(tmp_path):
    paths = write_tree(tmp_path / "d", n=4)
    with open(paths[1], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"garbage")
    ds = PretrainDataset(str(tmp_path / "d" / "train"), input_size=16)
    with pytest.warns(UserWarning, match="skipping .*img1.png"):
        batch = collate_skip_bad([ds[i] for i in range(len(ds))])
    # the bad file is replaced by the next readable sample: batches stay full (DDP needs that)
    assert batch[0].shape == (4, 1, 16, 16) and batch[1] is None and batch[2] == 1
    strict = PretrainDataset(str(tmp_path / "d" / "train"), input_size=16, strict=True)
    with pytest.raises(DatasetError, match="img1.png.*re-export.*--strict_data"):
        [strict[i] for i in range(len(strict))]
    for path in paths:  # nothing readable left: a clear error instead of an endless search
        with open(path, "wb") as f:
            f.write(b"")
    with pytest.raises(DatasetError, match="consecutive images .* are unreadable"), pytest.warns(UserWarning):
        ds[0]


def test_grey_one_channel_and_16_bit(tmp_path):
    folder = tmp_path / "g" / "train"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "deep.png"), np.full((40, 40), 65535 // 4, np.uint16))
    ds = PretrainDataset(str(folder), input_size=16, in_chans=1, train=False)
    inp, tgt, _ = ds[0]
    assert inp.shape == (1, 16, 16) and tgt is None
    torch.testing.assert_close(inp, torch.full((1, 16, 16), (65535 // 4) / 65535))


def test_num_train_subset_is_rank_independent(tmp_path):
    write_tree(tmp_path / "s", n=10)
    a = PretrainDataset(str(tmp_path / "s" / "train"), num_samples=4, seed=3)
    b = PretrainDataset(str(tmp_path / "s" / "train"), num_samples=4, seed=3)
    assert len(a) == 4 and a.samples == b.samples


def test_crop_box_stays_inside_and_follows_scale():
    gen = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(200):
        top, left, h, w = sample_crop_box(100, 150, gen)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 150
        areas.append(h * w / (100 * 150))
    assert 0.15 < min(areas) and max(areas) <= 1.0 and np.mean(areas) > 0.4


def test_training_crops_match_the_published_pil_resize(tmp_path):
    """RandomResizedCrop of the published code: PIL crop + bicubic resize of the uint8 image."""
    from PIL import Image
    from util.datasets import resize_box
    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur((rng.random((300, 260)) * 255).astype(np.uint8), (0, 0), 1.5)
    colour = np.stack([img, img[::-1], 255 - img], axis=2)
    for box in [(0, 0, 300, 260), (20, 31, 180, 150), (100, 7, 61, 77)]:
        top, left, h, w = box
        for source in (img, colour):
            ours = resize_box(source if source.ndim == 3 else source[:, :, None], box, (64, 64))
            pil = np.asarray(Image.fromarray(source).crop((left, top, left + w, top + h)).resize((64, 64), Image.BICUBIC))
            pil = pil.reshape(64, 64, -1).transpose(2, 0, 1).astype(int)
            diff = np.abs(ours.numpy().astype(int) - pil)
            assert ours.dtype == torch.uint8 and diff.max() <= 1 and diff.mean() < 0.05, (box, diff.mean())
    deep = (img.astype(np.uint16) * 257)[:, :, None]  # 16-bit: float pixels in [0, 1]
    out = resize_box(deep, (0, 0, 300, 260), (64, 64))
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


# ------------------------------------------------------------------------------ colour decided once per run
def blurred_copy(repo_root, src, dst, *extra):
    subprocess.run([sys.executable, os.path.join(repo_root, "blurred_images.py"), "--src_dir", str(src),
                    "--dst_dir", str(dst), "--workers", "1", *extra], check=True, capture_output=True, cwd=repo_root)


def colour_datasets(tmp_path, repo_root, keep_channels):
    """The three modes over the same colour tree (paired: the copy made with the matching option)."""
    orig = tmp_path / "orig"
    if not orig.exists():
        write_tree(orig, n=4, colour=True)
    copy = tmp_path / ("blur_colour" if keep_channels else "blur_grey")
    if not copy.exists():
        blurred_copy(repo_root, orig, copy, *(["--keep_channels"] if keep_channels else []))
    common = dict(input_size=32, train=False, keep_channels=keep_channels)
    return {"vanilla": PretrainDataset(str(orig / "train"), **common),
            "blur": PretrainDataset(str(orig / "train"), blur=BlurSpec(), **common),
            "paired": PretrainDataset(str(copy / "train"), orig_root=str(orig / "train"), **common)}


@pytest.mark.parametrize("keep_channels", [False, True])
def test_colour_images_get_the_same_conversion_for_input_and_target_in_every_mode(tmp_path, repo_root,
                                                                                  keep_channels):
    from util.image_io import read_image, to_grey

    datasets = colour_datasets(tmp_path, repo_root, keep_channels)
    channels = 3 if keep_channels else 1
    for mode, ds in datasets.items():
        for i in range(len(ds)):
            image, target = ds.load_pair(i)
            original = read_image(ds.samples[i][1] or ds.samples[i][0])
            expected_target = original if keep_channels else to_grey(original)[:, :, None]
            assert image.shape[2] == channels, mode
            if mode == "vanilla":
                assert target is None and np.array_equal(image, expected_target)
            else:  # before: a grey (blurred) input with a colour target, i.e. colourisation
                assert target.shape == image.shape and np.array_equal(target, expected_target), mode
            pixels, target_pixels, _ = ds[i]
            assert pixels.shape[0] == channels and (target_pixels is None or target_pixels.shape == pixels.shape)
    # on-the-fly and offline blur agree in both colour settings
    for i in range(len(datasets["blur"])):
        assert np.array_equal(datasets["blur"].load_pair(i)[0], datasets["paired"].load_pair(i)[0])


def test_grey_copy_of_colour_originals_with_keep_channels_is_refused(tmp_path, repo_root):
    write_tree(tmp_path / "orig", n=2, colour=True)
    blurred_copy(repo_root, tmp_path / "orig", tmp_path / "grey_copy")
    ds = PretrainDataset(str(tmp_path / "grey_copy" / "train"), orig_root=str(tmp_path / "orig" / "train"),
                         input_size=32, keep_channels=True)
    with pytest.raises(DatasetError, match="is grey but its original .* is colour.*--keep_channels"):
        ds[0]
    with pytest.raises(ValueError, match="1-channel model"):
        PretrainDataset(str(tmp_path / "orig" / "train"), in_chans=1, keep_channels=True)


def test_colour_report_counts_colour_images_and_states_the_conversion(tmp_path):
    write_tree(tmp_path / "mixed", n=3, colour=True)
    write_tree(tmp_path / "grey", n=2)
    for path in (tmp_path / "grey" / "train").rglob("*.png"):
        os.replace(path, tmp_path / "mixed" / "train" / path.parent.name / f"grey_{path.name}")
    ds = PretrainDataset(str(tmp_path / "mixed" / "train"), input_size=32)
    assert ds.start_report() == ("colour: 3 of 5 images are stored in colour; input and target both "
                                  "converted to grey (--keep_channels keeps colour)")
    keep = PretrainDataset(str(tmp_path / "mixed" / "train"), input_size=32, keep_channels=True)
    assert keep.start_report().endswith("kept in colour for input and target alike (grey images stay grey)")
    from util.datasets import colour_census
    files = [s[0] for s in ds.samples]
    colour, checked, total = colour_census(files, seed=0, max_files=2)
    assert (checked, total) == (2, 5) and 0 <= colour <= 2


def test_dicom_without_extension_is_indexed_paired_and_non_images_reported(tmp_path, repo_root):
    import shutil

    from pydicom.data import get_testdata_file

    cine = get_testdata_file("examples_ybr_color.dcm", download=False)
    if cine is None:
        pytest.skip("pydicom's bundled example files are missing from this installation")
    write_tree(tmp_path / "orig", n=2)
    shutil.copy(cine, tmp_path / "orig" / "train" / "c0" / "IM000001")
    (tmp_path / "orig" / "train" / "c0" / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    vanilla = PretrainDataset(str(tmp_path / "orig" / "train"), input_size=32)
    assert len(vanilla) == 2 + 30  # every frame of the cine; before: the two PNGs only
    assert vanilla.start_report().startswith(f"1 file(s) in {tmp_path / 'orig' / 'train'} are not images and "
                                             "are left out (e.g. c0/report.pdf)")
    blurred_copy(repo_root, tmp_path / "orig", tmp_path / "blur")
    assert (tmp_path / "blur" / "train" / "c0" / "IM000001_f029.png").exists()
    paired = PretrainDataset(str(tmp_path / "blur" / "train"), orig_root=str(tmp_path / "orig" / "train"),
                             input_size=32)
    online = PretrainDataset(str(tmp_path / "orig" / "train"), blur=BlurSpec(), input_size=32)
    assert len(paired) == len(online) == 32
    for i in (0, 5, 31):
        assert np.array_equal(paired.load_pair(i)[0], online.load_pair(i)[0])
        assert np.array_equal(paired.load_pair(i)[1], online.load_pair(i)[1])
