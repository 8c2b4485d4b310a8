"""Make mmsegmentation 1.2.2 + mmengine 0.10.7 + mmcv-lite 2.1.0 work on current PyTorch.

Import this module **before** anything imports ``mmseg`` (the SEG tools import it first; the
configs list it in ``custom_imports``). Importing it installs every patch below; installing again
is a no-op, also when the file is imported under two names (``mmseg_compat`` with ``SEG/`` on
``sys.path``, or ``SEG.mmseg_compat`` from the repository root): each patch checks the state it
changes, not a flag of this module.

Patches
-------
1. ``mmcv.ops`` namespace (only when mmcv has no compiled ``mmcv._ext``, i.e. mmcv-lite).
   mmseg imports ``mmcv.ops`` eagerly at start-up (``point_sample`` in ``mmseg.models.utils``,
   ``mmseg.utils.mask_classification`` and the SAN head; ``sigmoid_focal_loss`` at the top of
   ``mmseg.models.losses.focal_loss``). mmcv-lite ships the Python files of ``mmcv.ops`` but not the
   compiled extension, and the real ``mmcv/ops/__init__.py`` imports all ~60 ops at once, so the
   first compiled one ends the import of mmseg with ``No module named 'mmcv._ext'``.
   The patch puts a namespace module at ``sys.modules['mmcv.ops']`` whose ``__path__`` is mmcv's
   own ``ops`` folder, so the real ``__init__`` never runs but the real submodules stay importable:

   * ops written in pure PyTorch come from mmcv's own files, imported when first asked for
     (``point_sample``, ``SimpleRoIAlign``, ``rel_roi_point_to_rel_img_point`` eagerly, because
     mmseg needs them at start-up; ``CrissCrossAttention``, ``CornerPool``, ``conv2d`` ... lazily).
     Which name lives in which file is read from mmcv's ``ops/__init__.py`` (``ast``), so the
     table follows the installed mmcv rather than a copy in this file;
   * ``sigmoid_focal_loss`` (compiled in mmcv; imported unconditionally by mmseg and called only
     for CUDA tensors) is re-expressed with ``torchvision.ops.sigmoid_focal_loss``, with mmcv's
     signature and semantics (class-index targets, index == num_classes means background,
     optional per-class ``weight`` applied by target class, ``'mean'`` = sum / N);
   * every other compiled op raises :class:`MmcvOpUnavailableError`, a ``ModuleNotFoundError``
     (so mmseg's and mmcv's own ``try: from mmcv.ops import X / except ModuleNotFoundError``
     fallbacks keep working) whose message names the op and the fix.

   With the full mmcv (``mmcv._ext`` present) nothing is patched: the real ``mmcv.ops`` is used.

2. Checkpoint allow-list for ``torch.load(weights_only=True)``, the default since torch 2.6.
   mmengine 0.10.7 calls ``torch.load`` without ``weights_only`` (``CheckpointLoader`` for local
   files, URLs and ``torchvision://``/``open-mmlab://`` hub files; so ``load_from``, ``resume``,
   ``init_cfg=dict(type='Pretrained')`` and ``tools/test.py`` all go through it), and its
   checkpoints pickle more than tensors: the top-level ``message_hub`` entry holds
   :class:`mmengine.logging.HistoryBuffer` objects with numpy arrays inside, numpy scalars appear
   in logged values, and ``HistoryBuffer.__getstate__`` also pickles its statistics methods,
   which pickle protocol 2 writes as ``getattr(HistoryBuffer, 'min')``. Without the patch:
   ``Weights only load failed ... Unsupported global: GLOBAL
   mmengine.logging.history_buffer.HistoryBuffer``, then ``... GLOBAL getattr``.
   The patch registers exactly those types with ``torch.serialization.add_safe_globals`` (see
   :data:`SAFE_GLOBALS`): ``HistoryBuffer``, ``numpy.ndarray`` with ``_reconstruct``, ``dtype``
   and the numeric/string dtype classes (no object dtype), numpy ``scalar``; and, under the name
   ``builtins.getattr``, a stand-in that resolves only public methods of ``HistoryBuffer`` (the
   real ``getattr`` would let a checkpoint reach any attribute of any allowed object). torch's
   restricted unpickler stays on, so a pickle naming any other callable (``os.system``,
   ``eval``, arbitrary classes, ``getattr`` on anything else) is still refused. Safety is not
   switched off anywhere.

Not patches, but facts of the stack that ``stack_problems()`` checks (pins in
``requirements.txt``):

* ``ftfy`` and ``regex``: mmseg imports them (CLIP tokenizer of the SAN/VPD models, imported by
  ``mmseg.models``) but does not declare them.
* ``setuptools<82``: 82 removed ``pkg_resources``, which mmengine uses to resolve
  ``mmseg::`` base-config imports (``_base_ = ['mmseg::_base_/...']``).
* ``mmcv<2.2.0``: mmseg 1.2.2 asserts it at import.
"""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Optional

