"""Physics, labels, masks, determinism and file layouts of tools/synthetic_us.py."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import synthetic_us as sus

RAYLEIGH_SNR = math.sqrt(math.pi / (4 - math.pi))      # 1.913: mean/std of a Rayleigh envelope


def _ideal_probe(**kw):
    """A probe without noise, compounding or TGC so only the tested effect remains."""
    return sus.Probe(noise_db=-np.inf, tgc_db_cm_mhz=0.0, tgc_ripple_db=(), compound_frames=1,
                     **kw)


def _homogeneous_envelope(gamma_shape, attenuation=0.0, probe=None, seed=0):
    probe = probe or _ideal_probe()
    grid = sus.make_grid(probe, (256, 256))
    maps = sus.TissueMaps.uniform(grid.shape, gamma_shape=gamma_shape, attenuation=attenuation)
    return sus.form_envelope(np.random.default_rng(seed), maps, probe, grid), grid


# ---------------------------------------------------------------------------------- physics
def test_fully_developed_speckle_has_rayleigh_snr():
    env, _ = _homogeneous_envelope(sus.RAYLEIGH)
    core = env[16:-16, 16:-16]
    assert core.mean() / core.std() == pytest.approx(RAYLEIGH_SNR, abs=0.08)
    # 0 dB tissue is the display reference: mean envelope sqrt(pi)/2 (unit mean power).
    assert core.mean() == pytest.approx(math.sqrt(math.pi) / 2, rel=0.05)


def test_sparse_scatterers_give_non_rayleigh_speckle():
    env, _ = _homogeneous_envelope(0.3)
    core = env[16:-16, 16:-16]
    assert core.mean() / core.std() < RAYLEIGH_SNR - 0.25


def test_depth_attenuation_matches_half_db_per_cm_per_mhz():
    probe = _ideal_probe(center_mhz=8.0)
    env, grid = _homogeneous_envelope(sus.RAYLEIGH, attenuation=0.5, probe=probe)
    power_db = 10 * np.log10((env ** 2).mean(axis=1))
    depth_cm = grid.crop(grid.d)[:, 0] / 10.0
    slope = np.polyfit(depth_cm, power_db, 1)[0]
    assert slope == pytest.approx(-2 * 0.5 * 8.0, rel=0.05)          # round trip
    # A TGC that assumes the right attenuation flattens the profile.
    probe = _ideal_probe(center_mhz=8.0)
    probe = replace(probe, tgc_db_cm_mhz=0.5)
    env, _ = _homogeneous_envelope(sus.RAYLEIGH, attenuation=0.5, probe=probe)
    flat = np.polyfit(depth_cm, 10 * np.log10((env ** 2).mean(axis=1)), 1)[0]
    assert abs(flat) < 0.5


@pytest.mark.parametrize("inclusion_attenuation, brighter_behind", [(0.02, True), (2.5, False)])
def test_posterior_enhancement_and_shadowing_emerge(inclusion_attenuation, brighter_behind):
    """A weakly attenuating cyst brightens what lies behind it, a strongly attenuating mass darkens
    it, with TGC set for ordinary tissue (no rule paints these artefacts)."""
    probe = replace(_ideal_probe(), tgc_db_cm_mhz=0.5)
    grid = sus.make_grid(probe, (256, 256))
    maps = sus.TissueMaps.uniform(grid.shape, attenuation=0.5)
    disk = np.hypot(grid.x, grid.z - 12.0) < 5.0
    maps.paint(disk, backscatter_db=-40.0, attenuation=inclusion_attenuation)
    env = sus.form_envelope(np.random.default_rng(1), maps, probe, grid)
    x, z = grid.crop(grid.x), grid.crop(grid.z)
    behind = (np.abs(x) < 3.0) & (z > 20.0) & (z < 30.0)
    beside = (np.abs(x) > 10.0) & (np.abs(x) < 16.0) & (z > 20.0) & (z < 30.0)
    ratio_db = 10 * np.log10((env[behind] ** 2).mean() / (env[beside] ** 2).mean())
    assert (ratio_db > 3.0) if brighter_behind else (ratio_db < -6.0)


# ---------------------------------------------------------------------------------- TI-RADS
def test_tirads_points_follow_acr():
    feat = {"composition": "solid", "echogenicity": "very_hypoechoic",
            "shape": "taller_than_wide", "margin": "lobulated_irregular",
            "echogenic_foci": ["punctate"]}
    assert sus.tirads_points(feat) == (13, "TR5")
    feat.update(composition="mixed", echogenicity="isoechoic", shape="wider_than_tall",
                margin="smooth", echogenic_foci=[])
    assert sus.tirads_points(feat) == (2, "TR2")
    feat.update(composition="spongiform", echogenic_foci=["punctate"])
    assert sus.tirads_points(feat) == (0, "TR1")


def test_feature_distributions_differ_by_label_but_overlap():
    rng = np.random.default_rng(0)
    pts = {lab: np.array([sus.sample_features(rng, lab)["tirads_points"] for _ in range(400)])
           for lab in sus.LABELS}
    assert pts["malignant"].mean() > pts["benign"].mean() + 2.0
    # Not separable by a threshold on the score: both labels populate TR3-TR5.
    assert (pts["benign"] >= 4).mean() > 0.15
    assert (pts["malignant"] <= 4).mean() > 0.05


# ---------------------------------------------------------------------------------- images
def test_generate_image_outputs():
    for size, sector in (((96, 160), False), (128, True)):
        img, mask, label, feat = sus.generate_image(3, size=size, sector=sector)
        shape = size if isinstance(size, tuple) else (size, size)
        assert img.shape == mask.shape == shape
        assert img.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and (mask == 255).any()
        assert label in sus.LABELS and feat["label"] == label
        assert img.std() > 10                       # not blank or constant
        json.dumps(feat)                            # the features are plain JSON
        if sector:                                  # the corners lie outside the fan: black
            assert img[0, 0] == img[0, -1] == 0 and mask[0, 0] == 0
    plain = sus.simulate(0, size=64, nodule=False)
    assert plain["label"] is None and not plain["mask"].any() and plain["image"].std() > 10
    with pytest.raises(ValueError, match="label"):
        sus.generate_image(0, label="Malignant")


def _core_and_parenchyma(out):
    """Output pixels deep inside the nodule, and thyroid parenchyma around it (not behind it)."""
    probe, nod, anat = out["probe"], out["nodule"], out["anatomy"]
    x, z, _ = sus.output_coordinates(probe, out["image"].shape)
    sd = nod.signed_distance(x, z)
    cx, cz, ax, az, power = anat.lobe
    lobe = sus.ellipse(x, z, cx, cz, ax - 1.0, az - 1.0, power)
    # Inside any halo (<= 1.3 mm), anterior half (the nodule's own attenuation darkens the rest).
    core = (sd < -1.5) & (z < nod.cz)
    ring = lobe & (sd > 1.5) & (z < nod.cz + nod.az)
    return core, ring


def test_mask_matches_nodule_and_its_echogenicity():
    expected_sign = {"anechoic": -1, "very_hypoechoic": -1, "hypoechoic": -1, "hyperechoic": 1}
    checked = 0
    for seed in range(32):
        label = sus.LABELS[seed % 2]
        out = sus.simulate(1000 + seed, size=256, label=label)
        img, mask, feat, nod = out["image"], out["mask"] > 0, out["features"], out["nodule"]
        # The mask is the nodule: its area matches the drawn size (contour wiggles aside).
        x, z, _ = sus.output_coordinates(out["probe"], img.shape)
        px_area = (x[0, 1] - x[0, 0]) * (z[1, 0] - z[0, 0])
        ratio = mask.sum() * px_area / (math.pi * nod.ax * nod.az)
        assert 0.6 < ratio < 1.7, (seed, ratio)
        assert mask[nod.inside(x, z)].all()
        sign = expected_sign.get(feat["echogenicity"])
        if sign is None or feat["composition"] not in ("solid", "cystic") or \
                feat["echogenic_foci"]:
            continue
        if sign > 0 and feat["halo"]:
            continue
        core, ring = _core_and_parenchyma(out)
        if core.sum() < 20 or ring.sum() < 200:
            continue
        diff = float(np.median(img[core]) - np.median(img[ring]))
        assert diff * sign > 4.0, (seed, feat["echogenicity"], diff)
        checked += 1
    assert checked >= 5


def test_labels_are_balanced():
    labels = [sus.generate_image(np.random.default_rng(s), size=64)[2] for s in range(40)]
    assert 13 <= labels.count("benign") <= 27


def test_same_seed_same_image_different_seed_different_image():
    a = sus.generate_image(123, size=96)
    b = sus.generate_image(123, size=96)
    c = sus.generate_image(124, size=96)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[2:] == b[2:]
    assert a[0].tobytes() != c[0].tobytes()
    # Per-image generators come from (seed, stream, index), not from any shared state.
    r1 = sus.image_rng(5, sus.LABELLED_STREAM, 7).random(4)
    sus.image_rng(5, sus.LABELLED_STREAM, 6).random(100)
    assert np.array_equal(r1, sus.image_rng(5, sus.LABELLED_STREAM, 7).random(4))
    assert not np.array_equal(r1, sus.image_rng(6, sus.LABELLED_STREAM, 7).random(4))


# ---------------------------------------------------------------------------------- CLI
def _tree(root: Path):
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_writes_layouts_independent_of_worker_count(tmp_path):
    args = ["--num_pretrain", "6", "--num_labelled", "8", "--size", "64", "--seed", "3", "--quiet"]
    sus.main(args + ["--out", str(tmp_path / "w1"), "--workers", "1"])
    sus.main(args + ["--out", str(tmp_path / "w2"), "--workers", "2"])
    one, two = _tree(tmp_path / "w1"), _tree(tmp_path / "w2")
    assert one == two

    def count(pattern):
        return len([k for k in one if Path(k).match(pattern)])
    assert count("pretrain/train/us/*.png") == 5 and count("pretrain/val/us/*.png") == 1
    # 8 labelled cases: 6 train / 1 val / 1 test, labels alternate so train is 3 + 3.
    assert count("cls/train/benign/*.png") == 3 and count("cls/train/malignant/*.png") == 3
    assert count("cls/val/*/*.png") == 1 and count("cls/test/*/*.png") == 1
    for split, n in (("train", 6), ("val", 1), ("test", 1)):
        assert count(f"seg/images/{split}/*.png") == n and count(f"seg/masks/{split}/*.png") == n
    root = tmp_path / "w1"
    for k in one:
        if k.startswith("seg/masks/"):
            mask = np.array(Image.open(root / k))
            assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
            image = np.array(Image.open(root / k.replace("masks", "images")))
            assert image.shape == (64, 64) and image.dtype == np.uint8
    records = [json.loads(line) for line in (root / "features.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for r in records:
        assert (root / "cls" / r["split"] / r["label"] / f"{r['id']}.png").is_file()
        assert r["features"]["label"] == r["label"] and "tirads_level" in r["features"]


def test_cli_rejects_bad_size(tmp_path):
    with pytest.raises(SystemExit):
        sus.main(["--out", str(tmp_path), "--size", "1", "2", "3"])


def test_same_seed_twice_gives_identical_files_and_another_seed_does_not(tmp_path):
    """Bit-identical output for the same command: two runs compared file by file."""
    args = ["--num_pretrain", "2", "--num_labelled", "4", "--size", "48", "--quiet",
            "--workers", "1"]
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        sus.main(args + ["--seed", seed, "--out", str(tmp_path / name)])
    a, b, c = (_tree(tmp_path / name) for name in "abc")
    assert len(a) == 2 + 3 * 4 + 1 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".png"))


# ---------------------------------------------------------------------------------- label cues
def _descriptor_sample(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return [sus.sample_features(rng, sus.LABELS[i % 2]) for i in range(n)]


def _rate(records, label, test):
    chosen = [r for r in records if r["label"] == label]
    return sum(map(test, chosen)) / len(chosen)


def test_fine_cues_depend_on_the_label():
    """The rules docs/synthetic-data.md states: micro-calcifications, irregular margins and the
    echotexture depend on the label; halo and comet tails are benign signs."""
    records = _descriptor_sample()
    cues = {"punctate": lambda f: "punctate" in f["echogenic_foci"],
            "irregular": lambda f: f["margin"] in ("lobulated_irregular",
                                                   "extrathyroidal_extension"),
            "halo": lambda f: f["halo"],
            "comet": lambda f: "comet_tail" in f["echogenic_foci"]}
    rates = {name: {lab: _rate(records, lab, test) for lab in sus.LABELS}
             for name, test in cues.items()}
    # punctate: 0.43 + 0.57 x 0.15 ~ 0.52 malignant vs 0.06 benign; margins 0.6 vs 0.15
    assert rates["punctate"]["malignant"] == pytest.approx(0.516, abs=0.04)
    assert rates["punctate"]["benign"] == pytest.approx(0.06, abs=0.02)
    assert rates["irregular"]["malignant"] == pytest.approx(0.6, abs=0.04)
    assert rates["irregular"]["benign"] == pytest.approx(0.15, abs=0.03)
    assert rates["halo"]["benign"] > rates["halo"]["malignant"] + 0.3
    assert rates["comet"]["benign"] > rates["comet"]["malignant"] + 0.08
    textures = {lab: {r["texture_gamma_shape"] for r in records if r["label"] == lab}
                for lab in sus.LABELS}
    assert textures == {"benign": {3.0}, "malignant": {1.0}}


def test_fine_descriptors_add_to_what_coarse_ones_carry():
    """Cross-validated on 3000 nodules' recorded descriptors: the fine cues alone predict the
    label, and adding them to the coarse ones halves the error; the coarse cues alone are strong
    too (AUROC ~0.97), as docs/synthetic-data.md reports."""
    records = _descriptor_sample()
    labels = [r["label"] == "malignant" for r in records]

    def score(names):
        return sus.cross_validated_auroc([sus.descriptor_columns(r, names) for r in records],
                                         labels)
    coarse = score(sus.COARSE_DESCRIPTORS)
    fine = score(sus.FINE_DESCRIPTORS)
    both = score(sus.COARSE_DESCRIPTORS + sus.FINE_DESCRIPTORS)
    assert 0.85 < fine["auroc"] < 0.92
    assert 0.94 < coarse["auroc"] < 0.98
    assert both["auroc"] > coarse["auroc"] + 0.015
    assert 1 - both["accuracy"] < 0.65 * (1 - coarse["accuracy"])
    # much of the coarse cues' strength is the attenuation (darker nodule, posterior shadow)
    no_attenuation = score(tuple(n for n in sus.COARSE_DESCRIPTORS if n != "attenuation"))
    assert no_attenuation["auroc"] < coarse["auroc"] - 0.05


def test_image_cues_measure_shape_brightness_and_spots():
    """A bright ellipse, twice as wide as tall, on a dark background, with a dark shadow below it;
    then the same with bright one-pixel spots inside: only the fine measurements change."""
    image = np.full((128, 128), 60, np.uint8)
    mask = np.zeros((128, 128), np.uint8)
    yy, xx = np.mgrid[:128, :128]
    inside = ((xx - 64) / 32.0) ** 2 + ((yy - 50) / 16.0) ** 2 <= 1
    mask[inside] = 255
    image[inside] = 120
    image[70:90, 40:88] = 20  # posterior shadow
    coarse, fine = sus.image_cues(image, mask)
    log_area, eccentricity, height_over_width, mean_inside, contrast, posterior = coarse
    assert math.exp(log_area) == pytest.approx(inside.mean(), rel=0.1)
    assert eccentricity == pytest.approx(math.sqrt(1 - 0.25), abs=0.06)
    assert height_over_width == pytest.approx(0.5, abs=0.1)
    assert mean_inside == pytest.approx(120, abs=8) and contrast > 30 and posterior < -20
    assert fine[3] == 0 and fine[4] == pytest.approx(1.0, abs=0.03)
    spotted = image.copy()
    spotted[40:60:4, 50:80:5] = 250
    coarse2, fine2 = sus.image_cues(spotted, mask)
    assert fine2[3] == pytest.approx(math.log1p(5 * 6)) and fine2[1] > fine[1] + 10
    assert coarse2[:3] == coarse[:3] and abs(coarse2[3] - coarse[3]) < 10


def test_audit_reads_a_written_data_set(tmp_path, capsys):
    sus.main(["--out", str(tmp_path / "d"), "--num_pretrain", "0", "--num_labelled", "12",
              "--size", "64", "--seed", "1", "--quiet", "--workers", "1"])
    n, rows = sus.audit_labels(tmp_path / "d", folds=2)
    assert n == 12 and len(rows) == 9
    assert all(0 <= m["auroc"] <= 1 and 0 <= m["accuracy"] <= 1 for _, _, m in rows)
    assert [k for _, k, _ in rows] == [10, 7, 17, 6, 13, 5, 5, 11, 11]
    with pytest.raises(SystemExit, match="features.jsonl"):
        sus.main(["--audit", str(tmp_path)])
