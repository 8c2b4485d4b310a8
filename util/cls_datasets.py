"""Classification data: ``root/{train,val,test}/<class>/...`` read with the shared image readers.

* Classes are the sub-folders of the split folders, in alphabetical order (as torchvision's
  ``ImageFolder``), taken over all splits present so that a split missing one class keeps the same
  class indices. Images may sit at any depth below their class folder; a multi-frame DICOM gives one
  sample per frame.
* Pixels: the file is read as grey or RGB, 8 or 16 bit (``util.image_io``) and, as in pretraining,
  converted to grey unless ``keep_channels`` keeps colour (one decision for the whole run, so the
  arms with and without blur see the same kind of image); ``blur`` (the deblurring arms) is then
  applied at the native bit depth, with the same key as ``blurred_images.py`` uses for that file, so
  on-the-fly and offline blurring give the same input.
  The image is then reduced to 8 bits, because timm's RandAugment operates on 8-bit PIL images; the
  evaluation transform gets the same 8-bit image so training and evaluation see identical pixels.
* Transforms: timm's ``create_transform`` -- RandomResizedCrop (bicubic), flip, RandAugment, random
  erasing for training; resize + centre crop for evaluation (the published rule: crop 224/256 up to
  224 px, no crop above).
* A file that cannot be decoded yields ``None`` (dropped and counted by ``collate_labelled``, with a
  warning naming the file) unless ``strict`` is set, in which case the error stops the run.

Samples are ``(image tensor, label, index)``; the index lets distributed evaluation count every
sample once although ``DistributedSampler`` pads the last batch with repeats.

Groups: every sample belongs to a group of images that are not independent evidence (``GROUP_BY``):
its source file by default (the frames of one multi-frame DICOM), or a patient / study from the
DICOM tags, or a ``file,group`` CSV. The evaluation pools and bootstraps by group (util/metrics.py).
"""
from __future__ import annotations

import csv
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from util.blur import BlurSpec, blur_key
from util.datasets import (DatasetError, colour_census, colour_report, dataset_mean_std, index_items, to_channels,
                           to_unit_tensor)
from util.image_io import UnreadableImageError, describe_not_images, is_dicom_file, is_image_file, read_image, to_grey

SPLITS = ("train", "val", "test")
RANDAUGMENT = "rand-m9-mstd0.5-inc1"


# ------------------------------------------------------------------------------ classes
def class_folders(split_root: str) -> List[str]:
    """Visible sub-folders of one split folder; images lying directly in it are an error, because
    they have no class."""
    entries = sorted(os.listdir(split_root))
    loose = [e for e in entries if os.path.isfile(os.path.join(split_root, e))
             and is_image_file(os.path.join(split_root, e))]
    if loose:
        raise DatasetError(f"{split_root} holds images outside class folders (e.g. {', '.join(loose[:3])}). "
                           f"Put every image in {split_root}/<class name>/, e.g. benign/ and malignant/.")
    return [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(split_root, e))]


def find_class_names(root: str, splits: Sequence[str]) -> List[str]:
    """Alphabetical union of the class folders of ``splits`` below ``root``."""
    names = set()
    for split in splits:
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            names.update(class_folders(folder))
    return sorted(names)


def resolve_class_names(found: Sequence[str], recorded: Optional[Sequence[str]], nb_classes: Optional[int],
                        root: str) -> List[str]:
    """The class list to use: the one a fine-tuned checkpoint recorded (the folders must be among
    them), else the folders found; ``--nb_classes`` must agree with it."""
    if recorded:
        unknown = sorted(set(found) - set(recorded))
        if unknown:
            raise DatasetError(f"{root} has class folders {unknown} that the checkpoint was not trained on "
                               f"(its classes: {list(recorded)}). Rename the folders or use the matching "
                               "checkpoint.")
        names = list(recorded)
    else:
        names = list(found)
    if len(names) < 2:
        raise DatasetError(f"{root}: found {len(names)} class folder(s) {names}; classification needs at "
                           "least two, as train/<class>/, val/<class>/ and test/<class>/ sub-folders.")
    if nb_classes is not None and nb_classes != len(names):
        raise DatasetError(f"--nb_classes {nb_classes} but {root} has {len(names)} classes ({', '.join(names)}). "
                           f"Pass --nb_classes {len(names)} or leave it out (it defaults to the number of "
                           "class folders).")
    return names


