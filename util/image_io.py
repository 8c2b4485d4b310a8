"""Reading and writing dataset images: one reader for blurred_images.py and the training datasets.

``read_image`` returns a numpy array, ``H x W`` (grey) or ``H x W x 3`` in **RGB** order, of dtype
uint8 or uint16. What it does to the file's pixels, and why:

* EXIF orientation is applied (a photographed or exported frame shows upright, as in any viewer).
* Alpha is dropped without compositing (RGBA -> RGB, LA -> L): ultrasound exports carry an opaque or
  meaningless alpha plane. Palette images become RGB, bilevel images grey.
* 16-bit PNG and TIFF stay uint16, grey and colour alike. Pillow reduces 16-bit *colour* to 8 bits, so
  those files are decoded with OpenCV instead.
* DICOM (``.dcm``, or a file without an image extension that starts with the DICOM preamble, as a
  scanner's ``IM000001``) is decoded with pydicom, one frame at a time; compressed transfer syntaxes
  through the pylibjpeg plugins and Pillow (README lists them). A file whose compression has no
  decoder installed says so and names the missing package, rather than calling the file damaged.
  YBR photometrics become RGB, PALETTE COLOR goes through its colour table and MONOCHROME1 is
  inverted so that bright always means strong echo. Signed data are shifted by
  ``2**(BitsStored-1)`` to become unsigned without loss. Data stored with fewer bits than the output
  type (e.g. 12-bit) are scaled up by a left shift, as the PNG specification (section 12.5, sample
  depth scaling) asks of a 16-bit file: the shift is exact and reversible, and a 16-bit image then
  spans the 16-bit range, so viewers and the ``/ 65535`` normalisation of the datasets see the
  intended contrast. Only floating-point or more-than-16-bit data are rescaled min-to-max onto the
  full uint16 range, because they cannot be stored otherwise.

Any file that cannot be decoded raises :class:`UnreadableImageError`, which names the file. So do:

* an image larger than :func:`max_image_pixels` (width x height; default ``2**28``, e.g. 16384 x 16384;
  raise it with the environment variable ``DEBLURRINGMIM_MAX_IMAGE_PIXELS``). The size is read from
  the header before anything is decoded, so a small file that declares a huge image costs nothing;
* a DICOM file whose header declares more frames (NumberOfFrames) than its pixel data holds: native
  data are measured in bytes, encapsulated (compressed) data by their offset table and fragments.
  Memory and the number of dataset entries then follow the data, never the header;
* floating-point DICOM pixel data with NaN or infinite values (no min-to-max mapping means anything
  then: one NaN used to turn the whole image black);
* a symbolic link whose target does not exist.
"""
from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

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
# Pillow modes of grey images (with or without alpha, any depth); every other mode holds colour.
_GREY_PIL_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})

# Largest image (width x height, any number of channels or bits) read by default: 16384 x 16384. A
# 16-bit RGB image of that size is 1.5 GiB decoded, already more than a DataLoader worker should
# hold; ultrasound frames are far smaller. A file above it is reported as unreadable, naming this.
DEFAULT_MAX_IMAGE_PIXELS = 2**28
MAX_IMAGE_PIXELS_ENV = "DEBLURRINGMIM_MAX_IMAGE_PIXELS"
# Rows converted at a time by to_grey: its 32-bit sums then need a few MiB, not 4x the image.
_GREY_BAND_ROWS = 256

_DECODER_ADVICE = ("Install the DICOM decoders that requirements.txt lists (pip install -r requirements.txt: "
                   "pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle), or export the file "
                   "uncompressed.")
_DAMAGED_ADVICE = ("The file is damaged or not an image this reader supports: re-export or re-copy it, or "
                   "move it out of the dataset folder.")
# DICOM pixel data elements: Pixel Data, Float Pixel Data, Double Float Pixel Data
_PIXEL_DATA_TAGS = {0x7FE00010: None, 0x7FE00008: 32, 0x7FE00009: 64}
# explicit-VR elements with a 2-byte reserved field and a 4-byte length
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


