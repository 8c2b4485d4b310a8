"""Tiny classification images and DICOM files made by the tests (fine-tuning, linear probing, the
patient split tool)."""
import cv2
import numpy as np


def make_image(rng, malignant: bool, dtype=np.uint8, shape=(40, 48)):
    """Smooth noise; the 'malignant' class has a bright block, so a tiny model learns it in a few epochs."""
    img = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 2) * 0.45
    if malignant:
        img[10:30, 12:36] += 0.4
    top = 65535 if dtype == np.uint16 else 255
    return (np.clip(img, 0, 1) * top).astype(dtype)


def write_dicom(path, frames, **tags):
    """A grey DICOM file of ``frames`` (F x H x W uint8; F > 1: a multi-frame cine) with ``tags``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(frames if len(frames) > 1 else frames[0], "MONOCHROME2", 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def cine(rng, malignant: bool, n_frames: int):
    """``n_frames`` frames of one class, for :func:`write_dicom`."""
    return np.stack([make_image(rng, malignant) for _ in range(n_frames)])