__all__ = ['MmcvOpUnavailableError', 'SAFE_GLOBALS', 'install', 'stack_problems']

# Names in ``mmcv.ops`` that mmseg imports at start-up and that are pure PyTorch in mmcv: they
# are imported when the shim is installed (binding them before anyone can import the
# ``mmcv.ops.point_sample`` submodule, whose name would otherwise shadow the function).
_EAGER_SUBMODULES = ('point_sample',)

_SHIM_MARKER = '__deblurringmim_shim__'


class MmcvOpUnavailableError(ModuleNotFoundError):
    """A compiled ``mmcv.ops`` operator was asked for, but mmcv-lite has no compiled ops."""


def _unavailable_message(name: str) -> str:
    return (f'mmcv.ops.{name} is a compiled operator of mmcv (needs mmcv._ext), and the installed '
            'mmcv-lite has no compiled ops. The DeblurringMIM segmentation models (UPerNet with '
            'ConvViT/ViT backbones) do not use it. To use a model that does, install the full '
            '`mmcv` package (<2.2.0) built for your torch/CUDA in place of mmcv-lite; '
            'SEG/mmseg_compat.py then leaves mmcv.ops alone.')


def _has_compiled_mmcv() -> bool:
    try:
        return importlib.util.find_spec('mmcv._ext') is not None
    except (ImportError, ValueError):
        return False


def _index_ops(ops_dir: str) -> dict:
    """Map each public name of mmcv's ``ops/__init__.py`` to (submodule, name in submodule)."""
    init_file = os.path.join(ops_dir, '__init__.py')
    try:
        with open(init_file, encoding='utf-8') as f:
            tree = ast.parse(f.read(), filename=init_file)
    except (OSError, SyntaxError):
        return {}
    index = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                index[alias.asname or alias.name] = (node.module, alias.name)
    return index