class FrameIndexError(IndexError):
    """A frame number outside a file's frames was requested (a caller's mistake, not a bad file)."""


class DatasetError(RuntimeError):
    """The dataset folder cannot be used as given; the message names the folder and the fix.
    (Here, not in util/datasets.py, so that tools which only read images need not import torch.)"""


class UnreadableImageError(Exception):
    """An image file exists but cannot be decoded (empty, truncated, not an image, unsupported,
    too large). ``advice`` says what to do; by default: the file is damaged, re-export it."""

    def __init__(self, path: str | os.PathLike, reason: str, advice: str | None = None):
        self.path = os.fspath(path)
        self.reason = reason
        self.advice = advice or _DAMAGED_ADVICE
        super().__init__(f"cannot read image {self.path}: {reason}. {self.advice}")

    def __reduce__(self):  # survives pickling (process pools) with all three fields
        return type(self), (self.path, self.reason, self.advice)


class PixelLimitSettingError(ValueError):
    """DEBLURRINGMIM_MAX_IMAGE_PIXELS is set to something that is not a pixel count."""


def max_image_pixels() -> int:
    """The largest width x height read: ``DEBLURRINGMIM_MAX_IMAGE_PIXELS`` if set, else 2**28."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(text))  # 3e8 and 300000000 alike
    except ValueError:
        value = 0
    if value < 1:
        raise PixelLimitSettingError(f"{MAX_IMAGE_PIXELS_ENV}={text!r} is not a positive number of pixels; "
                         f"unset it (default {DEFAULT_MAX_IMAGE_PIXELS}) or give e.g. {2 * DEFAULT_MAX_IMAGE_PIXELS}")
    return value


def check_image_size(path: str | os.PathLike, width: int, height: int) -> None:
    """Raise UnreadableImageError when ``width x height`` exceeds :func:`max_image_pixels`."""
    limit = max_image_pixels()
    if width * height > limit:
        raise UnreadableImageError(
            path, f"the image is {width} x {height} = {width * height:,} pixels, above the limit of {limit:,} "
                  "pixels per image that keeps memory bounded",
            f"Downscale or crop it, or raise the limit with the environment variable {MAX_IMAGE_PIXELS_ENV}="
            f"{width * height} (a 16-bit colour image needs about 12 bytes per pixel while it is decoded)")


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file whose extension is one of IMAGE_EXTENSIONS (any letter case), or
    that is a DICOM file by its content (see :func:`is_dicom_file`); ``path`` must name the file
    itself for the content check."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if name.startswith(".") or name.lower() in _SYSTEM_FILES:
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS or has_dicom_preamble(path)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """``.dcm`` by name, or a file without an image extension that starts with the DICOM preamble:
    scanner exports often name their files ``IM000001`` or after a UID (``1.2.840.....1``)."""
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension == ".dcm":
        return True
    return extension not in IMAGE_EXTENSIONS and has_dicom_preamble(path)


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """True when the file's bytes 128-131 are ``DICM`` (DICOM part 10 files: PS3.10 section 7.1)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:  # a folder, a dangling link, no permission: not a DICOM file we can read
        return False


def blurred_copy_names(relative_path: str, frames: int, dicom: bool) -> list[str]:
    """Names of the blurred copy of a source file, the rule ``blurred_images.py`` writes and the
    paired datasets look for: an ordinary image keeps its name; a DICOM file becomes PNG
    (``scan.dcm`` -> ``scan.png``, ``IM000001`` -> ``IM000001.png``), one file per frame of a
    multi-frame file (``scan_f000.png``, ... with three digits, more above 1000 frames)."""
    if not dicom:
        return [relative_path]
    stem = relative_path[:-4] if relative_path.lower().endswith(".dcm") else relative_path
    if frames == 1:
        return [f"{stem}.png"]
    digits = max(3, len(str(frames - 1)))
    return [f"{stem}_f{index:0{digits}d}.png" for index in range(frames)]


