"""Checkpoint files: safe loading, atomic saving, and loading weights into a model with surgery.

Accepted inputs: our checkpoints (``{'model', 'optimizer', 'epoch', 'scaler', 'args': dict}``), the
published DeblurringMIM ones (``'model'`` key, ``args`` pickled as ``argparse.Namespace``), the
official MAE / ConvMAE ones, DDP ``module.``-prefixed weights and plain state dicts.

Files are always read with ``torch.load(weights_only=True)``. The only non-tensor class the
published checkpoints need, ``argparse.Namespace``, is on an explicit allow-list; anything else that
would require unrestricted unpickling (which can run arbitrary code) is refused with a clear
message -- there is no silent fallback. ``.safetensors`` files (``tools/export.py``, timm, Hugging
Face) are read with ``safetensors``, a format that holds tensors and strings only.

Weight surgery when loading into a model (``load_weights``):
* learned position embeddings are resampled bicubically to the model's grid (fixed sin-cos ones are
  recomputed by the model, so its own values are kept);
* the first convolution is adapted between 1 and 3 input channels (timm's ``adapt_input_conv``);
* classifier heads of another class count can be dropped (fine-tuning from a classifier);
* any other shape mismatch, or a missing key outside the allowed prefixes, is an error naming the
  file, the keys and the fix.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models._manipulate import adapt_input_conv

from util.fileio import atomic_save
from util.pos_embed import resample_pos_embed

# Classes the published checkpoints pickle besides tensors and builtins.
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]
FIRST_CONV_KEYS = ("patch_embed.proj.weight", "patch_embed1.proj.weight")
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class CheckpointError(RuntimeError):
    """A checkpoint a user passed cannot be used; the message names the file and the fix."""


# ------------------------------------------------------------------------------ files
def _allow_listed_globals():
    """Scope the allow-list to our loads where torch can (>= 2.5); torch 2.4 only has the global
    registry, which is then extended with the same few classes."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(SAFE_CHECKPOINT_GLOBALS)
    torch.serialization.add_safe_globals(SAFE_CHECKPOINT_GLOBALS)
    return contextlib.nullcontext()


