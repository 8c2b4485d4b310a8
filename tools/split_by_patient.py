"""Split a labelled folder into train/val/test by patient (or another group), never by image.

    python tools/split_by_patient.py --source flat/ --dest dataset/ --group_by patient
    python tools/split_by_patient.py --source flat/ --dest dataset/ --group_by csv --groups patients.csv \
        --fractions 0.7 0.15 0.15 --seed 0 --mode hardlink --dry_run

``flat/<class>/...`` (e.g. ``benign/`` and ``malignant/``, images at any depth below them) becomes
``dest/{train,val,test}/<class>/...`` with the same relative paths, the layout main_finetune.py reads.

* Groups (``--group_by``, as in main_finetune.py): ``file`` (every file its own group: only right when
  no patient has two files), ``patient`` / ``study`` (DICOM PatientID / StudyInstanceUID), ``csv``
  (``--groups``: columns ``file,group``, ``file`` relative to ``--source``, e.g. ``benign/IM0001.dcm``).
  All images of a group go to one split, so no patient is in two splits.
* Stratified by class: the groups of each class (a group with images of several classes forms its own
  stratum) are shuffled with ``--seed`` and dealt to the splits in the proportions ``--fractions``
  (largest remainders), so each split gets its share of the *patients* of every class; image counts
  follow from the group sizes.
* Files are copied (``--mode copy``, atomically), hard-linked or symlinked: the source is never
  changed. An existing destination file is never overwritten: if it holds the same content it is kept
  (a re-run completes an interrupted split), otherwise the run stops before writing anything, naming
  it. A destination inside the source is refused. ``--dry_run`` prints the plan and writes nothing.
* ``dest/groups.csv`` (columns ``file,group,split,class``, ``file`` relative to ``dest``) records the
  split; ``main_finetune.py --groups dest/groups.csv`` evaluates per patient with it.
"""
from __future__ import annotations

import argparse
import csv
import filecmp
import io
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.cls_datasets import GROUP_BY, SPLITS, class_folders, file_groups, read_groups_csv  # noqa: E402
from util.datasets import DatasetError  # noqa: E402
from util.fileio import atomic_write_text  # noqa: E402
from util.image_io import list_images  # noqa: E402

MODES = ("copy", "hardlink", "symlink")
GROUPS_FILE = "groups.csv"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Split <source>/<class>/ images into <dest>/{train,val,test}/<class>/ "
                                            "by patient: no group in two splits, stratified by class.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True, help="folder with one sub-folder per class (e.g. benign/, malignant/)")
    p.add_argument("--dest", required=True, help="new dataset folder (train/, val/, test/ are created in it)")
    p.add_argument("--group_by", required=True, choices=GROUP_BY,
                   help="what one patient is: file (each file), patient (DICOM PatientID), study (DICOM "
                        "StudyInstanceUID), csv (the --groups file)")
    p.add_argument("--groups", default=None, metavar="CSV",
                   help="with --group_by csv: columns file,group; file relative to --source")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
                   help="shares of the groups of each class that go to train, val and test")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle of the groups")
    p.add_argument("--mode", default="copy", choices=MODES,
                   help="copy the files, hard-link them (same file system, no extra space) or symlink them")
    p.add_argument("--dry_run", action="store_true", help="print the plan; write nothing")
    return p


# ------------------------------------------------------------------------------ plan
def check_folders(source: str, dest: str) -> None:
    if not os.path.isdir(source):
        raise SystemExit(f"error: --source {source} is not a folder")
    real_source, real_dest = os.path.realpath(source), os.path.realpath(dest)
    if real_dest == real_source or real_dest.startswith(real_source + os.sep):
        raise SystemExit(f"error: --dest {dest} lies inside --source {source}; the split would become part of the "
                         "data it splits. Choose a destination outside the source folder.")
    for split in SPLITS:
        split_folder = os.path.join(real_dest, split)
        if real_source == split_folder or real_source.startswith(split_folder + os.sep):
            raise SystemExit(f"error: --source {source} lies inside {os.path.join(dest, split)}, where the split is "
                             "written. Choose another --dest.")


