"""Synthetic thyroid B-mode ultrasound with nodules, labels, masks and TI-RADS features.

A physically motivated generator (numpy/scipy only) for demos, tests and benchmarks when no real
thyroid data is at hand.  Each image is formed the way a scanner forms it:

1. *Tissue*: a transverse view of the neck (skin, subcutaneous fat, strap and sternocleidomastoid
   muscles, thyroid lobe and isthmus, carotid artery and jugular vein, trachea, longus colli) as
   maps of diffuse backscatter (echogenicity, dB re. thyroid parenchyma), scatterer density
   (gamma shape; large = fully developed speckle), attenuation (dB/cm/MHz) and acoustic impedance
   (MRayl).
2. *Scatterers*: a circular complex Gaussian field whose local power is the backscatter times a
   gamma-distributed cross-section, so sparse tissue gives K-distributed (non-Rayleigh) speckle.
   Impedance steps along the beam add coherent specular echoes (strongest where the interface is
   perpendicular to the beam) and cost transmitted energy, so air and calcifications shadow.
3. *Propagation*: round-trip attenuation integrated along each beam line; a time-gain compensation
   that assumes a slightly wrong attenuation, so posterior shadowing and enhancement emerge.
4. *Beamforming*: a separable pulse-echo point-spread function (Gaussian-modulated, set by the
   axial and lateral resolution) FFT-convolved with the field; receiver noise enters before the
   axial (receive) filter; optional spatial compounding of partially decorrelated frames.
5. *Display*: envelope detection, log compression over a dynamic range to 8 bits, and scan
   conversion (linear, or a curvilinear sector).

Units: mm, MHz, dB; the speed of sound is 1540 m/s.  Envelope statistics of a homogeneous region
are Rayleigh (mean/std 1.91) for fully developed speckle, as tests/test_synthetic_us.py checks.

Nodules are drawn from label-conditional distributions over ACR TI-RADS descriptors that overlap,
so the benign/malignant task is learnable but not trivial.  docs/synthetic-data.md states the rules
(which cue depends on the label, how strongly, at which scale) and what ``--audit`` measured: how
well coarse and fine cues predict the label.

Python API: :func:`generate_image`, :func:`write_layouts`; lower level :func:`form_envelope`.
CLI (writes the pretraining, classification and segmentation trees the scripts read)::

    python tools/synthetic_us.py --out data/synthetic --num_pretrain 2000 --num_labelled 400
    python tools/synthetic_us.py --audit data/synthetic    # label-cue audit of a written data set
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage, signal
from scipy.special import erfc

REPO = Path(__file__).resolve().parents[1]
SPEED_OF_SOUND_MM_PER_US = 1.54
# Finest sample spacing of the simulation grid.  Speckle grains are ~0.3 x 0.5 mm, so ~0.16 mm
# samples resolve them; a smaller output image is a downsampled view, not a coarser physics.
SIM_SPACING_MM = 0.16
LABELS = ("benign", "malignant")

# Acoustic impedances (MRayl).  Only their ratios matter: they set reflection and transmission.
Z_GEL, Z_FAT, Z_SOFT, Z_MUSCLE, Z_FASCIA = 1.50, 1.38, 1.63, 1.70, 1.85
Z_BLOOD, Z_FLUID, Z_CARTILAGE, Z_CALCIUM, Z_AIR = 1.61, 1.52, 1.75, 4.5, 0.0004
RAYLEIGH = np.inf  # gamma shape meaning "many scatterers per resolution cell"
# Echo of a perpendicular interface with pressure reflection coefficient R, per sample, relative to
# the diffuse echo of 0 dB tissue.  Calibrated so that a fat/muscle fascia (R ~ 0.1) shows about
# +15 dB over thyroid parenchyma, as in clinical images; air (R ~ 1) saturates the display.
SPECULAR_GAIN = 3.0 / 0.1


# ----------------------------------------------------------------------------------------------
# Probe and sampling grid
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """Acquisition and display settings of one image."""
    center_mhz: float = 10.0          # transmit centre frequency
    axial_fwhm_mm: float = 0.28       # pulse-echo axial resolution, ~ c / (2 * bandwidth)
    lateral_fwhm_mm: float = 0.50     # lateral resolution, ~ wavelength * f-number
    depth_mm: float = 40.0            # imaged depth below the probe face
    width_mm: float = 40.0            # linear array aperture (field of view width)
    sector: bool = False              # curvilinear (fan) geometry instead of linear
    apex_mm: float = 25.0             # curvilinear radius: distance from virtual apex to the face
    half_angle_deg: float = 28.0      # half opening angle of the sector
    dynamic_range_db: float = 60.0    # displayed span of the log-compressed envelope
    thyroid_gray: float = 0.55        # display level (fraction of 255) of mean thyroid speckle
    tgc_db_cm_mhz: float = 0.55       # attenuation the time-gain compensation assumes
    tgc_ripple_db: tuple = ()         # (amplitude dB, cycles over depth, phase) of TGC slider error
    noise_db: float = -62.0           # receiver noise re. thyroid speckle at the face (before TGC)
    demod_offset_mhz: float = 0.0     # echo centre minus IQ demodulation frequency
    compound_frames: int = 1          # steered frames averaged by spatial compounding
    compound_correlation: float = 0.0  # speckle correlation between compounded frames


def sample_probe(rng: np.random.Generator, sector: bool = False) -> Probe:
    """A plausible high-frequency thyroid probe and operator setting."""
    f0 = rng.uniform(7.0, 11.0)
    wavelength_mm = SPEED_OF_SOUND_MM_PER_US / f0
    # Pulse-echo resolution of clinical linear arrays: axial ~2 wavelengths (a 1.5-2 cycle pulse
    # after the receive filter), lateral ~ wavelength x F-number with F# 3-5 (the beam is wider
    # than the transmit focus everywhere else).
    axial = wavelength_mm * rng.uniform(1.5, 2.2)
    lateral = wavelength_mm * rng.uniform(3.0, 5.0)
    ripple = tuple((rng.uniform(0.3, 1.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi))
                   for _ in range(2))
    return Probe(center_mhz=f0, axial_fwhm_mm=axial, lateral_fwhm_mm=lateral,
                 depth_mm=rng.uniform(32.0, 45.0), width_mm=rng.uniform(36.0, 46.0),
                 sector=sector, apex_mm=rng.uniform(20.0, 40.0),
                 half_angle_deg=rng.uniform(22.0, 32.0),
                 dynamic_range_db=rng.uniform(50.0, 66.0), thyroid_gray=rng.uniform(0.5, 0.66),
                 tgc_db_cm_mhz=rng.uniform(0.4, 0.6), tgc_ripple_db=ripple,
                 noise_db=rng.uniform(-80.0, -68.0), compound_frames=int(rng.integers(1, 4)),
                 # Attenuation lowers the echo's centre frequency below the nominal one.
                 demod_offset_mhz=-rng.uniform(0.0, 1.0),
                 compound_correlation=rng.uniform(0.2, 0.5))


@dataclass
class BeamGrid:
    """Samples in beam coordinates (axis 0: time/depth along the beam, axis 1: beam line).

    ``x``/``z`` are Cartesian positions (mm; z down from the face centre), ``d`` is depth below the
    skin along the beam (layers follow the probe face).  ``pad`` extra samples on each side let the
    PSF see scatterers beyond the image edge; :meth:`crop` removes them.
    """
    x: np.ndarray
    z: np.ndarray
    d: np.ndarray
    dr_mm: float                       # axial sample spacing
    dl_mm: float                       # lateral sample spacing at the focal depth
    pad: tuple

    @property
    def shape(self):
        return self.x.shape

    def crop(self, a: np.ndarray) -> np.ndarray:
        pa, pl = self.pad
        return a[pa:a.shape[0] - pa, pl:a.shape[1] - pl]


def _psf_pad(probe: Probe, dr_mm: float, dl_mm: float) -> tuple:
    """Samples the PSF reaches beyond its centre (3 sigma) along each axis."""
    sa = probe.axial_fwhm_mm / 2.3548 / dr_mm
    sl = probe.lateral_fwhm_mm / 2.3548 / dl_mm
    return int(math.ceil(3 * sa)) + 1, int(math.ceil(3 * sl)) + 1


def sim_shape(probe: Probe, out_shape: tuple) -> tuple:
    """Beam-grid size: at least the output size and fine enough to resolve speckle."""
    h, w = out_shape
    n_ax = max(h, int(math.ceil(probe.depth_mm / SIM_SPACING_MM)))
    if probe.sector:
        arc_mm = 2 * math.radians(probe.half_angle_deg) * (probe.apex_mm + probe.depth_mm / 2)
        return n_ax, max(w, int(math.ceil(arc_mm / SIM_SPACING_MM)))
    return n_ax, max(w, int(math.ceil(probe.width_mm / SIM_SPACING_MM)))


def make_grid(probe: Probe, shape: tuple) -> BeamGrid:
    """Sample positions of a beam grid of ``shape`` (without padding), padded for the PSF."""
    n_ax, n_lat = shape
    dr = probe.depth_mm / n_ax
    if probe.sector:
        half = math.radians(probe.half_angle_deg)
        dtheta = 2 * half / n_lat
        dl = dtheta * (probe.apex_mm + probe.depth_mm / 2)
    else:
        dl = probe.width_mm / n_lat
    pa, pl = _psf_pad(probe, dr, dl)
    depth = (np.arange(-pa, n_ax + pa) + 0.5) * dr
    if probe.sector:
        theta = (np.arange(-pl, n_lat + pl) + 0.5) * dtheta - half
        r = probe.apex_mm + depth[:, None]
        x = r * np.sin(theta)[None, :]
        z = r * np.cos(theta)[None, :] - probe.apex_mm
        d = np.broadcast_to(depth[:, None], x.shape).copy()
    else:
        lat = (np.arange(-pl, n_lat + pl) + 0.5) * dl - probe.width_mm / 2
        x, z = np.meshgrid(lat, depth)
        d = z.copy()
    return BeamGrid(x=x, z=z, d=d, dr_mm=dr, dl_mm=dl, pad=(pa, pl))


def output_coordinates(probe: Probe, out_shape: tuple):
    """Cartesian (x, z) in mm of the output pixel centres and the mask of pixels inside the scan."""
    h, w = out_shape
    if probe.sector:
        half = math.radians(probe.half_angle_deg)
        r_max = probe.apex_mm + probe.depth_mm
        x_max = r_max * math.sin(half)
        z_top = probe.apex_mm * (math.cos(half) - 1.0)     # face edges sit above the face centre
        x = (np.arange(w) + 0.5) / w * 2 * x_max - x_max
        z = z_top + (np.arange(h) + 0.5) / h * (probe.depth_mm - z_top)
        x, z = np.meshgrid(x, z)
        r = np.hypot(x, z + probe.apex_mm)
        theta = np.arctan2(x, z + probe.apex_mm)
        inside = (r >= probe.apex_mm) & (r <= r_max) & (np.abs(theta) <= half)
        return x, z, inside
    x = (np.arange(w) + 0.5) / w * probe.width_mm - probe.width_mm / 2
    z = (np.arange(h) + 0.5) / h * probe.depth_mm
    x, z = np.meshgrid(x, z)
    return x, z, np.ones((h, w), bool)


# ----------------------------------------------------------------------------------------------
# Tissue property maps
# ----------------------------------------------------------------------------------------------
@dataclass
class TissueMaps:
    """Acoustic properties on a beam grid (padded)."""
    backscatter_db: np.ndarray      # diffuse echogenicity re. thyroid parenchyma
    gamma_shape: np.ndarray         # scatterer-density shape; np.inf = fully developed speckle
    attenuation: np.ndarray         # dB/cm/MHz
    impedance: np.ndarray           # MRayl
    coherent: np.ndarray = None     # extra coherent reflectivity (pressure reflection units)

    @classmethod
    def uniform(cls, shape, backscatter_db=0.0, gamma_shape=RAYLEIGH, attenuation=0.5,
                impedance=Z_SOFT):
        return cls(np.full(shape, backscatter_db, float), np.full(shape, gamma_shape, float),
                   np.full(shape, attenuation, float), np.full(shape, impedance, float))

    def paint(self, where, backscatter_db=None, gamma_shape=None, attenuation=None,
              impedance=None):
        """Assign properties inside a boolean region (later paints cover earlier ones)."""
        for name, value in (("backscatter_db", backscatter_db), ("gamma_shape", gamma_shape),
                            ("attenuation", attenuation), ("impedance", impedance)):
            if value is not None:
                arr = getattr(self, name)
                arr[where] = value[where] if isinstance(value, np.ndarray) else value


def smooth_curve(rng, x, base, amplitude, wavelengths_mm=(30.0, 14.0)):
    """A gently undulating interface depth z = f(x) (tissue planes are never flat)."""
    out = np.full_like(x, base, dtype=float)
    for lam in wavelengths_mm:
        out += amplitude * rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * x / lam + rng.uniform(0, 6.3))
    return out


def correlated_field(rng, shape, sigma_px) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with the given correlation lengths (samples)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="wrap")
    return f / (f.std() + 1e-12)


def ellipse(x, z, cx, cz, ax, az, power=2.0):
    """Inside a (super)ellipse centred (cx, cz) with semi-axes (ax, az) in mm."""
    return (np.abs((x - cx) / ax) ** power + np.abs((z - cz) / az) ** power) <= 1.0


@dataclass
class Anatomy:
    """Neck layout in mm; ``side`` = +1 if lateral is to the right (x > 0), else -1."""
    side: int
    skin_mm: float
    fat_bottom: tuple                 # (mean depth, undulation amplitude) of the fat/muscle plane
    muscle_bottom: tuple              # same for the strap muscle / thyroid plane
    lobe: tuple                       # (cx, cz, ax, az, power)
    isthmus: tuple                    # (z_top, thickness)
    carotid: tuple                    # (cx, cz, radius, wall)
    jugular: tuple | None             # (cx, cz, ax, az)
    trachea: tuple | None             # (cx, cz, radius, wall)
    scm: tuple                        # sternocleidomastoid lens (cx, cz, ax, az)
    longus: tuple                     # (cx, cz, ax, az)
    seed: int                         # texture seed (curves, fibre fields)


# ----------------------------------------------------------------------------------------------
# Nodules and ACR TI-RADS
# ----------------------------------------------------------------------------------------------
# Label-conditional probabilities.  They overlap on purpose: many benign nodules are hypoechoic
# and solid, many carcinomas are wider-than-tall, so a classifier must combine several cues.
# Written side by side, (benign, malignant), so that how strongly each cue depends on the label
# reads off one line; FEATURE_PRIORS below is the same per label.
PRIORS_BENIGN_MALIGNANT = {
    "composition": {"cystic": (0.15, 0.02), "spongiform": (0.15, 0.0), "mixed": (0.25, 0.13),
                    "solid": (0.45, 0.85)},
    "echogenicity": {"hyperechoic": (0.2, 0.03), "isoechoic": (0.45, 0.12), "hypoechoic": (0.3, 0.5),
                     "very_hypoechoic": (0.05, 0.35)},
    "taller_than_wide": (0.1, 0.45),
    "margin": {"smooth": (0.6, 0.2), "ill_defined": (0.25, 0.2), "lobulated_irregular": (0.15, 0.5),
               "extrathyroidal_extension": (0.0, 0.1)},
    "foci": {"none": (0.6, 0.3), "comet_tail": (0.18, 0.02), "macrocalcification": (0.12, 0.15),
             "peripheral_rim": (0.04, 0.1), "punctate": (0.06, 0.43)},
    "halo": (0.45, 0.1),
    "attenuation": ((0.35, 1.0), (0.8, 1.9)),  # uniform range of dB/cm/MHz
}


def _prior_of(label_index: int, value):
    return {k: v[label_index] for k, v in value.items()} if isinstance(value, dict) else value[label_index]


FEATURE_PRIORS = {label: {feature: _prior_of(i, value) for feature, value in PRIORS_BENIGN_MALIGNANT.items()}
                  for i, label in enumerate(("benign", "malignant"))}

# Solid-part echogenicity ranges (dB re. thyroid).  Strap muscle sits near -8 dB, which is the
# boundary between "hypo" and "very hypo" in ACR terms.
ECHO_DB = {"hyperechoic": (3.5, 8.0), "isoechoic": (-2.5, 2.0), "hypoechoic": (-11.0, -3.0),
           "very_hypoechoic": (-22.0, -11.0), "anechoic": (-45.0, -40.0)}
# Scatterer-density shape of the solid part (see scatterer_amplitude; 1 = coarse, heterogeneous
# speckle of carcinomas) and the impedance step of the stroma over parenchyma (a faint boundary echo).
TEXTURE_GAMMA_SHAPE = {"benign": 3.0, "malignant": 1.0}
STROMA_IMPEDANCE_STEP = {"benign": 0.0, "malignant": 0.04}
POINTS = {
    "composition": {"cystic": 0, "spongiform": 0, "mixed": 1, "solid": 2},
    "echogenicity": {"anechoic": 0, "hyperechoic": 1, "isoechoic": 1, "hypoechoic": 2,
                     "very_hypoechoic": 3},
    "shape": {"wider_than_tall": 0, "taller_than_wide": 3},
    "margin": {"smooth": 0, "ill_defined": 0, "lobulated_irregular": 2,
               "extrathyroidal_extension": 3},
    "foci": {"none": 0, "comet_tail": 0, "macrocalcification": 1, "peripheral_rim": 2,
             "punctate": 3},
}


def _choice(rng, probs: dict):
    keys = list(probs)
    p = np.array([probs[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def tirads_points(feat: dict) -> tuple:
    """ACR TI-RADS points and level (TR1-TR5) of a feature dict."""
    if feat["composition"] == "spongiform":     # ACR: spongiform scores 0, add nothing else
        return 0, "TR1"
    pts = (POINTS["composition"][feat["composition"]] + POINTS["echogenicity"][feat["echogenicity"]]
           + POINTS["shape"][feat["shape"]] + POINTS["margin"][feat["margin"]]
           + sum(POINTS["foci"][f] for f in feat["echogenic_foci"]))
    level = "TR1" if pts == 0 else "TR2" if pts == 2 else "TR3" if pts <= 3 else \
        "TR4" if pts <= 6 else "TR5"
    return int(pts), level


def sample_features(rng, label: str) -> dict:
    """TI-RADS descriptors and physical parameters of one nodule, given its label."""
    pr = FEATURE_PRIORS[label]
    comp = _choice(rng, pr["composition"])
    echo = "anechoic" if comp == "cystic" else _choice(rng, pr["echogenicity"])
    if comp == "spongiform":        # spongiform tissue between the microcysts is iso/hyperechoic
        echo = "isoechoic" if rng.random() < 0.7 else "hyperechoic"
    ttw = rng.random() < pr["taller_than_wide"]
    margin = _choice(rng, pr["margin"])
    foci = _choice(rng, pr["foci"])
    if foci == "comet_tail" and comp == "solid":   # colloid lives in fluid spaces
        foci = "none"
    foci_list = [] if foci == "none" else [foci]
    if foci != "punctate" and label == "malignant" and rng.random() < 0.15:
        foci_list.append("punctate")
    transverse = float(np.exp(rng.uniform(np.log(5.0), np.log(17.0))))
    ratio = rng.uniform(1.05, 1.5) if ttw else rng.uniform(0.5, 0.97)
    lo, hi = pr["attenuation"]
    if echo in ("hyperechoic", "isoechoic"):
        # Strong attenuation comes from fibrosis, which also makes tissue hypoechoic; an
        # attenuating "hyperechoic" nodule would look hypoechoic once its lower half darkens.
        lo, hi = min(lo, 0.5), min(hi, 0.9)
    feat = {
        "label": label,
        "composition": comp,
        "echogenicity": echo,
        "shape": "taller_than_wide" if ttw else "wider_than_tall",
        "margin": margin,
        "echogenic_foci": foci_list,
        "halo": bool(rng.random() < pr["halo"] and margin != "extrathyroidal_extension"),
        "size_mm": {"transverse": round(transverse, 2),
                    "anteroposterior": round(transverse * ratio, 2)},
        "solid_echogenicity_db": round(float(rng.uniform(*ECHO_DB[echo])), 2),
        "attenuation_db_cm_mhz": round(float(rng.uniform(lo, hi)), 3),
        # Echotexture and stroma, fixed by the label (no draw): carcinomas have fewer, coarser
        # scatterers (K-distributed speckle) and a slightly stiffer, desmoplastic stroma.
        "texture_gamma_shape": TEXTURE_GAMMA_SHAPE[label],
        "stroma_impedance_step_mrayl": STROMA_IMPEDANCE_STEP[label],
    }
    feat["tirads_points"], feat["tirads_level"] = tirads_points(feat)
    return feat


@dataclass
class Nodule:
    """Geometry of a nodule: a star-shaped contour around (cx, cz), tilted by ``tilt`` rad."""
    cx: float
    cz: float
    ax: float                        # semi-axis, transverse (mm)
    az: float                        # semi-axis, antero-posterior (mm)
    tilt: float
    harmonics: np.ndarray            # rows (k, amplitude, phase) of the contour perturbation
    spikes: np.ndarray               # rows (angle, width rad, height) of spiculations
    edge_mm: float                   # width of the echogenicity transition (ill-defined margins)
    features: dict
    seed: int

    def signed_distance(self, x, z):
        """Approximate signed distance to the contour in mm (negative inside)."""
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        u = ((x - self.cx) * c + (z - self.cz) * s) / self.ax
        v = (-(x - self.cx) * s + (z - self.cz) * c) / self.az
        rho = np.hypot(u, v)
        phi = np.arctan2(v, u)
        radius = np.ones_like(rho)
        for k, amp, ph in self.harmonics:
            radius += amp * np.cos(k * phi + ph)
        for ang, width, height in self.spikes:
            dphi = np.angle(np.exp(1j * (phi - ang)))
            radius += height * np.exp(-0.5 * (dphi / width) ** 2)
        # Scale by the local radius (mm) so the transition width is in millimetres.
        local_r_mm = np.hypot(self.ax * np.cos(phi), self.az * np.sin(phi))
        return (rho - radius) * local_r_mm

    def inside(self, x, z):
        return self.signed_distance(x, z) <= 0.0


def sample_nodule_geometry(rng, feat: dict, center) -> Nodule:
    """Contour of a nodule with the margin its features describe."""
    ax = feat["size_mm"]["transverse"] / 2
    az = feat["size_mm"]["anteroposterior"] / 2
    margin = feat["margin"]
    harm = [(k, rng.uniform(0.0, 0.035), rng.uniform(0, 6.3)) for k in (2, 3)]
    spikes = []
    edge = rng.uniform(0.1, 0.25)
    if margin == "ill_defined":
        edge = rng.uniform(0.8, 1.8)
    elif margin in ("lobulated_irregular", "extrathyroidal_extension"):
        if rng.random() < 0.5:      # lobulated: a few bulges
            harm += [(k, rng.uniform(0.05, 0.11), rng.uniform(0, 6.3))
                     for k in rng.choice(np.arange(3, 7), 2, replace=False)]
        else:                       # irregular / spiculated: fine jaggedness plus spicules
            harm += [(k, rng.uniform(0.015, 0.04), rng.uniform(0, 6.3)) for k in range(6, 15, 2)]
            n = int(rng.integers(4, 11))
            spikes = [(rng.uniform(-np.pi, np.pi), rng.uniform(0.04, 0.1), rng.uniform(0.12, 0.35))
                      for _ in range(n)]
    return Nodule(cx=center[0], cz=center[1], ax=ax, az=az, tilt=rng.uniform(-0.25, 0.25),
                  harmonics=np.array(harm, float).reshape(-1, 3),
                  spikes=np.array(spikes, float).reshape(-1, 3), edge_mm=edge, features=feat,
                  seed=int(rng.integers(2 ** 31)))


# ----------------------------------------------------------------------------------------------
# Anatomy sampling and painting
# ----------------------------------------------------------------------------------------------
def sample_anatomy(rng, nodule_feat: dict | None):
    """Neck layout sized so that the nodule fits in the thyroid lobe; returns (anatomy, nodule)."""
    side = 1 if rng.random() < 0.5 else -1
    skin = rng.uniform(1.3, 2.3)
    fat_base = skin + rng.uniform(1.5, 5.0)
    muscle_base = fat_base + rng.uniform(3.0, 6.0)
    # Lobe in "lateral" coordinate u = side * x (u > 0 towards the carotid).
    ax_l, az_l = rng.uniform(8.0, 12.0), rng.uniform(6.0, 9.0)
    nod = None
    if nodule_feat is not None:
        n_ax = nodule_feat["size_mm"]["transverse"] / 2
        n_az = nodule_feat["size_mm"]["anteroposterior"] / 2
        # A nodule enlarges the lobe; keep ~1.5 mm of parenchyma around it unless it breaks out.
        ax_l = max(ax_l, n_ax * 1.25 + 1.5)
        az_l = max(az_l, n_az * 1.15 + 1.5)
    u_l = rng.uniform(-4.0, 1.0)
    cz_l = muscle_base + az_l + rng.uniform(0.2, 1.0)
    if nodule_feat is not None:
        n_ax = nodule_feat["size_mm"]["transverse"] / 2
        n_az = nodule_feat["size_mm"]["anteroposterior"] / 2
        du = rng.uniform(-1, 1) * max(0.0, ax_l - n_ax * 1.15 - 1.0)
        dz = rng.uniform(-1, 1) * max(0.0, az_l - n_az * 1.1 - 1.0)
        if nodule_feat["margin"] == "extrathyroidal_extension":
            dz = -(az_l - 0.6 * n_az)       # nodule breaks through the anterior capsule
        center = (side * (u_l + du), cz_l + dz)
        nod = sample_nodule_geometry(rng, nodule_feat, center)
        n_right = u_l + du + n_ax * 1.4     # lateral extent incl. spicules (in u)
        n_left = u_l + du - n_ax * 1.4
    else:
        n_right, n_left = u_l, u_l
    r_c = rng.uniform(2.8, 4.0)
    u_c = max(u_l + ax_l * rng.uniform(0.8, 1.0), n_right + 0.8) + r_c
    cz_c = cz_l + rng.uniform(0.0, 3.0)
    carotid = (side * u_c, cz_c, r_c, rng.uniform(0.5, 0.9))
    jugular = None
    if rng.random() < 0.6:
        jugular = (side * (u_c + r_c + rng.uniform(2.0, 4.0)), cz_c - rng.uniform(1.0, 3.0),
                   rng.uniform(3.0, 6.0), rng.uniform(1.2, 3.5))
    trachea = None
    r_t = rng.uniform(7.0, 9.0)
    if rng.random() < 0.55:
        u_t = min(u_l - ax_l * rng.uniform(0.5, 0.8), n_left - 1.0) - r_t
        trachea = (side * u_t, cz_l + rng.uniform(-1.0, 2.0), r_t, rng.uniform(1.2, 2.0))
    isthmus = (muscle_base + rng.uniform(0.0, 1.0), rng.uniform(2.0, 4.0))
    scm = (side * (u_c + rng.uniform(-2.0, 3.0)), fat_base + rng.uniform(2.0, 3.5),
           rng.uniform(9.0, 14.0), rng.uniform(2.5, 4.0))
    longus = (side * (u_l - rng.uniform(2.0, 6.0)), cz_l + az_l + rng.uniform(2.5, 4.5),
              rng.uniform(6.0, 10.0), rng.uniform(2.5, 4.0))
    anat = Anatomy(side=side, skin_mm=skin, fat_bottom=(fat_base, rng.uniform(0.3, 1.2)),
                   muscle_bottom=(muscle_base, rng.uniform(0.3, 1.0)),
                   lobe=(side * u_l, cz_l, ax_l, az_l, rng.uniform(2.0, 2.6)), isthmus=isthmus,
                   carotid=carotid, jugular=jugular, trachea=trachea, scm=scm, longus=longus,
                   seed=int(rng.integers(2 ** 31)))
    return anat, nod


def _paint_layers(maps: TissueMaps, grid: BeamGrid, anat: Anatomy, rng, fibres):
    """Gel, skin, subcutaneous fat with septa, strap muscle with perimysium, deep soft tissue."""
    x, d = grid.x, grid.d
    fat_bottom = smooth_curve(rng, x, *anat.fat_bottom)
    muscle_bottom = smooth_curve(rng, x, *anat.muscle_bottom)
    muscle_bottom = np.maximum(muscle_bottom, fat_bottom + 1.5)
    deep_texture = 2.0 * correlated_field(rng, grid.shape, (3.0, 6.0))
    maps.paint(d >= 0, backscatter_db=-5.0 + deep_texture, gamma_shape=1.5, attenuation=0.6,
               impedance=Z_SOFT)
    # Subcutaneous fat: hypoechoic lobules between bright fibrous septa (septa run laterally).
    fat = (d >= anat.skin_mm) & (d < fat_bottom)
    septa = fibres > 1.3
    maps.paint(fat, backscatter_db=np.where(septa, 2.0, -11.0), gamma_shape=0.8,
               attenuation=0.6, impedance=np.where(septa, 1.48, Z_FAT))
    # Strap muscles: hypoechoic fibres with echogenic perimysium dots/streaks; fascia on both faces.
    muscle = (d >= fat_bottom) & (d < muscle_bottom)
    perimysium = fibres > 1.0
    maps.paint(muscle, backscatter_db=np.where(perimysium, -2.0, -9.0), gamma_shape=1.0,
               attenuation=1.0, impedance=Z_MUSCLE)
    for depth in (fat_bottom, muscle_bottom):
        maps.paint((d >= depth) & (d < depth + 0.35), backscatter_db=3.0, impedance=Z_FASCIA)
    # Skin (dermis): thin, echogenic, collagen-rich; gel above it has no scatterers.
    maps.paint((d >= 0) & (d < anat.skin_mm), backscatter_db=5.0, gamma_shape=3.0,
               attenuation=1.2, impedance=1.62)
    maps.paint(d < 0, backscatter_db=-80.0, gamma_shape=RAYLEIGH, attenuation=0.0,
               impedance=Z_GEL)
    return muscle_bottom


def _paint_organs(maps: TissueMaps, grid: BeamGrid, anat: Anatomy, rng, fibres, muscle_bottom):
    """Deep muscles, thyroid lobe + isthmus, vessels and trachea (order = who covers whom)."""
    x, z, d = grid.x, grid.z, grid.d
    below_muscle = d >= muscle_bottom
    cx, cz, ax, az = anat.longus
    maps.paint(ellipse(x, z, cx, cz, ax, az) & below_muscle,
               backscatter_db=np.where(fibres > 1.1, -3.0, -9.0), gamma_shape=1.0,
               attenuation=1.0, impedance=Z_MUSCLE)
    cx, cz, ax, az = anat.scm
    scm = ellipse(x, z, cx, cz, ax, az) & (d >= muscle_bottom - 4.0)
    maps.paint(scm, backscatter_db=np.where(fibres > 1.0, -2.0, -9.0), gamma_shape=1.0,
               attenuation=1.0, impedance=Z_MUSCLE)
    # Thyroid: homogeneous "ground glass" parenchyma (near-Rayleigh), capsule as a bright rim.
    lcx, lcz, lax, laz, power = anat.lobe
    lobe = ellipse(x, z, lcx, lcz, lax, laz, power)
    lobe_with_capsule = ellipse(x, z, lcx, lcz, lax + 0.4, laz + 0.4, power)
    z_top, thick = anat.isthmus
    medial = (x - lcx) * anat.side < 0
    isthmus = medial & (d >= z_top) & (d < z_top + thick)
    thyroid = (lobe | isthmus) & below_muscle
    capsule = (lobe_with_capsule | (medial & (d >= z_top - 0.4) & (d < z_top + thick + 0.4))) \
        & ~thyroid & below_muscle
    parenchyma = 1.2 * correlated_field(rng, grid.shape, (6.0, 6.0))
    maps.paint(capsule, backscatter_db=2.0, gamma_shape=5.0, attenuation=0.8,
               impedance=Z_FASCIA)
    maps.paint(thyroid, backscatter_db=parenchyma, gamma_shape=6.0, attenuation=0.5,
               impedance=Z_SOFT)
    if anat.jugular is not None:
        cx, cz, ax, az = anat.jugular
        maps.paint(ellipse(x, z, cx, cz, ax, az) & below_muscle, backscatter_db=-38.0,
                   gamma_shape=RAYLEIGH, attenuation=0.18, impedance=Z_BLOOD)
    # Carotid: echogenic intima-media wall around an anechoic, weakly attenuating lumen.
    cx, cz, rad, wall = anat.carotid
    rr = np.hypot(x - cx, z - cz)
    maps.paint(rr < rad + wall, backscatter_db=0.0, gamma_shape=4.0, attenuation=1.0,
               impedance=1.78)
    maps.paint(rr < rad, backscatter_db=-42.0, gamma_shape=RAYLEIGH, attenuation=0.18,
               impedance=Z_BLOOD)
    if anat.trachea is not None:
        # Cartilage ring (hypoechoic), mucosa, then air: total reflection and a clean shadow.
        cx, cz, rad, wall = anat.trachea
        rr = np.hypot(x - cx, z - cz)
        maps.paint(rr < rad + wall, backscatter_db=-16.0, gamma_shape=RAYLEIGH,
                   attenuation=1.0, impedance=Z_CARTILAGE)
        maps.paint(rr < rad, backscatter_db=-80.0, gamma_shape=RAYLEIGH, attenuation=0.0,
                   impedance=Z_AIR)


def _paint_nodule(maps: TissueMaps, grid: BeamGrid, nod: Nodule):
    """Nodule interior by composition, halo, calcifications and comet tails.

    Returns the extra coherent reflectivity (comet tails) for :attr:`TissueMaps.coherent`.
    """
    rng = np.random.default_rng(nod.seed)
    f = nod.features
    x, z = grid.x, grid.z
    sd = nod.signed_distance(x, z)
    # Echogenicity blends across the margin over edge_mm (sharp for smooth, wide for ill-defined).
    w = 0.5 * erfc(sd / (nod.edge_mm * 0.7))
    region = sd < 2.0 * nod.edge_mm
    background = maps.backscatter_db.copy()
    solid_db = f["solid_echogenicity_db"] + 1.0 * correlated_field(rng, grid.shape, (3.0, 3.0))
    fluid = np.zeros(grid.shape, bool)
    inside = sd <= 0
    if f["composition"] == "cystic":
        fluid = sd < -rng.uniform(0.3, 0.6)
    elif f["composition"] == "mixed":
        # Eccentric solid component attached to the wall; the rest is fluid.
        ang = rng.uniform(0, 2 * np.pi)
        r_solid = rng.uniform(0.45, 0.75) * min(nod.ax, nod.az)
        sx = nod.cx + (nod.ax - r_solid) * math.cos(ang)
        sz = nod.cz + (nod.az - r_solid) * math.sin(ang)
        fluid = inside & (np.hypot(x - sx, z - sz) > r_solid) & (sd < -0.3)
    elif f["composition"] == "spongiform":
        fluid = inside & _microcysts(rng, x, z, nod)
    # Desmoplastic (fibrotic) stroma of carcinomas is slightly stiffer: a faint boundary echo.
    maps.paint(region, backscatter_db=w * solid_db + (1 - w) * background,
               gamma_shape=f["texture_gamma_shape"],
               impedance=Z_SOFT + f["stroma_impedance_step_mrayl"])
    maps.paint(inside, attenuation=f["attenuation_db_cm_mhz"])
    if f["halo"]:
        halo = inside & (sd > -rng.uniform(0.5, 1.3))
        maps.paint(halo, backscatter_db=-14.0, gamma_shape=RAYLEIGH)
    # Colloid/serous fluid: anechoic (some cysts carry faint debris), nearly no attenuation.
    maps.paint(fluid, backscatter_db=-38.0 + 8.0 * (rng.random() < 0.3), gamma_shape=RAYLEIGH,
               attenuation=0.02, impedance=Z_FLUID)
    coherent = np.zeros(grid.shape)
    for kind in f["echogenic_foci"]:
        _paint_foci(maps, coherent, rng, kind, x, z, sd, fluid, nod, grid)
    return coherent


def _microcysts(rng, x, z, nod: Nodule) -> np.ndarray:
    """Many 0.3-0.9 mm fluid spaces filling most of the nodule (spongiform: > 50 %)."""
    area = math.pi * nod.ax * nod.az
    n = int(area * 1.0 / (math.pi * 0.6 ** 2)) + 3
    cyst = np.zeros(x.shape, bool)
    box = (np.abs(x - nod.cx) < nod.ax + 1.5) & (np.abs(z - nod.cz) < nod.az + 1.5)
    xb, zb = x[box], z[box]
    hit = np.zeros(xb.shape, bool)
    for _ in range(n):
        rr, th = math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        cx, cz = nod.cx + rr * nod.ax * math.cos(th), nod.cz + rr * nod.az * math.sin(th)
        rad = rng.uniform(0.3, 0.9)
        hit |= (xb - cx) ** 2 + (zb - cz) ** 2 < rad ** 2
    cyst[box] = hit
    return cyst


def _pick(rng, candidates: np.ndarray, low: int, high: int) -> np.ndarray:
    """Between low and high-1 distinct flat indices drawn from a boolean map."""
    idx = np.flatnonzero(candidates)
    n = min(len(idx), int(rng.integers(low, high)))
    return rng.choice(idx, n, replace=False) if n else idx[:0]


def _paint_foci(maps, coherent, rng, kind, x, z, sd, fluid, nod: Nodule, grid: BeamGrid):
    """Echogenic foci of ACR TI-RADS, each with its physics.

    punctate: sub-resolution calcium, bright but too small to block the beam (no shadow);
    macro/rim: calcium larger than the beam -> strong reflection, transmission loss and shadow;
    comet tail: reverberation inside a colloid crystal, a bright focus with a tapering tail.
    """
    solid = (sd <= -0.3) & ~fluid
    if kind == "punctate":
        for idx in _pick(rng, solid & (sd < -0.5), 3, 14):
            blob = np.hypot(x - x.flat[idx], z - z.flat[idx]) < rng.uniform(0.1, 0.22)
            maps.paint(blob, backscatter_db=16.0, impedance=2.4)
    elif kind == "macrocalcification":
        for idx in _pick(rng, (solid if solid.any() else sd < 0) & (sd < -1.0), 1, 3):
            # Calcium (~25 dB/cm/MHz, Z ~4.5 MRayl): bright anterior surface, dark behind.
            blob = np.hypot(x - x.flat[idx], (z - z.flat[idx]) * 1.6) < rng.uniform(1.0, 2.5)
            maps.paint(blob, backscatter_db=14.0, gamma_shape=RAYLEIGH, attenuation=25.0,
                       impedance=Z_CALCIUM)
    elif kind == "peripheral_rim":
        # Eggshell calcification along an arc of the anterior (beam-facing) wall.
        phi = np.arctan2(z - nod.cz, x - nod.cx)
        centre, span = -np.pi / 2 + rng.uniform(-0.6, 0.6), rng.uniform(0.8, 2.0)
        arc = (np.abs(np.angle(np.exp(1j * (phi - centre)))) < span / 2) & (sd > -0.7) & (sd <= 0)
        maps.paint(arc, backscatter_db=14.0, attenuation=25.0, impedance=Z_CALCIUM)
    elif kind == "comet_tail":
        n_tail = max(2, int(round(rng.uniform(1.0, 2.5) / grid.dr_mm)))
        for idx in _pick(rng, fluid | ((sd <= 0) & (sd > -0.8)), 1, 5):
            i, j = np.unravel_index(idx, x.shape)
            k = np.arange(min(n_tail, x.shape[0] - i))
            # Reverberation inside the crystal: one echo per internal round trip, each weaker
            # (pressure reflection of the head 0.1-0.2), so the tail tapers with depth.
            coherent[i + k, j] += rng.uniform(0.1, 0.2) * np.exp(-k / (0.3 * n_tail))


# ----------------------------------------------------------------------------------------------
# Image formation
# ----------------------------------------------------------------------------------------------
def gaussian_kernel(fwhm_mm: float, spacing_mm: float, cycles_per_mm: float = 0.0) -> np.ndarray:
    """Unit-energy Gaussian-modulated kernel (pulse or beam profile) on the sample grid.

    The scanner demodulates the RF echo to baseband (IQ), so the axial kernel carries only the
    residual carrier ``cycles_per_mm`` = 2 * (echo centre - demodulation frequency) / c, which is
    small enough to sample; for a circular scatterer field it does not change envelope statistics,
    but closely spaced specular echoes interfere through it.
    """
    sigma = max(fwhm_mm / 2.3548 / spacing_mm, 1e-3)
    half = int(math.ceil(3 * sigma)) + 1
    t = np.arange(-half, half + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2) * np.exp(2j * np.pi * cycles_per_mm * spacing_mm * t)
    return k / np.sqrt((np.abs(k) ** 2).sum())


def specular_echoes(impedance: np.ndarray, grid: BeamGrid, directivity: float = 3.0):
    """Signed pressure reflection coefficient of impedance steps along the beam, and transmission.

    R = (Z2 - Z1) / (Z2 + Z1) at each axial step.  A smooth interface reflects like a mirror, so
    only the part facing the probe returns: weight by |cos(angle to beam)|**directivity, using the
    smoothed impedance gradient for the interface normal.
    """
    z_next = impedance[1:]
    z_prev = impedance[:-1]
    refl = np.zeros_like(impedance)
    refl[1:] = (z_next - z_prev) / (z_next + z_prev)
    logz = ndimage.gaussian_filter(np.log(impedance), 1.0)
    g_ax = np.gradient(logz, axis=0) / grid.dr_mm
    g_lat = np.gradient(logz, axis=1) / grid.dl_mm
    cos = np.abs(g_ax) / (np.hypot(g_ax, g_lat) + 1e-9)
    # Round-trip amplitude transmission through each interface: (1 - R^2) (energy conserved).
    transmission = 1.0 - np.minimum(refl ** 2, 0.999)
    return refl * cos ** directivity, transmission


def round_trip_gain(maps: TissueMaps, transmission: np.ndarray, probe: Probe, grid: BeamGrid,
                    beam_sigma_lines: float) -> np.ndarray:
    """Amplitude factor of an echo from each sample after the trip there and back.

    Frequency-dependent attenuation (dB/cm/MHz x MHz x path) plus interface transmission, summed
    along the beam up to (not including) the sample.  The beam has finite width, so the intensity
    loss is averaged laterally over the beam profile: a calcification smaller than the beam casts
    only a faint shadow, an extended one a dark band.
    """
    loss_db = 2.0 * maps.attenuation * probe.center_mhz * (grid.dr_mm / 10.0)
    log_amp = -loss_db * (np.log(10.0) / 20.0) + np.log(transmission)
    cum = np.cumsum(log_amp, axis=0) - 0.5 * log_amp          # mid-sample
    intensity = np.exp(2.0 * cum)
    if beam_sigma_lines > 0.3:
        intensity = ndimage.gaussian_filter1d(intensity, beam_sigma_lines, axis=1, mode="nearest")
    return np.sqrt(intensity)


def tgc_gain_db(probe: Probe, depth_mm: np.ndarray) -> np.ndarray:
    """Time-gain compensation: the scanner assumes one uniform attenuation, plus slider ripple."""
    depth = np.maximum(depth_mm, 0.0)
    gain = 2.0 * probe.tgc_db_cm_mhz * probe.center_mhz * depth / 10.0
    for amp, cycles, phase in probe.tgc_ripple_db:
        gain = gain + amp * np.sin(2 * np.pi * cycles * depth / probe.depth_mm + phase)
    return gain


def complex_normal(rng, shape) -> np.ndarray:
    """Circular complex Gaussian samples of unit mean power (random-phase scatterer sums)."""
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2.0)


def scatterer_amplitude(rng, maps: TissueMaps) -> np.ndarray:
    """RMS scattering amplitude per sample: backscatter x gamma-distributed cross-section.

    The cross-section (mean 1, shape k) models the number of scatterers per sample: with few
    scatterers per resolution cell the envelope is K-distributed (darker holes, brighter spots
    than Rayleigh); k = inf gives fully developed speckle.
    """
    k = maps.gamma_shape
    cross_section = np.ones(k.shape)
    sparse = np.isfinite(k) & (k < 50)
    if sparse.any():
        cross_section[sparse] = rng.gamma(k[sparse], 1.0 / k[sparse])
    return np.sqrt(10.0 ** (maps.backscatter_db / 10.0) * cross_section)


def form_envelope(rng: np.random.Generator, maps: TissueMaps, probe: Probe,
                  grid: BeamGrid) -> np.ndarray:
    """Detected envelope (linear amplitude) on the unpadded beam grid.

    Normalised so that fully developed speckle of 0 dB backscatter, with TGC exactly compensating
    the attenuation, has mean power 1 (mean envelope sqrt(pi)/2).  With ``compound_frames`` > 1
    the envelopes of several steered frames are averaged (spatial compounding): the tissue is the
    same, the speckle of each frame is partially decorrelated (``compound_correlation``).
    """
    shape = grid.shape
    amp = scatterer_amplitude(rng, maps)
    refl, transmission = specular_echoes(maps.impedance, grid)
    if maps.coherent is not None:
        refl = refl + maps.coherent
    residual = 2.0 * probe.demod_offset_mhz / SPEED_OF_SOUND_MM_PER_US    # cycles per mm
    k_ax = gaussian_kernel(probe.axial_fwhm_mm, grid.dr_mm, residual)
    k_lat = gaussian_kernel(probe.lateral_fwhm_mm, grid.dl_mm)
    beam_sigma = probe.lateral_fwhm_mm / 2.3548 / grid.dl_mm
    gain = round_trip_gain(maps, transmission, probe, grid, beam_sigma)
    amp = amp * gain
    echo = SPECULAR_GAIN * refl * gain
    coherent = echo + reverberation(echo, maps.impedance, gain, grid)
    common = complex_normal(rng, shape)
    rho = probe.compound_correlation
    envelope = np.zeros(shape)
    for frame in range(probe.compound_frames):
        phases = common if frame == 0 else \
            rho * common + math.sqrt(1.0 - rho ** 2) * complex_normal(rng, shape)
        rf = signal.fftconvolve(amp * phases + coherent, k_lat[None, :], mode="same", axes=1)
        if np.isfinite(probe.noise_db):
            # Receiver noise: white per channel sample, band-limited by the receive (axial) filter.
            rf = rf + 10.0 ** (probe.noise_db / 20.0) * complex_normal(rng, shape)
        rf = signal.fftconvolve(rf, k_ax[:, None], mode="same", axes=0)
        envelope += np.abs(rf)
    tgc = 10.0 ** (tgc_gain_db(probe, grid.d[:, :1]) / 20.0)
    return grid.crop(envelope / probe.compound_frames * tgc)


def log_compress(envelope: np.ndarray, probe: Probe) -> np.ndarray:
    """Envelope -> display grey level in [0, 255] (float) over the probe's dynamic range."""
    ref = math.sqrt(math.pi) / 2.0        # mean envelope of 0 dB (thyroid) speckle
    db = 20.0 * np.log10(np.maximum(envelope, 1e-12) / ref)
    return np.clip(255.0 * (probe.thyroid_gray + db / probe.dynamic_range_db), 0.0, 255.0)