def _looks_like_torch_save(path: str) -> bool:
    """Whether the file starts as torch.save's formats do: a zip archive (torch >= 1.6), or the
    legacy format, a pickle (first opcode PROTO) of torch's magic number."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def load_checkpoint_file(path: Union[str, os.PathLike], map_location="cpu") -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found. Check the path passed to "
                              "--resume / --finetune / model.pretrained.")
    if path.endswith(SAFETENSORS_SUFFIX):
        return load_safetensors_file(path, map_location)
    try:
        if not _looks_like_torch_save(path):
            # random bytes, an empty file, an image or another kind of file: the unpickler would only
            # fail on them in arbitrary ways (or call them unsafe, which they are not)
            size = os.path.getsize(path)
            found = "it is empty" if size == 0 else f"its {size} bytes are in neither of the formats torch.save writes"
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (truncated or corrupt: {found}). "
                                  "Copy or download it again.")
        with _allow_listed_globals():
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except PermissionError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror}). Check its permissions.") from None
    except pickle.UnpicklingError as err:
        # a global outside the allow-list, or an attribute lookup the allow-listed getattr refuses
        # (SEG/mmseg_compat.py's restricted getattr for mmengine's HistoryBuffer)
        disallowed = re.search(r"GLOBAL ([\w.]+)|refused (getattr\([^)]*\))", str(err))
        if disallowed is None:  # bytes the unpickler does not understand (torch's text would blame safety)
            raise _corrupt(path, "its pickled data is damaged") from None
        raise CheckpointError(
            f"{path}: refused to load: the file pickles objects outside the safe allow-list "
            f"(only tensors, containers and argparse.Namespace are accepted; it holds "
            f"{disallowed.group(1) or disallowed.group(2)}). Loading it would run arbitrary code. If you trust its origin, re-save "
            f"only its weights (torch.save({{'model': state_dict}}, ...)) and pass that file.") from None
    except Exception as err:  # a damaged archive or pickle fails with whatever the reader hits first
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _corrupt(path, f"{type(err).__name__}: {detail}") from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(ckpt).__name__}.")
    return dict(ckpt)


SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_ARGS_KEY = "args"  # metadata entry: the settings the weights were trained with, as JSON


def load_safetensors_file(path: str, map_location="cpu") -> dict:
    """A ``.safetensors`` file as a checkpoint dict: ``{'model': tensors}`` plus ``'args'`` when its
    metadata records them (``tools/export.py`` does). The format holds tensors and strings only, so
    reading it cannot run code: the weights-only guarantee holds without an allow-list."""
    import json

    from safetensors import SafetensorError, safe_open

    device = map_location if isinstance(map_location, str) else "cpu"
    try:
        with safe_open(path, framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]}). "
                              "Copy or export it again.") from None
    ckpt = {"model": state}
    if SAFETENSORS_ARGS_KEY in metadata:
        try:
            ckpt["args"] = dict(json.loads(metadata[SAFETENSORS_ARGS_KEY]))
        except (ValueError, TypeError):
            raise CheckpointError(f"{path}: its '{SAFETENSORS_ARGS_KEY}' metadata is not a JSON object; "
                                  "export the checkpoint again with tools/export.py.") from None
    return ckpt


def _corrupt(path: str, detail: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {detail}). "
                           "Copy or download it again.")


def numbered_checkpoints(folder: str) -> List[tuple]:
    """``(N, path)`` of the regular files ``checkpoint-N.pth`` in ``folder`` (links are not ours),
    oldest first."""
    found = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(path) and not os.path.islink(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_intact_checkpoint(folder: str) -> Optional[str]:
    """The numbered checkpoint of ``folder`` with the highest N that loads; None if none does."""
    for _, path in reversed(numbered_checkpoints(folder)):
        try:
            load_checkpoint_file(path)
        except CheckpointError:
            continue
        return path
    return None


def load_auto_resume_checkpoint(path: str) -> dict:
    """``--auto_resume``'s ``checkpoint-last.pth``. If it is damaged, the error names the newest intact
    numbered checkpoint beside it and how to continue from that one."""
    try:
        return load_checkpoint_file(path)
    except CheckpointError as err:
        folder = os.path.dirname(path) or "."
        intact = newest_intact_checkpoint(folder)
        if intact is not None:
            advice = (f"--auto_resume cannot continue from it. The newest intact numbered checkpoint is {intact}: "
                      f"continue from it with --resume {intact} (in place of --auto_resume; the epochs after it "
                      "are trained again).")
        else:
            advice = (f"--auto_resume cannot continue from it, and {folder} holds no intact numbered checkpoint "
                      "(checkpoint-N.pth). Move the damaged file out of the folder to start afresh.")
        raise CheckpointError(f"{str(err).removesuffix(' Copy or download it again.')} {advice}") from None


RERUN_HINT = "(or pass a writable --output_dir) and re-run the same command with --auto_resume"


def save_checkpoint(obj: dict, path: Union[str, os.PathLike], rerun_hint: str = RERUN_HINT) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact, never a partial one.

    A failed write (disk full, quota, read-only or vanished folder) is a CheckpointError naming the
    file: torch.save reports a full disk as a bare ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos ...``, which tells a user nothing. ``rerun_hint``: how to
    continue, in the words of the calling tool's flags.
    """
    try:
        atomic_save(obj, path)
    except (OSError, RuntimeError) as err:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free there"
        except OSError:
            free = "the folder is not accessible"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"could not write {path} ({type(err).__name__}: {detail}; {free}). The disk is probably full "
            f"or the folder read-only; the previous {os.path.basename(path)}, if any, is intact. Free space "
            f"{rerun_hint}.") from err