def _sigmoid_focal_loss(input, target, gamma: float = 2.0, alpha: float = 0.25,
                        weight=None, reduction: str = 'mean'):
    """``mmcv.ops.sigmoid_focal_loss`` through ``torchvision.ops.sigmoid_focal_loss``.

    ``input`` (N, C) logits, ``target`` (N,) class indices in [0, C] (C = background: negative
    for every class), ``weight`` optional (C,) weights applied by each row's target class.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.ops import sigmoid_focal_loss

    if reduction not in ('none', 'mean', 'sum'):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if input.dim() != 2 or target.dim() != 1 or input.size(0) != target.size(0):
        raise ValueError(f'expected input (N, C) and target (N,), got {tuple(input.shape)} and '
                         f'{tuple(target.shape)}')
    num_classes = input.size(1)
    one_hot = F.one_hot(target.long(), num_classes + 1)[:, :num_classes].to(input.dtype)
    loss = sigmoid_focal_loss(input, one_hot, alpha=float(alpha), gamma=float(gamma),
                              reduction='none')
    if weight is not None:
        # mmcv scales a whole row by the weight of its target class (background rows: 1 here).
        padded = torch.cat([weight.to(loss.dtype), loss.new_ones(1)])
        loss = loss * padded[target.long()].unsqueeze(1)
    if reduction == 'mean':
        return loss.sum() / input.size(0)
    if reduction == 'sum':
        return loss.sum()
    return loss


class _MmcvOpsNamespace(types.ModuleType):
    """Stand-in for ``mmcv.ops``: pure ops from mmcv's files, a clear error for compiled ones."""

    def __getattr__(self, name: str):
        if name.startswith('__'):
            raise AttributeError(name)
        index = self.__dict__.get('_op_index', {})
        if name not in index:
            raise AttributeError(f"module 'mmcv.ops' has no attribute {name!r}")
        submodule, attr = index[name]
        try:
            module = importlib.import_module(f'{self.__name__}.{submodule}')
        except ModuleNotFoundError as exc:
            if exc.name == 'mmcv._ext':
                raise self.MmcvOpUnavailableError(_unavailable_message(name),
                                                  name='mmcv._ext') from None
            raise
        # Bind every op of that file after the import: importing ``mmcv.ops.<sub>`` sets the
        # attribute <sub> to the submodule, which must not shadow an op of the same name.
        for op_name, (op_sub, op_attr) in index.items():
            if op_sub == submodule:
                setattr(self, op_name, getattr(module, op_attr))
        return self.__dict__[name]

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self.__dict__.get('_op_index', {})))


def _install_mmcv_ops_shim() -> bool:
    """Install patch 1; return True when the shim is (already) in place."""
    current = sys.modules.get('mmcv.ops')
    if current is not None and getattr(current, _SHIM_MARKER, False):
        return True
    try:
        import mmcv
    except ImportError:
        return False  # not installed: stack_problems() says so, mmseg's import fails anyway
    if _has_compiled_mmcv():
        return False  # full mmcv: the real mmcv.ops works

    ops_dir = os.path.join(os.path.dirname(mmcv.__file__), 'ops')
    shim = _MmcvOpsNamespace('mmcv.ops', 'mmcv-lite stand-in installed by SEG/mmseg_compat.py')
    shim.__spec__ = importlib.machinery.ModuleSpec('mmcv.ops', None, is_package=True)
    shim.__spec__.submodule_search_locations = [ops_dir]
    shim.__path__ = [ops_dir]
    shim.__package__ = 'mmcv.ops'
    shim.__file__ = os.path.abspath(__file__)
    shim._op_index = _index_ops(ops_dir)
    shim.MmcvOpUnavailableError = MmcvOpUnavailableError
    setattr(shim, _SHIM_MARKER, True)
    shim.sigmoid_focal_loss = _sigmoid_focal_loss
    sys.modules['mmcv.ops'] = shim
    mmcv.ops = shim
    for submodule in _EAGER_SUBMODULES:
        names = [name for name, (sub, _) in shim._op_index.items() if sub == submodule]
        if names:
            getattr(shim, names[0])  # binds every name of that file
    return True


def _history_buffer_method(owner, name):
    """Stand-in for ``builtins.getattr`` inside ``torch.load(weights_only=True)``.

    ``HistoryBuffer.__getstate__`` pickles its statistics methods (``HistoryBuffer.min`` ...);
    pickle protocol 2 (torch's) writes a method as ``getattr(HistoryBuffer, 'min')``. Allowing
    the real ``getattr`` would let a checkpoint reach any attribute of any allowed object, so
    only public functions defined on ``HistoryBuffer`` itself are resolved; all else is refused.
    """
    import pickle

    from mmengine.logging import HistoryBuffer

    if (owner is HistoryBuffer and isinstance(name, str) and not name.startswith('_')
            and isinstance(vars(HistoryBuffer).get(name), types.FunctionType)):
        return vars(HistoryBuffer)[name]
    raise pickle.UnpicklingError(
        f'refused getattr({getattr(owner, "__qualname__", type(owner).__name__)}, {name!r}) in a '
        'checkpoint: SEG/mmseg_compat.py only allows the statistics methods of mmengine\'s '
        'HistoryBuffer here')