def check_fractions(fractions) -> None:
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SystemExit(f"error: --fractions {' '.join(map(str, fractions))}: three shares >= 0 that sum to 1 "
                         "are needed (train val test), e.g. 0.7 0.15 0.15")


def list_source(source: str) -> dict[str, str]:
    """``{path relative to source: class}`` of every image below a class folder."""
    try:
        classes = class_folders(source)
    except DatasetError as err:
        raise SystemExit(f"error: {err}")
    files = {f"{name}/{rel}": name for name in classes for rel in list_images(os.path.join(source, name))}
    if not files:
        raise SystemExit(f"error: no images below {source}/<class>/; expected one sub-folder per class "
                         "(e.g. benign/, malignant/) holding the images")
    return files


def allocate(n: int, fractions) -> list[int]:
    """``n`` items dealt in the proportions ``fractions`` by largest remainders (ties: earlier split)."""
    exact = np.asarray(fractions, dtype=float) * n
    counts = np.floor(exact + 1e-9).astype(int)
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def assign_splits(groups: dict[str, str], classes: dict[str, str], fractions, seed: int) -> dict[str, str]:
    """``{group: split}``: per stratum (the set of classes a group has images of), the sorted groups
    shuffled with ``seed`` and dealt by ``allocate``."""
    classes_of = defaultdict(set)
    for rel, group in groups.items():
        classes_of[group].add(classes[rel])
    strata = defaultdict(list)
    for group, names in classes_of.items():
        strata["+".join(sorted(names))].append(group)
    rng = np.random.default_rng(seed)
    split_of = {}
    for stratum in sorted(strata):
        members = sorted(strata[stratum])
        shuffled = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for split, count in zip(SPLITS, allocate(len(members), fractions)):
            split_of.update({group: split for group in shuffled[start:start + count]})
            start += count
    return split_of


def build_plan(source: str, group_by: str, groups_csv: str | None, fractions, seed: int):
    """(rows of ``(rel, class, group, split)`` sorted by rel)."""
    classes = list_source(source)
    rels = sorted(classes)
    if group_by == "csv" and not groups_csv:
        raise SystemExit("error: --group_by csv reads the groups from --groups FILE (columns file,group)")
    if groups_csv and group_by != "csv":
        raise SystemExit(f"error: --groups is only read with --group_by csv (not --group_by {group_by})")
    try:
        mapping = read_groups_csv(groups_csv) if groups_csv else None
        names = file_groups(source, rels, group_by, mapping, source=f"--groups {groups_csv}")
    except DatasetError as err:
        raise SystemExit(f"error: {err}")
    groups = dict(zip(rels, names))
    split_of = assign_splits(groups, classes, fractions, seed)
    return [(rel, classes[rel], groups[rel], split_of[groups[rel]]) for rel in rels]