def reverberation(echo: np.ndarray, impedance: np.ndarray, gain: np.ndarray, grid: BeamGrid,
                  face_reflectivity: float = 0.3, orders=(2, 3, 4)) -> np.ndarray:
    """Multiple reflections between the probe face and an air interface (trachea).

    The n-th reverberation has travelled n round trips to the interface, so it appears at n times
    its depth, weaker by (face reflectivity x round-trip loss) per extra trip.  ``echo`` is the
    (already attenuated) specular echo field, ``gain`` the round-trip amplitude factor.
    """
    out = np.zeros_like(echo)
    air = impedance < 0.1
    cols = np.flatnonzero(air.any(axis=0))
    if not len(cols):
        return out
    top = grid.pad[0]
    first = np.argmax(air[:, cols], axis=0)
    depth = first - top
    ok = depth > 4
    cols, first, depth = cols[ok], first[ok], depth[ok]
    e1 = echo[first, cols]
    per_trip = face_reflectivity * gain[first - 1, cols]
    for n in orders:
        rows = top + n * depth
        keep = rows < echo.shape[0]
        out[rows[keep], cols[keep]] += e1[keep] * per_trip[keep] ** (n - 1)
    return out


def resample_to_output(gray: np.ndarray, probe: Probe, grid: BeamGrid, out_shape: tuple):
    """Scan conversion: beam-grid grey levels -> output pixels (bilinear, anti-aliased)."""
    n_ax, n_lat = gray.shape
    h, w = out_shape
    if not probe.sector and (n_ax, n_lat) == (h, w):
        return gray
    x, z, inside = output_coordinates(probe, out_shape)
    if probe.sector:
        r = np.hypot(x, z + probe.apex_mm)
        theta = np.arctan2(x, z + probe.apex_mm)
        half = math.radians(probe.half_angle_deg)
        rows = (r - probe.apex_mm) / probe.depth_mm * n_ax - 0.5
        cols = (theta + half) / (2 * half) * n_lat - 0.5
        # Output pixel spacing over beam sample spacing (> 1: anti-alias before sampling).
        zoom_ax = (probe.depth_mm - z.min()) / h / grid.dr_mm
        zoom_lat = (x.max() - x.min()) / w / grid.dl_mm
    else:
        rows = (z / probe.depth_mm) * n_ax - 0.5
        cols = (x + probe.width_mm / 2) / probe.width_mm * n_lat - 0.5
        zoom_ax, zoom_lat = n_ax / h, n_lat / w
    sig = (max(0.0, (zoom_ax - 1) / 2), max(0.0, (zoom_lat - 1) / 2))
    if max(sig) > 0.05:
        gray = ndimage.gaussian_filter(gray, sig, mode="nearest")
    out = ndimage.map_coordinates(gray, [rows, cols], order=1, mode="nearest")
    return np.where(inside, out, 0.0)


