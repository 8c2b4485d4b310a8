"""tools/split_by_patient.py: no patient in two splits, stratified by class, never moves or overwrites."""
import csv
import os
from collections import defaultdict

import numpy as np
import pytest

from tools.split_by_patient import allocate, main
from util.cls_datasets import ClassificationDataset, read_groups_csv

SPLITS = ("train", "val", "test")


def make_source(root, n_patients=(20, 10)):
    """root/<class>/<patient>_<k>.png with 1-3 images per patient; patients.csv maps file -> patient."""
    rng = np.random.default_rng(0)
    rows = ["file,group"]
    for name, count in zip(("benign", "malignant"), n_patients):
        (root / name).mkdir(parents=True)
        for p in range(count):
            patient = f"{name[0]}{p:02d}"
            for k in range(1 + p % 3):
                rel = f"{name}/{patient}_{k}.png"
                (root / rel).write_bytes(b"\x89PNG fake " + rng.bytes(16))  # never decoded here
                rows.append(f"{rel},{patient}")
    (root.parent / "patients.csv").write_text("\n".join(rows) + "\n")
    return root.parent / "patients.csv"


def snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def split_files(dest):
    """{split: {relative path below the split}}."""
    return {split: {os.path.relpath(os.path.join(d, f), dest / split)
                    for d, _, files in os.walk(dest / split) for f in files} for split in SPLITS}


def run(*argv):
    return main([str(a) for a in argv])


def test_allocate_deals_by_largest_remainder():
    assert allocate(20, (0.7, 0.15, 0.15)) == [14, 3, 3]
    assert allocate(10, (0.7, 0.15, 0.15)) == [7, 2, 1]
    assert allocate(1, (0.7, 0.15, 0.15)) == [1, 0, 0]
    assert sum(allocate(13, (0.5, 0.25, 0.25))) == 13


def test_split_keeps_patients_whole_is_stratified_and_leaves_the_source(tmp_path):
    source = tmp_path / "flat"
    groups_csv = make_source(source)
    before = snapshot(source)
    dest = tmp_path / "dataset"
    assert run("--source", source, "--dest", dest, "--group_by", "csv", "--groups", groups_csv,
               "--fractions", 0.6, 0.2, 0.2, "--seed", 3) == 0
    assert snapshot(source) == before  # copied, not moved
    placed = split_files(dest)
    all_files = [rel for split in SPLITS for rel in placed[split]]
    assert sorted(all_files) == sorted(before)  # every file exactly once
    patient_splits = defaultdict(set)
    for split in SPLITS:
        for rel in placed[split]:
            assert (dest / split / rel).read_bytes() == before[rel]
            patient_splits[os.path.basename(rel).split("_")[0]].add(split)
    assert all(len(s) == 1 for s in patient_splits.values())  # no patient in two splits
    for name, n in (("b", 20), ("m", 10)):  # 60/20/20 % of each class's patients
        counts = [sum(1 for p, s in patient_splits.items() if p[0] == name and split in s) for split in SPLITS]
        assert counts == allocate(n, (0.6, 0.2, 0.2))
    # the record: usable as main_finetune --groups
    mapping = read_groups_csv(str(dest / "groups.csv"))
    test = ClassificationDataset(str(dest), "test", ["benign", "malignant"])
    test.assign_groups("csv", mapping)
    assert set(test.groups) == {p for p, s in patient_splits.items() if s == {"test"}}
    # another seed gives another split
    other = tmp_path / "other"
    run("--source", source, "--dest", other, "--group_by", "csv", "--groups", groups_csv, "--seed", 4)
    assert split_files(other) != placed


def test_dicom_patients_stay_together(tmp_path):
    from classification_images import cine, write_dicom

    rng = np.random.default_rng(0)
    source = tmp_path / "flat"
    for i in range(8):
        name = "malignant" if i % 2 else "benign"
        for k in range(2):  # two files per patient, one of them a cine
            write_dicom(source / name / f"IM{i}{k}.dcm", cine(rng, i % 2 == 1, 1 + 2 * k), PatientID=f"P{i}")
    dest = tmp_path / "dataset"
    assert run("--source", source, "--dest", dest, "--group_by", "patient", "--fractions", 0.5, 0.25, 0.25) == 0
    placed = split_files(dest)
    for i in range(8):
        homes = {split for split in SPLITS for rel in placed[split] if f"IM{i}" in rel}
        assert len(homes) == 1
    assert [len(placed[s]) for s in SPLITS] == [8, 4, 4]
    with open(dest / "groups.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["group"] for r in rows} == {f"P{i}" for i in range(8)}


def test_never_overwrites_and_a_rerun_completes(tmp_path, capsys):
    source = tmp_path / "flat"
    groups_csv = make_source(source, (6, 6))
    dest = tmp_path / "dataset"
    argv = ["--source", source, "--dest", dest, "--group_by", "csv", "--groups", groups_csv]
    run(*argv, "--dry_run")
    assert not dest.exists()  # a dry run writes nothing
    assert "dry run: would copy 24 file(s)" in capsys.readouterr().out
    run(*argv)
    first = snapshot(dest)
    # a re-run finds identical files: nothing changes, nothing fails
    (dest / "train" / sorted(split_files(dest)["train"])[0]).unlink()  # as if interrupted
    assert run(*argv) == 0 and snapshot(dest) == first
    # a destination file with other content: refused before anything is written, the file intact
    victim = dest / "test" / sorted(split_files(dest)["test"])[0]
    victim.write_bytes(b"the user's own file")
    other = dest / "val" / sorted(split_files(dest)["val"])[0]
    other.unlink()
    with pytest.raises(SystemExit) as info:
        run(*argv)
    assert str(victim) in str(info.value) and "nothing was written" in str(info.value)
    assert victim.read_bytes() == b"the user's own file" and not other.exists()
    # another seed would move patients: its groups.csv differs, so it is refused too
    victim.unlink()
    with pytest.raises(SystemExit, match="groups.csv"):
        run(*argv, "--seed", 9)


def test_links_and_refusals(tmp_path):
    source = tmp_path / "flat"
    groups_csv = make_source(source, (4, 4))
    argv = ["--source", source, "--group_by", "csv", "--groups", groups_csv]
    run(*argv, "--dest", tmp_path / "hard", "--mode", "hardlink")
    run(*argv, "--dest", tmp_path / "soft", "--mode", "symlink")
    for split in SPLITS:
        for rel in split_files(tmp_path / "hard")[split]:
            assert os.path.samefile(tmp_path / "hard" / split / rel, source / rel)
            link = tmp_path / "soft" / split / rel
            assert link.is_symlink() and os.path.samefile(link, source / rel)
    with pytest.raises(SystemExit, match="inside --source"):
        run(*argv, "--dest", source / "split")
    with pytest.raises(SystemExit, match="sum to 1"):
        run(*argv, "--dest", tmp_path / "x", "--fractions", 0.5, 0.2, 0.2)
    with pytest.raises(SystemExit, match="no DICOM PatientID"):
        run("--source", source, "--dest", tmp_path / "x", "--group_by", "patient")
    assert not (tmp_path / "x").exists() and not (source / "split").exists()