def extract_state_dict(ckpt: Mapping, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The weights inside any accepted checkpoint layout, without wrapper prefixes."""
    state = ckpt
    for key in ("model", "state_dict", "module"):
        if isinstance(ckpt.get(key), Mapping):
            state = ckpt[key]
            break
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry '{name}' is a {type(value).__name__}, not a tensor; "
                                  "this does not look like a model checkpoint.")
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


# ------------------------------------------------------------------------------ surgery
@dataclass
class LoadReport:
    source: str
    loaded: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)
    adapted: List[str] = field(default_factory=list)
    kept_model_value: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        def few(keys):
            return ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for label, keys in (("interpolated", self.interpolated), ("adapted", self.adapted),
                            ("kept the model's fixed value", self.kept_model_value),
                            ("dropped (shape of another head)", self.dropped),
                            ("missing (left initialised)", self.missing),
                            ("unexpected (ignored)", self.unexpected)):
            if keys:
                lines.append(f"  {label}: {few(keys)}")
        return "\n".join(lines)


def _grid_of(model: nn.Module):
    grid = getattr(model, "grid", None)
    if grid is None:
        raise CheckpointError("cannot resample position embeddings: the model has no 'grid' attribute")
    return tuple(grid)


def _adapt_tensor(name, value, target: nn.Parameter, model, report, drop_prefixes, hint: str):
    """Return the tensor to load for ``name``, or None to leave the model's value."""
    if value.shape == target.shape:
        report.loaded.append(name)
        return value
    if name in POS_EMBED_KEYS and not target.requires_grad:
        report.kept_model_value.append(name)  # fixed sin-cos: the model computed it for its grid
        return None
    if name == "pos_embed" and value.ndim == 3 and value.shape[2] == target.shape[2]:
        prefix = 1 if hasattr(model, "cls_token") else 0
        try:
            resampled = resample_pos_embed(value, _grid_of(model), num_prefix_tokens=prefix)
        except ValueError:
            resampled = None  # not a square grid of the model's kind: reported as a mismatch below
        if resampled is not None:
            report.interpolated.append(f"{name} {tuple(value.shape)}->{tuple(target.shape)}")
            return resampled
    if name in FIRST_CONV_KEYS and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
        report.adapted.append(f"{name} {value.shape[1]}->{target.shape[1]} input channels")
        return adapt_input_conv(target.shape[1], value.float()).to(value.dtype)
    if name.startswith(tuple(drop_prefixes)):
        report.dropped.append(f"{name} {tuple(value.shape)}")
        return None
    raise CheckpointError(f"{report.source}: '{name}' has shape {tuple(value.shape)} in the checkpoint "
                          f"but {tuple(target.shape)} in the model: the checkpoint is of another "
                          f"architecture or size; {hint}.")


def load_weights(model: nn.Module, source: Union[str, os.PathLike, Mapping], *,
                 allowed_missing: Sequence[str] = (), allow_unexpected: bool = True,
                 drop_mismatched: Iterable[str] = (), source_name: Optional[str] = None,
                 hint: str = "check --model (and --nb_classes / --input_size)") -> LoadReport:
    """Load ``source`` (a path, a checkpoint dict or a state dict) into ``model``.

    ``source_name``: how errors and the report name a dict ``source`` (the file it was read from).
    ``hint``: what the error of a checkpoint of another architecture tells the user to check (the
    setting that chose the model: ``--model`` for the scripts, a config key for the segmentation side).

    ``allowed_missing``: key prefixes that may be absent (e.g. ``('head.', 'fc_norm.')`` when
    fine-tuning from a pretraining checkpoint); any other missing key is an error.
    ``drop_mismatched``: key prefixes whose tensors are skipped when their shape differs
    (e.g. a classifier head of another class count).
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        state = extract_state_dict(load_checkpoint_file(name), name)
    else:
        name = source_name or "state dict"
        state = extract_state_dict(source, name)
    report = LoadReport(source=name)
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    # Name checks first: a checkpoint of another family fails on names, which says more than shapes.
    report.missing = [k for k in targets if k not in state and not _is_non_persistent(model, k)]
    report.unexpected = [k for k in state if k not in targets]
    bad_missing = [k for k in report.missing if not k.startswith(tuple(allowed_missing))]
    if bad_missing:
        raise CheckpointError(
            f"{name}: {len(bad_missing)} weights of the model are missing from the checkpoint "
            f"(first: {', '.join(bad_missing[:6])}). It was made for another architecture; {hint}.")
    if report.unexpected and not allow_unexpected:
        raise CheckpointError(f"{name}: unexpected weights {', '.join(report.unexpected[:6])}: the "
                              f"checkpoint is of another architecture; {hint}.")
    to_load = {}
    for key, value in state.items():
        if key in targets:
            new_value = _adapt_tensor(key, value, targets[key], model, report, drop_mismatched, hint)
            if new_value is not None:
                to_load[key] = new_value
    model.load_state_dict(to_load, strict=False)
    return report


def _is_non_persistent(model: nn.Module, key: str) -> bool:
    module_name, _, buffer_name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer_name in getattr(module, "_non_persistent_buffers_set", set())