def _to_uint8(gray: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _parse_size(size) -> tuple:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(s) for s in size)
    return h, w


def simulate(rng, size=(256, 256), label: str | None = None, sector: bool = False,
             nodule: bool = True):
    """Full simulation of one image (``nodule=False``: no nodule, label None, empty mask).

    Returns a dict: ``image``/``mask`` (as :func:`generate_image`), ``label``, ``features``, and for
    inspection the ``envelope`` on the beam grid (before log compression and scan conversion),
    ``probe``, ``grid``, ``nodule`` and ``anatomy``.
    """
    rng = _as_rng(rng)
    out_shape = _parse_size(size)
    if label is not None and label not in LABELS:
        raise ValueError(f"label must be one of {LABELS} or None, got {label!r}")
    if label is None and nodule:
        label = LABELS[int(rng.random() < 0.5)]
    probe = sample_probe(rng, sector)
    feat = sample_features(rng, label) if nodule else None
    anat, nod = sample_anatomy(rng, feat)
    # The operator sets the depth so the whole lobe and some tissue behind it are in view.
    _, lcz, _, laz, _ = anat.lobe
    probe = replace(probe, depth_mm=min(60.0, max(probe.depth_mm, lcz + laz + 4.0)))
    grid = make_grid(probe, sim_shape(probe, out_shape))
    maps = TissueMaps.uniform(grid.shape)
    tex_rng = np.random.default_rng(anat.seed)
    # Fibre orientation: septa and perimysium run roughly parallel to the skin (laterally).
    fibres = correlated_field(tex_rng, grid.shape,
                              (0.25 / grid.dr_mm, 1.6 / grid.dl_mm))
    muscle_bottom = _paint_layers(maps, grid, anat, tex_rng, fibres)
    _paint_organs(maps, grid, anat, tex_rng, fibres, muscle_bottom)
    echoes = _paint_nodule(maps, grid, nod) if nod is not None else np.zeros(grid.shape)
    maps.coherent = echoes
    envelope = form_envelope(rng, maps, probe, grid)
    gray = resample_to_output(log_compress(envelope, probe), probe, grid, out_shape)
    x, z, in_scan = output_coordinates(probe, out_shape)
    mask = (nod.inside(x, z) & in_scan) if nod is not None else np.zeros(out_shape, bool)
    features = dict(feat) if feat is not None else {}
    features["probe"] = {"center_mhz": round(probe.center_mhz, 3),
                         "depth_mm": round(probe.depth_mm, 2),
                         "geometry": "sector" if sector else "linear",
                         "dynamic_range_db": round(probe.dynamic_range_db, 1)}
    if feat is not None:
        features["posterior"] = _posterior_feature(feat)
    return {"image": _to_uint8(gray), "mask": (mask * 255).astype(np.uint8), "label": label,
            "features": features, "envelope": envelope, "probe": probe, "grid": grid,
            "nodule": nod, "anatomy": anat}


