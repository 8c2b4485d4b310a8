"""Reading and writing dataset images: one reader for blurred_images.py and the training datasets.

``read_image`` returns a numpy array, ``H x W`` (grey) or ``H x W x 3`` in **RGB** order, of dtype
uint8 or uint16. What it does to the file's pixels, and why:

* EXIF orientation is applied (a photographed or exported frame shows upright, as in any viewer).
* Alpha is dropped without compositing (RGBA -> RGB, LA -> L): ultrasound exports carry an opaque or
  meaningless alpha plane. Palette images become RGB, bilevel images grey.
* 16-bit PNG and TIFF stay uint16, grey and colour alike. Pillow reduces 16-bit *colour* to 8 bits, so
  those files are decoded with OpenCV instead.
* DICOM (``.dcm``) is decoded with pydicom (JPEG, JPEG 2000, RLE through pydicom's Pillow plugin), one
  frame at a time. YBR photometrics become RGB, PALETTE COLOR goes through its colour table and
  MONOCHROME1 is inverted so that bright always means strong echo. Signed data are shifted by
  ``2**(BitsStored-1)`` to become unsigned without loss. Data stored with fewer bits than the output
  type (e.g. 12-bit) are scaled up by a left shift, as the PNG specification (section 12.5, sample
  depth scaling) asks of a 16-bit file: the shift is exact and reversible, and a 16-bit image then
  spans the 16-bit range, so viewers and the ``/ 65535`` normalisation of the datasets see the
  intended contrast. Only floating-point or more-than-16-bit data are rescaled min-to-max onto the
  full uint16 range, because they cannot be stored otherwise.

Any file that cannot be decoded raises :class:`UnreadableImageError`, which names the file.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps

from util.fileio import atomic_write_bytes

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm"})
# Files that file managers drop into image folders; they are never images even if renamed.
_SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})

# libpng's fixed-point RGB -> grey weights for (0.299, 0.587) as OpenCV requests them when it reads
# a colour PNG with IMREAD_GRAYSCALE; they sum to 2**15. Using the same integers (and libpng's
# truncation for 8-bit, rounding for 16-bit samples) makes to_grey bit-identical to that read.
_GREY_WEIGHTS_RGB = (9797, 19234, 3737)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FrameIndexError(IndexError):
    """A frame number outside a file's frames was requested (a caller's mistake, not a bad file)."""


class UnreadableImageError(Exception):
    """An image file exists but cannot be decoded (empty, truncated, not an image, unsupported)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}. The file is damaged or not an image this "
            "reader supports: re-export or re-copy it, or move it out of the dataset folder."
        )


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file whose extension is one of IMAGE_EXTENSIONS (any letter case)."""
    name = os.path.basename(os.fspath(path))
    if name.startswith(".") or name.lower() in _SYSTEM_FILES:
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_dicom_file(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".dcm")


def list_images(root: str | os.PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Sorted relative POSIX paths of all images below ``root``, at any depth.

    Folders whose name is in ``exclude`` (e.g. ``masks``) and hidden folders are not entered.
    Symbolic links to folders are followed (datasets are often assembled from links), except a link
    back to a folder above it, which would make the walk endless.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder; check the path")
    excluded = set(exclude)
    # For each folder still to visit, the real paths of it and its ancestors (to detect link cycles).
    ancestry = {root: frozenset({os.path.realpath(root)})}
    found: list[str] = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        chain = ancestry.pop(folder)
        entered = []
        for name in subfolders:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if name in excluded or name.startswith(".") or real in chain:
                continue
            ancestry[path] = chain | {real}
            entered.append(name)
        subfolders[:] = entered
        relative_folder = os.path.relpath(folder, root)
        for name in files:
            if is_image_file(name):
                relative = name if relative_folder == "." else os.path.join(relative_folder, name)
                found.append(relative.replace(os.sep, "/"))
    return sorted(found)


def image_frames(path: str | os.PathLike) -> int:
    """Number of frames: NumberOfFrames for a DICOM file, 1 for any other image."""
    path = os.fspath(path)
    if not is_dicom_file(path):
        return 1
    return _guarded(path, lambda: _dicom_frame_count(_read_dicom_header(path)))


def read_image(path: str | os.PathLike, frame: int = 0) -> np.ndarray:
    """Decode one image (one ``frame`` of a multi-frame DICOM) as described in the module docstring."""
    path = os.fspath(path)
    if is_dicom_file(path):
        return _guarded(path, lambda: _dicom_frame(_load_dicom(path), path, frame))
    if frame != 0:
        raise FrameIndexError(f"{path} has a single frame; frame {frame} was requested")
    return _guarded(path, lambda: _read_ordinary(path))


def read_frames(path: str | os.PathLike, frames: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame, image)`` for the given frames (default: all), opening the file only once.

    For a long DICOM cine this avoids re-reading the whole file for every frame.
    """
    path = os.fspath(path)
    if not is_dicom_file(path):
        for frame in (0,) if frames is None else frames:
            yield frame, read_image(path, frame)
        return
    ds = _guarded(path, lambda: _load_dicom(path))
    for frame in range(_dicom_frame_count(ds)) if frames is None else frames:
        yield frame, _guarded(path, lambda: _dicom_frame(ds, path, frame))