# ------------------------------------------------------------------------------ groups
# What makes images one group (one case) for the per-group metrics and the bootstrap.
GROUP_BY = ("file", "patient", "study", "csv")
DICOM_GROUP_TAGS = {"patient": "PatientID", "study": "StudyInstanceUID"}


def _normalise_rel(path: str) -> str:
    """A relative path as written in a groups CSV, in the form the file lists use (``a/b.png``)."""
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def read_groups_csv(path: str) -> Dict[str, str]:
    """``file -> group`` from a CSV whose header names the columns ``file`` and ``group`` (others are
    ignored); ``file`` is a path relative to the data folder. Errors name the file and the fix."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
            rows = list(csv.DictReader(f))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read the groups file {path}: {err}. Pass a CSV file with the columns "
                           "file,group.") from err
    if not rows or not {"file", "group"} <= set(columns):
        raise DatasetError(f"{path}: a groups file needs a header with the columns file,group and one row per "
                           f"image file (found columns {sorted(c for c in columns if c)}, {len(rows)} rows)")
    mapping: Dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        file, group = _normalise_rel(row["file"] or ""), (row["group"] or "").strip()
        if not file or not group:
            raise DatasetError(f"{path}, line {line}: empty file or group; every row needs both")
        if mapping.get(file, group) != group:
            raise DatasetError(f"{path}, line {line}: {file} is given two groups ({mapping[file]!r} and "
                               f"{group!r}); keep one row per file")
        mapping[file] = group
    return mapping


def file_groups(root: str, rels: Sequence[str], group_by: str, mapping: Optional[Dict[str, str]] = None,
                prefix: str = "", source: str = "--groups") -> List[str]:
    """The group of each file ``rels`` (paths relative to ``root``).

    ``file``: the file itself (its frames form one group). ``patient`` / ``study``: the DICOM
    PatientID / StudyInstanceUID. ``csv``: ``mapping`` (``read_groups_csv``), looked up as
    ``prefix + rel`` (relative to the data folder when ``root`` is one of its splits) or as ``rel``.
    Files without a group are one error naming them and the fix.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {GROUP_BY}; got {group_by!r}")
    if group_by == "file":
        return list(rels)
    if group_by == "csv":
        if mapping is None:
            raise ValueError("group_by 'csv' needs the mapping of read_groups_csv")
        found = [mapping.get(prefix + rel, mapping.get(rel)) for rel in rels]
        missing = [rel for rel, group in zip(rels, found) if group is None]
        if missing:
            raise DatasetError(f"{source}: no group for {len(missing)} file(s) of {root}, e.g. "
                               f"{', '.join(prefix + m for m in missing[:5])}. Add a row file,group for each "
                               f"(the file relative to the data folder, e.g. {prefix + missing[0]}).")
        return found
    tag = DICOM_GROUP_TAGS[group_by]
    groups = [_dicom_tag(os.path.join(root, rel), tag) for rel in rels]
    missing = [rel for rel, group in zip(rels, groups) if not group]
    if missing:
        raise DatasetError(f"--group_by {group_by}: {len(missing)} file(s) of {root} have no DICOM {tag}, e.g. "
                           f"{', '.join(missing[:5])} (not DICOM, or the tag is empty or removed by "
                           f"anonymisation). Give their groups in a CSV file with the columns file,group "
                           f"(--groups FILE), or group by --group_by file.")
    return groups