def _posterior_feature(feat: dict) -> str:
    """What the attenuation physics produces behind the nodule (not scored by ACR)."""
    if feat["composition"] in ("cystic", "spongiform", "mixed"):
        return "enhancement"
    if any(f in ("macrocalcification", "peripheral_rim") for f in feat["echogenic_foci"]) \
            or feat["attenuation_db_cm_mhz"] > 1.2:
        return "shadowing"
    return "none"


def generate_image(rng_or_seed, size=(256, 256), label: str | None = None, sector: bool = False):
    """One synthetic thyroid B-mode image with a nodule.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or anything ``default_rng`` accepts.
        size: output (H, W) or a single int.
        label: "benign", "malignant" or None (drawn 50/50).
        sector: curvilinear fan geometry instead of a linear array.
    Returns:
        (image uint8 HxW, mask uint8 HxW with values {0, 255} (255 = nodule), label str,
         features dict: ACR TI-RADS descriptors, points and level, size, probe settings).
    """
    out = simulate(rng_or_seed, size=size, label=label, sector=sector)
    return out["image"], out["mask"], out["label"], out["features"]


# ----------------------------------------------------------------------------------------------
# Dataset layouts
# ----------------------------------------------------------------------------------------------
PRETRAIN_STREAM, LABELLED_STREAM = 0, 1


