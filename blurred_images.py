"""Blur every image of a dataset tree into a mirror tree (the blurred inputs of Deblurring MAE).

    python blurred_images.py --src_dir /path/to/dataset_orig/ --dst_dir /path/to/dataset_blurred/ \\
        --method gaussian --sigma 1.1

Every image below ``--src_dir`` (any depth) is read, turned grey (``--keep_channels`` keeps colour),
blurred with util.blur and written under ``--dst_dir`` at the same relative path and file name, in
the same format: PNG stays lossless PNG, JPEG is re-encoded at quality 95, TIFF/BMP/WebP keep their
format, 16-bit PNG/TIFF stay 16-bit. Non-image files (``.DS_Store``, ``Thumbs.db``, text, hidden
files) are ignored, and folders named by ``--exclude`` (e.g. ``--exclude masks``) are not entered.

DICOM files (``.dcm``, or without extension, recognised by the DICOM preamble, as a scanner's
``IM000001``) are written as PNG: ``scan.dcm`` becomes ``scan.png``, ``IM000001`` becomes
``IM000001.png``; each frame of a multi-frame DICOM becomes its own file, ``scan_f000.png``,
``scan_f001.png``, ... (three digits, more when a file has over 1000 frames). Files that are not images
are left out and counted at the start and in the summary.

Work is spread over ``--workers`` processes (default: all cores) with a progress bar. Outputs that
already exist are skipped, so an interrupted run resumes where it stopped; ``--overwrite`` redoes
them. Writes are atomic (temporary file + rename), so an interruption never leaves a half-written
image behind. A file that cannot be read is reported by name and skipped; the run ends with a summary
and exits with status 1 if any file failed (2 for a usage error such as a destination inside the
source tree).

The settings of the run (method and the settings it uses, grey or colour, the source folder) are
written to ``blur.json`` at the top of ``--dst_dir``: the training scripts read them, record them in
their checkpoints and refuse to mix them up (util/provenance.py). A destination blurred with other
settings is refused unless ``--overwrite`` redoes every image; until such a run finishes, ``blur.json``
marks the copy as mixed.

Originals are never written: before anything is written the run stops (status 2) if the destination
contains the source, if an output folder resolves into a source folder (a link or mount), or if a file
already carrying an output name is a link or hard link to a source image.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass, field

import cv2
from tqdm import tqdm

from util.arguments import available_cores
from util.blur import BlurSpec, add_blur_arguments, blur_key, blur_spec_from_args
from util.image_io import (DatasetError, UnreadableImageError, blurred_copy_names, describe_not_images, image_frames,
                           is_dicom_file, read_frames, scan_images, to_grey, write_image_atomic)
from util.provenance import DataBlur, read_blur_settings, write_blur_settings


class UsageError(Exception):
    """A mistake in the command line (paths), reported without a traceback."""


@dataclass(frozen=True)
class FileTask:
    """Everything a worker process needs to blur one source file."""

    src_dir: str
    dst_dir: str
    relative_path: str
    dicom: bool
    spec: BlurSpec
    keep_channels: bool
    overwrite: bool


@dataclass
class FileResult:
    relative_path: str
    written: int = 0
    skipped: int = 0
    error: str | None = None


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    not_images: int = 0  # files of the source tree that are not images (left out)

    def add(self, result: FileResult) -> None:
        self.written += result.written
        self.skipped += result.skipped
        if result.error is not None:
            self.failed.append(result.relative_path)

    def __str__(self) -> str:
        text = f"written {self.written}, skipped {self.skipped} (already there), failed {len(self.failed)}"
        return text + (f"; {self.not_images} non-image file(s) left out" if self.not_images else "")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Image Blurring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src_dir", required=True, help="dataset tree to blur (read only)")
    parser.add_argument("--dst_dir", required=True, help="where the blurred tree is written (outside src_dir)")
    add_blur_arguments(parser)
    parser.add_argument("--keep_channels", action="store_true",
                        help="keep colour images in colour (default: grey output, as published)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="FOLDER",
                        help="folder names not to enter, at any depth (e.g. masks)")
    parser.add_argument("--workers", type=int, default=available_cores(),
                        help="worker processes (default: all cores available to this process)")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    return parser


def output_paths(relative_path: str, frames: int, dicom: bool) -> list[str]:
    """Relative output path(s) for a source file; DICOM becomes PNG, one file per frame (the rule
    is util.image_io.blurred_copy_names, which the paired datasets follow too)."""
    return blurred_copy_names(relative_path, frames, dicom)


def blur_file(task: FileTask) -> FileResult:
    """Blur one source file (every frame of it); never raises, failures come back in the result."""
    result = FileResult(task.relative_path)
    source = os.path.join(task.src_dir, task.relative_path)
    try:
        frames = image_frames(source)
        destinations = [os.path.join(task.dst_dir, rel)
                        for rel in output_paths(task.relative_path, frames, task.dicom)]
        pending = [f for f, dst in enumerate(destinations) if task.overwrite or not os.path.exists(dst)]
        result.skipped = frames - len(pending)
        for frame, img in read_frames(source, pending):
            if not task.keep_channels:
                img = to_grey(img)
            key = blur_key(task.relative_path, frame if frames > 1 else None)
            write_image_atomic(destinations[frame], task.spec.apply(img, key=key))
            result.written += 1
    except UnreadableImageError as exc:
        result.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file (or a full disk) must not hide the others
        result.error = f"{source}: {type(exc).__name__}: {exc}"
    return result


def main(args: argparse.Namespace) -> Summary:
    """Blur the tree; returns the summary. Raises UsageError for bad paths.

    With more than one worker, processes are started the safe way (fork server or spawn), so a
    script that calls this function must do so under ``if __name__ == "__main__":``.
    """
    src_dir, dst_dir = _checked_dirs(args.src_dir, args.dst_dir)
    spec = blur_spec_from_args(args)
    previous = _settings_of_destination(src_dir, dst_dir, spec, args)
    relative_paths, not_images = scan_images(src_dir, exclude=args.exclude)
    if not relative_paths:
        raise UsageError(f"no images found under {src_dir} (looked for .png .jpg .jpeg .bmp .tif .tiff .webp "
                         ".dcm and DICOM files without extension at any depth); check --src_dir and --exclude"
                         + (f"; {len(not_images)} other file(s) there, e.g. {not_images[0]}" if not_images else ""))
    dicom = {rel: is_dicom_file(os.path.join(src_dir, rel)) for rel in relative_paths}
    _refuse_outputs_that_are_sources(src_dir, dst_dir, relative_paths, dicom)
    summary = Summary(not_images=len(not_images))
    for source, png in _dicom_name_clashes(relative_paths, dicom).items():
        print(f"FAILED {os.path.join(src_dir, source)}: its output {png} is also the name of a source image; "
              "rename one of the two", file=sys.stderr)
        summary.failed.append(source)
    tasks = [FileTask(src_dir, dst_dir, rel, dicom[rel], spec, args.keep_channels, args.overwrite)
             for rel in relative_paths if rel not in summary.failed]
    if not_images:
        print(describe_not_images(not_images, src_dir))
    # written before any image: a copy is never without the settings its images were made with
    mixed = previous is not None and (previous.pending or not _same_settings(previous, spec, args.keep_channels))
    write_blur_settings(dst_dir, spec, args.keep_channels, src_dir, pending=mixed)
    print(f"Blurring {len(tasks)} files from {src_dir} into {dst_dir} with {spec.describe()} blur")

    with tqdm(total=len(tasks), unit="file", desc="blurring", dynamic_ncols=True) as progress:
        for result in _run(tasks, args.workers):
            summary.add(result)
            if result.error is not None:
                tqdm.write(f"FAILED {result.error}", file=sys.stderr)
            progress.update()
    if mixed and not summary.failed:  # every image has now been made with these settings
        write_blur_settings(dst_dir, spec, args.keep_channels, src_dir, pending=False)
    print(f"Done: {summary}.")
    if previous is None and summary.skipped:
        print(f"note: {summary.skipped} output(s) were already in {dst_dir} before it recorded its settings and were "
              f"kept; if they were not blurred with {spec.describe()} ({_channels(args.keep_channels)}), run again "
              "with --overwrite")
    if summary.failed:
        print(f"{len(summary.failed)} file(s) could not be blurred (reasons above): "
              + ", ".join(summary.failed[:10]) + (" ..." if len(summary.failed) > 10 else ""), file=sys.stderr)
    return summary


def _channels(keep_channels: bool) -> str:
    return "colour" if keep_channels else "grey"


def _same_settings(previous: DataBlur, spec: BlurSpec, keep_channels: bool) -> bool:
    return previous.spec.settings() == spec.settings() and previous.channels == _channels(keep_channels)


def _settings_of_destination(src_dir: str, dst_dir: str, spec: BlurSpec, args) -> DataBlur | None:
    """The settings ``dst_dir`` was blurred with so far (None for a new destination). Outputs that
    exist are skipped, so another blur would leave a copy mixing two blurs: refused unless --overwrite."""
    try:
        if read_blur_settings(src_dir) is not None:
            print(f"warning: {src_dir} is itself a blurred copy ({read_blur_settings(src_dir).path}): its images "
                  "are blurred a second time", file=sys.stderr)
        previous = read_blur_settings(dst_dir, search_parents=False)
    except DatasetError as err:
        raise UsageError(str(err)) from None
    if previous is None or args.overwrite:
        return previous
    if not _same_settings(previous, spec, args.keep_channels):
        raise UsageError(f"{dst_dir} holds images blurred with {previous.describe()} ({previous.path}); this run "
                         f"asks for {spec.describe()}, {_channels(args.keep_channels)}. Images already there are kept, "
                         "so the copy would mix two blurs. Choose another --dst_dir, or pass --overwrite to blur "
                         "every image again with the new settings.")
    if previous.pending:
        raise UsageError(f"{dst_dir}: an earlier run with --overwrite and these settings did not finish "
                         f"({previous.path}), so some images still have the old blur. Run again with --overwrite.")
    return previous


def _dicom_name_clashes(relative_paths: list[str], dicom: dict[str, bool]) -> dict[str, str]:
    """Single-frame-style PNG names of DICOM files that another source image already has
    (``a.dcm`` or ``a`` next to ``a.png``): one would silently be skipped as 'already there'."""
    sources = set(relative_paths)
    clashes = {}
    for rel in relative_paths:
        if dicom[rel] and (png := output_paths(rel, 1, True)[0]) in sources:
            clashes[rel] = png
    return clashes


def _run(tasks: list[FileTask], workers: int):
    """Yield results, in-process for one worker, otherwise from a process pool (any order)."""
    if workers <= 1 or len(tasks) == 1:
        yield from map(blur_file, tasks)
        return
    workers = min(workers, len(tasks))
    # Several files per message keep the pickling overhead small; small enough to keep the bar moving.
    chunk = max(1, min(16, len(tasks) // (workers * 8)))
    # Never fork this process: OpenCV's (and torch's) thread pools, already running in a caller
    # such as a test session, do not survive fork and the children can deadlock. A fork server
    # (or spawn where it is unavailable) starts workers from a clean interpreter.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(blur_file, tasks, chunksize=chunk)


def _init_worker() -> None:
    # Each process handles whole images; OpenCV's own threads would only oversubscribe the cores.
    cv2.setNumThreads(1)


def _checked_dirs(src_dir: str, dst_dir: str) -> tuple[str, str]:
    src = os.path.realpath(src_dir)
    dst = os.path.realpath(dst_dir)
    if not os.path.isdir(src):
        raise UsageError(f"--src_dir {src_dir} does not exist or is not a folder")
    if dst == src or os.path.commonpath([src, dst]) == src:
        raise UsageError(f"--dst_dir {dst_dir} is the source folder or inside it ({src}); blurred images "
                         f"would mix with the originals. Choose a destination outside it, e.g. {src}_blurred")
    if os.path.commonpath([src, dst]) == dst:
        raise UsageError(f"--dst_dir {dst_dir} contains the source folder {src}; blurred images would be "
                         "written among (and could replace) the originals. Choose a destination outside it, "
                         f"e.g. {src}_blurred")
    return src, dst


def _refuse_outputs_that_are_sources(src: str, dst: str, relative_paths: list[str], dicom: dict[str, bool]) -> None:
    """Raise UsageError when any output could land on a source file or in a source folder.

    ``_checked_dirs`` compares the two roots; this looks at every output. A folder of the destination
    tree may be a link into the source tree (or a bind mount of it), and a file already in the
    destination may be a link or a hard link to an original: writing through the folder would replace
    originals, and an output name that already exists would be "skipped" with the original standing
    in as its blurred copy. So, before anything is written, every output folder is resolved (real path
    and device/inode) and compared with the source folders, and every existing file that carries an
    output name is compared (device/inode and real path) with the source files.
    """
    source_files: dict[tuple[int, int], str] = {}
    real_source_files: dict[str, str] = {}
    source_dirs: dict[tuple[int, int], str] = {}
    real_source_dirs: dict[str, str] = {src: src}
    outputs_by_dir: dict[str, tuple[set[str], set[str]]] = {}  # folder -> (file names, DICOM stems)
    for rel in relative_paths:
        path = os.path.join(src, rel)
        folder = os.path.dirname(path)
        try:
            st = os.stat(path)
            folder_st = os.stat(folder)
        except OSError:
            continue  # a dangling link or a vanished file: reported when its turn comes
        source_files[(st.st_dev, st.st_ino)] = path
        real_source_files[os.path.realpath(path)] = path
        source_dirs[(folder_st.st_dev, folder_st.st_ino)] = folder
        real_source_dirs[os.path.realpath(folder)] = folder
        names, stems = outputs_by_dir.setdefault(os.path.dirname(rel), (set(), set()))
        if dicom[rel]:
            stems.add(os.path.basename(output_paths(rel, 1, True)[0])[:-len(".png")])
        else:
            names.add(os.path.basename(rel))

    fix = (f"Choose a --dst_dir that is neither inside, nor linked into, nor hard-linked with the source "
           f"tree (e.g. a new folder {src}_blurred), or remove that link from the destination")
    for rel_folder, (names, stems) in outputs_by_dir.items():
        out_folder = os.path.join(dst, rel_folder)
        inside = _enclosing(os.path.realpath(out_folder), real_source_dirs)
        if inside is None and os.path.isdir(out_folder):
            st = os.stat(out_folder)
            inside = source_dirs.get((st.st_dev, st.st_ino))
        if inside is not None:
            raise UsageError(f"the output folder {out_folder} is the source folder {inside} (through a link or "
                             f"mount); blurred images would be written among the originals. {fix}.")
        if not os.path.isdir(out_folder):
            continue
        for entry in os.scandir(out_folder):
            if not (entry.name in names or not stems.isdisjoint(_dicom_output_stems(entry.name))):
                continue
            try:
                st = entry.stat()  # follows a link: what a reader of this output would get
            except OSError:
                continue  # a dangling link is replaced by the output, never followed
            original = source_files.get((st.st_dev, st.st_ino)) or real_source_files.get(
                os.path.realpath(entry.path))
            if original is not None:
                raise UsageError(f"the output {entry.path} is the source image {original} (a link or hard link "
                                 "to it); it would be skipped as already blurred, or with --overwrite replace "
                                 f"the original. {fix}.")


_DICOM_FRAME_OUTPUT = re.compile(r"(.+)_f\d{3,}\.png")


def _dicom_output_stems(name: str) -> set[str]:
    """Stems of the DICOM files whose output could be called ``name``: ``scan`` for ``scan.png``;
    ``scan`` and ``scan_f012`` for ``scan_f012.png`` (a frame of scan.dcm, or all of scan_f012.dcm)."""
    if not name.endswith(".png"):
        return set()
    frame = _DICOM_FRAME_OUTPUT.fullmatch(name)
    return {name[:-4]} | ({frame.group(1)} if frame else set())


def _enclosing(real_path: str, folders: dict[str, str]) -> str | None:
    """The entry of ``folders`` (real path -> name to report) that is ``real_path`` or one of its
    ancestors, if any."""
    path = real_path
    while True:
        if path in folders:
            return folders[path]
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    try:
        outcome = main(parsed)
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if outcome.failed else 0)
