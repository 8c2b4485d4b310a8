"""What a model's inputs were: the blur, the input size and the colour decision a checkpoint was
trained with, and the settings file that ``blurred_images.py`` leaves in a blurred copy.

A model evaluated (or fine-tuned) on inputs prepared otherwise than it was trained gives numbers
that look valid and are not: a classifier fine-tuned on Gaussian-blurred images and evaluated on
sharp ones scored 0.667 instead of 0.889 on a test set here. So every checkpoint records, in its
``args``:

* ``input_blur``: the blur of the model's inputs, ``{"method": ..., <the settings it uses>,
  "applied": "on the fly" | "<path>/blur.json"}``, or None for unblurred inputs. In the paired mode
  of pretraining (a copy blurred offline) it comes from the copy's ``blur.json``; a copy without
  one is recorded as ``{"method": "unknown", ...}``;
* ``input_size``, ``in_chans`` and ``keep_channels`` (colour kept, or converted to grey).

``blurred_images.py`` writes ``blur.json`` at the top of its destination tree (method, settings,
grey or colour, the source folder); a script given a folder inside such a tree finds it there.

The scripts that load a checkpoint apply what it recorded unless told otherwise (``--blur METHOD``,
``--blur none``, ``--input_size``): see :func:`resolve_input_blur`.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

from timm.layers import to_2tuple

from util.blur import BLUR_SETTINGS_FILE, NO_BLUR, BlurSpec
from util.image_io import DatasetError
from util.fileio import atomic_write_text

SETTINGS_WRITER = "blurred_images.py"
UNKNOWN = "unknown"
ON_THE_FLY = "on the fly"
# What the published Deblurring models were pretrained with (blurred_images.py's default): assumed
# for a deblurring checkpoint that records no blur, and said so.
PUBLISHED_BLUR = BlurSpec("gaussian", sigma=1.1)


# ------------------------------------------------------------------------------ blurred copies
@dataclass(frozen=True)
class DataBlur:
    """The settings file of a blurred copy."""

    spec: BlurSpec
    channels: str  # "grey", or "colour" (blurred_images.py --keep_channels)
    path: str  # the blur.json
    pending: bool  # an --overwrite run with other settings has not finished: the tree mixes two blurs

    def describe(self) -> str:
        return f"{self.spec.describe()}, {self.channels}"


def write_blur_settings(dst_dir: str, spec: BlurSpec, keep_channels: bool, src_dir: str, pending: bool) -> None:
    """``dst_dir/blur.json``, atomically (a reader never sees half of it)."""
    record = {"written_by": SETTINGS_WRITER, "blur": spec.settings(),
              "channels": "colour" if keep_channels else "grey", "source": os.path.abspath(src_dir),
              "pending": pending}
    atomic_write_text(os.path.join(dst_dir, BLUR_SETTINGS_FILE), json.dumps(record, indent=2) + "\n")


def read_blur_settings(folder: str, search_parents: bool = True) -> Optional[DataBlur]:
    """The settings file of the blurred copy ``folder`` belongs to (in it, or with ``search_parents``
    in the nearest folder above it), None if there is none. A file of that name in a folder above that
    blurred_images.py did not write belongs to something else and is passed over; in ``folder`` itself
    it is an error (the data would be used without knowing whether they are blurred)."""
    candidate = os.path.abspath(folder)
    while True:
        path = os.path.join(candidate, BLUR_SETTINGS_FILE)
        if os.path.isfile(path):
            found = _parse_blur_settings(path, strict=candidate == os.path.abspath(folder))
            if found is not None:
                return found
        parent = os.path.dirname(candidate)
        if not search_parents or parent == candidate:
            return None
        candidate = parent


def _parse_blur_settings(path: str, strict: bool) -> Optional[DataBlur]:
    """The settings in ``path``; a file blurred_images.py did not write is None, or with ``strict`` an error."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict) or record.get("written_by") != SETTINGS_WRITER:
            raise ValueError("it was not written by blurred_images.py")
    except (OSError, ValueError) as err:
        if not strict:
            return None
        raise _unreadable_settings(path, err) from None
    try:
        channels = record["channels"]
        if channels not in ("grey", "colour"):
            raise ValueError(f"channels is {channels!r}")
        return DataBlur(BlurSpec.from_settings(record["blur"]), channels, path, bool(record.get("pending")))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _unreadable_settings(path, err) from None


def _unreadable_settings(path: str, err: Exception) -> DatasetError:
    return DatasetError(f"{path}: not a readable settings file of blurred_images.py ({type(err).__name__}: {err}). "
                        "Re-create the blurred copy with blurred_images.py, or move the file away if this folder "
                        "is not a blurred copy.")