def image_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator per image: the data set does not depend on the worker count."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))


def split_of(index: int, n: int, fractions=(0.7, 0.15, 0.15), names=("train", "val", "test")):
    """Contiguous split by index (labels alternate, so every split stays balanced)."""
    bounds = np.cumsum([int(round(f * n)) for f in fractions[:-1]])
    for b, name in zip(bounds, names):
        if index < b:
            return name
    return names[-1]


def _save_png(array: np.ndarray, path: Path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _make_pretrain(task):
    out, seed, index, n, size, sector = task
    img, _, _, _ = generate_image(image_rng(seed, PRETRAIN_STREAM, index), size, None, sector)
    n_val = max(1, int(round(0.1 * n))) if n >= 2 else 0
    split = "val" if index >= n - n_val else "train"
    _save_png(img, Path(out) / "pretrain" / split / "us" / f"us_{index:06d}.png")
    return None


def _make_labelled(task):
    out, seed, index, n, size, sector = task
    label = LABELS[index % 2]
    img, mask, label, feat = generate_image(image_rng(seed, LABELLED_STREAM, index), size, label,
                                            sector)
    split = split_of(index, n)
    name = f"case_{index:06d}.png"
    out = Path(out)
    _save_png(img, out / "cls" / split / label / name)
    _save_png(img, out / "seg" / "images" / split / name)
    _save_png(mask, out / "seg" / "masks" / split / name)
    return {"id": name[:-4], "split": split, "label": label, "features": feat}


def write_layouts(out, num_pretrain: int = 200, num_labelled: int = 100, size=256, seed: int = 0,
                  workers: int | None = None, sector: bool = False, progress: bool = True):
    """Write the pretraining, classification and segmentation trees plus ``features.jsonl``.

    <out>/pretrain/{train,val}/us/*.png            unlabelled images
    <out>/cls/{train,val,test}/{benign,malignant}/*.png
    <out>/seg/images/{train,val,test}/*.png, <out>/seg/masks/{train,val,test}/*.png (0/255)
    <out>/features.jsonl                            one line per labelled image
    Returns the list of feature records.
    """
    out = Path(out)
    size = _parse_size(size)
    workers = max(1, workers or os.cpu_count() or 1)
    pre = [(str(out), seed, i, num_pretrain, size, sector) for i in range(num_pretrain)]
    lab = [(str(out), seed, i, num_labelled, size, sector) for i in range(num_labelled)]
    jobs = [(_make_pretrain, t) for t in pre] + [(_make_labelled, t) for t in lab]
    records = []
    bar = _progress(len(jobs), progress)
    if workers == 1:
        results = (_run_job(j) for j in jobs)
        for r in results:
            records.append(r)
            bar.update(1)
    else:
        import multiprocessing as mp
        # Not "fork": forking a process whose threads (OpenMP, OpenCV, torch) hold locks can
        # deadlock the children, e.g. when called from a test session or a training script.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for r in pool.imap(_run_job, jobs, chunksize=4):
                records.append(r)
                bar.update(1)
    bar.close()
    records = [r for r in records if r is not None]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "features.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    return records


def _run_job(job):
    fn, task = job
    return fn(task)


def _progress(total, enabled):
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=not enabled, desc="synthetic US", unit="img")
    except ImportError:     # tqdm is in requirements; keep the API usable without it
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Null()

