"""Pretraining datasets: paired (blurred copy + original) or on-the-fly blur, any image tree.

Modes
* paired (published): the blurred input comes from ``blurred_root``, the sharp target from
  ``orig_root``; files are paired by relative path (a DICOM original ``scan.dcm`` or ``IM000001``
  pairs with the PNG ``scan.png`` / ``IM000001.png`` / ``scan_f000.png`` ... that ``blurred_images.py``
  writes for it, see ``util.image_io.blurred_copy_names``);
* on the fly: the input is ``blur.apply`` of the original at its native resolution, before the
  crop -- the same numbers the offline ``blurred_images.py`` copy holds, without that copy;
* vanilla: input and target are the same image (``orig_root`` and ``blur`` both None).

Colour is decided once per run and applied to input and target alike (``keep_channels``): by
default every image is converted to grey right after decoding -- before the blur, and the sharp
target too, as ``blurred_images.py`` makes its grey copy -- so a model is never asked to colourise
a grey input. With ``keep_channels`` colour images stay colour in both (the blur then works per
channel, as ``blurred_images.py --keep_channels``); grey images stay grey. ``start_report`` gives
the line the scripts print about it at start.

Every sample gets one RandomResizedCrop box and one flip decision, applied to both images. They
are drawn from a generator seeded by (epoch seed, sample index): the sampler hands each index to the
workers together with the epoch's seed (``SeededSampler``), so the crops of an epoch depend on
neither the number of workers nor which worker serves a sample, persistent workers see every new
epoch, and a resumed run draws the same crops as an uninterrupted one. (The published code reseeded
the global RNG with the wall-clock second, so all samples loaded within one second got the same
crop.)

Samples leave the workers as compact *pixels*: the crop resized as uint8 for 8-bit sources with
PIL's bicubic filter (what the published pipeline did: PIL resized the uint8 image, then
``ToTensor``), float32 in [0, 1] for 16-bit ones, and grey images with one channel even for 3-channel models. That is 12x
fewer bytes to collate, pin and copy than 3-channel float32; ``PixelNormaliser`` turns them into the
model's normalised 3- (or 1-) channel input on the device. A corrupt file is replaced by the next
readable sample and counted (``collate_skip_bad`` sums the counts for the log) unless ``strict`` is
set.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch.utils.data import Dataset, Sampler

from util.blur import BLUR_SETTINGS_FILE, BlurSpec, blur_key
from util.image_io import (DatasetError, UnreadableImageError, blurred_copy_names, describe_not_images, image_frames,
                           is_dicom_file, list_images, read_image, scan_images, stored_in_colour, to_grey)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Unreadable files met in a row before a sample gives up (then the dataset is broken, not a file).
MAX_SUBSTITUTES = 16
# Part of the decoded cache's key: raise it whenever decode_pair's output changes for the same files
# and settings (a blur or channel conversion changed), so old caches are not read any more.
# 2: colour converted to grey for input and target alike; header-checked DICOM frames, NaN floats.
DECODE_VERSION = 2
# Colour census at start: files whose header is read (all of them up to this many, else a sample).
COLOUR_CENSUS_FILES = 2000


# ------------------------------------------------------------------------------ indexing
def split_folder(root: str, split: str) -> Optional[str]:
    """``root/split`` when the tree has splits; a tree without ``train/`` is all training data."""
    candidate = os.path.join(root, split)
    if os.path.isdir(candidate):
        return candidate
    if split == "train" and not os.path.isdir(os.path.join(root, "val")):
        return root
    return None


def index_items(root: str, not_images: Optional[List[str]] = None) -> List[Tuple[str, int, int]]:
    """(relative path, frame, frame count) for every image below ``root``; a multi-frame DICOM
    contributes each of its frames. The paths of the other files met are added to ``not_images``."""
    items = []
    scan = scan_images(root)
    if not_images is not None:  # a blurred copy's settings file is part of the copy, not a stray file
        not_images.extend(os.path.join(root, rel) for rel in scan.not_images if rel != BLUR_SETTINGS_FILE)
    for rel in scan.images:
        try:
            frames = image_frames(os.path.join(root, rel))
        except UnreadableImageError:
            frames = 1  # reported (or raised) when the sample is read
        items.extend((rel, f, frames) for f in range(frames))
    return items


def check_pairs(orig_root: str, orig_items, blurred_root: str) -> List[str]:
    """Blurred relative path for each original item; one clear error listing unpaired files."""
    dicom = {rel: is_dicom_file(os.path.join(orig_root, rel)) for rel, _, _ in orig_items}
    # the names blurred_images.py gives the blurred copies (DICOM -> PNG, per frame)
    expected = [blurred_copy_names(rel, frames, dicom[rel])[frame] for rel, frame, frames in orig_items]
    present = set(list_images(blurred_root))
    missing = [e for e in expected if e not in present]
    extra = sorted(present - set(expected))
    if missing or extra:
        lines = [f"the blurred tree {blurred_root} and the original tree {orig_root} do not pair:"]
        if missing:
            lines.append(f"  {len(missing)} originals have no blurred copy, e.g. {', '.join(missing[:5])}")
        if extra:
            lines.append(f"  {len(extra)} blurred files have no original, e.g. {', '.join(extra[:5])}")
        lines.append("Re-run blurred_images.py on the original tree (it resumes and only writes what is "
                     "missing), or blur on the fly with --blur gaussian instead of --data_path_blurred.")
        raise DatasetError("\n".join(lines))
    return expected


def colour_census(paths: Sequence[str], seed: int = 0, max_files: int = COLOUR_CENSUS_FILES) -> Tuple[int, int, int]:
    """(colour files, files checked, files in all) over the distinct ``paths``, from headers only;
    a large dataset is judged from a seeded sample of ``max_files``. Unreadable files are not counted
    (they are reported when read)."""
    files = sorted(set(paths))
    chosen = files
    if len(files) > max_files:
        chosen = [files[i] for i in np.sort(np.random.default_rng(seed).permutation(len(files))[:max_files])]
    colour = checked = 0
    for path in chosen:
        try:
            colour += stored_in_colour(path)
            checked += 1
        except (UnreadableImageError, OSError):
            continue
    return colour, checked, len(files)


def colour_report(census: Tuple[int, int, int], keep_channels: bool, in_chans: int) -> str:
    """The one line the scripts print at start: how many colour images, what is done with them."""
    colour, checked, total = census
    where = f"of {checked} images" if checked == total else f"of {checked} images checked (a sample of {total})"
    if keep_channels:
        action = "kept in colour for input and target alike (grey images stay grey)"
    elif in_chans == 1:
        action = "input and target both converted to grey (1-channel model)"
    else:
        action = "input and target both converted to grey (--keep_channels keeps colour)"
    return f"colour: {colour} {where} are stored in colour; {action}"


def subset(items: list, num: Optional[int], seed: int) -> list:
    """The same ``num`` items on every rank (the seed, not the rank, picks them)."""
    if not num or num >= len(items):
        return items
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:num])
    return [items[i] for i in keep]


# ------------------------------------------------------------------------------ pixels
def model_channels(img: np.ndarray, in_chans: int) -> np.ndarray:
    """H x W or H x W x 3 -> H x W x C as the workers keep it: grey for 1-channel models (colour is
    converted) and for grey images (replicated to 3 channels only on the device); colour stays RGB."""
    if in_chans == 1:
        return to_grey(img)[:, :, None]
    return img[:, :, None] if img.ndim == 2 else img


def to_channels(img: np.ndarray, in_chans: int) -> np.ndarray:
    """H x W or H x W x 3 -> H x W x in_chans (grey replicated to 3 channels, colour to grey): for
    pipelines that need every channel on the CPU (classification's PIL transforms)."""
    pixels = model_channels(img, in_chans)
    return np.repeat(pixels, in_chans, axis=2) if pixels.shape[2] < in_chans else pixels


def to_unit_tensor(img: np.ndarray) -> torch.Tensor:
    """H x W x C uint8/uint16 -> C x H x W float32 in [0, 1]."""
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    # np.require copies only when needed: decoded arrays may be read-only views
    chw = np.require(img.transpose(2, 0, 1), requirements=("C", "W"))
    return torch.from_numpy(chw).float().div_(scale)


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float pixels -> float32 in [0, 1] (on whatever device they are)."""
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(255.0)
    return pixels.float()


class PixelNormaliser:
    """Loader pixels (uint8 or [0, 1] float; 1 channel or ``len(mean)``) -> the model's normalised
    float input with ``len(mean)`` channels, computed on the device after the (compact) copy."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels_to_unit(pixels.to(self.mean.device, non_blocking=True))
        channels = self.mean.shape[1]
        if x.shape[1] != channels:
            if x.shape[1] != 1:
                raise ValueError(f"pixels with {x.shape[1]} channels for a {channels}-channel model")
            x = x.expand(-1, channels, -1, -1)  # grey -> RGB as a view; the arithmetic below copies
        return (x - self.mean) / self.std


def sample_crop_box(height: int, width: int, gen: torch.Generator,
                    scale=CROP_SCALE, ratio=CROP_RATIO) -> Tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area fraction in ``scale``, log-uniform aspect
    ``ratio``, ten tries, then a centred crop clamped to the ratio range (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_box(img: np.ndarray, box, size: Tuple[int, int]) -> torch.Tensor:
    """Cut ``box`` out of an H x W x C integer image and resize it bicubically (antialiased) to
    ``size``: C x H x W *pixels* (uint8 for 8-bit images, float32 in [0, 1] for 16-bit ones).

    8-bit crops take torch's uint8 path, whose fixed-point filter is PIL's bicubic (a = -0.5): the
    published pipeline resized uint8 PIL images, and this path matches it within one grey level
    (mean 0.003 levels; the float path, a = -0.75, is off by up to 3) and is the faster one.
    Cutting first keeps memory bounded by the crop, not the whole image (a 10000 x 10000 scan).
    """
    top, left, h, w = box
    crop = img[top:top + h, left:left + w]
    if crop.dtype != np.uint8:
        # one channel at a time: the float copy of a crop that spans a large 16-bit colour scan is
        # then one channel's (4 bytes a pixel), not three channels' (12 bytes a pixel)
        channels = []
        for c in range(crop.shape[2]):
            unit = to_unit_tensor(crop[:, :, c:c + 1]).unsqueeze(0)
            channels.append(F.interpolate(unit, size=size, mode="bicubic", align_corners=False, antialias=True))
        return torch.cat(channels, dim=1).squeeze(0).clamp_(0.0, 1.0)
    # contiguous and writable (a copy when the source is a read-only decode or memory map); as
    # C x H x W it is channels-last, the layout the uint8 kernel wants
    chw = torch.from_numpy(np.require(crop, requirements=("C", "W"))).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(chw, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.squeeze(0).contiguous()


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The crop generator of one sample in one epoch: a function of (epoch seed, index) only."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def center_box(height: int, width: int, size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """Largest centred box with the aspect of ``size`` (evaluation: deterministic, whole content)."""
    aspect = size[1] / size[0]
    h, w = height, int(round(height * aspect))
    if w > width:
        w, h = width, int(round(width / aspect))
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------------------ dataset
class PretrainDataset(Dataset):
    def __init__(self, root: str, *, orig_root: Optional[str] = None, blur: Optional[BlurSpec] = None,
                 input_size=224, in_chans: int = 3, train: bool = True, strict: bool = False,
                 num_samples: Optional[int] = None, seed: int = 0, keep_channels: bool = False):
        """``root``: inputs (blurred copy in paired mode; originals otherwise).
        ``orig_root``: originals in paired mode. ``blur``: on-the-fly blur of ``root``'s images.
        ``keep_channels``: keep colour images in colour, input and target (default: both grey)."""
        if orig_root is not None and blur is not None:
            raise ValueError("use either a blurred copy (orig_root) or on-the-fly blur, not both")
        if keep_channels and in_chans == 1:
            raise ValueError("keep_channels keeps colour, which a 1-channel model cannot take; use in_chans=3")
        self.size = to_2tuple(input_size)
        self.in_chans, self.train, self.strict, self.blur = in_chans, train, strict, blur
        self.keep_channels, self.seed = keep_channels, seed
        index_root = orig_root or root
        self.index_root = index_root
        self.not_images: List[str] = []  # files of the tree that are not images, left out
        items = index_items(index_root, self.not_images)
        if not items:
            raise DatasetError(f"no images found under {index_root}. Expected image files (PNG, JPEG, "
                               "TIFF, BMP, DICOM, ...) in train/<class>/ and val/<class>/ folders or any "
                               "tree below it; check the path.")
        if orig_root is not None:
            blurred = check_pairs(orig_root, items, root)
            pairs = [(os.path.join(root, b), os.path.join(orig_root, rel), 0, rel, f, n)
                     for b, (rel, f, n) in zip(blurred, items)]
        else:
            pairs = [(os.path.join(root, rel), None, f, rel, f, n) for rel, f, n in items]
        self.samples = subset(pairs, num_samples, seed)
        self.cache = None  # a DecodedCache of decode_pair's arrays, see use_cache

    def __len__(self) -> int:
        return len(self.samples)

    def start_report(self) -> str:
        """What the scripts print at start about the data: the files left out as not images (if
        any), and how many images (the sharp ones in paired mode) are stored in colour with the
        conversion this run applies to input and target."""
        files = [s[1] or s[0] for s in self.samples]
        colour = colour_report(colour_census(files, self.seed), self.keep_channels, self.in_chans)
        return "\n".join(filter(None, [describe_not_images(self.not_images, self.index_root), colour]))

    # ---------------------------------------------------------------- decoded arrays
    def channels_of_run(self, img: np.ndarray) -> np.ndarray:
        """The run's one colour decision, applied to every decoded image, input and target alike."""
        return img if self.keep_channels else to_grey(img)

    def decode_pair(self, index: int):
        """(input, target) as H x W x C arrays decoded from the files; target None when it is the
        input itself."""
        input_path, orig_path, input_frame, rel, frame, frames = self.samples[index]
        image = self.channels_of_run(read_image(input_path, input_frame))
        if self.blur is not None:
            key = blur_key(rel, frame if frames > 1 else None)
            # after the colour decision, as blurred_images.py does, so both give the same input
            blurred = self.blur.apply(image, key=key)
            return model_channels(blurred, self.in_chans), model_channels(image, self.in_chans)
        if orig_path is not None:
            target = self.channels_of_run(read_image(orig_path, frame))
            if target.shape[:2] != image.shape[:2]:
                raise DatasetError(f"{input_path} is {image.shape[1]}x{image.shape[0]} but its original "
                                   f"{orig_path} is {target.shape[1]}x{target.shape[0]}; re-create the "
                                   "blurred copy with blurred_images.py")
            if image.ndim != target.ndim:  # only with keep_channels, e.g. a grey copy of a colour original
                kinds = ("grey", "colour") if image.ndim == 2 else ("colour", "grey")
                raise DatasetError(f"{input_path} is {kinds[0]} but its original {orig_path} is {kinds[1]}, and "
                                   "--keep_channels keeps each image's colours: input and target would differ "
                                   "in colour. Re-create the blurred copy from these originals with "
                                   "blurred_images.py --keep_channels, or train without --keep_channels (input "
                                   "and target then both grey).")
            return model_channels(image, self.in_chans), model_channels(target, self.in_chans)
        return model_channels(image, self.in_chans), None

    def load_pair(self, index: int):
        """``decode_pair``'s arrays, from the decoded cache when one is attached."""
        if self.cache is not None:
            return self.cache.read(index)
        return self.decode_pair(index)

    def cache_description(self) -> Tuple[dict, List[List[str]]]:
        """What ``decode_pair`` depends on besides the files' bytes (the cache key), and the files
        of every sample (their sizes and modification times join the key)."""
        sample_list = json.dumps([[s[0], s[1], s[2], s[4]] for s in self.samples]).encode()
        description = {"decode_version": DECODE_VERSION,
                       "blur": None if self.blur is None else repr(self.blur),
                       "channels": "native" if self.keep_channels else "grey",
                       "num_samples": len(self.samples),
                       "samples_sha256": hashlib.sha256(sample_list).hexdigest()}
        files = [[s[0]] + ([s[1]] if s[1] else []) for s in self.samples]
        return description, files

    def use_cache(self, cache_dir: str, *, build: bool, num_workers: int, log=print) -> None:
        """Read decoded arrays from a memory-mapped cache below ``cache_dir`` (built first when
        missing and ``build``; otherwise waiting for the process that builds it)."""
        from util.decoded_cache import DecodedCache, cache_key
        description, files = self.cache_description()
        key = cache_key(description, files)
        self.cache = DecodedCache.open_or_build(
            cache_dir, key, len(self.samples), self.decode_pair, [s[0] for s in self.samples],
            num_workers=num_workers, build=build, description=description, log=log)

    # ---------------------------------------------------------------- samples
    def __getitem__(self, key):
        """``key``: an index, or ``(index, epoch seed)`` as ``SeededSampler`` yields them (a bare
        index uses seed 0). Returns ``(input pixels, target pixels or None, unreadable files met)``.

        An unreadable file is replaced by the next readable sample, so every batch stays full: under
        DDP a rank with an empty batch would skip its step while the others wait for it forever.
        """
        index, seed = key if isinstance(key, tuple) else (key, 0)
        for attempt in range(MAX_SUBSTITUTES + 1):
            item = (index + attempt) % len(self.samples)
            try:
                image, target = self.load_pair(item)
            except UnreadableImageError as err:
                if self.strict:
                    # DatasetError: the scripts turn it into one message, and its one-argument
                    # constructor lets a DataLoader worker re-raise it as itself, message intact
                    raise DatasetError(f"{err} (stopped by --strict_data)") from err
                warnings.warn(f"skipping {err.path}: {err.reason} (use --strict_data to stop instead)")
                continue
            image, target = self.crop_pair(image, target, sample_generator(seed, index))
            return image, target, attempt
        raise DatasetError(f"{MAX_SUBSTITUTES + 1} consecutive images from {self.samples[index][0]} on are "
                           "unreadable; check the dataset (see the warnings above for the files)")

    def crop_pair(self, image: np.ndarray, target: Optional[np.ndarray], gen: torch.Generator):
        """One crop box and one flip decision, applied to both images (H x W x C arrays in,
        C x H x W pixels out)."""
        height, width = image.shape[:2]
        if self.train:
            box = sample_crop_box(height, width, gen)
            flip = bool(torch.rand(1, generator=gen) < 0.5)
        else:
            box, flip = center_box(height, width, self.size), False
        image = resize_box(image, box, self.size)
        target = resize_box(target, box, self.size) if target is not None else None
        if flip:
            image = image.flip(-1)
            target = target.flip(-1) if target is not None else None
        return image, target


class SeededSampler(Sampler):
    """Wraps a sampler and yields ``(index, epoch seed)``: the seed reaches the workers with every
    index, so per-sample crops follow the epoch even in persistent workers started epochs ago."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.seed = 0

    def set_epoch(self, epoch: int, seed: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.seed = int(seed)

    def __iter__(self):
        seed = self.seed
        return ((index, seed) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def limit_worker_threads(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one OpenCV thread per worker. Each worker is already one of
    many parallel decoders; OpenCV's own pool inside each of them only oversubscribes the cores
    (suspected cause of the low per-worker rate of the published pipeline, docs/performance.md)."""
    import cv2
    cv2.setNumThreads(1)


def worker_options(num_workers: int) -> dict:
    """DataLoader keyword arguments for its worker processes.

    The workers are started by a fork server, not forked from the training process: a child forked
    after the parent's OpenCV thread pool has run (a blur in the main process, the dataset
    statistics) inherits that pool's locks held, and ``cv2.setNumThreads`` then hangs for ever
    (seen here). A fork-server child starts clean; with persistent workers it starts once per run.
    The fork server and the workers die with the training process (util/workers.py).
    """
    if num_workers <= 0:
        return {}
    from util.workers import forkserver_context
    return {"multiprocessing_context": forkserver_context(), "worker_init_fn": limit_worker_threads}


def stack_pixels(items: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack pixels of one batch; a batch mixing grey and colour (or 8- and 16-bit) files is brought
    to the wider form first."""
    channels = max(x.shape[0] for x in items)
    if any(x.dtype != items[0].dtype for x in items):
        items = [pixels_to_unit(x) for x in items]
    return torch.stack([x.expand(channels, -1, -1) if x.shape[0] != channels else x for x in items])


def collate_skip_bad(batch: Sequence):
    """Stack a batch; return ``(inputs, targets or None, number of unreadable files skipped)``."""
    inputs = stack_pixels([b[0] for b in batch])
    targets = None if batch[0][1] is None else stack_pixels([b[1] for b in batch])
    return inputs, targets, sum(b[2] for b in batch)


def dataset_mean_std(dataset: PretrainDataset, max_images: int = 2000, seed: int = 0):
    """Per-channel mean and std of the (un-normalised) inputs over up to ``max_images`` samples."""
    order = np.random.default_rng(seed).permutation(len(dataset))[:max_images]
    total, total_sq, count = 0.0, 0.0, 0
    channels = getattr(dataset, "in_chans", None)
    for i in order:
        item = dataset[int(i)]
        if item is None:  # an unreadable file (datasets that do not substitute one)
            continue
        x = pixels_to_unit(item[0]).double()
        # grey counts towards every channel of an RGB model
        x = x.expand(channels or x.shape[0], -1, -1)
        total = total + x.sum(dim=(1, 2))
        total_sq = total_sq + (x * x).sum(dim=(1, 2))
        count += x.shape[1] * x.shape[2]
    if count == 0:
        raise DatasetError("could not read any image to compute the dataset mean/std")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
