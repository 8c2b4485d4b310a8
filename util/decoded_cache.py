"""A pre-decoded, memory-mapped cache of the pretraining images (optional, ``--cache_dir``).

Why
    Without a cache every epoch decodes every source file again (a 512 x 512 PNG takes about 2.4 ms)
    and, with on-the-fly blur, blurs it again; together they dominate the per-sample cost of the
    loader. The cache does that work once: later epochs only slice a memory-mapped uint8 array and
    resize the crop.

What it stores
    For every sample ``i`` exactly the two arrays the dataset's ``load(i)`` returned while the cache was
    built: the decoded, blurred (when blurring on the fly) and channel-converted input and its target
    (or no target in vanilla mode), at full resolution, bit-identical, with their dtype (uint8 or
    uint16) and shape. Crops, flips and resizing are still drawn per epoch from these arrays, so the
    augmentation is the same as without a cache. A sample whose file could not be decoded is stored
    as "unreadable" with the file's path, the reason and the advice; reading it raises the same
    :class:`~util.image_io.UnreadableImageError` again, and the dataset substitutes the next sample
    exactly as it does without a cache.

Layout (``<cache_dir>/<key>/``)
    ``chunk-00000.bin``   the arrays of samples ``0 .. chunk_size-1``, raw bytes back to back (each
                          array starts at a multiple of 64 bytes);
    ``chunk-00000.json``  that chunk's index: for each sample and each of its two arrays the byte
                          offset, shape and dtype, or ``null`` (no target), or the unreadable file's
                          path and reason; written after its ``.bin``, so a chunk is done exactly when
                          its index exists;
    ...
    ``meta.json``         written last, when every chunk is done: format version, key, number of
                          samples, chunk size, the description, creation time, total bytes, number of
                          unreadable samples. It marks the cache complete.
    Every file is written through :mod:`util.fileio` (temporary file + atomic rename).

Key and invalidation
    ``key = cache_key(description, source_files)``: a hash of :data:`FORMAT_VERSION`, the
    description (blur settings, channel mode, list of samples, ...) and the path, size and
    modification time of every source file. Changing, adding or removing a source file, another blur
    or another channel mode gives another key and therefore another folder; an old folder is never
    reused for different data (and never deleted by this module).

Resume and concurrency
    A build that was killed (or failed) leaves its finished chunks behind; the next build only makes
    the missing ones. Temporary files a killed write left behind are ignored, and removed once they
    are an hour old. Two processes that build the same key at once (e.g. two nodes sharing a file
    system) write identical files atomically, so the result is correct either way. Processes that
    must not build (``build=False``, e.g. the DDP ranks other than local rank 0) wait until
    ``meta.json`` appears.

Disk cost
    The arrays are stored uncompressed: a 512 x 512 grey input plus its target is 0.5 MiB, so 280k
    pairs take about 140 GiB. The build checks the free space after its first chunk and stops with a
    clear message if the rest will not fit.

A cache folder is only a copy of work that can be redone: it is always safe to delete (a later run
with ``--cache_dir`` rebuilds it).
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence

import numpy as np

from util.fileio import atomic_path, atomic_write_text
from util.image_io import UnreadableImageError

FORMAT_VERSION = 1

_META = "meta.json"
_ALIGN = 64  # every array starts at a multiple of this many bytes in its chunk file
_MAX_OPEN_CHUNKS = 64  # memory maps kept open per process (each one holds a file descriptor)
_STALE_TEMP_SECONDS = 3600.0  # a temporary file untouched this long belongs to a dead writer
# The hidden temporary names util.fileio.atomic_path makes for this module's files.
_TEMP_NAME = re.compile(r"^\.(chunk-\d+\.(bin|json)|meta\.json)\..+\.tmp\.(bin|json)$")
# dtype codes in a chunk's in-memory index besides the indices into its dtype list
_ABSENT = -1
_UNREADABLE = -2
_GIB = float(1 << 30)


class CacheError(RuntimeError):
    """The cache cannot be built or used; the message names the cache folder and the fix."""


def cache_key(description: dict, source_files: Sequence[Sequence[str]]) -> str:
    """Hex digest (16 characters of a sha256) of :data:`FORMAT_VERSION`, ``description`` (as JSON with
    sorted keys) and the ``(path, size, mtime_ns)`` of every source file of every sample (a missing
    file contributes its path and ``None``).

    A changed, added or removed source file, another blur or another channel mode (anything the
    caller puts into ``description``) gives another key.
    """
    digest = hashlib.sha256()
    digest.update(f"decoded-cache-format-{FORMAT_VERSION}\n".encode())
    try:
        text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise TypeError(f"cache_key: the description must be plain JSON data (str, numbers, lists, "
                        f"dicts): {err}") from None
    digest.update(text.encode())
    digest.update(b"\n")
    for index, files in enumerate(source_files):
        if isinstance(files, (str, bytes, os.PathLike)):
            files = (files,)
        entries = []
        for path in files:
            path = os.fspath(path)
            try:
                st = os.stat(path)
                entries.append([path, st.st_size, st.st_mtime_ns])
            except FileNotFoundError:
                entries.append([path, None])
        digest.update(json.dumps([index, entries], separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# File names and messages


def _chunk_stem(folder: str, k: int) -> str:
    return os.path.join(folder, f"chunk-{k:05d}")


def _delete_hint(folder: str) -> str:
    return f"delete that folder (rm -r {folder}) and run again to rebuild it"


def _write_error(folder: str, err: OSError) -> CacheError:
    reason = err.strerror or str(err)
    return CacheError(f"cannot write the decoded image cache in {folder}: {reason}. Free space there or "
                      "fix its permissions, pass another --cache_dir, or train without --cache_dir.")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ----------------------------------------------------------------------------------------------------
# Building one chunk (in-process or in a pool worker)


def _array_entry(array, what: str, name: str, offset: int):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"decoded cache: load() returned {type(array).__name__} as the {what} of {name}; "
                        "expected a numpy array")
    if array.dtype.hasobject:
        raise TypeError(f"decoded cache: the {what} of {name} has dtype {array.dtype}; expected a "
                        "numeric array")
    return [offset, [int(s) for s in array.shape], array.dtype.str]


def _build_chunk(folder: str, key: str, k: int, start: int, stop: int, names: Sequence[str],
                 load: Callable[[int], tuple]) -> tuple[int, int, int, int]:
    """Write ``chunk-k.bin`` and then ``chunk-k.json`` for samples ``start .. stop-1``.

    Returns ``(k, bytes, unreadable samples, samples)``. Exceptions of ``load`` other than
    UnreadableImageError propagate unchanged; an OSError while writing becomes one CacheError.
    """
    done = _chunk_done(folder, key, k, start, stop)
    if done is not None:  # another process finished it meanwhile
        return (k, done[0], done[1], stop - start)
    stem = _chunk_stem(folder, k)
    entries = []
    unreadable = 0
    offset = 0
    stage = "write"
    try:
        with atomic_path(stem + ".bin") as tmp, open(tmp, "wb") as out:
            for i in range(start, stop):
                name = names[i - start]
                stage = "load"
                try:
                    result = load(i)
                except UnreadableImageError as err:
                    entries.append({"name": name, "unreadable": [err.path, err.reason, err.advice]})
                    unreadable += 1
                    stage = "write"
                    continue
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise TypeError(f"decoded cache: load({i}) must return (input, target or None), "
                                    f"got {type(result).__name__}")
                stage = "write"
                entry = {"name": name}
                for what, array in zip(("input", "target"), result):
                    if array is None and what == "target":
                        entry[what] = None
                        continue
                    entry[what] = _array_entry(array, what, name, offset)
                    data = np.ascontiguousarray(array)
                    out.write(memoryview(data.reshape(-1).view(np.uint8)))
                    offset += data.nbytes
                    pad = -offset % _ALIGN
                    if pad:
                        out.write(b"\0" * pad)
                        offset += pad
                entries.append(entry)
            stage = "write"
        index = {"format_version": FORMAT_VERSION, "key": key, "chunk": k, "start": start, "stop": stop,
                 "bytes": offset, "unreadable": unreadable, "samples": entries}
        atomic_write_text(stem + ".json", json.dumps(index, separators=(",", ":")))
    except OSError as err:
        if stage == "load":
            raise
        raise _write_error(folder, err) from None
    return (k, offset, unreadable, stop - start)


def _chunk_done(folder: str, key: str, k: int, start: int, stop: int):
    """``(bytes, unreadable)`` of a finished chunk that matches this layout, else None."""
    stem = _chunk_stem(folder, k)
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            index = json.load(f)
        size = os.path.getsize(stem + ".bin")
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    expected = {"format_version": FORMAT_VERSION, "key": key, "chunk": k, "start": start, "stop": stop}
    if any(index.get(name) != value for name, value in expected.items()):
        return None
    if index.get("bytes") != size or len(index.get("samples", ())) != stop - start:
        return None
    return int(index["bytes"]), int(index.get("unreadable", 0))


_WORKER_LOAD = None


def _init_worker(load) -> None:
    global _WORKER_LOAD
    # each worker decodes whole images; library thread pools would only oversubscribe the cores
    import cv2
    import torch
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _WORKER_LOAD = load


def _worker_task(task):
    folder, key, k, start, stop, names = task
    return _build_chunk(folder, key, k, start, stop, names, _WORKER_LOAD)


# ----------------------------------------------------------------------------------------------------
# Reading


class _ChunkIndex:
    """One chunk's index in compact numpy form (a Python dict per sample would cost ~0.5 KB each in
    every DataLoader worker)."""

    __slots__ = ("nbytes", "offsets", "ndims", "shapes", "codes", "dtypes", "unreadable")

    def __init__(self, index: dict):
        samples = index["samples"]
        n = len(samples)
        width = 1
        for s in samples:
            for what in ("input", "target"):
                if s.get(what):
                    width = max(width, len(s[what][1]))
        self.nbytes = int(index["bytes"])
        self.offsets = np.zeros((n, 2), dtype=np.int64)
        self.ndims = np.zeros((n, 2), dtype=np.int8)
        self.shapes = np.zeros((n, 2, width), dtype=np.int64)
        self.codes = np.full((n, 2), _ABSENT, dtype=np.int16)
        self.dtypes: list[np.dtype] = []
        self.unreadable: dict[int, tuple[str, ...]] = {}
        dtype_ids: dict[str, int] = {}
        for j, s in enumerate(samples):
            if "unreadable" in s:
                # (path, reason, advice); caches built before the advice was kept hold two
                self.unreadable[j] = tuple(s["unreadable"])
                self.codes[j] = _UNREADABLE
                continue
            for slot, what in enumerate(("input", "target")):
                entry = s.get(what)
                if entry is None:
                    if what == "input":
                        raise ValueError(f"sample {j} has no input")
                    continue
                offset, shape, dtype = entry
                if dtype not in dtype_ids:
                    dtype_ids[dtype] = len(self.dtypes)
                    self.dtypes.append(np.dtype(dtype))
                self.offsets[j, slot] = offset
                self.ndims[j, slot] = len(shape)
                self.shapes[j, slot, :len(shape)] = shape
                self.codes[j, slot] = dtype_ids[dtype]


class DecodedCache:
    """A complete cache folder, read through per-process memory maps. Create with :meth:`open_or_build`."""

    def __init__(self, folder: str, meta: dict):
        self._folder = folder
        self._key = meta["key"]
        self._num_samples = int(meta["num_samples"])
        self._chunk_size = int(meta["chunk_size"])
        self._indexes: dict[int, _ChunkIndex] = {}
        self._maps: collections.OrderedDict = collections.OrderedDict()
        self._pid = os.getpid()

    # -- opening and building ----------------------------------------------------------------------

    @classmethod
    def open_or_build(cls, cache_dir: str, key: str, num_samples: int, load: Callable[[int], tuple],
                      sample_names: Sequence[str], *, num_workers: int = 0, build: bool = True,
                      description: dict | None = None, chunk_size: int = 256, poll_seconds: float = 5.0,
                      log=print) -> "DecodedCache":
        """Open ``cache_dir/<key>/`` once it is complete (its ``meta.json`` exists).

        If it is not complete: with ``build`` build it (only the chunks a killed build did not finish;
        ``num_workers`` > 0 builds in a fork-server process pool, each task writing one chunk), then
        open it; without ``build`` (another process builds it) wait, checking every ``poll_seconds``,
        until it is complete.

        ``load(i)`` returns ``(input, target or None)`` as numpy arrays and must be picklable for
        ``num_workers`` > 0; ``sample_names[i]`` names sample ``i`` (its source path) in messages.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        if len(sample_names) != num_samples:
            raise ValueError(f"{len(sample_names)} sample names for {num_samples} samples")
        if not key or os.sep in key or key in (".", ".."):
            raise ValueError(f"invalid cache key {key!r}")
        folder = os.path.join(os.fspath(cache_dir), key)
        meta_path = os.path.join(folder, _META)
        if not os.path.exists(meta_path):
            if build:
                _note_other_caches(os.fspath(cache_dir), key, log)
                _Builder(folder, key, num_samples, load, sample_names, num_workers, description or {},
                         chunk_size, log).run()
            else:
                log(f"waiting for another process to build the decoded image cache in {folder} "
                    f"(checking every {poll_seconds:g} s)")
                while not os.path.exists(meta_path):
                    time.sleep(poll_seconds)
        return cls(folder, _read_meta(folder, key, num_samples))

    # -- reading -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._num_samples

    @property
    def folder(self) -> str:
        return self._folder

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(input, target or None)`` exactly as ``load(index)`` returned them at build time, as
        read-only views of the memory-mapped chunk file (nothing is copied).

        A sample whose ``load`` raised UnreadableImageError at build time raises it again here, with
        the same path and reason.
        """
        index = int(index)
        if index < 0:
            index += self._num_samples
        if not 0 <= index < self._num_samples:
            raise IndexError(f"sample {index} out of range for a cache of {self._num_samples} samples")
        k, j = divmod(index, self._chunk_size)
        chunk = self._chunk_index(k)
        if chunk.codes[j, 0] == _UNREADABLE:
            raise UnreadableImageError(*chunk.unreadable[j])
        data = self._memmap(k, chunk)
        image = self._view(data, chunk, j, 0)
        target = None if chunk.codes[j, 1] == _ABSENT else self._view(data, chunk, j, 1)
        return image, target

    @staticmethod
    def _view(data, chunk: _ChunkIndex, j: int, slot: int) -> np.ndarray:
        dtype = chunk.dtypes[chunk.codes[j, slot]]
        shape = tuple(int(s) for s in chunk.shapes[j, slot, :chunk.ndims[j, slot]])
        if data is None or math.prod(shape) == 0:
            array = np.empty(shape, dtype=dtype)
            array.flags.writeable = False
            return array
        return np.ndarray(shape, dtype=dtype, buffer=data, offset=int(chunk.offsets[j, slot]))

    def _chunk_index(self, k: int) -> _ChunkIndex:
        chunk = self._indexes.get(k)
        if chunk is None:
            path = _chunk_stem(self._folder, k) + ".json"
            start = k * self._chunk_size
            stop = min(start + self._chunk_size, self._num_samples)
            try:
                with open(path, encoding="utf-8") as f:
                    index = json.load(f)
                if (index.get("format_version") != FORMAT_VERSION or index.get("start") != start
                        or index.get("stop") != stop or len(index.get("samples", ())) != stop - start):
                    raise ValueError("it belongs to another layout or format version")
                chunk = _ChunkIndex(index)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CacheError(f"the decoded image cache in {self._folder} is damaged ({path}: {err}); "
                                 f"{_delete_hint(self._folder)}") from None
            self._indexes[k] = chunk
        return chunk

    def _memmap(self, k: int, chunk: _ChunkIndex):
        if self._pid != os.getpid():  # forked or unpickled in a DataLoader worker: own maps
            self._maps = collections.OrderedDict()
            self._pid = os.getpid()
        if chunk.nbytes == 0:
            return None
        data = self._maps.get(k)
        if data is not None:
            self._maps.move_to_end(k)
            return data
        path = _chunk_stem(self._folder, k) + ".bin"
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as err:
            raise CacheError(f"cannot read the decoded image cache file {path} ({err}); "
                             f"{_delete_hint(self._folder)}") from None
        if data.size < chunk.nbytes:
            raise CacheError(f"the decoded image cache file {path} is truncated ({data.size} of "
                             f"{chunk.nbytes} bytes); {_delete_hint(self._folder)}")
        # views handed out keep their map alive; dropping ours only bounds the open file descriptors
        self._maps[k] = data
        if len(self._maps) > _MAX_OPEN_CHUNKS:
            self._maps.popitem(last=False)
        return data

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = collections.OrderedDict()  # memory maps are per process
        state["_pid"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"DecodedCache({self._folder!r}, {self._num_samples} samples)"


def _read_meta(folder: str, key: str, num_samples: int) -> dict:
    path = os.path.join(folder, _META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read {path} ({err}); {_delete_hint(folder)}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"the decoded image cache in {folder} has format version {version}, this code "
                         f"reads version {FORMAT_VERSION}; {_delete_hint(folder)}")
    if meta.get("num_samples") != num_samples:
        raise CacheError(f"the decoded image cache in {folder} holds {meta.get('num_samples')} samples, "
                         f"the dataset has {num_samples}; {_delete_hint(folder)}")
    if meta.get("key") != key or not isinstance(meta.get("chunk_size"), int) or meta["chunk_size"] < 1:
        raise CacheError(f"{path} does not describe this cache (key {meta.get('key')!r}, chunk size "
                         f"{meta.get('chunk_size')!r}); {_delete_hint(folder)}")
    return {name: meta[name] for name in ("key", "num_samples", "chunk_size")}


def _note_other_caches(cache_dir: str, key: str, log) -> None:
    """Say which complete caches of other data or settings ``cache_dir`` already holds: a changed
    file or blur setting builds a new cache beside the old one, and at ~0.5 MiB per image the old
    ones are worth deleting once no run needs them (nothing is deleted here)."""
    try:
        names = sorted(os.listdir(cache_dir))
    except OSError:
        return
    others = []
    for name in names:
        try:
            with open(os.path.join(cache_dir, name, _META), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if name != key and isinstance(meta, dict):
            others.append((name, float(meta.get("total_bytes", 0)) / _GIB))
    if others:
        listed = ", ".join(f"{name} ({gib:.1f} GiB)" for name, gib in others)
        log(f"{cache_dir} also holds {len(others)} decoded cache(s) of other files or settings: {listed}; "
            "delete those no run uses any more (each folder's meta.json says what it holds)")


# ----------------------------------------------------------------------------------------------------
# The build


class _Builder:
    def __init__(self, folder, key, num_samples, load, sample_names, num_workers, description,
                 chunk_size, log):
        self.folder, self.key, self.num_samples = folder, key, num_samples
        self.load, self.names, self.num_workers = load, sample_names, num_workers
        self.description, self.chunk_size, self.log = description, chunk_size, log
        self.num_chunks = -(-num_samples // chunk_size)
        self.stats: dict[int, tuple[int, int, int]] = {}  # chunk -> (bytes, unreadable, samples)
        self.space_checked = False

    def bounds(self, k: int) -> tuple[int, int]:
        start = k * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)

    def run(self) -> None:
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as err:
            raise _write_error(self.folder, err) from None
        self.remove_stale_temps()
        todo = []
        for k in range(self.num_chunks):
            start, stop = self.bounds(k)
            done = _chunk_done(self.folder, self.key, k, start, stop)
            if done is None:
                todo.append(k)
            else:
                self.stats[k] = (done[0], done[1], stop - start)
        if todo:
            self.build(todo)
        self.write_meta()

    def remove_stale_temps(self) -> None:
        """Remove our temporary files that a killed write left behind (an hour old: a live writer
        touches its file at every sample, and must never lose it under its feet)."""
        now = time.time()
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if not _TEMP_NAME.match(name):
                continue
            path = os.path.join(self.folder, name)
            try:
                if now - os.path.getmtime(path) > _STALE_TEMP_SECONDS:
                    os.remove(path)
            except OSError:
                pass

    def build(self, todo: list[int]) -> None:
        total = sum(self.bounds(k)[1] - self.bounds(k)[0] for k in todo)
        workers = min(self.num_workers, len(todo)) if self.num_workers > 0 else 0
        resumed = f" (resuming: {len(self.stats)} chunks already done)" if self.stats else ""
        self.log(f"building the decoded image cache in {self.folder}: {total} images in {len(todo)} "
                 f"chunks, {workers or 'no'} worker processes{resumed}")
        if self.stats:
            self.check_space()
        progress = _Progress(total, self.log)
        tasks = []
        for k in todo:
            start, stop = self.bounds(k)
            tasks.append((self.folder, self.key, k, start, stop, list(self.names[start:stop])))
        if workers == 0:
            for folder, key, k, start, stop, names in tasks:
                self.finished(_build_chunk(folder, key, k, start, stop, names, self.load), progress)
            return
        from util.workers import forkserver_context
        # Never fork: the parent has running threads (OpenCV, torch, the DataLoader's), which do not
        # survive a fork; the children could deadlock. A fork server starts clean processes, which
        # die with this one (util/workers.py).
        context = forkserver_context()
        with context.Pool(workers, initializer=_init_worker, initargs=(self.load,)) as pool:
            for result in pool.imap_unordered(_worker_task, tasks):
                self.finished(result, progress)

    def finished(self, result, progress) -> None:
        k, nbytes, unreadable, samples = result
        self.stats[k] = (nbytes, unreadable, samples)
        progress.update(samples)
        if not self.space_checked:
            self.check_space()

    def check_space(self) -> None:
        """Once, as soon as a chunk is done: stop early if the remaining chunks cannot fit."""
        self.space_checked = True
        done_bytes = sum(s[0] for s in self.stats.values())
        done_samples = sum(s[2] for s in self.stats.values())
        if done_samples == 0:
            return
        needed = done_bytes / done_samples * (self.num_samples - done_samples)
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return
        if free < needed:
            raise CacheError(
                f"not enough disk space for the decoded image cache in {self.folder}: it needs about "
                f"{needed / _GIB:.1f} GiB more, {free / _GIB:.1f} GiB are free. Pass another --cache_dir "
                "on a disk with more space, or train without --cache_dir (images are then decoded every "
                "epoch). The chunks written so far are kept and reused when the build is resumed there.")

    def write_meta(self) -> None:
        path = os.path.join(self.folder, _META)
        total_bytes = sum(s[0] for s in self.stats.values())
        unreadable = sum(s[1] for s in self.stats.values())
        if os.path.exists(path):  # another process completed it: never overwrite a complete cache
            return
        meta = {
            "format_version": FORMAT_VERSION, "key": self.key, "num_samples": self.num_samples,
            "chunk_size": self.chunk_size, "num_chunks": self.num_chunks,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "total_bytes": total_bytes, "unreadable": unreadable, "description": self.description,
        }
        try:
            atomic_write_text(path, json.dumps(meta, indent=1, sort_keys=True) + "\n")
        except OSError as err:
            raise _write_error(self.folder, err) from None
        self.log(f"decoded image cache complete in {self.folder}: {self.num_samples} images, "
                 f"{total_bytes / _GIB:.2f} GiB, {unreadable} unreadable")


class _Progress:
    """A log line at about every 10% with images/s and the remaining time."""

    def __init__(self, total: int, log):
        self.total, self.log = max(total, 1), log
        self.done = 0
        self.next_step = 1
        self.start = time.monotonic()

    def update(self, samples: int) -> None:
        self.done += samples
        step = self.done * 10 // self.total
        if step < self.next_step:
            return
        self.next_step = step + 1
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.log(f"decoded image cache: {self.done}/{self.total} images ({100 * self.done // self.total}%), "
                 f"{rate:.0f} images/s, ETA {_format_seconds(eta)}")