# ----------------------------------------------------------------------------------------------
# Label-cue audit: how much of the label the coarse and the fine cues carry
# ----------------------------------------------------------------------------------------------
# Recorded descriptors by the scale at which they show (docs/synthetic-data.md).  Coarse: what a
# 32x32 thumbnail of the frame still shows (size and shape, mean brightness, composition,
# attenuation and its shadow, 1-2.5 mm calcifications with their shadows).  Fine: sub-millimetre
# detail that blur and speckle hide (0.1-0.2 mm punctate micro-calcifications, the margin's contour
# and edge width, the 0.5-1.3 mm halo, comet tails).  The echotexture (texture_gamma_shape) is
# fixed by the label, so a classifier given it would be perfect: it is measured in the images
# (speckle statistics, :func:`image_cues`) instead.
COARSE_DESCRIPTORS = ("size_and_shape", "composition", "echogenicity", "attenuation",
                      "large_calcifications")
FINE_DESCRIPTORS = ("margin", "punctate_foci", "halo", "comet_tail")


def descriptor_columns(feat: dict, names) -> list:
    """Numeric columns of the recorded descriptors ``names`` of one nodule."""
    size = feat["size_mm"]
    columns = {
        "size_and_shape": [math.log(size["transverse"]),
                           math.log(size["anteroposterior"] / size["transverse"])],
        "composition": [feat["composition"] == c for c in FEATURE_PRIORS["benign"]["composition"]],
        "echogenicity": [feat["solid_echogenicity_db"]],
        "attenuation": [feat["attenuation_db_cm_mhz"]],
        "large_calcifications": [k in feat["echogenic_foci"]
                                 for k in ("macrocalcification", "peripheral_rim")],
        "margin": [feat["margin"] == m for m in FEATURE_PRIORS["benign"]["margin"]],
        "punctate_foci": ["punctate" in feat["echogenic_foci"]],
        "halo": [feat["halo"]],
        "comet_tail": ["comet_tail" in feat["echogenic_foci"]],
    }
    return [float(v) for name in names for v in columns[name]]


