"""Synthetic brain MRI phantoms that imitate the BraTS 2021 glioma segmentation task.

Each case is a skull-stripped head (zero outside the brain, as BraTS data is) scanned with four
sequences, T1, T1ce (T1 after gadolinium), T2 and FLAIR, with BraTS's three tumour labels:
1 necrotic tumour core, 2 peritumoral oedema, 4 GD-enhancing tumour. Everything is drawn from one
integer seed, so the same seed gives the same arrays and the same file bytes.

Geometry as in :mod:`medmim.data.phantom`: array axes ``[i, j, k]`` point to the patient's Right,
Anterior and Superior (RAS+), the affine is ``diag(spacing)`` with the volume centre at world
``(0, 0, 0)`` mm, and the head lies within ~2 mm of that centre. Anatomy is defined in
millimetres (smooth random fields on a fixed mm lattice, sampled at the voxel centres), so tissue
and tumour volumes in mL do not depend on ``shape`` or ``spacing``.

How a case is built (one named step each, in :func:`make_brain_phantom`):

1. draw the head: size, deformation, atrophy, ventricles, tumour size and shape (``_draw_head``), and the
   normal brain's random fields (``_brain_fields``);
2. place the tumour (``_place_tumour``): its site is drawn from where adult gliomas arise, in proportion to
   how often they arise there (:data:`_TUMOUR_SITES`: frontal, temporal, parietal, occipital, insular/deep,
   after Larjavaara et al. 2007), in either hemisphere; a centre proposed in the site is kept where it lies in
   white or deep grey matter and the lobulated core stays inside the brain, clear of the lateral ventricles
   and the midline. Cores may reach into the cortex; where a site holds no core that big, the tumour is
   smaller. This is decided on the normal brain painted on a fixed 2 mm lattice, not on the voxel grid;
3. brain outline: a deformed ellipsoid; a CSF layer outside the cortex; a grey-matter ribbon whose
   thickness follows a noisy folding field (deep where sulci are, with CSF in the sulci); white
   matter inside; the interhemispheric fissure; deep grey nuclei; two lateral ventricles and the
   third ventricle (``_paint_brain``);
4. the tumour in one hemisphere: an irregular enhancing shell around a necrotic core; around it, a margin
   of infiltrated tissue (white matter, and any cortex the core reaches, whose sulci it effaces), and
   vasogenic oedema spreading further along the white matter only (``_paint_tumour``); all of it is
   BraTS's label 2, "oedematous / invaded tissue";
5. per-sequence intensities of each tissue, a smooth multiplicative bias field, Rician noise, the
   skull-strip mask, and an arbitrary positive scale per sequence (``_render``). The bias field lies within
   exp(+-peak) of its mean level over the brain, the peak drawn from :data:`BIAS_PEAK` (3-10 %, at most
   BrainWeb's "20 %" non-uniformity), small against the contrast between normal tissues. T1ce is the T1
   sequence repeated after gadolinium in the same session: T1's tissue signal, with the same per-case
   jitter, times :data:`GD_ENHANCEMENT`, which is 1 for every tissue but the enhancing tumour (nothing else
   enhances; normal vessels, dura and choroid plexus are not modelled), and T1's bias field, shifted by the
   patient's small motion between the two scans (:data:`T1CE_SHIFT_MM`). T2 and FLAIR have bias fields of
   their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medmim.data.phantom import _affine, _check_seed, _mm, _norm, write_cases
from medmim.data.regions import BRATS_LABEL_NAMES, ED, ET, NCR
from medmim.data.phantom import _check_geometry as _check_phantom_geometry
from medmim.fileio import atomic_write_text

BRATS_LABELS: dict[int, str] = BRATS_LABEL_NAMES
BRATS_MODALITIES: dict[int, str] = {0: "T1", 1: "T1ce", 2: "T2", 3: "FLAIR"}
DEFAULT_SHAPE = (160, 192, 160)  # voxels along i, j, k: 4.9 million
DEFAULT_SPACING = (1.0, 1.0, 1.0)  # mm; BraTS is resampled to 1 mm isotropic
# smallest field of view (mm along i, j, k) that holds the whole brain
MIN_FOV_MM = (150.0, 180.0, 150.0)

OEDEMA_MARGIN_MM = 5.0  # least oedema around the tumour core (in white matter)
# tissue classes (``BrainPhantomCase.tissue``)
BACKGROUND, CSF, GM, WM, DEEP_GM, OEDEMA, NECROSIS, ENHANCING = range(8)
BRAIN_TISSUES: dict[int, str] = {
    BACKGROUND: "background", CSF: "cerebrospinal fluid", GM: "cortical grey matter", WM: "white matter",
    DEEP_GM: "deep grey matter", OEDEMA: "peritumoral oedema", NECROSIS: "necrosis",
    ENHANCING: "enhancing tumour",
}
_TISSUE_LABEL = np.array([0, 0, 0, 0, 0, ED, NCR, ET], np.uint8)
# gadolinium enhancement per tissue: T1ce signal / T1 signal. T1ce is the same T1-weighted sequence after
# the contrast agent, which shortens T1 only where it leaves the vessels through a broken blood-brain
# barrier: the enhancing tumour. Intact parenchyma, CSF, vasogenic oedema and necrosis (no perfusion) keep
# their T1 signal (their small blood volume's enhancement is neglected, as are enhancing vessels and dura)
GD_ENHANCEMENT = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.80 / 0.74], np.float32)
# relative signal of each tissue per sequence (columns T1, T1ce, T2, FLAIR), before the per-case
# jitter (+-4 %, shared by T1 and T1ce), the bias field, noise and the arbitrary scale of each sequence;
# the T1ce column is T1 x GD_ENHANCEMENT
TISSUE_INTENSITY = np.array([
    #  T1    T1ce   T2    FLAIR
    [0.00, 0.00, 0.00, 0.00],  # background (outside the brain mask, stays 0)
    [0.30, 0.30, 2.00, 0.20],  # CSF: dark on T1, brightest on T2, suppressed on FLAIR
    [0.72, 0.72, 1.00, 1.00],  # cortical GM
    [1.00, 1.00, 0.68, 0.74],  # WM: brightest normal tissue on T1, darker than GM on T2/FLAIR
    [0.82, 0.82, 0.88, 0.92],  # deep GM (thalamus, basal ganglia): between GM and WM
    [0.82, 0.82, 1.60, 1.75],  # oedema: slightly dark on T1, bright on T2, brightest on FLAIR
    [0.38, 0.38, 1.80, 0.85],  # necrosis: dark on T1 and T1ce (no enhancement), fluid-bright on T2
    [0.74, 1.80, 1.15, 1.25],  # enhancing rim: GM-like on T1, very bright after gadolinium
], np.float32)
assert np.allclose(TISSUE_INTENSITY[:, 1], TISSUE_INTENSITY[:, 0] * GD_ENHANCEMENT)
# bias field: its largest deviation from its mean level over the brain (log scale: the field lies within
# exp(+-peak) of that level, so it varies by peak to 2 x peak across the brain), drawn per case and acquisition
# from this range. Receive-coil sensitivity and B1 inhomogeneity leave a smooth intensity non-uniformity over
# the brain in clinical head-coil scans, and BraTS does not correct it.
# BrainWeb's simulator uses fields estimated from real scans, scaled to 0.90-1.10 over the brain at its "20 %"
# level; +-3 % to +-10 % stays within that. The cortex spans the whole brain, so its median sees the field's
# middle level, and the deep nuclei its value near the centre: at this amplitude they differ by at most about
# the peak, less than the 14 % nominal T1 contrast between deep and cortical grey matter (the +-4 % tissue
# jitter can still narrow it)
BIAS_PEAK = (0.03, 0.10)
# the patient's motion between the pre- and post-contrast T1 scans, mm along each axis: BraTS registers the
# sequences to each other, so T1ce's coil profile is T1's, shifted by that much against the anatomy
T1CE_SHIFT_MM = 3.0

_HALF_MM = 100.0  # the random fields cover the box +-100 mm around the head centre

# Where gliomas arise: (site, share, |x|/a, y/b, z/c), a box in the head frame normalised by the brain's
# semi-axes a, b, c (x lateral, y anterior, z superior, from the brain's centre) that proposes tumour centres.
# Shares: 331 adults with glioma, Larjavaara et al., Neuro-Oncology 2007: frontal 40 %, temporal 29 %,
# parietal 14 %, occipital 3 %, deep structures 14 %. The boxes only propose: ``_place_tumour`` keeps a
# centre where the tumour fits the brain there, so the site sets where, not whether
_TUMOUR_SITES = (
    ("frontal", 0.40, (0.05, 0.85), (0.05, 1.00), (-0.45, 1.00)),  # in front of the central sulcus
    ("temporal", 0.29, (0.45, 1.00), (-0.55, 0.35), (-1.00, -0.25)),  # lateral, below the Sylvian fissure
    ("parietal", 0.14, (0.05, 0.90), (-0.75, 0.05), (0.05, 1.00)),  # behind the central sulcus, above it
    ("occipital", 0.03, (0.05, 0.80), (-1.00, -0.60), (-0.55, 0.50)),  # the posterior pole
    ("insular/deep", 0.14, (0.10, 0.65), (-0.30, 0.40), (-0.45, 0.20)),  # insula, basal ganglia, thalamus
)
_VENTRICLE_MARGIN_MM = 4.0  # least wall of white matter between the tumour core and a lateral ventricle


@dataclass
class BrainPhantomCase:
    """One synthetic multi-sequence brain MRI.

    ``image``: ``[4, I, J, K]`` float32, sequences T1, T1ce, T2, FLAIR (:data:`BRATS_MODALITIES`),
    arbitrary positive units, exactly 0 outside the brain.
    ``label``: ``[I, J, K]`` uint8, BraTS 2021 values (:data:`BRATS_LABELS`).
    ``affine``: ``[4, 4]`` float64, voxel index -> RAS+ world (mm).
    ``tissue``: ``[I, J, K]`` uint8 tissue classes (:data:`BRAIN_TISSUES`), the ground truth behind
    both (not written to disk).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray


# --- public API -------------------------------------------------------------------------------

def make_brain_phantom(seed: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> BrainPhantomCase:
    """Generate one skull-stripped 4-sequence brain MRI with a glioma and BraTS labels from ``seed``.

    ``shape``: voxels along i, j, k; ``spacing``: mm along i, j, k. Their product, the field of
    view, must be at least :data:`MIN_FOV_MM`. Same arguments, same arrays.
    Raises :class:`MedmimError` naming ``--seed``, ``--shape`` or ``--spacing`` when invalid.
    """
    seed = _check_seed(seed)
    shape, spacing = _check_geometry(shape, spacing)
    anatomy_ss, noise_ss = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(anatomy_ss)
    head = _draw_head(rng)
    fields = _brain_fields(rng)
    _place_tumour(head, rng, fields)
    affine = _affine(shape, spacing)
    # patient-frame coordinates (mm) of the voxel centres along each axis
    axes = [(np.arange(n, dtype=np.float64) * s + affine[a, 3] - head.offset[a]).astype(np.float32)
            for a, (n, s) in enumerate(zip(shape, spacing))]
    tissue = _paint_brain(head, fields, axes)
    _paint_tumour(head, rng, axes, tissue)
    image = _render(head, rng, np.random.default_rng(noise_ss), axes, tissue)
    label = _TISSUE_LABEL[tissue]
    return BrainPhantomCase(image=image, label=label, affine=affine, tissue=tissue)


def write_brain_phantom_dataset(out_dir, labeled: int, unlabeled: int, seed: int = 0, shape=DEFAULT_SHAPE,
                                spacing=DEFAULT_SPACING, progress: bool = False) -> Path:
    """Write a Medical Segmentation Decathlon folder of brain phantoms and return ``out_dir``.

    ``out_dir/imagesTr/brain_XXXX.nii.gz`` (4D: ``[I, J, K, 4]``, T1, T1ce, T2, FLAIR) +
    ``labelsTr/brain_XXXX.nii.gz`` for the ``labeled`` cases (indices ``0..labeled-1``),
    ``imagesTs/brain_XXXX.nii.gz`` (images only, for pretraining) for the ``unlabeled`` ones
    (indices ``labeled..labeled+unlabeled-1``), and an MSD ``dataset.json``. Case ``i`` is
    ``make_brain_phantom(case_seed(seed, i), shape, spacing)``, so the same arguments write the
    same bytes. Raises :class:`MedmimError` on invalid arguments.
    """
    def make(case_seed_, shape_, spacing_):
        case = make_brain_phantom(case_seed_, shape_, spacing_)
        return np.ascontiguousarray(np.moveaxis(case.image, 0, -1)), case.label, case.affine  # MSD: channels last

    training, test, seeds, seed, shape, spacing = write_cases(out_dir, labeled, unlabeled, seed, shape, spacing,
                                                              "brain", progress, make, _check_geometry)
    out_dir = Path(out_dir)
    fov = [round(n * s, 3) for n, s in zip(shape, spacing)]
    desc = {
        "name": "medmim-phantom-brain",
        "description": ("Synthetic skull-stripped brain MRI with a glioma imitating BraTS 2021 (T1, T1ce, T2, "
                        f"FLAIR; necrosis, oedema, enhancing tumour), {'x'.join(map(str, shape))} voxels of "
                        f"{'x'.join(map(str, spacing))} mm ({'x'.join(map(str, fov))} mm field of view), RAS+, "
                        "float32 in arbitrary units, 0 outside the brain; imagesTs are unlabeled cases for "
                        "pretraining"),
        "tensorImageSize": "4D",
        "reference": "medmim.data.phantom_brain",
        "licence": "CC0",
        "modality": {str(k): v for k, v in BRATS_MODALITIES.items()},
        "labels": {str(k): v for k, v in BRATS_LABELS.items()},
        "numTraining": labeled,
        "numTest": unlabeled,
        "training": training,
        "test": test,
        "lateral_pairs": [],
        "medmim_phantom": {"kind": "brain", "seed": seed, "shape": list(shape), "spacing": list(spacing),
                           "case_seeds": seeds},
    }
    atomic_write_text(out_dir / "dataset.json", json.dumps(desc, indent=2) + "\n")
    return out_dir


# --- argument checks --------------------------------------------------------------------------

def _check_geometry(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """As :func:`medmim.data.phantom._check_geometry`, with the brain's smallest field of view."""
    return _check_phantom_geometry(shape, spacing, MIN_FOV_MM, "brain")


# --- smooth random fields in mm -------------------------------------------------------------

class _Field:
    """A smooth Gaussian random field (sd ~1) on a fixed mm lattice around ``centre``: drawn from
    ``rng`` independently of the voxel grid, sampled by trilinear interpolation at any points."""

    def __init__(self, rng, sigma_mm: float, step_mm: float, half_mm: float = _HALF_MM, centre=(0.0, 0.0, 0.0)):
        self.step, self.half = float(step_mm), float(half_mm)
        self.centre = np.asarray(centre, np.float64)
        n = int(round(2 * half_mm / step_mm)) + 1
        lat = rng.standard_normal((n, n, n), dtype=np.float32)
        lat = ndimage.gaussian_filter(lat, sigma_mm / step_mm, mode="wrap")
        self.lat = lat / np.float32(lat.std())

    def sample(self, xs, ys, zs) -> np.ndarray:
        """Values at the grid ``xs x ys x zs`` (1D patient-frame mm): ``[len(xs), len(ys), len(zs)]``."""
        out = self.lat
        n = out.shape[0]
        for a, c in enumerate((xs, ys, zs)):
            t = np.clip((np.asarray(c, np.float64) - self.centre[a] + self.half) / self.step, 0.0, n - 1.0)
            i0 = np.minimum(np.floor(t).astype(np.intp), n - 2)
            w = (t - i0).astype(np.float32)
            shp = [1, 1, 1]
            shp[a] = -1
            w = w.reshape(shp)
            out = np.take(out, i0, axis=a) * (1 - w) + np.take(out, i0 + 1, axis=a) * w
        return out


def _grid(axes, sl=(slice(None),) * 3):
    """Broadcastable ``X, Y, Z`` (patient mm) of the sub-box ``sl``."""
    x, y, z = (ax[s] for ax, s in zip(axes, sl))
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _box(axes, lo, hi):
    """Slices of the voxels whose centres lie in the patient-frame box [lo, hi] (mm), or None."""
    sl = []
    for ax, a, b in zip(axes, lo, hi):
        idx = np.nonzero((ax >= a) & (ax <= b))[0]
        if idx.size == 0:
            return None
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(sl)


# --- the head -------------------------------------------------------------------------------

@dataclass
class _Head:
    """Case-wide anatomy in the patient frame: mm, x Right, y Anterior, z Superior, origin at the
    brain's centre."""

    offset: np.ndarray  # [3] head centre in world mm
    semi: tuple[float, float, float]  # brain half-width, half-length, half-height
    atrophy: float  # 0 young .. 1 old: wider sulci and ventricles
    csf_mm: float  # subarachnoid CSF layer outside the cortex
    gm_mm: float  # cortical ribbon scale
    ventricle: dict  # lateral ventricle geometry
    tumour: dict  # centre, radii, rotation, irregularity


def _rot(rng) -> np.ndarray:
    """A uniformly random rotation matrix."""
    q = rng.normal(size=4)
    q /= _norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _outline_r(semi, x, y, z):
    """The brain's nominal outline (``_paint_brain``'s, before the random deformation) as a normalised radius
    at patient-frame points (mm): < 1 inside."""
    a, b, c = semi
    return np.sqrt((x / (a * (1.0 - 0.07 * y / b))) ** 2 + (y / b) ** 2 + (z / np.where(z < 0, 0.85 * c, c)) ** 2)


def _ventricle_section(v: dict, s: float, yn, f=float):
    """The lateral ventricle on side ``s`` (+1 right, -1 left) at normalised ``yn`` (-1 front .. 1 back): the
    centre ``xc``, ``zc`` (mm) and the half-width ``sx`` of its cross-section. Curved, wider at the back (atrium),
    widening outwards to keep the septum between the two. ``f`` casts the constants (``np.float32`` for grids)."""
    zc = f(v["z"]) - f(v["bend"]) * yn * yn
    sx = f(v["sx"]) * (1.0 + f(0.35) * np.clip(-yn, 0.0, 1.0))
    xc = f(s * (v["sep"] + v["sx"])) + f(s) * (sx - f(v["sx"]))
    return xc, zc, sx


def _ventricle_rho(v: dict, s: float, x, y, z):
    """The lateral ventricle on side ``s`` at points (mm), in float32: < 1 inside."""
    f = np.float32
    yn = (y - f(v["y"])) / f(v["sy"])
    xc, zc, sx = _ventricle_section(v, s, yn, f)
    return ((x - xc) / sx) ** 2 + yn * yn + ((z - zc) / f(v["sz"])) ** 2


def _ventricle_points(v: dict) -> np.ndarray:
    """``[N, 3]`` points (mm) on the surfaces of both lateral ventricles, ~1-2 mm apart."""
    yn = np.linspace(-1.0, 1.0, 41)[:, None]
    th = np.linspace(0.0, 2 * math.pi, 24, endpoint=False)[None, :]
    pts = []
    for s in (1.0, -1.0):
        xc, zc, sx = _ventricle_section(v, s, yn)
        w = np.sqrt(1.0 - yn * yn)
        x, y, z = np.broadcast_arrays(xc + sx * w * np.cos(th), v["y"] + v["sy"] * yn, zc + v["sz"] * w * np.sin(th))
        pts.append(np.stack([x, y, z], axis=-1).reshape(-1, 3))
    return np.concatenate(pts)


def _sphere_dirs(n: int) -> np.ndarray:
    """``[n, 3]`` unit vectors spread evenly over the sphere (a Fibonacci spiral)."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = k * math.pi * (3.0 - math.sqrt(5.0))
    rho = np.sqrt(1.0 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def _draw_head(rng) -> _Head:
    u = rng.uniform
    size = u(0.93, 1.04)
    semi = (66.0 * size * u(0.97, 1.03), 78.0 * size * u(0.97, 1.03), 57.0 * size * u(0.97, 1.03))
    atrophy = u(0.0, 1.0)
    vs = 1.0 + 0.6 * atrophy
    ventricle = {"y": u(-8.0, -2.0), "z": u(8.0, 14.0), "sx": u(5.0, 7.0) * vs, "sy": u(24.0, 30.0),
                 "sz": u(5.0, 7.5) * vs, "sep": u(1.0, 2.0), "bend": u(6.0, 12.0)}
    # tumour: its size and shape here, its site (one hemisphere, a lobe where gliomas arise) and centre in
    # ``_place_tumour``, against the normal brain
    tumour = {"r_tc": u(12.0, 23.0),  # tumour core (necrosis + enhancing rim) mean radius, before it must fit
              "rim": u(2.5, 6.0),  # enhancing rim thickness
              "ed_extra": u(8.0, 22.0),  # oedema reach beyond the core
              "aniso": u(0.8, 1.25, 3), "rot": _rot(rng), "irregular": u(0.12, 0.25)}
    return _Head(offset=u(-2.0, 2.0, 3), semi=semi, atrophy=atrophy, csf_mm=u(0.8, 1.6) + 1.6 * atrophy,
                 gm_mm=u(3.4, 4.4), ventricle=ventricle, tumour=tumour)


def _place_tumour(hd: _Head, rng, fields) -> None:
    """Choose the tumour's site and centre (``hd.tumour``: ``site``, ``centre``, ``r_tc``, ``r_nec``, ``r_ed``).

    The site is one of :data:`_TUMOUR_SITES`, drawn by how often adult gliomas arise there, in either
    hemisphere; its box proposes centres. A centre is kept where

    * it lies in white or deep grey matter of the normal brain (gliomas arise subcortically),
    * the core, its lobulations included (radius ``(1 + irregular) r_tc`` along its own anisotropic, rotated
      axes), stays inside the brain: it may reach into the cortex and efface the sulci (``_paint_tumour``),
      as cortical-subcortical gliomas do, but not leave the brain,
    * the core's mean radius keeps :data:`_VENTRICLE_MARGIN_MM` of tissue from the lateral ventricles, and its
      longest axis keeps 2 mm from the midline (crossing it takes the corpus callosum: a butterfly glioma,
      not modelled).

    Where the site holds no core that big, the tumour is smaller (-5 % per 10 proposals, down to 8 mm). The
    normal brain is painted for this on a fixed 2 mm lattice in the patient frame, so the choice does not
    depend on the voxel grid."""
    tm, u = hd.tumour, rng.uniform
    side = 1.0 if rng.random() < 0.5 else -1.0
    shares = np.array([st[1] for st in _TUMOUR_SITES])
    site = _TUMOUR_SITES[int(rng.choice(len(shares), p=shares / shares.sum()))]
    a, b, c = hd.semi
    lat = [np.arange(-h - 6.0, h + 6.0 + 1e-6, 2.0, dtype=np.float32) for h in (a, b, c)]
    normal = _paint_brain(hd, fields, lat)
    subcortical = (normal == WM) | (normal == DEEP_GM)
    brain = normal != BACKGROUND
    lo = np.array([ax[0] for ax in lat])
    vent = _ventricle_points(hd.ventricle)
    # the core's nominal surface, centred at 0: rot @ (aniso * r_tc * direction), as ``_paint_tumour`` draws it
    shell = _mm(_sphere_dirs(256) * tm["aniso"], tm["rot"].T)
    long_axis = float(tm["aniso"].max())
    r_tc, best, best_score = tm["r_tc"], None, -np.inf
    for attempt in range(400):
        centre = np.array([side * u(*site[2]) * a, u(*site[3]) * b, u(*site[4]) * c])
        pts = np.vstack([centre, centre + (1.0 + tm["irregular"]) * r_tc * shell])
        ijk = np.clip(np.rint((pts - lo) / 2.0).astype(np.intp), 0, np.array(normal.shape) - 1)
        inside = float(brain[ijk[1:, 0], ijk[1:, 1], ijk[1:, 2]].mean())
        if not subcortical[tuple(ijk[0])]:
            inside = 0.0
        clear = min(float(np.sqrt(((vent - centre) ** 2).sum(1)).min()) - r_tc - _VENTRICLE_MARGIN_MM,
                    abs(centre[0]) - long_axis * r_tc - 2.0)
        if any(_ventricle_rho(hd.ventricle, s, *centre) < 1.0 for s in (1.0, -1.0)):
            clear = -r_tc
        score = min(inside - 1.0, clear / r_tc)
        if score > best_score:
            best, best_score, best_r = centre, score, r_tc
        if score >= 0.0:
            break
        if attempt % 10 == 9 and r_tc > 8.0:  # the site holds no core this big: a smaller tumour
            r_tc = max(8.0, r_tc * 0.95)
    # else the best of the 400 proposals (at 8 mm)
    centre, r_tc = best, best_r
    rim = min(tm["rim"], 0.45 * r_tc)
    tm.update(site=site[0], centre=centre, r_tc=r_tc, r_nec=r_tc - rim, r_ed=r_tc + tm["ed_extra"])


# --- anatomy --------------------------------------------------------------------------------

def _brain_fields(rng) -> tuple[_Field, _Field]:
    """The normal brain's random fields (outline deformation, cortical folding), drawn before anything depends
    on the grid."""
    return _Field(rng, sigma_mm=22.0, step_mm=6.0), _Field(rng, sigma_mm=3.5, step_mm=1.5)


def _paint_brain(hd: _Head, fields, axes) -> np.ndarray:
    """Tissue classes of the normal brain at the grid ``axes`` (patient mm): ``[I, J, K]`` uint8."""
    shape_field, fold_field = fields
    X, Y, Z = _grid(axes)
    a, b, c = hd.semi
    # outline: wider at the back, flatter at the base, deformed by a smooth field (+-7 %)
    a_eff = np.float32(a) * (1.0 - np.float32(0.07) * Y / np.float32(b))
    c_eff = np.where(Z < 0, np.float32(0.85 * c), np.float32(c))
    r = np.sqrt((X / a_eff) ** 2 + (Y / np.float32(b)) ** 2 + (Z / c_eff) ** 2)
    deform = shape_field.sample(*axes)
    rr = r / (1.0 + np.float32(0.035) * np.clip(deform, -2.0, 2.0))
    brain = rr < 1.0
    # approximate depth below the brain surface (mm) along the ray from the centre
    dist = np.sqrt(X * X + Y * Y + Z * Z)
    depth = dist * (1.0 - rr) / np.maximum(rr, np.float32(1e-3))
    del r, rr, dist
    fold = fold_field.sample(*axes)
    csf = np.float32(hd.csf_mm) * (1.0 + np.float32(0.3) * np.clip(deform, -2.0, 2.0))
    # the ribbon stands for folded cortex: deeper than the 2.5-4 mm of real cortical thickness, so that grey
    # matter is about as much of the brain as white matter, as in an adult
    gm_inner = csf + np.float32(hd.gm_mm) * np.clip(3.3 + 1.2 * fold, 1.2, None)
    tissue = np.zeros(brain.shape, np.uint8)
    tissue[brain] = WM
    tissue[brain & (depth < gm_inner)] = GM
    # sulci: CSF in the middle of the deep cortical folds, lined by grey matter at the fundus
    sulcus_thr = np.float32(1.05 - 0.35 * hd.atrophy)
    tissue[brain & (fold > sulcus_thr) & (depth < gm_inner - np.float32(1.6 * hd.gm_mm))] = CSF
    tissue[brain & (depth < csf)] = CSF
    del depth, gm_inner, fold, deform
    v = hd.ventricle
    # interhemispheric fissure, lined by medial cortex: above the corpus callosum, and down to the base in
    # front of and behind it (the hemispheres join only through the callosum and the deep structures)
    z_cc = v["z"] + v["sz"] + 5.0
    for lo, hi in (((-12.0, -1e4, z_cc), (12.0, 1e4, 1e4)), ((-12.0, v["y"] + 38.0, -1e4), (12.0, 1e4, z_cc)),
                   ((-12.0, -1e4, -1e4), (12.0, v["y"] - 42.0, z_cc))):
        sl = _box(axes, lo, hi)
        if sl is None:
            continue
        x, _, _ = _grid(axes, sl)
        t, br = tissue[sl], brain[sl]
        half = np.float32(0.8 + 0.6 * hd.atrophy)
        t[br & (t == WM) & (np.abs(x) < half + np.float32(hd.gm_mm * 1.3))] = GM
        t[br & (np.abs(x) < half)] = CSF
    # deep grey nuclei: thalami and basal ganglia, each side
    for s in (1.0, -1.0):
        for cx, dy, dz, semi in ((11.0, -6.0, -12.0, (8.0, 13.0, 9.0)), (22.0, 12.0, -8.0, (6.5, 15.0, 10.0))):
            ctr = np.array([s * cx, v["y"] + dy, v["z"] + dz])
            sl = _box(axes, ctr - semi, ctr + semi)
            if sl is None:
                continue
            x, y, z = _grid(axes, sl)
            rho = ((x - ctr[0]) / semi[0]) ** 2 + ((y - ctr[1]) / semi[1]) ** 2 + ((z - ctr[2]) / semi[2]) ** 2
            t = tissue[sl]
            t[(rho < 1.0) & (t == WM)] = DEEP_GM
    # lateral ventricles: curved, wider at the back (atrium), a septum between them
    for s in (1.0, -1.0):
        cx = s * (v["sep"] + v["sx"])
        lo = np.array([cx - 2 * v["sx"], v["y"] - v["sy"], v["z"] - v["sz"] - v["bend"]])
        hi = np.array([cx + 2 * v["sx"], v["y"] + v["sy"], v["z"] + v["sz"]])
        sl = _box(axes, lo, hi)
        if sl is None:
            continue
        t = tissue[sl]
        t[(_ventricle_rho(v, s, *_grid(axes, sl)) < 1.0) & brain[sl]] = CSF
    # third ventricle: a thin midline slit between the thalami
    sl = _box(axes, (-2.0, v["y"] - 16.0, v["z"] - 22.0), (2.0, v["y"] + 6.0, v["z"] - 6.0))
    if sl is not None:
        x, _, _ = _grid(axes, sl)
        t = tissue[sl]
        t[(np.abs(x) < 1.5 * (1.0 + hd.atrophy)) & brain[sl]] = CSF
    return tissue


def _paint_tumour(hd: _Head, rng, axes, tissue: np.ndarray) -> None:
    """Glioma: an irregular enhancing shell around a necrotic core; infiltrated tissue in a margin around it
    (white and deep grey matter, cortex, effaced sulci) and vasogenic oedema further out along the white (and
    deep grey) matter, all BraTS label 2. Only inside the brain, the oedema only in the tumour's hemisphere."""
    tm = hd.tumour
    c = tm["centre"]
    reach = tm["r_ed"] * 1.6 + 4.0
    shape_field = _Field(rng, sigma_mm=6.0, step_mm=2.0, half_mm=reach, centre=c)
    core_field = _Field(rng, sigma_mm=4.0, step_mm=2.0, half_mm=reach, centre=c)
    oedema_field = _Field(rng, sigma_mm=8.0, step_mm=2.0, half_mm=reach, centre=c)
    sl = _box(axes, c - reach, c + reach)
    if sl is None:
        return
    X, Y, Z = _grid(axes, sl)
    d = (X - np.float32(c[0]), Y - np.float32(c[1]), Z - np.float32(c[2]))
    rot, an = tm["rot"], tm["aniso"]
    q = [(np.float32(rot[0, k]) * d[0] + np.float32(rot[1, k]) * d[1] + np.float32(rot[2, k]) * d[2])
         / np.float32(an[k]) for k in range(3)]
    rad = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])  # mm, anisotropic
    del q, d
    xs, ys, zs = (ax[s] for ax, s in zip(axes, sl))
    irr = np.float32(tm["irregular"])
    r_shape = rad / (1.0 + irr * np.clip(shape_field.sample(xs, ys, zs), -2.0, 2.0))
    r_core = rad / (1.0 + 1.3 * irr * np.clip(core_field.sample(xs, ys, zs), -2.0, 2.0))
    r_ed = rad / (1.0 + 1.2 * irr * np.clip(oedema_field.sample(xs, ys, zs), -2.0, 2.0))
    t = tissue[sl]
    inside = t != BACKGROUND
    # oedema: out to its own irregular reach, and never less than a margin around the core, so that the core
    # sits in oedema rather than against normal white matter
    oedema = (r_ed < tm["r_ed"]) | (r_shape < tm["r_tc"] + OEDEMA_MARGIN_MM)
    # the falx keeps the oedema in the tumour's hemisphere (it crosses, rarely, through the corpus callosum)
    oedema &= (X * np.float32(np.sign(c[0]))) > -2.0
    t[oedema & ((t == WM) | (t == DEEP_GM))] = OEDEMA
    # within the margin around the core, cortex the tumour reaches is infiltrated (FLAIR-bright; BraTS's label 2
    # is oedematous *or invaded* tissue), and the swollen gyri efface the sulci and subarachnoid CSF next to it
    # (mass effect); the ventricles and the midline keep their CSF. Vasogenic oedema, beyond the margin, spreads
    # only along the white matter
    margin = oedema & (r_shape < tm["r_tc"] + OEDEMA_MARGIN_MM)
    t[margin & (t == GM)] = OEDEMA
    i, j, k = np.nonzero(margin & (t == CSF) & (np.abs(X) > np.float32(3.0)))
    if i.size:
        keep = np.ones(i.size, bool)
        for s_ in (1.0, -1.0):
            keep &= _ventricle_rho(hd.ventricle, s_, xs[i], ys[j], zs[k]) >= 1.0
        t[i[keep], j[keep], k[keep]] = OEDEMA
    del margin
    core = inside & (r_shape < tm["r_tc"])
    t[core] = ENHANCING
    # necrosis: irregular, but inside the enhancing shell (at least most of the rim's thickness deep), so the
    # rim closes around it as in a typical glioblastoma
    rim = tm["r_tc"] - tm["r_nec"]
    t[core & (r_core < tm["r_nec"]) & (r_shape < tm["r_tc"] - np.float32(0.7 * rim))] = NECROSIS