def data_blur(folder: str) -> Optional[DataBlur]:
    """:func:`read_blur_settings` for training and evaluation: a copy left half re-blurred is an error."""
    found = read_blur_settings(folder)
    if found is not None and found.pending:
        raise DatasetError(f"{folder}: its blurred copy mixes two blurs: blurred_images.py --overwrite with "
                           f"{found.spec.describe()} did not finish ({found.path}). Run that command again to "
                           "finish it.")
    return found


# ------------------------------------------------------------------------------ checkpoints
def recorded_args(ckpt) -> dict:
    """The settings a checkpoint recorded: our plain dict, or the published argparse.Namespace."""
    if ckpt is None:
        return {}
    saved = ckpt.get("args")
    if isinstance(saved, argparse.Namespace):
        return vars(saved)
    return dict(saved) if isinstance(saved, dict) else {}


def size_hw(size) -> tuple:
    """An input size as scripts record it (an int, [S] or [H, W]) as (H, W)."""
    if not isinstance(size, int) and len(size) == 1:
        size = size[0]
    return to_2tuple(size)


def input_blur_record(spec: Optional[BlurSpec], applied: str) -> Optional[dict]:
    """What ``args.input_blur`` holds (and so every checkpoint): None for unblurred inputs."""
    return None if spec is None else {**spec.settings(), "applied": applied}


def unknown_blur_record(applied: str) -> dict:
    return {"method": UNKNOWN, "applied": applied}


def same_blur_record(a: Optional[dict], b: Optional[dict]) -> bool:
    """Two ``input_blur`` records describe the same blur (where it was applied does not count)."""
    def blur(record):
        return None if record is None else {k: v for k, v in record.items() if k != "applied"}
    return blur(a) == blur(b)


def describe_blur_record(record: Optional[dict]) -> str:
    if record is None:
        return "none"
    if record.get("method") == UNKNOWN:
        return f"not recorded ({record.get('applied')})"
    return BlurSpec.from_settings(record).describe()


@dataclass(frozen=True)
class RecordedBlur:
    """The blur a checkpoint's model was trained with (None: unblurred inputs) and how that is known."""

    spec: Optional[BlurSpec]
    how: str


def recorded_input_blur(recorded: dict, deblurring: bool) -> Optional[RecordedBlur]:
    """The blur of the inputs a checkpoint was trained with, None when it cannot be known.

    ``recorded``: the checkpoint's args (:func:`recorded_args`). ``deblurring``: its model is a
    Deblurring MAE / ConvMAE (trained on blurred inputs by definition): without a record, or with a
    blurred copy of unknown settings, the published blur is assumed (and the messages say so).
    Checkpoints made before ``input_blur`` was recorded still say which ``--blur`` they used.
    """
    assumed = RecordedBlur(PUBLISHED_BLUR, "assumed: the published blur, as the checkpoint does not record its own")
    if "input_blur" in recorded:
        entry = recorded["input_blur"]
        if entry is None:
            return RecordedBlur(None, "recorded in the checkpoint")
        if entry.get("method") == UNKNOWN:
            return assumed if deblurring else None
        return RecordedBlur(BlurSpec.from_settings(entry), "recorded in the checkpoint")
    if recorded.get("blur_method"):
        settings = {k[len("blur_"):]: v for k, v in recorded.items() if k.startswith("blur_")}
        return RecordedBlur(BlurSpec.from_settings(settings), "recorded in the checkpoint")
    return assumed if deblurring else None


def same_blur(a: Optional[BlurSpec], b: Optional[BlurSpec]) -> bool:
    """Equal methods and equal settings of that method (settings it does not use do not count)."""
    return (a is None) == (b is None) and (a is None or a.settings() == b.settings())


def describe_inputs(spec: Optional[BlurSpec]) -> str:
    return f"inputs blurred with {spec.describe()}" if spec is not None else "unblurred inputs"


OVERRIDE = ("pass --blur none for unblurred inputs, or --blur METHOD (--blur_sigma S, ...) for another blur")


