"""Safety: checkpoints are only unpickled with weights_only=True, a pickle that would run code is
refused by every entry point, and no script writes outside its output folder or follows a link out
of it when replacing or pruning checkpoints."""
import ast
import os
import sys

import cv2
import numpy as np
import pytest
import torch

import blurred_images
import main_finetune
import main_pretrain
from util.checkpoint import CheckpointError

from cli_args import finetune_args, pretrain_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG_DIR = os.path.join(ROOT, "SEG")


# ------------------------------------------------------------------------------ weights_only everywhere
def project_sources():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "node_modules")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def unsafe_loads(path):
    """Calls that can unpickle arbitrary objects: torch.load without weights_only=True, pickle.load(s),
    numpy's allow_pickle=True, and any weights_only=False."""
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        weights_only = keywords.get("weights_only")
        if func.endswith("torch.load") and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{path}:{node.lineno} {func} without weights_only=True")
        if func in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load"):
            found.append(f"{path}:{node.lineno} {func}")
        for name in ("allow_pickle", "weights_only"):
            value = keywords.get(name)
            if isinstance(value, ast.Constant) and value.value is (name == "allow_pickle"):
                found.append(f"{path}:{node.lineno} {name}={value.value}")
    return found


def test_no_code_path_unpickles_without_weights_only():
    sources = list(project_sources())
    assert any(p.endswith(os.path.join("util", "checkpoint.py")) for p in sources)
    assert [problem for path in sources for problem in unsafe_loads(path)] == []
    # and the scanner does catch what it forbids
    bad = "import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
    probe = os.path.join(ROOT, "tests", "__pycache__", "unsafe_probe.py")
    os.makedirs(os.path.dirname(probe), exist_ok=True)
    with open(probe, "w") as f:
        f.write(bad)
    try:
        assert len(unsafe_loads(probe)) == 4
    finally:
        os.remove(probe)


# ------------------------------------------------------------------------------ a pickle that runs code
class RunsCode:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evil")
    RunsCode.marker = str(folder / "code-ran")
    from util.registry import pretrain_models
    path = folder / "evil.pth"
    state = pretrain_models().create("mae_vit_tiny_patch16", img_size=32).state_dict()
    torch.save({"model": state, "epoch": 0, "payload": RunsCode()}, path)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                img = cv2.GaussianBlur((rng.random((40, 48)) * 255).astype(np.uint8), (0, 0), 2)
                cv2.imwrite(str(root / split / cls / f"{i}.png"), img)
    return root


@pytest.mark.parametrize("entry", ["main_pretrain --resume", "main_finetune --finetune", "main_finetune --resume",
                                   "SEG model.pretrained"])
def test_pickle_that_would_run_code_is_refused_by_every_entry_point(entry, evil, tree, tmp_path):
    expected = f"{evil}: refused to load: the file pickles objects outside the safe allow-list"
    if entry.startswith("SEG"):
        if SEG_DIR not in sys.path:
            sys.path.append(SEG_DIR)
        import mmseg_compat  # noqa: F401
        from mmseg_custom.vit_backbone import ViTBackbone
        with pytest.raises(CheckpointError, match="refused to load.*arbitrary code") as info:
            ViTBackbone(arch="tiny_patch16", img_size=32, out_indices=[0, 1, 1, 1], pretrained=str(evil))
        assert str(evil) in str(info.value)
    else:
        script, flag = entry.split()
        cli, args = (main_pretrain.cli, pretrain_args) if script == "main_pretrain" else (main_finetune.cli,
                                                                                          finetune_args)
        with pytest.raises(SystemExit) as info:
            cli(args(tree, tmp_path, flag, str(evil)))
        assert expected in str(info.value) and "arbitrary code" in str(info.value)
    assert not os.path.exists(RunsCode.marker)


# ------------------------------------------------------------------------------ writes stay in the output folder
def snapshot(root, skip):
    """path -> (size, mtime) of every file and link below ``root`` except under ``skip``."""
    state = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != str(skip)]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            state[path] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.mark.parametrize("script", ["pretrain", "finetune", "blurred_images"])
def test_writes_stay_in_the_output_folder_and_links_out_of_it_are_never_followed(script, tree, tmp_path,
                                                                                  monkeypatch):
    data, out, outside = tmp_path / "data", tmp_path / "out", tmp_path / "outside"
    os.symlink(tree, data)
    outside.mkdir()
    out.mkdir()
    # links in the output folder pointing out of it, with the names the scripts write or prune
    names = {"pretrain": ["checkpoint-last.pth", "checkpoint-0.pth"],
             "finetune": ["checkpoint-last.pth", "checkpoint-best.pth"],
             "blurred_images": [os.path.join("train", "a", "0.png")]}[script]
    for i, name in enumerate(names):
        (outside / f"precious{i}").write_bytes(b"keep me")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(outside / f"precious{i}", out / name)
    monkeypatch.chdir(tmp_path)  # a script writing to the working folder would show up below
    before = snapshot(tmp_path, skip=out)
    if script == "pretrain":
        main_pretrain.cli(pretrain_args(data, out, "--epochs", "2", "--save_freq", "1", "--keep_last", "1"))
        assert not os.path.lexists(out / "checkpoint-0.pth")  # pruned: the link was replaced, then removed
    elif script == "finetune":
        main_finetune.cli(finetune_args(data, out))
    else:
        blurred_images.main(blurred_images.get_args_parser().parse_args(
            ["--src_dir", str(data), "--dst_dir", str(out), "--workers", "1", "--overwrite"]))
    assert snapshot(tmp_path, skip=out) == before
    for i, name in enumerate(names):
        assert (outside / f"precious{i}").read_bytes() == b"keep me"
        if os.path.lexists(out / name):
            assert not os.path.islink(out / name), name  # replaced by a file of ours, target untouched


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_log_txt_linked_out_of_the_output_folder_is_refused_at_start(script, tree, tmp_path):
    # the log is appended to, and used to be written through the link into the file it points to
    out, outside = tmp_path / "out", tmp_path / "outside.txt"
    out.mkdir()
    outside.write_text("keep me\n")
    os.symlink(outside, out / "log.txt")
    cli, args = (main_pretrain.cli, pretrain_args) if script == "pretrain" else (main_finetune.cli, finetune_args)
    with pytest.raises(SystemExit) as info:
        cli(args(tree, out))
    assert f"{out / 'log.txt'} is a symbolic link (to {outside}): refusing to write" in str(info.value)
    assert outside.read_text() == "keep me\n" and not list(out.glob("checkpoint-*.pth"))


def test_log_txt_link_made_during_a_run_is_not_followed(tmp_path):
    from util.training import append_log
    append_log(str(tmp_path), {"epoch": 0}, None, 0)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("keep me\n")
    os.replace(tmp_path / "log.txt", tmp_path / "old-log.txt")
    os.symlink(outside, tmp_path / "log.txt")
    with pytest.raises(SystemExit, match="log.txt is a symbolic link"):
        append_log(str(tmp_path), {"epoch": 1}, None, 1)
    assert outside.read_text() == "keep me\n"