def groups_table(plan) -> str:
    """The CSV written to dest/groups.csv."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "group", "split", "class"])
    for rel, name, group, split in plan:
        writer.writerow([f"{split}/{rel}", group, split, name])
    return buffer.getvalue()


def summary(plan, fractions) -> list[str]:
    """Per split and class: groups and images; warnings for empty cells that should not be."""
    groups, images = defaultdict(set), Counter()
    for _, name, group, split in plan:
        groups[split, name].add(group)
        images[split, name] += 1
    classes = sorted({name for _, name, _, _ in plan})
    lines = [f"{'split':<8}{'class':<20}{'groups':>8}{'images':>8}"]
    for split in SPLITS:
        for name in classes:
            lines.append(f"{split:<8}{name:<20}{len(groups[split, name]):>8}{images[split, name]:>8}")
    for split, share in zip(SPLITS, fractions):
        empty = [name for name in classes if share > 0 and not groups[split, name]]
        if empty:
            lines.append(f"warning: {split} has no group of class(es) {', '.join(empty)} (too few groups for "
                         "these --fractions); metrics on it will be undefined or partial")
    all_groups = {group for _, _, group, _ in plan}
    lines.append(f"{len(plan)} files in {len(all_groups)} groups; no group is in two splits")
    return lines


# ------------------------------------------------------------------------------ write
def same_content(src: str, dst: str) -> bool:
    try:
        return os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)
    except OSError:
        return False  # e.g. a dangling symlink


def conflicts(source: str, dest: str, plan, table: str) -> tuple[list[str], set[str]]:
    """(destination paths that exist with other content, relative paths already in place)."""
    clashing, done = [], set()
    for rel, _, _, split in plan:
        dst = os.path.join(dest, split, rel)
        if os.path.lexists(dst):
            if same_content(os.path.join(source, rel), dst):
                done.add(rel)
            else:
                clashing.append(dst)
    groups_path = os.path.join(dest, GROUPS_FILE)
    if os.path.lexists(groups_path):
        with open(groups_path, encoding="utf-8", errors="replace") as f:
            if f.read() != table:
                clashing.append(groups_path)
    return clashing, done


def place(src: str, dst: str, mode: str) -> None:
    """Put ``src`` at ``dst`` without ever replacing an existing ``dst`` (FileExistsError instead)."""
    folder = os.path.dirname(dst)
    os.makedirs(folder, exist_ok=True)
    if mode == "hardlink":
        os.link(src, dst)
        return
    if mode == "symlink":
        os.symlink(os.path.realpath(src), dst)
        return
    # A copy is made under a hidden temporary name and then linked in, so dst is either absent or
    # complete, and os.link refuses to replace a dst that appeared meanwhile.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dst)}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        shutil.copystat(src, tmp)
        try:
            os.link(tmp, dst)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then rename
            if os.path.lexists(dst):
                raise FileExistsError(dst)
            os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_split(source: str, dest: str, plan, done: set[str], mode: str) -> int:
    written = 0
    for rel, _, _, split in plan:
        if rel in done:
            continue
        dst = os.path.join(dest, split, rel)
        try:
            place(os.path.join(source, rel), dst, mode)
        except FileExistsError:
            raise SystemExit(f"error: {dst} appeared while splitting; it was left as it is. Re-run to continue.")
        except OSError as err:
            hint = " (hard links need source and destination on one file system: use --mode copy or symlink)" \
                if mode == "hardlink" else ""
            raise SystemExit(f"error: could not write {dst}: {err}{hint}. Files written so far are complete; "
                             "re-run the same command to continue.")
        written += 1
    return written


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    check_folders(args.source, args.dest)
    check_fractions(args.fractions)
    plan = build_plan(args.source, args.group_by, args.groups, args.fractions, args.seed)
    table = groups_table(plan)
    print("\n".join(summary(plan, args.fractions)))
    clashing, done = conflicts(args.source, args.dest, plan, table)
    if clashing:
        shown = "\n  ".join(clashing[:10])
        raise SystemExit(f"error: {len(clashing)} destination file(s) already exist with other content; nothing was "
                         f"written or overwritten:\n  {shown}\nChoose an empty --dest, or remove those files.")
    if args.dry_run:
        print(f"dry run: would {args.mode} {len(plan) - len(done)} file(s) into {args.dest} "
              f"({len(done)} already there) and write {os.path.join(args.dest, GROUPS_FILE)}")
        return 0
    written = write_split(args.source, args.dest, plan, done, args.mode)
    atomic_write_text(os.path.join(args.dest, GROUPS_FILE), table)
    print(f"{args.mode}: {written} file(s) into {args.dest} ({len(done)} already there); the split is recorded in "
          f"{os.path.join(args.dest, GROUPS_FILE)} (main_finetune.py --groups accepts it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