def resolve_input_blur(args, recorded: Optional[RecordedBlur], checkpoint: str, data_root: str) -> None:
    """Decide the blur of this run's inputs, print it, and set ``args.blur_*`` (the blur applied on the
    fly) and ``args.input_blur`` (what this run's checkpoints record).

    * ``--blur METHOD``: that blur on the fly (refused on data that is already a blurred copy);
      ``--blur none``: the images as they are. Either way a warning when it is not how
      ``checkpoint`` was trained.
    * no ``--blur``: the blur ``checkpoint`` recorded (``recorded``): nothing to do on a blurred copy
      with the same settings, otherwise on the fly; a blurred copy of other settings is refused.
    """
    data = data_blur(data_root) if data_root and os.path.isdir(data_root) else None
    explicit = args.blur_method
    if explicit not in (None, NO_BLUR):
        if data is not None:
            raise SystemExit(f"--blur {explicit}: {data_root} is already a blurred copy ({data.path}: "
                             f"{data.describe()}); blurring it again gives inputs blurred twice. Pass the original "
                             "images as the data, or leave out --blur to use the copy as it is.")
        on_the_fly = BlurSpec.from_settings(_blur_flags(args))
    elif explicit == NO_BLUR or recorded is None or recorded.spec is None:
        on_the_fly = None
        if explicit is None and recorded is not None and data is not None:  # recorded.spec is None here
            raise SystemExit(f"{checkpoint} was trained on unblurred inputs ({recorded.how}) but {data_root} is a "
                             f"blurred copy ({data.path}: {data.describe()}). Pass the original images as the data, "
                             "or --blur none to use the copy as it is.")
    elif data is not None:
        if not same_blur(data.spec, recorded.spec):
            raise SystemExit(f"{checkpoint} was trained on {describe_inputs(recorded.spec)} ({recorded.how}) "
                             f"but {data_root} is a copy blurred with {data.describe()} ({data.path}). Pass the "
                             "original images as the data (the checkpoint's blur is then applied on the fly), or "
                             "--blur none to use the copy as it is.")
        on_the_fly = None
    else:
        on_the_fly = recorded.spec
    _set_blur_flags(args, on_the_fly)
    inputs = on_the_fly if on_the_fly is not None else (data.spec if data is not None else None)
    args.input_blur = input_blur_record(inputs, ON_THE_FLY if on_the_fly is not None else
                                        (data.path if data is not None else ""))
    print(_blur_decision(inputs, on_the_fly, data, recorded, checkpoint, explicit))
    if explicit is not None and recorded is not None and not same_blur(inputs, recorded.spec):
        warnings.warn(f"{checkpoint} was trained on {describe_inputs(recorded.spec)} ({recorded.how}) but this "
                      f"run has {describe_inputs(inputs)} (--blur {explicit}): its results are not those of the "
                      "model as trained")


def _blur_decision(inputs, on_the_fly, data, recorded, checkpoint, explicit) -> str:
    if data is not None and on_the_fly is None:
        line = f"input blur: none added; the data is a copy blurred with {data.describe()} ({data.path})"
    elif on_the_fly is None:
        line = "input blur: none"
    elif explicit is not None:
        line = f"input blur: {on_the_fly.describe()}, applied on the fly (--blur {explicit})"
    else:
        return (f"input blur: {on_the_fly.describe()}, applied on the fly as {checkpoint} was trained "
                f"({recorded.how}); {OVERRIDE}")
    if explicit is None and recorded is not None:
        line += f", as {checkpoint} was trained ({recorded.how})"
    return line


def _blur_flags(args) -> dict:
    return {"method": args.blur_method, "sigma": args.blur_sigma, "kernel_size": args.blur_kernel_size,
            "srad_iterations": args.blur_srad_iterations, "srad_time_step": args.blur_srad_time_step,
            "seed": args.blur_seed}


def _set_blur_flags(args, spec: Optional[BlurSpec]) -> None:
    """``args.blur_*`` as if ``spec`` had been given on the command line (None: no blur)."""
    args.blur_method = None if spec is None else spec.method
    for name, value in ({} if spec is None else spec.settings()).items():
        if name != "method":
            setattr(args, f"blur_{name}", value)


def resolve_colour(args, recorded: dict, checkpoint: str) -> None:
    """The colour decision of the checkpoint's training: colour kept (``--keep_channels``) is applied
    when the model takes 3 channels; a grey-trained checkpoint given colour is warned about."""
    if "keep_channels" not in recorded:
        return
    if recorded["keep_channels"] and not args.keep_channels and args.in_chans == 3:
        args.keep_channels = True
        print(f"colour: kept in colour, as {checkpoint} was trained (--keep_channels)")
    elif args.keep_channels and not recorded["keep_channels"]:
        warnings.warn(f"{checkpoint} was trained on grey inputs (colour converted to grey) but --keep_channels "
                      "keeps colour: its results are not those of the model as trained")