# --- intensities ----------------------------------------------------------------------------

def _bias_log(field: _Field, semi, peak: float, axes, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Log of a multiplicative bias field at the voxel centres: ``field`` less its mean over the brain's nominal
    outline, scaled so that its largest deviation there is ``peak`` (both on a fixed 4 mm lattice, so
    independent of the voxel grid), clipped at +-peak; sampled ``shift`` mm off, for a coil profile displaced
    against the anatomy."""
    lat = [np.arange(-1.1 * h, 1.1 * h + 1e-6, 4.0) for h in semi]
    x, y, z = lat[0][:, None, None], lat[1][None, :, None], lat[2][None, None, :]
    f = field.sample(*lat)[_outline_r(semi, x, y, z) < 1.0]
    mean = float(f.mean())
    dev = float(np.abs(f - mean).max())
    g = field.sample(*(ax + np.float32(d) for ax, d in zip(axes, shift)))
    return np.float32(peak) * np.clip((g - np.float32(mean)) / np.float32(dev), -1.0, 1.0)


def _render(hd: _Head, rng, noise_rng, axes, tissue: np.ndarray) -> np.ndarray:
    """``[4, I, J, K]`` float32: tissue signal per sequence x bias field, Rician noise, 0 outside
    the brain, times an arbitrary positive scale per sequence."""
    jitter = rng.uniform(0.96, 1.04, TISSUE_INTENSITY.shape).astype(np.float32)
    table = TISSUE_INTENSITY * jitter
    # T1ce: T1's tissue signal (its jitter: the same tissue in the same session) times the gadolinium
    # enhancement, whose increase over 1 varies by case (dose, timing, vascularity): only where there is one
    table[:, 1] = table[:, 0] * (1.0 + (GD_ENHANCEMENT - 1.0) * jitter[:, 1])
    # one receive/transmit non-uniformity per acquisition; T1ce shares T1's (same coil, same session, the
    # same sequence), displaced by the patient's motion between the two scans (after registration)
    fields = {ch: _Field(rng, sigma_mm=45.0, step_mm=10.0) for ch in (0, 2, 3)}
    peaks = dict(zip((0, 2, 3), rng.uniform(*BIAS_PEAK, 3)))
    shift = rng.uniform(-T1CE_SHIFT_MM, T1CE_SHIFT_MM, 3)
    noise_sd = rng.uniform(0.02, 0.05, 4)  # relative to white matter / grey matter (~1)
    gain = rng.uniform(200.0, 3000.0, 4)
    mask = tissue != BACKGROUND
    image = np.empty((4, *tissue.shape), np.float32)
    for ch in range(4):
        signal = table[:, ch][tissue]
        if ch == 1:
            log_b = _bias_log(fields[0], hd.semi, peaks[0], axes, shift)
        else:
            log_b = _bias_log(fields[ch], hd.semi, peaks[ch], axes)
        signal *= np.exp(log_b)
        del log_b
        sd = np.float32(noise_sd[ch])
        re = signal + noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
        im = noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
        mag = np.sqrt(re * re + im * im)
        mag *= np.float32(gain[ch])
        mag[~mask] = 0.0
        image[ch] = mag
    return image