def _dicom_tag(path: str, keyword: str) -> Optional[str]:
    """The tag's text, None for a file that is not DICOM or lacks the tag. A DICOM file that cannot
    be parsed counts as its own group: it is reported (or stops the run) when its pixels are read."""
    if not is_dicom_file(path):
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        value = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword]).get(keyword)
    except (OSError, ValueError, InvalidDicomError):
        return f"unreadable:{path}"
    value = str(value).strip() if value is not None else ""
    return value or None


# ------------------------------------------------------------------------------ pixels
def to_uint8(img: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 with rounding (65535 -> 255); uint8 unchanged."""
    if img.dtype == np.uint8:
        return img
    out = np.empty(img.shape, np.uint8)
    # a band of rows at a time: the 32-bit sums of a large 16-bit scan would be 4x its size
    for top in range(0, img.shape[0], 256):
        band = img[top:top + 256].astype(np.uint32)
        band += 128
        band //= 257
        out[top:top + 256] = band
    return out


def to_pil(img: np.ndarray) -> Image.Image:
    """H x W x 1 -> mode L, H x W x 3 -> RGB."""
    return Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)


# ------------------------------------------------------------------------------ transforms
def eval_crop_pct(size: Tuple[int, int]) -> float:
    """The published evaluation crop: resize to size / 0.875 then centre-crop, up to 224 px; above,
    resize to the size itself."""
    return 224 / 256 if max(size) <= 224 else 1.0


def build_transform(train: bool, size: Tuple[int, int], in_chans: int, mean: Sequence[float],
                    std: Sequence[float], *, auto_augment: Optional[str] = RANDAUGMENT, re_prob: float = 0.25,
                    re_mode: str = "pixel", re_count: int = 1, color_jitter: Optional[float] = None):
    from timm.data import create_transform
    common = dict(input_size=(in_chans, *size), interpolation="bicubic", mean=tuple(mean), std=tuple(std))
    if train:
        return create_transform(is_training=True, auto_augment=auto_augment or None, color_jitter=color_jitter,
                                re_prob=re_prob, re_mode=re_mode, re_count=re_count, **common)
    return create_transform(is_training=False, crop_pct=eval_crop_pct(size), **common)


# ------------------------------------------------------------------------------ dataset
class ClassificationDataset(Dataset):
    def __init__(self, root: str, split: str, class_names: Sequence[str], transform=None, *,
                 blur: Optional[BlurSpec] = None, in_chans: int = 3, strict: bool = False,
                 keep_channels: bool = False):
        if keep_channels and in_chans == 1:
            raise ValueError("keep_channels keeps colour, which a 1-channel model cannot take; use in_chans=3")
        self.root, self.split = root, split
        self.split_root = os.path.join(root, split)
        self.class_names = list(class_names)
        self.transform, self.blur, self.in_chans, self.strict = transform, blur, in_chans, strict
        self.keep_channels = keep_channels
        self.samples = self._index()
        self.groups = [s[0] for s in self.samples]  # by file until assign_groups says otherwise
        if not self.samples:
            raise DatasetError(f"no images found in {self.split_root}/<class>/. Expected image files (PNG, "
                               "JPEG, TIFF, BMP, DICOM, ...) in one sub-folder per class; check --data_path.")
        self._check_every_class_has_images()

    def _check_every_class_has_images(self) -> None:
        """An empty (or missing) class folder: an error in train/ (that class could never be learnt,
        silently), a warning elsewhere (metrics over every class become undefined or partial)."""
        empty = [name for name, count in self.class_counts().items() if count == 0]
        if not empty:
            return
        folders = ", ".join(os.path.join(self.split_root, name) for name in empty)
        if self.split == "train":
            raise DatasetError(f"{folders}: no training images of class(es) {empty} (the folder is empty or "
                               "missing). Add images to it, or remove that class folder from every split.")
        warnings.warn(f"{folders}: no {self.split} images of class(es) {empty}; metrics on {self.split} that "
                      "need every class (AUROC, balanced accuracy) are undefined or partial")

    def _index(self) -> List[Tuple[str, int, int, int]]:
        """(path relative to the split folder, frame, frame count, label) for every sample."""
        samples = []
        self.not_images: List[str] = []  # files of the class folders that are not images, left out
        for label, name in enumerate(self.class_names):
            folder = os.path.join(self.split_root, name)
            if os.path.isdir(folder):
                samples.extend((f"{name}/{rel}", frame, frames, label)
                               for rel, frame, frames in index_items(folder, self.not_images))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> List[int]:
        return [s[3] for s in self.samples]

    def sample_name(self, index: int) -> str:
        """How predictions.csv names a sample: its path below the split, ``#frame`` for cine frames."""
        rel, frame, frames, _ = self.samples[index]
        return f"{rel}#{frame}" if frames > 1 else rel

    def assign_groups(self, group_by: str = "file", mapping: Optional[Dict[str, str]] = None,
                      source: str = "--groups") -> None:
        """Set the group of every sample (``file_groups``; a CSV ``mapping`` is keyed relative to the
        data folder, ``split/class/file``)."""
        files = sorted({s[0] for s in self.samples})
        by_file = dict(zip(files, file_groups(self.split_root, files, group_by, mapping, f"{self.split}/", source)))
        self.groups = [by_file[s[0]] for s in self.samples]

    def sample_group(self, index: int) -> str:
        """How predictions.csv names a sample's group."""
        return self.groups[index]

    def class_counts(self) -> Dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def start_report(self, colour: bool = True) -> str:
        """What the scripts print at start about this split: the files left out as not images (if
        any), and (``colour``) how many images are stored in colour with the conversion this run
        applies."""
        lines = [describe_not_images(self.not_images, self.split_root)]
        if colour:
            files = [os.path.join(self.split_root, s[0]) for s in self.samples]
            lines.append(colour_report(colour_census(files), self.keep_channels, self.in_chans))
        return "\n".join(filter(None, lines))

    def load_pixels(self, index: int) -> np.ndarray:
        """The model's input before the transform: H x W x in_chans uint8 (blurred when asked)."""
        rel, frame, frames, _ = self.samples[index]
        image = read_image(os.path.join(self.split_root, rel), frame)
        if not self.keep_channels:
            image = to_grey(image)
        if self.blur is not None:
            # key relative to the dataset root, as blurred_images.py run on that root would use
            key = blur_key(f"{self.split}/{rel}", frame if frames > 1 else None)
            image = self.blur.apply(image, key=key)
        return to_channels(to_uint8(image), self.in_chans)  # 8 bits first: grey is replicated after

    def __getitem__(self, index: int):
        try:
            pixels = self.load_pixels(index)
        except UnreadableImageError as err:
            if self.strict:
                # DatasetError has a one-argument constructor, so a DataLoader worker can re-raise it
                # in the main process as itself, message intact
                raise DatasetError(f"{err} (stopped by --strict_data)") from err
            warnings.warn(f"skipping {err.path}: {err.reason} (use --strict_data to stop instead)")
            return None
        label = self.samples[index][3]
        if self.transform is None:
            return to_unit_tensor(pixels), label, index
        return self.transform(to_pil(pixels)), label, index


class _UnitTensorView(Dataset):
    """The un-normalised [0, 1] inputs of a dataset, for ``dataset_mean_std``."""

    def __init__(self, dataset: ClassificationDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return (to_unit_tensor(self.dataset.load_pixels(index)),)
        except UnreadableImageError:
            return None


def pixel_mean_std(dataset: ClassificationDataset, seed: int = 0):
    """Per-channel mean and std of the model inputs (after blur), over up to 2000 images."""
    return dataset_mean_std(_UnitTensorView(dataset), seed=seed)


def collate_labelled(batch: Sequence):
    """``(images, labels, indices, number of unreadable files)``; images None when all were bad."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, None, skipped
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.int64)
    indices = torch.tensor([b[2] for b in good], dtype=torch.int64)
    return images, labels, indices, skipped