def _safe_globals() -> list:
    import numpy as np
    from mmengine.logging import HistoryBuffer

    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    # No object dtype ('O'): an object array would carry arbitrary pickled objects.
    dtype_classes = [type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDGUS']
    return [
        HistoryBuffer,  # mmengine MessageHub log/runtime buffers (meta.message_hub)
        (_history_buffer_method, 'builtins.getattr'),  # their statistics methods, see above
        np.ndarray, _reconstruct,  # arrays inside HistoryBuffer
        np.dtype, *dtype_classes,  # their dtypes (BUILD checks the dtype's own class)
        scalar,  # numpy scalars (e.g. a logged np.float64, a numpy seed)
        # the same functions under their numpy 1.x names (checkpoints written with numpy < 2)
        (_reconstruct, 'numpy.core.multiarray._reconstruct'),
        (scalar, 'numpy.core.multiarray.scalar'),
    ]


#: The exact types :func:`install` allows through ``torch.load(weights_only=True)``.
SAFE_GLOBALS: list = []


def _global_key(entry) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f'{entry.__module__}.{entry.__qualname__}'


def _install_checkpoint_allowlist() -> None:
    """Install patch 2. Entries whose name torch already allows are left as they are, so a
    second copy of this module (imported under another name) adds nothing."""
    import torch
    import torch.serialization

    if not hasattr(torch.serialization, 'add_safe_globals'):
        return  # torch < 2.4: no weights_only allow-list, and weights_only is off by default
    if not SAFE_GLOBALS:
        try:
            entries = _safe_globals()
        except ImportError:
            return  # mmengine not installed: stack_problems() says so
        # (callable, 'name') entries are understood from torch 2.6 on; before 2.6 weights_only
        # defaults to False, and without them only a method of HistoryBuffer stays refused.
        major_minor = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2])
        if major_minor < (2, 6):
            entries = [e for e in entries if not isinstance(e, tuple)]
        SAFE_GLOBALS.extend(entries)
    get_safe_globals = getattr(torch.serialization, 'get_safe_globals', list)  # torch >= 2.5
    present = {_global_key(e) for e in get_safe_globals()}
    missing = [e for e in SAFE_GLOBALS if _global_key(e) not in present]
    if missing:
        torch.serialization.add_safe_globals(missing)


def install() -> None:
    """Install all patches (idempotent). Called on import."""
    global MmcvOpUnavailableError
    _install_mmcv_ops_shim()
    shim = sys.modules.get('mmcv.ops')
    if getattr(shim, _SHIM_MARKER, False):
        # One error class, whichever copy of this file installed the shim.
        MmcvOpUnavailableError = shim.MmcvOpUnavailableError
    _install_checkpoint_allowlist()


def stack_problems() -> list:
    """Return one clear sentence per problem of the installed segmentation stack (empty: fine)."""
    from importlib import metadata

    problems = []
    for dist, why in (('mmsegmentation', 'the segmentation framework'),
                      ('mmengine', 'the training runner'),
                      ('ftfy', 'mmseg imports it but does not declare it'),
                      ('regex', 'mmseg imports it but does not declare it')):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            problems.append(f'{dist} is not installed ({why}): pip install -r '
                            'requirements.txt')
    mmcv_version = None
    for dist in ('mmcv', 'mmcv-lite'):
        try:
            mmcv_version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            pass
    if mmcv_version is None:
        problems.append('neither mmcv nor mmcv-lite is installed: pip install -r '
                        'requirements.txt')
    else:
        parts = tuple(int(p) for p in mmcv_version.split('.')[:2] if p.isdigit())
        if parts >= (2, 2):
            problems.append(f'mmcv {mmcv_version} is installed but mmseg 1.2.2 needs mmcv<2.2.0: '
                            'pip install mmcv-lite==2.1.0')
    if importlib.util.find_spec('pkg_resources') is None:
        problems.append("pkg_resources is missing (setuptools>=82 removed it); mmseg:: base "
                        "configs need it: pip install 'setuptools<82'")
    return problems


install()
