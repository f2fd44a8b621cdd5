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

1. draw the head: size, deformation, atrophy, ventricles, tumour position and size (``_draw_head``);
2. brain outline: a deformed ellipsoid; a CSF layer outside the cortex; a grey-matter ribbon whose
   thickness follows a noisy folding field (deep where sulci are, with CSF in the sulci); white
   matter inside; the interhemispheric fissure; deep grey nuclei; two lateral ventricles and the
   third ventricle (``_paint_brain``);
3. the tumour in one hemisphere's white matter: an irregular enhancing shell around a necrotic
   core, and oedema infiltrating the white matter around it (``_paint_tumour``);
4. per-sequence intensities of each tissue, a smooth multiplicative bias field per sequence,
   Rician noise, the skull-strip mask, and an arbitrary positive scale per sequence (``_render``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medmim.data.phantom import _affine, _check_seed, write_cases
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
# relative signal of each tissue per sequence (columns T1, T1ce, T2, FLAIR), before the per-case
# jitter (+-4 %), the bias field, noise and the arbitrary scale of each sequence
TISSUE_INTENSITY = np.array([
    #  T1    T1ce   T2    FLAIR
    [0.00, 0.00, 0.00, 0.00],  # background (outside the brain mask, stays 0)
    [0.30, 0.30, 2.00, 0.20],  # CSF: dark on T1, brightest on T2, suppressed on FLAIR
    [0.72, 0.74, 1.00, 1.00],  # cortical GM
    [1.00, 1.00, 0.68, 0.74],  # WM: brightest normal tissue on T1, darker than GM on T2/FLAIR
    [0.82, 0.84, 0.88, 0.92],  # deep GM (thalamus, basal ganglia): between GM and WM
    [0.82, 0.84, 1.60, 1.75],  # oedema: slightly dark on T1, bright on T2, brightest on FLAIR
    [0.38, 0.40, 1.80, 0.85],  # necrosis: dark on T1 and T1ce (no enhancement), fluid-bright on T2
    [0.74, 1.80, 1.15, 1.25],  # enhancing rim: GM-like on T1, very bright after gadolinium
], np.float32)

_HALF_MM = 100.0  # the random fields cover the box +-100 mm around the head centre


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
    affine = _affine(shape, spacing)
    # patient-frame coordinates (mm) of the voxel centres along each axis
    axes = [(np.arange(n, dtype=np.float64) * s + affine[a, 3] - head.offset[a]).astype(np.float32)
            for a, (n, s) in enumerate(zip(shape, spacing))]
    tissue = _paint_brain(head, rng, axes)
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
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _draw_head(rng) -> _Head:
    u = rng.uniform
    size = u(0.93, 1.04)
    semi = (66.0 * size * u(0.97, 1.03), 78.0 * size * u(0.97, 1.03), 57.0 * size * u(0.97, 1.03))
    atrophy = u(0.0, 1.0)
    vs = 1.0 + 0.6 * atrophy
    ventricle = {"y": u(-8.0, -2.0), "z": u(8.0, 14.0), "sx": u(5.0, 7.0) * vs, "sy": u(24.0, 30.0),
                 "sz": u(5.0, 7.5) * vs, "sep": u(1.0, 2.0), "bend": u(6.0, 12.0)}
    # tumour: in the white matter of one hemisphere, clear of the ventricles and the cortex
    r_tc = u(12.0, 23.0)  # tumour core (necrosis + enhancing rim) mean radius
    rim = u(2.5, 6.0)  # enhancing rim thickness
    r_ed = r_tc + u(8.0, 22.0)  # oedema reach
    side = 1.0 if rng.random() < 0.5 else -1.0
    a, b, c = semi
    for _ in range(200):
        centre = np.array([side * u(18.0, 0.62 * a), u(-0.6 * b, 0.6 * b), u(-0.25 * c, 0.5 * c)])
        r_ell = math.sqrt((centre[0] / a) ** 2 + (centre[1] / b) ** 2 + (centre[2] / c) ** 2)
        depth = (1.0 - r_ell) * min(a, b, c)  # conservative distance to the brain surface
        dv = min(math.dist(centre, (s * (ventricle["sep"] + ventricle["sx"]), ventricle["y"], ventricle["z"]))
                 for s in (1.0, -1.0))
        if depth > 1.25 * r_tc + 8.0 and dv > r_tc + 8.0:
            break
        r_tc, r_ed = max(8.0, r_tc * 0.97), max(8.0, r_tc * 0.97) + (r_ed - r_tc)
    rim = min(rim, 0.45 * r_tc)
    tumour = {"centre": centre, "r_tc": r_tc, "r_nec": r_tc - rim, "r_ed": r_ed,
              "aniso": u(0.8, 1.25, 3), "rot": _rot(rng), "irregular": u(0.12, 0.25)}
    return _Head(offset=u(-2.0, 2.0, 3), semi=semi, atrophy=atrophy, csf_mm=u(0.8, 1.6) + 1.6 * atrophy,
                 gm_mm=u(3.4, 4.4), ventricle=ventricle, tumour=tumour)


# --- anatomy --------------------------------------------------------------------------------

def _paint_brain(hd: _Head, rng, axes) -> np.ndarray:
    """Tissue classes of the normal brain: ``[I, J, K]`` uint8."""
    # every field is drawn before anything depends on the grid
    shape_field = _Field(rng, sigma_mm=22.0, step_mm=6.0)
    fold_field = _Field(rng, sigma_mm=3.5, step_mm=1.5)
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
        x, y, z = _grid(axes, sl)
        yn = (y - np.float32(v["y"])) / np.float32(v["sy"])
        zc = np.float32(v["z"]) - np.float32(v["bend"]) * yn * yn
        sx = np.float32(v["sx"]) * (1.0 + 0.35 * np.clip(-yn, 0.0, 1.0))
        xc = np.float32(cx) + np.float32(s) * (sx - np.float32(v["sx"]))  # widen outwards, keep the septum
        rho = ((x - xc) / sx) ** 2 + yn * yn + ((z - zc) / np.float32(v["sz"])) ** 2
        t = tissue[sl]
        t[(rho < 1.0) & brain[sl]] = CSF
    # third ventricle: a thin midline slit between the thalami
    sl = _box(axes, (-2.0, v["y"] - 16.0, v["z"] - 22.0), (2.0, v["y"] + 6.0, v["z"] - 6.0))
    if sl is not None:
        x, _, _ = _grid(axes, sl)
        t = tissue[sl]
        t[(np.abs(x) < 1.5 * (1.0 + hd.atrophy)) & brain[sl]] = CSF
    return tissue


def _paint_tumour(hd: _Head, rng, axes, tissue: np.ndarray) -> None:
    """Glioma: an irregular enhancing shell around a necrotic core, oedema infiltrating the white
    matter (and deep grey matter) around it. Only inside the brain."""
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
    core = inside & (r_shape < tm["r_tc"])
    t[core] = ENHANCING
    # necrosis: irregular, but inside the enhancing shell (at least most of the rim's thickness deep), so the
    # rim closes around it as in a typical glioblastoma
    rim = tm["r_tc"] - tm["r_nec"]
    t[core & (r_core < tm["r_nec"]) & (r_shape < tm["r_tc"] - np.float32(0.7 * rim))] = NECROSIS


# --- intensities ----------------------------------------------------------------------------

def _render(hd: _Head, rng, noise_rng, axes, tissue: np.ndarray) -> np.ndarray:
    """``[4, I, J, K]`` float32: tissue signal per sequence x bias field, Rician noise, 0 outside
    the brain, times an arbitrary positive scale per sequence."""
    table = TISSUE_INTENSITY * rng.uniform(0.96, 1.04, TISSUE_INTENSITY.shape).astype(np.float32)
    bias_fields = [_Field(rng, sigma_mm=45.0, step_mm=10.0) for _ in range(4)]
    bias_amp = rng.uniform(0.05, 0.12, 4)
    noise_sd = rng.uniform(0.02, 0.05, 4)  # relative to white matter / grey matter (~1)
    gain = rng.uniform(200.0, 3000.0, 4)
    mask = tissue != BACKGROUND
    image = np.empty((4, *tissue.shape), np.float32)
    for ch in range(4):
        signal = table[:, ch][tissue]
        signal *= np.exp(np.float32(bias_amp[ch]) * np.clip(bias_fields[ch].sample(*axes), -2.5, 2.5))
        sd = np.float32(noise_sd[ch])
        re = signal + noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
        im = noise_rng.standard_normal(signal.shape, dtype=np.float32) * sd
        mag = np.sqrt(re * re + im * im)
        mag *= np.float32(gain[ch])
        mag[~mask] = 0.0
        image[ch] = mag
    return image
