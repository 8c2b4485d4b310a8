"""util/decoded_cache.py: bit-identical round trip, unreadable samples, parallel build, resume, key,
waiting for another builder, pickling, disk space and write errors, foreign format versions."""
import collections
import errno
import json
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from util import decoded_cache
from util.decoded_cache import CacheError, DecodedCache, cache_key
from util.image_io import UnreadableImageError

N = 23
CHUNK = 5  # 5 chunks, the last one with 3 samples
UNREADABLE = 6


ADVICE = "Install the decoder named above, or convert the file."  # an unreadable file's own advice


class FakeLoader:
    """A picklable stand-in for the dataset: deterministic arrays of varying size, channels and dtype."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at
        self.calls = []

    @staticmethod
    def expected(i):
        rng = np.random.default_rng(1000 + i)
        h, w = 5 + i % 7, 4 + (3 * i) % 9
        if i == 7:  # 16-bit grey pair
            image = rng.integers(0, 65536, (h, w, 1), dtype=np.uint16)
            return image, rng.integers(0, 65536, (h, w, 1), dtype=np.uint16)
        channels = 1 if i % 2 == 0 else 3
        image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        if i == 3:  # a non-contiguous view, as a flipped or cropped decode could be
            image = image[:, ::-1]
        target = rng.integers(0, 256, (h, w, channels), dtype=np.uint8) if i % 3 == 1 else None
        return image, target

    def load(self, i):
        self.calls.append(i)
        if i == self.fail_at:
            raise RuntimeError(f"simulated crash at sample {i}")
        if i == UNREADABLE:
            raise UnreadableImageError(f"/data/train/img{i}.png", "the file is empty (0 bytes)", ADVICE)
        return self.expected(i)


class NeverLoad:
    def load(self, i):
        raise AssertionError("a waiting process must not load anything")


NAMES = [f"/data/train/img{i}.png" for i in range(N)]


def build(cache_dir, loader=None, key="k0", **kwargs):
    loader = loader or FakeLoader()
    kwargs.setdefault("log", lambda msg: None)
    return DecodedCache.open_or_build(str(cache_dir), key, N, loader.load, NAMES, chunk_size=CHUNK, **kwargs)


def assert_matches_loader(cache):
    assert len(cache) == N
    for i in range(N):
        if i == UNREADABLE:
            continue
        want_image, want_target = FakeLoader.expected(i)
        image, target = cache.read(i)
        assert image.dtype == want_image.dtype and image.shape == want_image.shape, i
        assert np.array_equal(image, want_image), i
        if want_target is None:
            assert target is None, i
        else:
            assert target.dtype == want_target.dtype and target.shape == want_target.shape, i
            assert np.array_equal(target, want_target), i


def memmap_base(array):
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    return base


def chunk_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("chunk-"))


def test_round_trip_is_bit_identical_read_only_and_memory_mapped(tmp_path):
    logs = []
    cache = build(tmp_path, log=logs.append)
    folder = tmp_path / "k0"
    assert cache.folder == str(folder)
    assert_matches_loader(cache)
    assert chunk_files(folder) == [f"chunk-{k:05d}.{ext}" for k in range(5) for ext in ("bin", "json")]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format_version"] == decoded_cache.FORMAT_VERSION and meta["num_samples"] == N
    assert meta["unreadable"] == 1 and meta["key"] == "k0" and meta["chunk_size"] == CHUNK
    assert meta["total_bytes"] == sum(os.path.getsize(folder / f"chunk-{k:05d}.bin") for k in range(5))
    for i in (1, 7, 10):
        image, target = cache.read(i)
        assert not image.flags.writeable and not target.flags.writeable
        assert isinstance(image, np.ndarray) and isinstance(memmap_base(image), np.memmap)
        with pytest.raises(ValueError):
            image[0, 0, 0] = 1
    # the 16-bit pair comes back as uint16, negative indices count from the end
    assert cache.read(7)[0].dtype == np.uint16
    assert np.array_equal(cache.read(-1)[0], FakeLoader.expected(N - 1)[0])
    with pytest.raises(IndexError):
        cache.read(N)
    assert any("images/s" in m and "ETA" in m for m in logs)
    # a second open reads the complete cache without loading anything
    again = DecodedCache.open_or_build(str(tmp_path), "k0", N, NeverLoad().load, NAMES, chunk_size=CHUNK,
                                       log=lambda m: None)
    assert_matches_loader(again)


def test_unreadable_sample_raises_the_same_error_again(tmp_path):
    cache = build(tmp_path)
    with pytest.raises(UnreadableImageError) as info:
        cache.read(UNREADABLE)
    assert info.value.path == f"/data/train/img{UNREADABLE}.png"
    assert info.value.reason == "the file is empty (0 bytes)"
    assert info.value.advice == ADVICE  # what to do, as the decoder said it (not a generic "damaged")
    # its neighbours in the same chunk are intact
    assert np.array_equal(cache.read(UNREADABLE - 1)[0], FakeLoader.expected(UNREADABLE - 1)[0])
    assert np.array_equal(cache.read(UNREADABLE + 1)[0], FakeLoader.expected(UNREADABLE + 1)[0])


def test_process_pool_build_writes_the_same_bytes(tmp_path):
    build(tmp_path / "serial")
    cache = build(tmp_path / "pool", num_workers=2)
    assert_matches_loader(cache)
    serial, pool = tmp_path / "serial" / "k0", tmp_path / "pool" / "k0"
    assert chunk_files(serial) == chunk_files(pool)
    for name in chunk_files(serial):
        assert (serial / name).read_bytes() == (pool / name).read_bytes(), name


def test_interrupted_build_is_resumed_from_the_missing_chunks(tmp_path):
    folder = tmp_path / "k0"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(tmp_path, FakeLoader(fail_at=2 * CHUNK + 1))
    assert chunk_files(folder) == [f"chunk-{k:05d}.{ext}" for k in range(2) for ext in ("bin", "json")]
    assert not (folder / "meta.json").exists()
    assert [n for n in os.listdir(folder) if n.startswith(".")] == []  # the aborted write cleaned up
    # temporary files of a killed writer: an old one is removed, a fresh one (a live writer) is not
    old, fresh = folder / ".chunk-00003.bin.x1y2z3.tmp.bin", folder / ".chunk-00004.json.a1b2c3.tmp.json"
    other = folder / "notes.txt"
    for path in (old, fresh, other):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    loader = FakeLoader()
    cache = build(tmp_path, loader)
    assert loader.calls == list(range(2 * CHUNK, N))
    assert_matches_loader(cache)
    assert not old.exists() and fresh.exists() and other.exists()


def test_complete_cache_with_a_chunk_removed_rebuilds_only_that_chunk(tmp_path):
    build(tmp_path)
    folder = tmp_path / "k0"
    reference = (folder / "chunk-00001.bin").read_bytes()
    for name in ("chunk-00001.bin", "chunk-00001.json", "meta.json"):
        os.remove(folder / name)
    # a chunk whose index exists but whose data file is truncated is not done either
    with open(folder / "chunk-00003.bin", "r+b") as f:
        f.truncate(10)
    loader = FakeLoader()
    cache = build(tmp_path, loader)
    assert loader.calls == list(range(CHUNK, 2 * CHUNK)) + list(range(3 * CHUNK, 4 * CHUNK))
    assert (folder / "chunk-00001.bin").read_bytes() == reference
    assert_matches_loader(cache)


def test_cache_key_follows_source_files_and_description(tmp_path):
    files = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(bytes([i]) * 10)
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000 + i))
        files.append([str(path)])
    description = {"blur": {"method": "gaussian", "sigma": 1.1}, "in_chans": 1, "samples": ["a", "b", "c"]}
    key = cache_key(description, files)
    assert len(key) == 16 and int(key, 16) >= 0
    # same inputs (and a description with another key order) -> same key
    assert cache_key(dict(reversed(list(description.items()))), [list(f) for f in files]) == key
    # another modification time
    os.utime(files[1][0], ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert cache_key(description, files) != key
    os.utime(files[1][0], ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_001))
    assert cache_key(description, files) == key
    # another content (size), same time
    (tmp_path / "img2.png").write_bytes(b"x" * 11)
    os.utime(files[2][0], ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_002))
    changed = cache_key(description, files)
    assert changed != key
    # an added file (a second source file for one sample, and another sample)
    extra = tmp_path / "orig0.png"
    extra.write_bytes(b"o")
    assert cache_key(description, [files[0] + [str(extra)]] + files[1:]) != changed
    assert cache_key(description, files + [[str(extra)]]) != changed
    # a removed file: its path still counts, with no stat
    os.remove(extra)
    missing = cache_key(description, files + [[str(extra)]])
    assert missing not in (changed, cache_key(description, files))
    # another blur or another channel mode
    assert cache_key({**description, "blur": {"method": "gaussian", "sigma": 1.2}}, files) != changed
    assert cache_key({**description, "in_chans": 3}, files) != changed


def test_waiting_process_returns_once_another_one_completed_the_cache(tmp_path):
    def builder():
        time.sleep(0.3)
        build(tmp_path)

    thread = threading.Thread(target=builder)
    thread.start()
    logs = []
    started = time.monotonic()
    try:
        cache = DecodedCache.open_or_build(str(tmp_path), "k0", N, NeverLoad().load, NAMES, build=False,
                                           chunk_size=CHUNK, poll_seconds=0.02, log=logs.append)
    finally:
        thread.join()
    assert time.monotonic() - started >= 0.3
    assert len(logs) == 1 and "waiting" in logs[0] and str(tmp_path / "k0") in logs[0]
    assert_matches_loader(cache)


def test_two_builders_of_the_same_key_at_once_end_with_a_correct_cache(tmp_path):
    results, errors = [], []

    def builder():
        try:
            results.append(build(tmp_path))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2
    for cache in results:
        assert_matches_loader(cache)


def test_pickled_cache_reads_the_same_and_carries_no_pixels(tmp_path):
    cache = build(tmp_path)
    assert_matches_loader(cache)  # opens every chunk's map in this process
    blob = pickle.dumps(cache)
    total = json.loads((tmp_path / "k0" / "meta.json").read_text())["total_bytes"]
    assert len(blob) < total  # the maps are not pickled, only the small index
    clone = pickle.loads(blob)
    assert clone.folder == cache.folder
    assert_matches_loader(clone)
    # a process change (fork, DataLoader worker) reopens its own maps
    opened = clone._maps
    clone._pid = -1
    image, _ = clone.read(12)
    assert clone._maps is not opened and list(clone._maps) == [12 // CHUNK]
    assert np.array_equal(image, FakeLoader.expected(12)[0])


class CacheDataset(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        try:
            image, target = self.cache.read(i)
        except UnreadableImageError as err:
            return i, err.reason, -1
        return i, image.tobytes(), -2 if target is None else int(target.astype(np.int64).sum())


def test_cache_works_inside_dataloader_worker_processes(tmp_path):
    cache = build(tmp_path)
    cache.read(0)  # an open map in the parent must not travel to the workers
    loader = torch.utils.data.DataLoader(CacheDataset(cache), batch_size=None, num_workers=2,
                                         multiprocessing_context="forkserver")
    seen = {int(i): (payload, checksum) for i, payload, checksum in loader}
    assert sorted(seen) == list(range(N))
    assert seen[UNREADABLE] == ("the file is empty (0 bytes)", -1)
    for i in range(N):
        if i != UNREADABLE:
            image, target = FakeLoader.expected(i)
            assert seen[i][0] == image.tobytes(), i
            assert seen[i][1] == (-2 if target is None else int(target.astype(np.int64).sum())), i


def test_views_stay_valid_when_their_map_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(decoded_cache, "_MAX_OPEN_CHUNKS", 2)
    cache = build(tmp_path)
    views = {i: cache.read(i) for i in range(N) if i != UNREADABLE}
    assert len(cache._maps) == 2
    for i, (image, target) in views.items():
        want_image, want_target = FakeLoader.expected(i)
        assert np.array_equal(image, want_image)
        assert (target is None) == (want_target is None)


def test_not_enough_disk_space_stops_after_the_first_chunk(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(decoded_cache.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1000))
    loader = FakeLoader()
    with pytest.raises(CacheError) as info:
        build(tmp_path, loader)
    message = str(info.value)
    assert str(tmp_path / "k0") in message and "--cache_dir" in message and "GiB" in message
    assert loader.calls == list(range(CHUNK))
    assert not (tmp_path / "k0" / "meta.json").exists()


def test_write_error_becomes_one_cache_error(tmp_path, monkeypatch):
    def no_space(path, text, encoding="utf-8"):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(decoded_cache, "atomic_write_text", no_space)
    with pytest.raises(CacheError) as info:
        build(tmp_path)
    assert str(tmp_path / "k0") in str(info.value) and "No space left on device" in str(info.value)
    # a load that raises OSError itself is not mistaken for a write error
    monkeypatch.undo()

    class MissingFile(FakeLoader):
        def load(self, i):
            raise FileNotFoundError(errno.ENOENT, "No such file", NAMES[i])

    with pytest.raises(FileNotFoundError):
        build(tmp_path / "other", MissingFile())


def test_foreign_format_version_or_sample_count_is_refused_and_kept(tmp_path):
    build(tmp_path)
    folder = tmp_path / "k0"
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 999}))
    with pytest.raises(CacheError) as info:
        build(tmp_path, NeverLoad())
    assert str(folder) in str(info.value) and "999" in str(info.value) and "delete" in str(info.value)
    assert meta_path.exists() and (folder / "chunk-00000.bin").exists()  # never deleted
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="delete"):
        DecodedCache.open_or_build(str(tmp_path), "k0", N + 1, NeverLoad().load, NAMES + ["x"],
                                   chunk_size=CHUNK, log=lambda m: None)
    assert_matches_loader(build(tmp_path, NeverLoad()))


def test_a_new_build_names_the_other_caches_in_the_folder(tmp_path):
    build(tmp_path, key="old")
    messages = []
    build(tmp_path, key="new", log=messages.append)
    notes = [m for m in messages if "also holds" in m]
    assert len(notes) == 1 and "old (" in notes[0] and "GiB" in notes[0]
    assert os.path.exists(tmp_path / "old" / "meta.json")  # named, never deleted
    messages.clear()
    build(tmp_path, key="new", log=messages.append)  # complete: opened, nothing built, nothing said
    assert not any("also holds" in m for m in messages)