def to_grey(img: np.ndarray) -> np.ndarray:
    """Grey version of an RGB(A) image, bit-identical to OpenCV's grey read of a colour PNG.

    Grey input is returned unchanged; the dtype (uint8 or uint16) is kept.
    """
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"to_grey expects H x W, H x W x 3 or H x W x 4, got shape {img.shape}")
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"to_grey supports uint8 and uint16 images, got {img.dtype}")
    wr, wg, wb = _GREY_WEIGHTS_RGB
    red, green, blue = (img[:, :, c].astype(np.uint64) for c in range(3))
    weighted = wr * red + wg * green + wb * blue
    if img.dtype == np.uint16:
        weighted += 1 << 14  # libpng rounds 16-bit samples and truncates 8-bit ones
    return (weighted >> 15).astype(img.dtype)


def write_image_atomic(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write ``img`` (grey or RGB, uint8 or uint16) in the format its extension names, atomically.

    PNG is lossless; JPEG is written at quality 95. uint16 is kept for PNG and TIFF and refused for
    formats that cannot hold it. A crash never leaves a half-written file under ``path``.
    """
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if img.dtype == np.uint16 and extension not in (".png", ".tif", ".tiff"):
        raise ValueError(f"cannot store a 16-bit image as {extension} ({path}); use .png or .tif")
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"write_image_atomic writes uint8 or uint16 images, got {img.dtype} for {path}")
    bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if extension in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(extension, bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {img.shape} as {extension} ({path})")
    atomic_write_bytes(path, encoded.tobytes())


# ----------------------------------------------------------------------------- internals


def _guarded(path: str, decode):
    """Run ``decode`` and turn any decoder failure into an UnreadableImageError naming ``path``.

    Decoders signal malformed input with all kinds of exceptions (OSError, SyntaxError,
    struct.error, IndexError, pydicom's own, ...), so everything but a missing file is translated;
    the original exception stays attached as the cause.
    """
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImageError(path, "the file is empty (0 bytes)")
        return decode()
    except (UnreadableImageError, FileNotFoundError, FrameIndexError):
        raise
    except Exception as exc:  # noqa: BLE001 - see docstring
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from exc


def _read_ordinary(path: str) -> np.ndarray:
    with Image.open(path) as im:
        if _is_16bit_colour(im, path):
            return _read_with_opencv(path)
        upright = ImageOps.exif_transpose(im)  # also forces the decode: truncation raises here
        return _pillow_to_array(upright, path)


def _is_16bit_colour(im: Image.Image, path: str) -> bool:
    if im.mode not in ("RGB", "RGBA"):
        return False
    if im.format == "PNG":
        with open(path, "rb") as f:
            header = f.read(26)  # signature (8) + IHDR length/type (8) + width, height (8) + depth
        return header.startswith(_PNG_SIGNATURE) and len(header) == 26 and header[24] == 16
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def _read_with_opencv(path: str) -> np.ndarray:
    # ANYDEPTH keeps 16 bits, ANYCOLOR drops alpha; without IMREAD_UNCHANGED OpenCV applies EXIF
    # orientation itself.
    encoded = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(encoded, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise UnreadableImageError(path, "OpenCV could not decode this 16-bit colour image")
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _pillow_to_array(im: Image.Image, path: str) -> np.ndarray:
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)  # also turns big-endian I;16B into native order
    if im.mode == "I":  # 32-bit integer TIFFs; accepted when the values fit 16 bits
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnreadableImageError(path, "32-bit integer pixel values outside 0..65535 are not supported")
        return values.astype(np.uint16)
    if im.mode == "F":
        raise UnreadableImageError(path, "floating-point images are not supported; convert to 8 or 16 bits")
    if im.mode in ("1", "LA", "La"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))  # RGBA, RGBa, RGBX, P, PA, CMYK, YCbCr, LAB, HSV


def _read_dicom_header(path: str):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _dicom_frame_count(ds) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _load_dicom(path: str):
    import pydicom  # local: only DICOM datasets pay for the import

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnreadableImageError(path, "the DICOM file holds no pixel data")
    return ds


def _dicom_frame(ds, path: str, frame: int) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, pixel_array

    frames = _dicom_frame_count(ds)
    if not 0 <= frame < frames:
        raise FrameIndexError(f"{path} has {frames} frame(s); frame {frame} does not exist")
    # as_rgb converts YBR_FULL / YBR_FULL_422 to RGB (JPEG-coded YBR_RCT / YBR_ICT come out as RGB).
    pixels = pixel_array(ds, index=frame if frames > 1 else None, as_rgb=True)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        return _to_unsigned_integer(pixels, bits=16 if pixels.dtype.itemsize > 1 else 8, signed=False)
    bits = int(ds.get("BitsStored", pixels.dtype.itemsize * 8))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return _to_unsigned_integer(pixels, bits, signed, invert=photometric == "MONOCHROME1")


def _to_unsigned_integer(pixels: np.ndarray, bits: int, signed: bool, invert: bool = False) -> np.ndarray:
    """Map stored DICOM values onto uint8 / uint16 as the module docstring explains.

    ``invert`` (MONOCHROME1) flips the values within the stored range, before the scaling shift.
    """
    if pixels.dtype.kind == "f" or bits > 16:
        stretched = _stretch_to_uint16(pixels)
        return 65535 - stretched if invert else stretched
    values = pixels.astype(np.int64)
    if signed:
        values += 1 << (bits - 1)
    values = np.clip(values, 0, (1 << bits) - 1)
    if invert:
        values = (1 << bits) - 1 - values
    target_bits = 8 if bits <= 8 else 16
    values <<= target_bits - bits
    return values.astype(np.uint8 if target_bits == 8 else np.uint16)


def _stretch_to_uint16(pixels: np.ndarray) -> np.ndarray:
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint16)
    return np.round((values - low) * (65535.0 / (high - low))).astype(np.uint16)