class ImageScan(NamedTuple):
    images: list[str]  # sorted relative POSIX paths of the images
    not_images: list[str]  # sorted relative paths of the other files met (text, system files, ...)


def list_images(root: str | os.PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Sorted relative POSIX paths of all images below ``root``, at any depth (see scan_images)."""
    return scan_images(root, exclude).images


def scan_images(root: str | os.PathLike, exclude: Iterable[str] = ()) -> ImageScan:
    """The images below ``root`` at any depth, and the other files met on the way.

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
    others: list[str] = []
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
            relative = (name if relative_folder == "." else os.path.join(relative_folder, name)).replace(os.sep, "/")
            (found if is_image_file(os.path.join(folder, name)) else others).append(relative)
    return ImageScan(sorted(found), sorted(others))


def describe_not_images(not_images: Sequence[str], where: str) -> str:
    """One line about the files that are not images (paths below the folder ``where``), e.g. for a
    start-up print; '' when none."""
    if not not_images:
        return ""
    visible = [p for p in not_images if not os.path.basename(p).startswith(".")] or list(not_images)
    shown = [os.path.relpath(p, where) if os.path.isabs(p) else p for p in visible[:3]]
    examples = ", ".join(shown) + (", ..." if len(not_images) > 3 else "")
    return (f"{len(not_images)} file(s) in {where} are not images and are left out (e.g. {examples}); images "
            "are recognised by extension (.png .jpg .jpeg .bmp .tif .tiff .webp .dcm) or, for DICOM, by the "
            "'DICM' preamble")


def image_frames(path: str | os.PathLike) -> int:
    """Number of frames: NumberOfFrames for a DICOM file (checked against its pixel data and the
    size limit), 1 for any other image."""
    path = os.fspath(path)
    if not is_dicom_file(path):
        return 1
    return _guarded(path, lambda: _dicom_header(path)[1])


def read_image(path: str | os.PathLike, frame: int = 0) -> np.ndarray:
    """Decode one image (one ``frame`` of a multi-frame DICOM) as described in the module docstring."""
    path = os.fspath(path)
    if is_dicom_file(path):
        return next(read_frames(path, [frame]))[1]
    if frame != 0:
        raise FrameIndexError(f"{path} has a single frame; frame {frame} was requested")
    return _guarded(path, lambda: _read_ordinary(path))


def read_frames(path: str | os.PathLike, frames: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame, image)`` for the given frames (default: all), parsing the header only once.

    A DICOM frame is read from the file on its own (pydicom seeks to it), so reading one frame of
    a long cine costs that frame, not the whole file.
    """
    path = os.fspath(path)
    if not is_dicom_file(path):
        for frame in (0,) if frames is None else frames:
            yield frame, read_image(path, frame)
        return
    header, count = _guarded(path, lambda: _dicom_header(path))
    missing = _missing_decoders(header)
    with open(path, "rb") as f:
        for frame in range(count) if frames is None else frames:
            if not 0 <= frame < count:
                raise FrameIndexError(f"{path} has {count} frame(s); frame {frame} does not exist")
            if missing and not missing.some_installed:
                raise UnreadableImageError(path, missing.reason, _DECODER_ADVICE)
            try:
                yield frame, _guarded(path, lambda: _dicom_frame(f, header, count, path, frame))
            except UnreadableImageError as err:
                if not missing:
                    raise
                # some decoders of this compression are installed and failed: the file may be
                # damaged, or need one of the decoders that are not installed
                raise UnreadableImageError(path, f"{err.reason}; {missing.reason}",
                                           "The file may be damaged, or need one of those decoders: "
                                           + _DECODER_ADVICE) from err


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
    wr, wg, wb = (np.uint32(w) for w in _GREY_WEIGHTS_RGB)
    # libpng rounds 16-bit samples and truncates 8-bit ones
    rounding = np.uint32(1 << 14 if img.dtype == np.uint16 else 0)
    grey = np.empty(img.shape[:2], img.dtype)
    # The weighted sum of 16-bit samples fits 32 bits (65535 * 2**15 + 2**14 < 2**32). Band by band,
    # the sums take a few MiB instead of four 64-bit copies of a large image.
    for top in range(0, img.shape[0], _GREY_BAND_ROWS):
        band = img[top:top + _GREY_BAND_ROWS]
        weighted = band[:, :, 0] * wr
        weighted += band[:, :, 1] * wg
        weighted += band[:, :, 2] * wb
        weighted += rounding
        weighted >>= 15
        grey[top:top + _GREY_BAND_ROWS] = weighted
    return grey


def stored_in_colour(path: str | os.PathLike) -> bool:
    """True when the file stores colour (RGB, palette, YBR, CMYK, ...) rather than grey pixels,
    read from its header only (nothing is decoded). Unreadable files raise UnreadableImageError."""
    path = os.fspath(path)
    if is_dicom_file(path):
        header = _guarded(path, lambda: _read_dicom_header(path))
        photometric = str(header.get("PhotometricInterpretation", "")).upper()
        return int(header.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"

    def colour_mode() -> bool:
        with _open_with_size_limit(path) as im:
            return im.mode not in _GREY_PIL_MODES
    return _guarded(path, colour_mode)


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
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnreadableImageError(path, f"it is a symbolic link to {os.readlink(path)}, which does not exist",
                                       "Fix or remove the link.") from None
        raise
    except (UnreadableImageError, FrameIndexError, PixelLimitSettingError):
        raise
    except Exception as exc:  # noqa: BLE001 - see docstring
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from exc


def _read_ordinary(path: str) -> np.ndarray:
    with _open_with_size_limit(path) as im:
        if _is_16bit_colour(im, path):
            return _read_with_opencv(path)
        ImageOps.exif_transpose(im, in_place=True)  # also forces the decode: truncation raises here
        return _pillow_to_array(im, path)


def _open_with_size_limit(path: str) -> Image.Image:
    """Image.open (lazy: only the header is read) and the size limit checked before any decoding.

    Pillow's own decompression-bomb guard is set to the same limit, so it never refuses an image
    this limit allows; it raises at twice the limit (then our message) and warns between the two
    (silenced: our check refuses that image right after).
    """
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(
            path, f"{exc}".rstrip("."),
            f"Downscale or crop it, or raise the limit ({limit:,} pixels per image) with the environment "
            f"variable {MAX_IMAGE_PIXELS_ENV}") from None
    try:
        check_image_size(path, *im.size)
    except UnreadableImageError:
        im.close()
        raise
    return im


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
    del encoded
    if img is None:
        raise UnreadableImageError(path, "OpenCV could not decode this 16-bit colour image")
    # in place: no second copy of a large decode
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)


def _pillow_to_array(im: Image.Image, path: str) -> np.ndarray:
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode.startswith("I;16"):
        # also turns big-endian I;16B into native order; native data are used without a copy
        return np.asarray(im).astype(np.uint16, copy=False)
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


class _MissingDecoders(NamedTuple):
    some_installed: bool  # other decoders of the same compression are installed
    reason: str


def _missing_decoders(header) -> _MissingDecoders | None:
    """What is missing to decode the file's transfer syntax; None when nothing is."""
    from pydicom.pixels import get_decoder

    syntax = header.file_meta.get("TransferSyntaxUID") if hasattr(header, "file_meta") else None
    if not syntax:
        return None
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return _MissingDecoders(False, f"its transfer syntax {syntax.name} ({syntax}) is not one pydicom can decode")
    # gdcm is an optional alternative that requirements.txt does not install: every transfer syntax
    # it decodes also has a pylibjpeg plugin, so its absence alone explains no failure
    missing = [m for m in decoder.missing_dependencies if not m.startswith("gdcm")]
    if not missing:
        return None
    what = f"decoders of its compression, {syntax.name} ({syntax}), that are not installed: {'; '.join(missing)}"
    if decoder.is_available:
        return _MissingDecoders(True, what)
    return _MissingDecoders(False, f"no decoder for its compression is installed ({what})")


def _read_dicom_header(path: str):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _dicom_header(path: str):
    """The DICOM header (no pixel data) and its number of frames, after checking the image size
    and that the pixel data holds every declared frame."""
    import pydicom  # local: only DICOM datasets pay for the import

    with open(path, "rb") as f:
        header = pydicom.dcmread(f, stop_before_pixels=True)
        declared = _declared_frames(header, path)
        if header.file_meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
            # the data set is zlib-compressed: its pixel data are only reached by inflating it all
            present = _frames_in_inflated(pydicom.dcmread(path), path)
        else:
            tag, length = _pixel_data_element(f, header, path)  # f stands at the pixel data element
            _check_dicom_size(header, path)
            present = _frames_in_pixel_data(f, header, tag, length, path)
    if declared > present:
        raise UnreadableImageError(path, f"its header declares {declared:,} frames (NumberOfFrames) but the "
                                         f"pixel data hold {present:,}; the file is truncated or its header is wrong")
    return header, declared


def _check_dicom_size(header, path: str) -> None:
    if "Rows" not in header or "Columns" not in header:
        raise UnreadableImageError(path, "the DICOM header gives no image size (Rows, Columns)")
    check_image_size(path, int(header.Columns), int(header.Rows))


def _frames_in_inflated(ds, path: str) -> int:
    """Frames in the (native) pixel data of a deflated data set, read whole."""
    for tag, float_bits in _PIXEL_DATA_TAGS.items():
        if tag in ds:
            _check_dicom_size(ds, path)
            return len(ds[tag].value) * 8 // max(_native_frame_bits(ds, float_bits), 1)
    raise UnreadableImageError(path, "the DICOM file holds no pixel data (not an image, e.g. a report)")


def _declared_frames(header, path: str) -> int:
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames < 1:
        raise UnreadableImageError(path, f"NumberOfFrames is {frames}")
    return frames


def _pixel_data_element(f, header, path: str) -> tuple[int, int]:
    """Tag and value length of the pixel data element whose header starts at the position of ``f``
    (where ``dcmread(..., stop_before_pixels=True)`` left it); ``f`` is left at its value."""
    implicit_vr, little_endian = header.original_encoding
    endian = "<" if little_endian or little_endian is None else ">"
    start = f.read(8)
    tag = None
    if len(start) == 8:
        group, element = struct.unpack(f"{endian}HH", start[:4])
        tag = group << 16 | element
    if tag not in _PIXEL_DATA_TAGS:
        raise UnreadableImageError(path, "the DICOM file holds no pixel data (not an image, e.g. a report)")
    # Some writers put an implicit-VR element into an explicit-VR file (pydicom reads them too):
    # there the bytes of a VR are not two capital letters.
    vr = start[4:6]
    if implicit_vr or not (vr.isalpha() and vr.isupper()):
        return tag, struct.unpack(f"{endian}L", start[4:])[0]
    if vr in _LONG_VRS:
        return tag, struct.unpack(f"{endian}L", f.read(4))[0]
    return tag, struct.unpack(f"{endian}H", start[6:])[0]


def _frames_in_pixel_data(f, header, tag: int, length: int, path: str) -> int:
    """How many frames the pixel data element (its value starting at the position of ``f``)
    actually holds.

    Native data: the bytes present (the element's length, cut at the end of a truncated file)
    over the bytes of one frame. Encapsulated data: the Extended Offset Table's entries if there is
    one, else the fragments (every frame has at least one), no more than a non-empty Basic Offset
    Table lists. Only item headers are read, never the compressed data.
    """
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    if length == 0xFFFFFFFF:  # encapsulated (compressed) frames
        if "ExtendedOffsetTable" in header:
            return len(header.ExtendedOffsetTable) // 8
        endian = "<" if header.original_encoding[1] is not False else ">"
        offsets = parse_basic_offsets(f, endianness=endian)
        fragments = parse_fragments(f, endianness=endian)[0]
        return min(len(offsets), fragments) if offsets else fragments
    available = min(length, os.fstat(f.fileno()).st_size - f.tell())
    frame_bits = _native_frame_bits(header, _PIXEL_DATA_TAGS[tag])
    if frame_bits <= 0:
        raise UnreadableImageError(path, "the DICOM header describes an image of 0 bytes")
    return available * 8 // frame_bits


def _native_frame_bits(header, float_bits: int | None) -> int:
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if samples == 3 and str(header.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
        samples = 2  # chroma shared by two pixels: two samples per pixel on average
    bits = float_bits or int(header.get("BitsAllocated", 8) or 8)
    return int(header.Rows) * int(header.Columns) * samples * bits


def _dicom_frame(f, header, frames: int, path: str, frame: int) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, pixel_array

    index = frame if frames > 1 else None
    # as_rgb converts YBR_FULL / YBR_FULL_422 to RGB (JPEG-coded YBR_RCT / YBR_ICT come out as RGB).
    try:
        # From the open file, not a loaded dataset: pydicom then reads this frame's bytes only.
        pixels = pixel_array(f, index=index, as_rgb=True)
    except Exception:  # noqa: BLE001 - retried below, which reports its own failure
        # pydicom's file route is stricter than its dataset reader about oddly written files (an
        # implicit-VR element in an explicit-VR file, ...): read the whole file as before.
        import pydicom
        f.seek(0)
        pixels = pixel_array(pydicom.dcmread(f), index=index, as_rgb=True)
    photometric = str(header.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, header)
        return _to_unsigned_integer(pixels, 16 if pixels.dtype.itemsize > 1 else 8, False, path)
    bits = int(header.get("BitsStored", pixels.dtype.itemsize * 8))
    signed = int(header.get("PixelRepresentation", 0)) == 1
    return _to_unsigned_integer(pixels, bits, signed, path, invert=photometric == "MONOCHROME1")


def _to_unsigned_integer(pixels: np.ndarray, bits: int, signed: bool, path: str,
                         invert: bool = False) -> np.ndarray:
    """Map stored DICOM values onto uint8 / uint16 as the module docstring explains.

    ``invert`` (MONOCHROME1) flips the values within the stored range, before the scaling shift.
    """
    if pixels.dtype.kind == "f" or bits > 16:
        if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            bad = int(pixels.size - np.count_nonzero(np.isfinite(pixels)))
            raise UnreadableImageError(
                path, f"{bad:,} of its {pixels.size:,} floating-point pixel values are NaN or infinite",
                "Re-export the image with finite values (e.g. missing pixels set to 0), or move it out of "
                "the dataset folder.")
        stretched = _stretch_to_uint16(pixels)
        return np.subtract(65535, stretched, out=stretched) if invert else stretched
    target_bits = 8 if bits <= 8 else 16
    target = np.uint8 if target_bits == 8 else np.uint16
    if pixels.dtype == target and bits == target_bits and not signed and not invert:
        return pixels  # already what we want: no copy
    values = pixels.astype(np.int32)  # holds every stored value (<= 16 bits) and the shifts below
    if signed:
        values += 1 << (bits - 1)
    np.clip(values, 0, (1 << bits) - 1, out=values)
    if invert:
        np.subtract((1 << bits) - 1, values, out=values)
    values <<= target_bits - bits
    return values.astype(target)


def _stretch_to_uint16(pixels: np.ndarray) -> np.ndarray:
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint16)
    values -= low  # in place: one float copy of the frame, not three
    values *= 65535.0 / (high - low)
    np.round(values, out=values)
    return values.astype(np.uint16)