def cross_validated_auroc(columns, labels, folds: int = 5, seed: int = 0) -> dict:
    """AUROC and accuracy of a logistic regression on ``columns``, each case scored by a model
    fitted on the other folds (so the numbers are what the cues predict, not what they fit)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.asarray(columns, float), np.asarray(labels, int)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    prob = cross_val_predict(model, x, y, cv=split, method="predict_proba")[:, 1]
    return {"auroc": float(roc_auc_score(y, prob)), "accuracy": float(((prob > 0.5) == y).mean())}


def _largest_blob_fallback(mask_small: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """A nodule smaller than one thumbnail pixel still gets the pixel it covers most."""
    if mask_small.any():
        return mask_small
    out = np.zeros_like(mask_small)
    out.flat[int(np.argmax(coverage))] = True
    return out


def image_cues(image: np.ndarray, mask: np.ndarray, thumbnail: int = 32) -> tuple:
    """(coarse, fine) measurements of the nodule in one grey frame and its mask.

    Coarse, from ``thumbnail`` x ``thumbnail`` versions of image and mask: log area fraction,
    eccentricity and height/width of the mask, mean grey level inside, inside minus the ring
    around it, below it (posterior shadow / enhancement) minus the ring.  Fine, at full resolution
    inside the mask eroded by one pixel: speckle SNR (mean / std), std, high-pass std (image minus
    its Gaussian blur, sigma 1.5 px), log(1 + pixels > 40 grey levels above their 5x5 median:
    bright spots such as micro-calcifications), and solidity of the mask (area / convex-hull area:
    lobulations and spicules lower it).
    """
    import cv2

    img = image.astype(np.float32)
    nodule = mask > 0
    small = cv2.resize(img, (thumbnail, thumbnail), interpolation=cv2.INTER_AREA)
    coverage = cv2.resize(nodule.astype(np.float32), (thumbnail, thumbnail),
                          interpolation=cv2.INTER_AREA)
    inside = _largest_blob_fallback(coverage > 0.5, coverage)
    rows, cols = np.nonzero(inside)
    spread = np.linalg.eigvalsh(np.cov(np.vstack([cols, rows]))) if len(rows) > 2 else (1.0, 1.0)
    eccentricity = math.sqrt(max(0.0, 1.0 - spread[0] / max(spread[1], 1e-6)))
    ring = (cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0) & ~inside
    around = small[ring].mean() if ring.any() else small.mean()
    below = small[rows.max() + 1:rows.max() + 6][:, np.unique(cols)]
    coarse = [math.log(coverage.mean() + 1e-4), eccentricity,
              (np.ptp(rows) + 1) / (np.ptp(cols) + 1), small[inside].mean(),
              small[inside].mean() - around, (below.mean() if below.size else around) - around]

    core = cv2.erode(nodule.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    core = core if core.sum() >= 10 else nodule
    values = img[core]
    high_pass = img - cv2.GaussianBlur(img, (0, 0), 1.5)
    median = cv2.medianBlur(np.clip(image, 0, 255).astype(np.uint8), 5).astype(np.float32)
    contours, _ = cv2.findContours(nodule.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    fine = [values.mean() / (values.std() + 1e-3), values.std(), high_pass[core].std(),
            math.log1p(int(((img - median) > 40)[core].sum())),
            cv2.contourArea(contour) / hull_area if hull_area > 0 else 1.0]
    return [float(v) for v in coarse], [float(v) for v in fine]


def audit_labels(root, blur_sigma: float = 1.1, thumbnail: int = 32, folds: int = 5) -> list:
    """Cross-validated AUROC / accuracy of the label from coarse and fine cues of a data set that
    :func:`write_layouts` wrote to ``root``: the recorded descriptors, and measurements of the
    segmentation images (sharp, and Gaussian-blurred with ``blur_sigma`` as blurred_images.py
    does).  Returns the number of images and rows (what, number of features, dict with auroc and
    accuracy), as :func:`audit_table` takes them."""
    import cv2
    if str(REPO) not in sys.path:  # run as a script: util/ lives beside tools/
        sys.path.insert(0, str(REPO))
    from util.blur import BlurSpec

    root = Path(root)
    if not (root / "features.jsonl").is_file():
        raise SystemExit(f"{root} has no features.jsonl: audit a folder written by "
                         "tools/synthetic_us.py --out")
    records = [json.loads(line) for line in (root / "features.jsonl").read_text().splitlines()]
    if len(records) < 2 * folds:
        raise SystemExit(f"{root / 'features.jsonl'} lists {len(records)} labelled images; the "
                         f"audit needs at least {2 * folds} (write more with --num_labelled)")
    blur = BlurSpec("gaussian", sigma=blur_sigma)
    labels = [r["label"] == "malignant" for r in records]
    coarse_rec = [descriptor_columns(r["features"], COARSE_DESCRIPTORS) for r in records]
    fine_rec = [descriptor_columns(r["features"], FINE_DESCRIPTORS) for r in records]
    sharp, blurred = [], []
    for r in records:
        name = f"{r['id']}.png"
        image = cv2.imread(str(root / "seg" / "images" / r["split"] / name), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(root / "seg" / "masks" / r["split"] / name), cv2.IMREAD_GRAYSCALE)
        if image is None or mask is None:
            raise SystemExit(f"cannot read {name} in {root / 'seg'}: audit a folder written by "
                             "tools/synthetic_us.py --out")
        sharp.append(image_cues(image, mask, thumbnail))
        blurred.append(image_cues(blur.apply(image), mask, thumbnail))
    coarse_img = [c for c, _ in sharp]
    fine_img, fine_blur = [f for _, f in sharp], [f for _, f in blurred]

    def joined(*parts):
        return [sum(row, []) for row in zip(*parts)]

    cases = [
        ("recorded coarse descriptors (" + ", ".join(COARSE_DESCRIPTORS) + ")", coarse_rec),
        ("recorded fine descriptors (" + ", ".join(FINE_DESCRIPTORS) + ")", fine_rec),
        ("recorded coarse + fine descriptors", joined(coarse_rec, fine_rec)),
        (f"image, coarse ({thumbnail}x{thumbnail} thumbnail of image and mask)", coarse_img),
        ("image, coarse + recorded fine descriptors", joined(coarse_img, fine_rec)),
        ("image, fine (full resolution, sharp)", fine_img),
        (f"image, fine (full resolution, blurred sigma {blur_sigma})", fine_blur),
        ("image, coarse + fine (sharp)", joined(coarse_img, fine_img)),
        (f"image, coarse + fine (blurred sigma {blur_sigma})", joined(coarse_img, fine_blur)),
    ]
    return len(records), [(what, len(x[0]), cross_validated_auroc(x, labels, folds))
                          for what, x in cases]


def audit_table(n: int, rows) -> str:
    lines = [f"| cues (n = {n} labelled images, 5-fold cross-validated logistic regression) "
             "| features | AUROC | accuracy |", "|---|---|---|---|"]
    lines += [f"| {what} | {k} | {m['auroc']:.3f} | {m['accuracy']:.3f} |" for what, k, m in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="output folder")
    target.add_argument("--audit", metavar="DIR",
                        help="instead of writing images: how well coarse and fine cues of the data "
                             "set in DIR (written with --out) predict the label "
                             "(docs/synthetic-data.md)")
    p.add_argument("--num_pretrain", type=int, default=200, help="unlabelled pretraining images")
    p.add_argument("--num_labelled", type=int, default=100,
                   help="labelled images (classification + segmentation), half benign")
    p.add_argument("--size", type=int, nargs="+", default=[256], help="H W, or one int for square")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--sector", action="store_true", help="curvilinear fan instead of linear")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if len(a.size) not in (1, 2) or min(a.size) < 16:
        p.error("--size takes one or two integers >= 16, e.g. --size 256 or --size 224 320")
    if a.num_pretrain < 0 or a.num_labelled < 0:
        p.error("--num_pretrain and --num_labelled must be >= 0")
    if a.audit:
        print(audit_table(*audit_labels(a.audit)))
        return
    size = a.size[0] if len(a.size) == 1 else tuple(a.size)
    t0 = time.perf_counter()
    write_layouts(a.out, a.num_pretrain, a.num_labelled, size, a.seed, a.workers, a.sector,
                  progress=not a.quiet)
    n = a.num_pretrain + a.num_labelled
    dt = time.perf_counter() - t0
    print(f"wrote {n} images to {a.out} in {dt:.1f} s ({dt / max(n, 1):.3f} s/image wall)")


if __name__ == "__main__":
    main()
