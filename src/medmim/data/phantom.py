"""Synthetic abdominal CT phantoms that imitate the BTCV multi-organ segmentation task.

Each case is a contrast-enhanced (portal venous phase) abdominal CT from the lung bases to the
lower lumbar spine, with BTCV's 13 organ labels. Everything is drawn from one integer seed, so
the same seed gives the same arrays and the same file bytes, on any CPU: the small matrix products
of the organ frames are summed in numpy's own loops (``_mm``, ``_norm``), not handed to its BLAS,
whose kernel depends on the CPU (an AVX-512 kernel rounded them differently from an AVX2 one and
moved a few tissue voxels of each image; the bytes are now those that the AVX2 kernel gave).

Geometry: array axes ``[i, j, k]`` point to the patient's Right, Anterior and Superior (RAS+), the
affine is ``diag(spacing)`` with the volume centre at world ``(0, 0, 0)`` mm, and the patient lies
within ~10 mm of that centre. Anatomy is defined in millimetres (deformed ellipsoids and tubes
along splines), so organ volumes in mL do not depend on ``shape`` or ``spacing``; a field of view
smaller than the body crops it, like a CT reconstructed with a small display field.

How a case is built (one named step each, in :func:`make_phantom`):

1. draw the patient: habitus, spine level, contrast, noise (``_draw_patient``);
2. body wall, ribs, spine and back muscles, which fix where the abdominal cavity is;
3. the retroperitoneal scaffold (aorta, IVC, kidneys, adrenals, pancreas), then the mobile organs
   (spleen, liver, gallbladder, stomach, esophagus) fill the cavity fat left free, then the portal
   and splenic veins. An organ only takes cavity fat (the gallbladder may also take liver, the
   veins liver and pancreas), so labels never overlap; kidneys and adrenals keep a shell of
   perirenal fat no other organ may take; organ volumes are drawn first and each shape is scaled
   to its drawn volume (so a squeezed organ grows where there is room);
4. unlabeled clutter: renal and mesenteric vessels, hepatic veins, duodenum, colon, small bowel,
   diaphragm, lung bases, heart;
5. Hounsfield units per tissue, scanner noise and a mild blur (partial volume); labels stay crisp.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medmim.errors import MedmimError
from medmim.fileio import atomic_write_text

BTCV_LABELS: dict[int, str] = {
    0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder",
    5: "esophagus", 6: "liver", 7: "stomach", 8: "aorta", 9: "inferior vena cava",
    10: "portal vein and splenic vein", 11: "pancreas", 12: "right adrenal gland",
    13: "left adrenal gland",
}
# pairs of labels that swap when the patient's left and right are mirrored
BTCV_LATERAL_PAIRS = [(2, 3), (12, 13)]
DEFAULT_SHAPE = (192, 160, 80)  # voxels along i, j, k: 2.46 million
DEFAULT_SPACING = (2.0, 2.0, 3.0)  # mm; thin in-plane, thicker slices, like clinical CT
# smallest field of view (mm along i, j, k) that still shows every organ
MIN_FOV_MM = (200.0, 200.0, 200.0)
# a phantom bigger than this is a typo, not a CT (512 x 512 x 1024)
MAX_VOXELS = 2**28

SPLEEN, KIDNEY_R, KIDNEY_L, GALLBLADDER, ESOPHAGUS, LIVER, STOMACH = 1, 2, 3, 4, 5, 6, 7
AORTA, IVC, PORTAL_SPLENIC, PANCREAS, ADRENAL_R, ADRENAL_L = 8, 9, 10, 11, 12, 13

# tissue classes: each voxel gets one, and each class one HU value per case
AIR, SKIN, FAT, MUSCLE, CAVITY_FAT, CORTICAL, CANCELLOUS, CANAL, DISC, LUNG = range(10)
BONE, HEART_WALL, HEART_BLOOD, BOWEL_WALL, BOWEL_FLUID, GAS, STOOL, URINE, BILE = range(10, 19)
GASTRIC_FLUID, HEPATIC_VEIN, ARTERY, VEIN, PORTAL_BRANCH, PERIRENAL_FAT = range(19, 25)
ORGAN = 30  # organ parenchyma: tissue class ORGAN + label
_N_TISSUES = 64
# HU of an organ = unenhanced + contrast * enhancement (portal venous phase), contrast ~ 0.9-1.1
_ORGAN_HU = {
    SPLEEN: (47, 70), KIDNEY_R: (35, 130), KIDNEY_L: (35, 130), GALLBLADDER: (10, 0),
    ESOPHAGUS: (35, 10), LIVER: (55, 55), STOMACH: (40, 30), AORTA: (45, 130), IVC: (45, 90),
    PORTAL_SPLENIC: (50, 120), PANCREAS: (45, 55), ADRENAL_R: (35, 35), ADRENAL_L: (35, 35),
}
# organ volumes drawn per case, mL (before the gallbladder and veins carve the liver)
_VOLUME_ML = {
    LIVER: (1300, 1750), SPLEEN: (130, 240), KIDNEY_R: (125, 170), KIDNEY_L: (125, 170),
    GALLBLADDER: (22, 45), STOMACH: (170, 380), PANCREAS: (55, 95), PORTAL_SPLENIC: (12, 25),
    ADRENAL_R: (3.5, 6.5), ADRENAL_L: (3.5, 6.5),
}
# box around the patient origin (mm, patient frame) that holds every fitted organ whole
_ANATOMY_BOX = (np.array([-150.0, -105.0, -112.0]), np.array([150.0, 110.0, 118.0]))


@dataclass
class PhantomCase:
    """One synthetic CT.

    ``image``: ``[I, J, K]`` int16 Hounsfield units (air -1000).
    ``label``: ``[I, J, K]`` uint8, ids of :data:`BTCV_LABELS`.
    ``affine``: ``[4, 4]`` float64, voxel index -> RAS+ world (mm).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


# --- public API -------------------------------------------------------------------------------

def make_phantom(seed: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> PhantomCase:
    """Generate one abdominal CT with BTCV labels from ``seed`` (an integer >= 0).

    ``shape``: voxels along i, j, k; ``spacing``: mm along i, j, k. Their product, the field of
    view, must be at least :data:`MIN_FOV_MM`. Same arguments, same arrays.
    Raises :class:`MedmimError` naming ``--seed``, ``--shape`` or ``--spacing`` when invalid.
    """
    seed = _check_seed(seed)
    shape, spacing = _check_geometry(shape, spacing)
    anatomy_ss, noise_ss = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(anatomy_ss)
    pt = _draw_patient(rng)
    cv = _Canvas.around(shape, spacing, pt.offset)
    # body wall, ribs and spine: where the abdominal cavity is
    _paint_body(cv, pt, rng)
    _paint_spine(cv, pt)
    # retroperitoneal scaffold first; mobile organs then fill the cavity fat left free
    vessels = _paint_great_vessels(cv, pt, rng)
    kidneys = _paint_kidneys(cv, pt, rng)
    _paint_adrenals(cv, pt, rng, kidneys)
    pancreas = _paint_pancreas(cv, pt, rng)
    spleen_hilum = _paint_spleen(cv, pt, rng)
    _paint_liver(cv, pt, rng)
    _paint_gallbladder(cv, pt, rng)
    ge_junction = _paint_stomach(cv, pt, rng)
    _paint_esophagus(cv, pt, rng, ge_junction)
    _paint_portal_splenic(cv, pt, rng, pancreas, spleen_hilum)
    # unlabeled: vessels, bowel, diaphragm, lung bases, heart
    _paint_small_vessels(cv, pt, rng, vessels, kidneys, pancreas)
    _paint_bowel(cv, pt, rng)
    _paint_thorax(cv, pt, rng)
    image = _render(cv, pt, rng, np.random.default_rng(noise_ss))
    label = np.ascontiguousarray(cv.label[cv.fov])
    return PhantomCase(image=image, label=label, affine=_affine(shape, spacing))


def write_phantom_dataset(out_dir, labeled: int, unlabeled: int, seed: int = 0, shape=DEFAULT_SHAPE,
                          spacing=DEFAULT_SPACING, progress: bool = False) -> Path:
    """Write a Medical Segmentation Decathlon folder of phantoms and return ``out_dir``.

    ``out_dir/imagesTr/phantom_XXXX.nii.gz`` + ``labelsTr/phantom_XXXX.nii.gz`` for the
    ``labeled`` cases (indices ``0..labeled-1``), ``imagesTs/phantom_XXXX.nii.gz`` (images only,
    for pretraining) for the ``unlabeled`` ones (indices ``labeled..labeled+unlabeled-1``), and an
    MSD ``dataset.json``. Case ``i`` is ``make_phantom(case_seed(seed, i), shape, spacing)``, so
    the same arguments write the same bytes. Raises :class:`MedmimError` on invalid arguments.
    """
    cases = write_cases(out_dir, labeled, unlabeled, seed, shape, spacing, "phantom", progress,
                        lambda case_seed_, shape_, spacing_: _as_written(make_phantom(case_seed_, shape_, spacing_)))
    training, test, seeds, seed, shape, spacing = cases
    out_dir = Path(out_dir)
    fov = [round(n * s, 3) for n, s in zip(shape, spacing)]
    desc = {
        "name": "medmim-phantom",
        "description": ("Synthetic contrast-enhanced abdominal CT imitating BTCV (13 organs), "
                        f"{'x'.join(map(str, shape))} voxels of {'x'.join(map(str, spacing))} mm "
                        f"({'x'.join(map(str, fov))} mm field of view), RAS+, HU int16; "
                        "imagesTs are unlabeled cases for pretraining"),
        "tensorImageSize": "3D",
        "reference": "medmim.data.phantom",
        "licence": "CC0",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "numTraining": labeled,
        "numTest": unlabeled,
        "training": training,
        "test": test,
        "lateral_pairs": [list(p) for p in BTCV_LATERAL_PAIRS],
        "medmim_phantom": {"seed": seed, "shape": list(shape), "spacing": list(spacing), "case_seeds": seeds},
    }
    atomic_write_text(out_dir / "dataset.json", json.dumps(desc, indent=2) + "\n")
    return out_dir


def _as_written(case: PhantomCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return case.image, case.label, case.affine


def write_cases(out_dir, labeled, unlabeled, seed, shape, spacing, prefix: str, progress: bool, make,
                check_geometry=None):
    """Check the arguments, then write case ``i`` = ``make(case_seed(seed, i), shape, spacing)`` -> (image,
    label, affine) as ``imagesTr``/``labelsTr`` (the first ``labeled``) or ``imagesTs`` (the rest) under
    ``out_dir``, named ``PREFIX_XXXX``. Returns (training entries, test entries, case seeds, and the checked
    seed, shape and spacing) for the caller's dataset.json."""
    from medmim.data.io import write_nifti

    labeled = _check_count(labeled, "--labeled")
    unlabeled = _check_count(unlabeled, "--unlabeled")
    if labeled + unlabeled == 0:
        raise MedmimError("--labeled and --unlabeled are both 0: no phantom to write")
    seed = _check_seed(seed)
    shape, spacing = (check_geometry or _check_geometry)(shape, spacing)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MedmimError(f"{out_dir}: exists and is not a folder")
    training, test, seeds = [], [], {}
    cases = range(labeled + unlabeled)
    if progress:
        from tqdm import tqdm

        cases = tqdm(cases, desc="phantoms" if prefix == "phantom" else f"{prefix} phantoms", unit="case")
    for i in cases:
        name = f"{prefix}_{i:04d}"
        seeds[name] = case_seed(seed, i)
        image, label, affine = make(seeds[name], shape, spacing)
        if i < labeled:
            write_nifti(out_dir / "imagesTr" / f"{name}.nii.gz", image, affine)
            write_nifti(out_dir / "labelsTr" / f"{name}.nii.gz", label, affine)
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        else:
            write_nifti(out_dir / "imagesTs" / f"{name}.nii.gz", image, affine)
            test.append(f"./imagesTs/{name}.nii.gz")
    return training, test, seeds, seed, shape, spacing


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset written with ``seed``: a 32-bit int from both."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


# --- argument checks --------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_seed(seed) -> int:
    if not _is_int(seed) or seed < 0:
        raise MedmimError(f"--seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _check_count(n, option: str) -> int:
    if not _is_int(n):
        raise MedmimError(f"{option} must be an integer, got {n!r}")
    if n < 0:
        raise MedmimError(f"{option} must be >= 0, got {n}")
    return int(n)


def _check_geometry(shape, spacing, min_fov_mm=MIN_FOV_MM, what: str = "abdomen"
                    ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``shape`` and ``spacing`` as tuples, or MedmimError naming the option; the field of view must hold
    ``min_fov_mm`` (the phantom ``what``'s smallest)."""
    try:
        shape_t = tuple(shape)
    except TypeError:
        raise MedmimError(f"--shape must be 3 positive integers, got {shape!r}")
    if len(shape_t) != 3 or not all(_is_int(n) and n > 0 for n in shape_t):
        raise MedmimError(f"--shape must be 3 positive integers, got {shape!r}")
    try:
        spacing_t = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise MedmimError(f"--spacing must be 3 positive numbers (mm), got {spacing!r}")
    if len(spacing_t) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise MedmimError(f"--spacing must be 3 positive numbers (mm), got {spacing!r}")
    shape_t = tuple(int(n) for n in shape_t)
    n_vox = math.prod(shape_t)
    if n_vox > MAX_VOXELS:
        raise MedmimError(f"--shape {shape_t} has {n_vox} voxels, more than the {MAX_VOXELS} a phantom may have")
    fov = [n * s for n, s in zip(shape_t, spacing_t)]
    if any(f < m for f, m in zip(fov, min_fov_mm)):
        raise MedmimError(
            f"--shape {shape_t} at --spacing {spacing_t} mm covers {' x '.join(f'{f:g}' for f in fov)} mm, "
            f"but the phantom {what} needs at least {' x '.join(f'{m:g}' for m in min_fov_mm)} mm "
            "(for a small volume use a coarser --spacing)")
    return shape_t, spacing_t




def _affine(shape, spacing) -> np.ndarray:
    """``[4, 4]`` RAS-aligned affine putting the volume centre at world (0, 0, 0)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return affine


# --- the patient --------------------------------------------------------------------------------

@dataclass
class _Patient:
    """Case-wide anatomy in the patient frame: mm, x Right, y Anterior, z Superior, origin at the
    body's in-plane centre. Cavity = inside the abdominal muscle wall."""

    offset: np.ndarray  # [3] patient origin in world mm
    cavity: tuple[float, float, float]  # half-width, anterior and posterior half-depth of the cavity
    wall: float  # muscle wall thickness
    fat: tuple[float, float, float]  # subcutaneous fat: lateral, anterior, posterior thickness
    exponent: float  # superellipse exponent of the body outline (2 = ellipse)
    taper: float  # relative widening of the body per 100 mm towards the chest
    z_l1: float  # centre of the L1 vertebral body
    level: float  # height of one vertebra + disc
    y_vb: float  # centre of the vertebral bodies (y) at L1
    vb_semi: tuple[float, float]  # vertebral body half-width, half-depth
    lordosis: float  # y shift per vertebral level going down
    dome: tuple[float, float]  # right and left diaphragm dome tops (z)
    contrast: float  # enhancement scale, ~0.9-1.1
    noise_sd: float  # HU, after blur
    blur_mm: tuple[float, float, float]  # partial-volume sigma per axis

    def y_spine(self, z):
        """y of the vertebral body centre at height ``z`` (lumbar lordosis brings it forward)."""
        return self.y_vb + self.lordosis * np.clip((self.z_l1 - z) / self.level, -3.0, 4.0)

    def y_front(self, z):
        """y of the anterior surface of the vertebral body at height ``z``."""
        return self.y_spine(z) + self.vb_semi[1]

    def diaphragm(self, x, y):
        """z of the diaphragm's upper surface over (x, y): two domes sloping to the recesses."""
        right = self.dome[0] - 45.0 * ((x - 55.0) ** 2 + (0.9 * y) ** 2) / 110.0**2
        left = self.dome[1] - 45.0 * ((x + 55.0) ** 2 + (0.9 * (y + 10.0)) ** 2) / 110.0**2
        # the posterior costophrenic recesses run low, lateral to the crura
        posterior = 0.5 * np.maximum(0.0, (self.y_vb + 10.0) - y) * np.clip((np.abs(x) - 30.0) / 60.0, 0.0, 1.0)
        return np.maximum(right, left) - posterior


def _draw_patient(rng: np.random.Generator) -> _Patient:
    u = rng.uniform
    cavity = (u(124, 134), u(80, 94), u(72, 82))
    fat_lat = u(14, 32)
    fat = (fat_lat, fat_lat * u(0.9, 1.25), fat_lat * u(0.5, 0.8))
    level = u(30, 34)
    z_l1 = u(-6, 6)
    y_vb = -cavity[2] + u(42, 50)
    dome_r = z_l1 + u(2.9, 3.2) * level
    return _Patient(
        offset=np.array([u(-8, 8), u(-8, 8), u(-8, 8)]),
        cavity=cavity, wall=u(8, 12), fat=fat, exponent=u(2.0, 2.5), taper=u(0.0, 0.05),
        z_l1=z_l1, level=level, y_vb=y_vb, vb_semi=(u(20, 24), u(14, 17)), lordosis=u(1.5, 3.5),
        dome=(dome_r, dome_r - u(8, 18)),
        contrast=u(0.9, 1.1), noise_sd=u(10, 20), blur_mm=(u(1.0, 1.6), u(1.0, 1.6), u(1.2, 2.0)),
    )


# --- canvas: the voxel grid the anatomy is painted on ------------------------------------------

class _Canvas:
    """Label and tissue arrays on the output lattice, grown to hold the whole anatomy box.

    ``x, y, z``: voxel-centre coordinates in the patient frame (mm), increasing; ``fov``: the
    slices of the requested volume inside the canvas.
    """

    def __init__(self, x, y, z, fov, spacing):
        self.x, self.y, self.z = (a.astype(np.float32) for a in (x, y, z))
        self.fov = fov
        self.spacing = spacing
        self.voxel_ml = float(np.prod(spacing)) / 1000.0
        shape = (len(x), len(y), len(z))
        self.label = np.zeros(shape, np.uint8)
        self.tissue = np.zeros(shape, np.uint8)

    @classmethod
    def around(cls, shape, spacing, offset) -> "_Canvas":
        axes, fov = [], []
        for n, s, off, lo, hi in zip(shape, spacing, offset, *_ANATOMY_BOX):
            origin = -(n - 1) / 2.0 * s  # world coordinate of voxel 0
            first = min(0, math.floor((lo + off - origin) / s))
            last = max(n - 1, math.ceil((hi + off - origin) / s))
            axes.append(origin + np.arange(first, last + 1) * s - off)
            fov.append(slice(-first, -first + n))
        return cls(*axes, tuple(fov), spacing)

    def box(self, lo, hi):
        """Slices of the voxels whose centres lie in the box [lo, hi] (mm), or None if empty."""
        sl = []
        for ax, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0, i1 = int(np.searchsorted(ax, a, "left")), int(np.searchsorted(ax, b, "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl):
        """Broadcastable coordinates of a box: X [n, 1, 1], Y [1, m, 1], Z [1, 1, l] (mm)."""
        return self.x[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.z[sl[2]][None, None, :]

    def free(self, sl, also=()) -> np.ndarray:
        """Voxels of the box an organ may take: cavity fat, plus organs listed in ``also``."""
        ok = self.tissue[sl] == CAVITY_FAT
        for lab in also:
            ok |= self.label[sl] == lab
        return ok

    def paint_organ(self, sl, mask, label: int, tissue: int) -> np.ndarray:
        """Paint an organ's largest connected piece; returns the mask painted."""
        mask = _largest_component(mask)
        self.paint(sl, mask, label, tissue)
        return mask

    def reserve_fat(self, sl, mask, mm: float) -> None:
        """Keep a fat shell ``mm`` thick around ``mask`` that later organs may not take."""
        shell = ndimage.binary_dilation(mask, _ball(mm, self.spacing)) & self.free(sl)
        self.paint(sl, shell, tissue=PERIRENAL_FAT)

    def paint(self, sl, mask, label=None, tissue=None) -> None:
        if label is not None:
            self.label[sl][mask] = label
        if tissue is not None:
            self.tissue[sl][mask] = tissue


# --- small products done in numpy's own loops: the same bytes on every CPU ---------------------
# numpy gives ``@``, ``np.dot`` and the norm of a vector to BLAS, whose kernel (picked for the CPU at start)
# may fuse or reorder the multiply-adds; a phantom drawn from them differs in a few voxels between machines.

def _mm(a, b) -> np.ndarray:
    """``a @ b`` for a matrix ``a`` [n, k] and a matrix [k, m] or vector [k] ``b``, summed in a fixed order."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if b.ndim == 1:
        return (a * b).sum(axis=-1)
    return (a[:, :, None] * b[None, :, :]).sum(axis=1)


def _norm(v) -> float:
    """Euclidean norm of a vector, summed in a fixed order."""
    v = np.asarray(v, float)
    return math.sqrt(float((v * v).sum()))


# --- shapes: smooth implicit fields, < 1 inside at scale 1 ------------------------------------

def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix Rx(ax) @ Ry(ay) @ Rz(az) (radians); columns are the local axes in world."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return _mm(_mm(rx, ry), rz)


def _frame(first, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Orthonormal columns: ``first`` normalised, then the part of ``up`` orthogonal to it."""
    e1 = np.asarray(first, float) / _norm(first)
    e3 = np.asarray(up, float) - float((np.asarray(up, float) * e1).sum()) * e1
    e3 /= _norm(e3)
    return np.stack([e1, np.cross(e3, e1), e3], axis=1)


def _extent(rot: np.ndarray, semi) -> np.ndarray:
    """Half-extent along the world axes of an ellipsoid with axes ``rot`` columns, ``semi`` mm."""
    return np.sqrt(_mm(rot**2, np.asarray(semi, float) ** 2))


def _draw_bumps(rng, size_mm: float, n: int = 3, amp: float = 0.07, wavelength=(60.0, 120.0)):
    """Random low-frequency sinusoids (k [3] 1/mm, phase, amplitude) that dent a shape by a few
    percent of its size without breaking it into pieces (amp * |k| * size < 0.6)."""
    bumps = []
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * math.pi / (_norm(k) * rng.uniform(*wavelength))
        a = min(rng.uniform(0.3, 1.0) * amp, 0.6 / (n * _norm(k) * size_mm))
        bumps.append((k.astype(np.float32), rng.uniform(0, 2 * math.pi), a))
    return bumps


def _ellipsoid(X, Y, Z, centre, rot, semi, bumps=()) -> np.ndarray:
    """Normalised radius of a rotated ellipsoid (1 on its surface) plus smooth dents.

    X, Y, Z: broadcastable mm coordinates; ``rot``: [3, 3] local axes as columns; ``semi``: mm.
    Returns float32 of the broadcast shape.
    """
    dx, dy, dz = X - np.float32(centre[0]), Y - np.float32(centre[1]), Z - np.float32(centre[2])
    rho2 = 0.0
    for a in range(3):
        r = rot[:, a] / semi[a]
        q = np.float32(r[0]) * dx + np.float32(r[1]) * dy + np.float32(r[2]) * dz
        rho2 = rho2 + q * q
    rho = np.sqrt(rho2)
    for k, phase, amp in bumps:
        rho += np.float32(amp) * np.sin(k[0] * dx + k[1] * dy + k[2] * dz + np.float32(phase))
    return rho


def _spline(ctrl, radii, step: float = 6.0):
    """Catmull-Rom curve through control points ``ctrl`` [M, 3] (mm), sampled every ~``step`` mm,
    with radii interpolated linearly. Returns points [N, 3], radii [N]."""
    p = np.asarray(ctrl, float)
    r = np.asarray(radii, float)
    pp = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    pts, rs = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = pp[i:i + 4]
        n = max(1, math.ceil(_norm(p2 - p1) / step))
        t = (np.arange(n) / n)[:, None]
        pts.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
        rs.append(r[i] + (r[i + 1] - r[i]) * t[:, 0])
    pts.append(p[-1:])
    rs.append(r[-1:])
    return np.vstack(pts), np.concatenate(rs)


def _wobble_radii(rng, pts, radii, amp: float = 0.08):
    """Radii times smooth noise along the arc length (two sinusoids, wavelengths 30-90 mm)."""
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    f = np.ones_like(s)
    for _ in range(2):
        f += rng.uniform(0.3, 1.0) * amp * np.sin(2 * math.pi * s / rng.uniform(30, 90) + rng.uniform(0, 2 * math.pi))
    return radii * f


def _tube_box(cv: _Canvas, curves, scale: float = 1.0):
    pts = np.vstack([p for p, _ in curves])
    r = max(float(rs.max()) for _, rs in curves) * scale + 2.0
    return cv.box(pts.min(0) - r, pts.max(0) + r)


def _tube(cv: _Canvas, sl, curves, scale: float = 1.0) -> np.ndarray:
    """Normalised distance to a union of tubes: min over segments of distance / local radius.

    ``curves``: list of (points [N, 3] mm, radii [N] mm); ``sl``: the box evaluated (see
    :func:`_tube_box`); ``scale``: largest radius scale the caller will threshold at.
    Returns float32 [box shape], inf far from every tube.
    """
    axes = [cv.x[sl[0]], cv.y[sl[1]], cv.z[sl[2]]]
    field = np.full(tuple(len(a) for a in axes), np.inf, np.float32)
    for pts, rs in curves:
        a, b = pts[:-1], pts[1:]
        pad = (np.maximum(rs[:-1], rs[1:]) * scale + 1.0)[:, None]
        lo, hi = np.minimum(a, b) - pad, np.maximum(a, b) + pad
        # each segment's own box, as index ranges inside this box; skip those outside it
        i0 = np.stack([np.searchsorted(ax, lo[:, d], "left") for d, ax in enumerate(axes)], axis=1)
        i1 = np.stack([np.searchsorted(ax, hi[:, d], "right") for d, ax in enumerate(axes)], axis=1)
        for n in np.nonzero(np.all(i1 > i0, axis=1))[0]:
            rel = tuple(slice(i0[n, d], i1[n, d]) for d in range(3))
            x, y, z = axes[0][rel[0]][:, None, None], axes[1][rel[1]][None, :, None], axes[2][rel[2]][None, None, :]
            d = (b[n] - a[n]).astype(np.float32)
            dx, dy, dz = x - np.float32(a[n, 0]), y - np.float32(a[n, 1]), z - np.float32(a[n, 2])
            t = (dx * d[0] + dy * d[1] + dz * d[2]) * np.float32(1.0 / max(float((d * d).sum()), 1e-6))
            np.clip(t, 0.0, 1.0, out=t)
            dist = np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)
            val = dist / (np.float32(rs[n]) + t * np.float32(rs[n + 1] - rs[n]))
            np.minimum(field[rel], val, out=field[rel])
    return field


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """``mask`` without the specks a cut-off shape leaves: only its largest 26-connected piece."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def _ball(radius_mm: float, spacing) -> np.ndarray:
    """Structuring element: the voxels within ``radius_mm`` of the centre."""
    r = [int(radius_mm // s) for s in spacing]
    g = np.ogrid[tuple(slice(-n, n + 1) for n in r)]
    return sum((gi * s) ** 2 for gi, s in zip(g, spacing)) <= radius_mm**2


def _fit(cv: _Canvas, sl, field, allowed, target_ml: float, s_max: float):
    """Mask of the ``target_ml`` allowed voxels with the lowest field value (the shape scaled to
    its drawn volume), capped at scale ``s_max``. Returns (mask, scale)."""
    ok = allowed & (field < s_max)
    vals = field[ok]
    k = int(round(target_ml / cv.voxel_ml))
    if k <= 0 or vals.size == 0:
        return np.zeros_like(ok), 0.0
    if k >= vals.size:
        return ok, s_max
    s = float(np.partition(vals, k - 1)[k - 1])
    return ok & (field <= s), s


# --- body wall, ribs, spine ---------------------------------------------------------------------

def _paint_body(cv: _Canvas, pt: _Patient, rng) -> None:
    """Skin, subcutaneous fat, muscle wall with ribs, and the cavity fat inside (tissue only)."""
    X, Y, Z = cv.coords((slice(None),) * 3)
    grow = (1.0 + pt.taper * np.clip((Z - pt.z_l1) / 100.0, -1.5, 1.5)).astype(np.float32)  # [1, 1, K]
    ca, cb_ant, cb_post = pt.cavity
    f_lat, f_ant, f_post = pt.fat
    # nested outlines, outside in: body, below skin, muscle, cavity (half-width, half-depths)
    outlines = [
        (ca + pt.wall + f_lat + 2.0, cb_ant + pt.wall + f_ant + 2.0, cb_post + pt.wall + f_post + 2.0),
        (ca + pt.wall + f_lat, cb_ant + pt.wall + f_ant, cb_post + pt.wall + f_post),
        (ca + pt.wall, cb_ant + pt.wall, cb_post + pt.wall),
        (ca, cb_ant, cb_post),
    ]
    layer = np.zeros(cv.tissue.shape, np.uint8)
    p = np.float32(pt.exponent)
    ax_, ay_ = np.abs(X), np.abs(Y)
    for a, b_ant, b_post in outlines:
        tx = (ax_ / (np.float32(a) * grow)) ** p  # [I, 1, K]
        b = np.where(Y > 0, np.float32(b_ant), np.float32(b_post)).astype(np.float32)
        ty = (ay_ / (b * grow)) ** p  # [1, J, K]
        layer += (tx + ty) < 1.0
    # layer 0..4 = air, skin, fat, muscle, cavity
    cv.tissue[...] = np.array([AIR, SKIN, FAT, MUSCLE, CAVITY_FAT], np.uint8)[layer]
    _paint_ribs(cv, pt, rng, layer == 3)


def _paint_ribs(cv: _Canvas, pt: _Patient, rng, wall: np.ndarray) -> None:
    """Oblique rib bands in the lateral and posterior muscle wall of the lower chest."""
    ii, jj, kk = np.nonzero(wall)
    x, y, z = cv.x[ii], cv.y[jj], cv.z[kk]
    # angle from the posterior midline, 0..pi, and the arc length it stands for
    off_back = np.abs(np.arctan2(x, -(y - pt.y_vb)))
    arc = off_back * 90.0
    pitch, width = rng.uniform(26, 32), rng.uniform(10, 13)
    phase = np.mod(z + 0.35 * arc - rng.uniform(0, pitch), pitch)
    costal = pt.z_l1 - 0.4 * pt.level + 0.3 * arc  # costal margin: ribs stop lower at the back
    rib = (phase < width) & (z > costal) & (off_back > 0.45) & (off_back < 2.5)
    cv.tissue[ii[rib], jj[rib], kk[rib]] = BONE


def _paint_spine(cv: _Canvas, pt: _Patient) -> None:
    """Vertebral bodies (cortex, cancellous bone, discs), canal, posterior elements, and the
    paraspinal, psoas and quadratus lumborum muscles (tissue only)."""
    y0 = pt.y_vb
    sl = cv.box((-95.0, y0 - 110.0, -1e4), (95.0, y0 + 40.0, 1e4))
    X, Y, Z = cv.coords(sl)
    rx, ry = pt.vb_semi
    yv = pt.y_spine(Z).astype(np.float32)  # [1, 1, K]
    r_canal = 9.0
    yc = yv - ry - r_canal - 1.5  # canal centre
    cb_post = pt.cavity[2]
    tissue = cv.tissue[sl]
    body_or_wall = (tissue == CAVITY_FAT) | (tissue == MUSCLE)
    # phase within a vertebral level: 0 and h at the discs, h/2 at the vertebra's middle
    h = pt.level
    u = np.mod(Z - pt.z_l1 + h / 2, h)
    disc = (u < 4.0) | (u > h - 4.0)
    # back muscles first; bone paints over them
    para = ((np.abs(X) - 30.0) / 26.0) ** 2 + ((Y - (yc - 17.0)) / 21.0) ** 2 < 1.0
    lumbar = np.clip((pt.z_l1 + 0.3 * h - Z) / (2.5 * h), 0.0, 1.0)  # 0 above L1, 1 at L4
    r_psoas = 4.0 + 20.0 * np.sqrt(lumbar)
    psoas = (((np.abs(X) - (rx + r_psoas * 0.8)) / r_psoas) ** 2 + ((Y - yv - 2.0) / (0.85 * r_psoas)) ** 2 < 1.0) \
        & (lumbar > 0)
    ql = (((np.abs(X) - (rx + 45.0)) / 20.0) ** 2 + ((Y - (yv - 38.0)) / 8.0) ** 2 < 1.0) & (Z < pt.z_l1 + 0.5 * h)
    tissue[(para | psoas | ql) & body_or_wall] = MUSCLE
    # vertebral body: cortex shell, cancellous core, discs between
    rr = (X / rx) ** 2 + ((Y - yv) / ry) ** 2
    core = (X / (rx - 2.5)) ** 2 + ((Y - yv) / (ry - 2.5)) ** 2 < 1.0
    vb = rr < 1.0
    tissue[vb & ~disc] = CORTICAL
    tissue[vb & core & ~disc] = CANCELLOUS
    tissue[vb & disc] = DISC
    # posterior arch around the canal, spinous and (lumbar) transverse processes
    rc = np.sqrt(X**2 + (Y - yc) ** 2)
    mid = (u > 0.25 * h) & (u < 0.85 * h)
    arch = (rc < r_canal + 6.0) & (Y < yv - ry * 0.6) & mid
    tip = -(cb_post + pt.wall) + 3.0
    top = yc - r_canal - 4.0
    spinous = (np.abs(X) < 4.0) & (Y < top) & (Y > tip) & mid
    transverse = (np.abs(X) < rx + 28.0) & (np.abs(Y - (yc + 4.0)) < 3.0 - np.abs(X) / 40.0) \
        & (u > 0.4 * h) & (u < 0.62 * h) & (Z < pt.z_l1 + 0.5 * h)
    tissue[arch | spinous | transverse] = BONE
    tissue[rc < r_canal] = CANAL


# --- labeled organs --------------------------------------------------------------------------

def _paint_great_vessels(cv: _Canvas, pt: _Patient, rng) -> dict:
    """Aorta (8) and inferior vena cava (9): tubes along the spine through the whole volume,
    aorta anterior-left of the vertebral bodies, IVC to its right, rising into the liver."""
    h, z1 = pt.level, pt.z_l1
    far = 600.0

    def yf(z):
        return float(pt.y_front(z))

    r_ao = rng.uniform(10.0, 12.5)
    x_ao = (-rng.uniform(2, 8), -rng.uniform(8, 14), -rng.uniform(14, 20))
    z_bif = z1 - rng.uniform(2.9, 3.3) * h
    aorta = np.array([
        [x_ao[0], yf(z_bif) + r_ao, z_bif],
        [x_ao[1], yf(z1 - 1.5 * h) + r_ao + 1.0, z1 - 1.5 * h],
        [x_ao[1], yf(z1) + r_ao + 1.0, z1],
        [x_ao[2], yf(z1 + 2 * h) + r_ao * 0.3, z1 + 2 * h],
        [x_ao[2] - 4.0, float(pt.y_spine(z1 + 4 * h)) + 4.0, z1 + 4 * h],
        [x_ao[2] - 4.0, float(pt.y_spine(z1 + 4 * h)) + 4.0, z1 + far],
    ])
    pts, rs = _spline(aorta, [r_ao * 0.85, r_ao * 0.95, r_ao, r_ao * 1.05, r_ao * 1.1, r_ao * 1.1], step=10.0)
    rs = _wobble_radii(rng, pts, rs, 0.04)
    sl = _tube_box(cv, [(pts, rs)])
    mask = (_tube(cv, sl, [(pts, rs)]) < 1.0) & cv.free(sl)
    cv.paint_organ(sl, mask, AORTA, ORGAN + AORTA)

    r_ivc = rng.uniform(9.5, 12.0)
    x_ivc = rng.uniform(20, 28)
    ivc = np.array([
        [x_ivc - 6.0, yf(z1 - 3.6 * h) + r_ivc, z1 - 3.6 * h],
        [x_ivc, yf(z1 - 1.5 * h) + r_ivc * 0.8, z1 - 1.5 * h],
        [x_ivc, yf(z1 + 0.5 * h) + r_ivc + 2.0, z1 + 0.5 * h],
        [x_ivc + 2.0, yf(z1 + 2.0 * h) + 20.0, z1 + 2.0 * h],
        [x_ivc - 6.0, yf(z1 + 3.0 * h) + 32.0, z1 + 3.0 * h],
        [x_ivc - 12.0, yf(z1 + 3.6 * h) + 45.0, z1 + 3.6 * h],
    ])
    ipts, irs = _spline(ivc, [r_ivc] * 6, step=10.0)
    irs = _wobble_radii(rng, ipts, irs, 0.08)
    sl = _tube_box(cv, [(ipts, irs)])
    mask = (_tube(cv, sl, [(ipts, irs)]) < 1.0) & cv.free(sl)
    cv.paint_organ(sl, mask, IVC, ORGAN + IVC)
    return {"z_bif": z_bif, "r_ao": r_ao, "x_ao": x_ao[1], "x_ivc": x_ivc, "r_ivc": r_ivc, "ivc_ctrl": ivc}


def _paint_kidneys(cv: _Canvas, pt: _Patient, rng) -> dict:
    """Right (2) and left (3) kidneys beside the spine, right one lower; bean-shaped (hilum notch
    facing anteromedially), long axis tilted so the upper pole is medial and posterior."""
    h, z1 = pt.level, pt.z_l1
    z_left = z1 - rng.uniform(0.2, 0.7) * h
    z_right = z_left - rng.uniform(8, 22)
    out = {}
    for lab, side, zc in ((KIDNEY_R, 1.0, z_right), (KIDNEY_L, -1.0, z_left)):
        centre = np.array([side * (pt.vb_semi[0] + rng.uniform(38, 48)), pt.y_spine(zc) - rng.uniform(2, 10), zc])
        # upper pole posterior (about x) and medial (about y), hilum turned forward (about z)
        rot = _rot(math.radians(rng.uniform(10, 20)), -math.radians(rng.uniform(8, 16)),
                   -math.radians(rng.uniform(20, 35)))
        rot = rot * np.array([[side], [1.0], [1.0]])  # mirror the right kidney's frame for the left one
        semi = np.array([25.0, 21.0, 55.0]) * rng.uniform(0.92, 1.08, 3)
        bumps = _draw_bumps(rng, semi.max(), amp=0.05)
        s_max = 1.3
        half = _extent(rot, semi) * s_max + 6.0
        sl = cv.box(centre - half, centre + half)
        X, Y, Z = cv.coords(sl)
        rho = _ellipsoid(X, Y, Z, centre, rot, semi, bumps)
        # hilum: a notch in the medial-anterior surface, left as sinus fat
        hilum = centre + _mm(rot, np.array([-semi[0] * 0.95, semi[1] * 0.25, 0.0]))
        notch = _ellipsoid(X, Y, Z, hilum, rot, semi * np.array([0.45, 0.45, 0.32])) < 1.0
        rho[notch] = np.inf
        allowed = cv.free(sl) & (Z < _diaphragm_floor(pt, X, Y))
        mask, s = _fit(cv, sl, rho, allowed, rng.uniform(*_VOLUME_ML[lab]), s_max)
        mask = cv.paint_organ(sl, mask, lab, ORGAN + lab)
        # collecting system: unenhanced urine in the sinus
        pelvis = _ellipsoid(X, Y, Z, centre + _mm(rot, np.array([-semi[0] * 0.35, 0.0, 0.0])), rot,
                            semi * np.array([0.25, 0.28, 0.5]) * s) < 1.0
        cv.paint(sl, mask & pelvis, tissue=URINE)
        cv.reserve_fat(sl, mask, rng.uniform(3, 8))  # perirenal fat
        out[lab] = {"centre": centre, "rot": rot, "semi": semi * s,
                    "upper_pole": centre + _mm(rot, np.array([0.0, 0.0, semi[2] * s])),
                    "hilum": centre + _mm(rot, np.array([-semi[0] * s * 0.9, semi[1] * s * 0.3, 0.0]))}
    return out


def _paint_adrenals(cv: _Canvas, pt: _Patient, rng, kidneys: dict) -> None:
    """Right (12) and left (13) adrenals: thin inverted-Y plates just above and medial to each
    kidney's upper pole (the left one more anteromedial)."""
    for lab, kid, side in ((ADRENAL_R, KIDNEY_R, 1.0), (ADRENAL_L, KIDNEY_L, -1.0)):
        pole = kidneys[kid]["upper_pole"]
        lift = rng.uniform(14, 20) if lab == ADRENAL_R else rng.uniform(4, 10)
        apex = pole + np.array([-side * rng.uniform(6, 10), rng.uniform(14, 20), lift])
        limbs = []
        for spread, length in ((-rng.uniform(15, 25), rng.uniform(24, 30)), (rng.uniform(30, 45), rng.uniform(20, 26))):
            a = math.radians(spread)
            direction = np.array([side * math.sin(a), -math.cos(a), -0.25])
            rot = _frame(direction)
            semi = np.array([length / 2, rng.uniform(3.0, 3.6), rng.uniform(10, 14)])
            limbs.append((apex + rot[:, 0] * length * 0.45, rot, semi))
        s_max = 1.5
        half = max(float(np.max(_extent(r, s))) for _, r, s in limbs) * s_max + 4.0
        sl = cv.box(apex - half - 20.0, apex + half + 20.0)
        X, Y, Z = cv.coords(sl)
        rho = np.minimum(*[_ellipsoid(X, Y, Z, c, r, s) for c, r, s in limbs])
        allowed = cv.free(sl) & (Z < _diaphragm_floor(pt, X, Y))
        mask, _ = _fit(cv, sl, rho, allowed, rng.uniform(*_VOLUME_ML[lab]), s_max)
        mask = cv.paint_organ(sl, mask, lab, ORGAN + lab)
        cv.reserve_fat(sl, mask, rng.uniform(3, 6))


def _paint_pancreas(cv: _Canvas, pt: _Patient, rng) -> dict:
    """Pancreas (11): an elongated tube lying transversely in front of the IVC and aorta, head on
    the right in the duodenal loop, tail rising towards the splenic hilum."""
    h, z1 = pt.level, pt.z_l1
    ya = float(pt.y_front(z1))
    j = lambda s: rng.normal(0, s)  # noqa: E731
    ctrl = np.array([
        [30 + j(3), ya + 40 + j(3), z1 - 0.9 * h + j(3)],  # head
        [28 + j(3), ya + 42 + j(3), z1 - 0.4 * h + j(3)],
        [5 + j(3), ya + 50 + j(3), z1 - 0.2 * h + j(3)],  # neck
        [-30 + j(4), ya + 46 + j(3), z1 + 0.1 * h + j(3)],  # body
        [-68 + j(4), ya + 22 + j(3), z1 + 0.5 * h + j(3)],  # tail
        [-86 + j(3), ya + 4 + j(3), z1 + 0.75 * h + j(3)],
    ])
    radii = np.array([17.0, 16.0, 12.0, 11.0, 9.5, 8.0]) * rng.uniform(0.9, 1.1)
    pts, rs = _spline(ctrl, radii, step=5.0)
    rs = _wobble_radii(rng, pts, rs, 0.12)
    s_max = 1.4
    sl = _tube_box(cv, [(pts, rs)], s_max)
    field = _tube(cv, sl, [(pts, rs)], s_max)
    mask, s = _fit(cv, sl, field, cv.free(sl), rng.uniform(*_VOLUME_ML[PANCREAS]), s_max)
    cv.paint_organ(sl, mask, PANCREAS, ORGAN + PANCREAS)
    return {"ctrl": ctrl, "radii": radii * s, "y_front": ya}


def _paint_spleen(cv: _Canvas, pt: _Patient, rng) -> np.ndarray:
    """Spleen (1): a flattened ellipsoid against the left posterolateral wall, long axis running
    down and forward along the ribs. Returns its hilum (mm)."""
    ca, _, cb_post = pt.cavity
    theta = math.radians(rng.uniform(195, 212))  # 180 = patient's left, 270 = posterior
    radial = np.array([math.cos(theta), math.sin(theta), 0.0])
    r_wall = 1.0 / math.sqrt((radial[0] / ca) ** 2 + (radial[1] / cb_post) ** 2)
    semi = np.array([21.0, 38.0, 55.0]) * rng.uniform(0.92, 1.08, 3)
    centre = radial * (r_wall - semi[0] * rng.uniform(0.55, 0.75))
    centre[2] = pt.z_l1 + rng.uniform(1.0, 1.4) * pt.level
    forward = np.array([math.sin(theta), -math.cos(theta), 0.0])  # tangent towards anterior
    tilt = math.radians(rng.uniform(25, 40))
    up = np.array([0.0, 0.0, math.cos(tilt)]) - forward * math.sin(tilt)
    e_len = up / _norm(up)
    rot = np.stack([radial, np.cross(e_len, radial), e_len], axis=1)
    bumps = _draw_bumps(rng, semi.max(), amp=0.07)
    s_max = 1.7  # room to grow round the kidney when the back of the cavity is shallow
    half = _extent(rot, semi) * s_max + 6.0
    sl = cv.box(centre - half, centre + half)
    X, Y, Z = cv.coords(sl)
    rho = _ellipsoid(X, Y, Z, centre, rot, semi, bumps)
    below = Z < _diaphragm_floor(pt, X, Y)
    mask, s = _fit(cv, sl, rho, cv.free(sl) & below, rng.uniform(*_VOLUME_ML[SPLEEN]), s_max)
    cv.paint_organ(sl, mask, SPLEEN, ORGAN + SPLEEN)
    return centre - radial * semi[0] * s * 0.9 + forward * 8.0


def _diaphragm_floor(pt: _Patient, X, Y):
    """z below which abdominal organs lie: the diaphragm surface minus its ~4 mm thickness."""
    return (pt.diaphragm(X, Y) - 4.0).astype(np.float32)


def _paint_liver(cv: _Canvas, pt: _Patient, rng) -> None:
    """Liver (6): fills the right upper quadrant down from the diaphragm, with a flat left lobe in
    front across the midline. Its thickness below the diaphragm is largest at the right flank and
    falls off medially and to the left; the drawn volume sets how far down it reaches."""
    ca, cb_ant, cb_post = pt.cavity
    # footprints under the diaphragm (ellipses in x, y) and the lobes' greatest thickness (mm)
    right = (ca * rng.uniform(0.62, 0.78), (cb_ant - cb_post) / 2 + rng.uniform(-10, 10),
             rng.uniform(95, 115), rng.uniform(100, 125), rng.uniform(120, 145))
    left = (rng.uniform(-25, -5), cb_ant - rng.uniform(22, 30), rng.uniform(65, 80), rng.uniform(28, 36),
            rng.uniform(45, 70))
    bumps = _draw_bumps(rng, 1.0, n=4, amp=0.06, wavelength=(70.0, 140.0))
    z_top = max(pt.dome) + 5.0
    sl = cv.box((-110.0, -cb_post - 5, pt.z_l1 - 4.5 * pt.level), (ca + 5, cb_ant + 5, z_top))
    X, Y, Z = cv.coords(sl)
    below = _diaphragm_floor(pt, X, Y)  # [n, m, 1]
    # the lobes' thicknesses add up where their footprints overlap, so they merge smoothly
    thick = np.zeros(below.shape, np.float32)
    for xc, yc, a, b, depth in (right, left):
        thick += np.float32(depth) * np.maximum(0, 1 - ((X - np.float32(xc)) / np.float32(a)) ** 2
                                                - ((Y - np.float32(yc)) / np.float32(b)) ** 2)
    phi = np.where(thick > 0, (below - Z) / np.maximum(thick, np.float32(1e-3)), np.float32(np.inf))
    # dents: 1 unit of phi is the lobe's full thickness, so 0.06 moves the lower surface ~8 mm
    for k, phase, amp in bumps:
        phi += np.float32(amp) * np.sin(k[0] * X + k[1] * Y + k[2] * Z + np.float32(phase))
    allowed = cv.free(sl) & (Z < below)
    mask, _ = _fit(cv, sl, phi, allowed, rng.uniform(*_VOLUME_ML[LIVER]), 1.6)
    cv.paint_organ(sl, mask, LIVER, ORGAN + LIVER)


def _paint_gallbladder(cv: _Canvas, pt: _Patient, rng) -> None:
    """Gallbladder (4): a pear of bile in a fossa on the liver's inferior surface, right anterior,
    fundus just below the liver edge, neck pointing up and back to the hilum."""
    ca, cb_ant, _ = pt.cavity
    x, y = ca * rng.uniform(0.28, 0.42), cb_ant - rng.uniform(28, 40)
    col = cv.box((x - 8, y - 8, -1e4), (x + 8, y + 8, 1e4))
    z_low = pt.z_l1
    if col is not None:
        liver = cv.label[col] == LIVER
        ks = np.nonzero(liver.any(axis=(0, 1)))[0]
        if ks.size:
            z_low = float(cv.z[col[2]][ks[0]])
    length = rng.uniform(34, 42)
    e_len = np.array([rng.uniform(-0.25, 0.0), -rng.uniform(0.35, 0.6), 1.0])
    rot = _frame(e_len, up=(1.0, 0.0, 0.0))
    # frame: column 0 = long axis (fundus -> neck); widths along the other two
    semi = np.array([length / 2, rng.uniform(13, 16), rng.uniform(13, 16)])
    fundus = np.array([x, y, z_low - rng.uniform(4, 12)])
    centre = fundus + rot[:, 0] * semi[0]
    s_max = 1.6
    half = _extent(rot, semi) * s_max + 4.0
    sl = cv.box(centre - half, centre + half)
    X, Y, Z = cv.coords(sl)
    dx, dy, dz = X - np.float32(centre[0]), Y - np.float32(centre[1]), Z - np.float32(centre[2])
    q = [np.float32(rot[0, a]) * dx + np.float32(rot[1, a]) * dy + np.float32(rot[2, a]) * dz for a in range(3)]
    taper = 1.0 - 0.35 * np.clip(q[0] / np.float32(semi[0]), -1, 1)  # pear: wide fundus, narrow neck
    rho = np.sqrt((q[0] / np.float32(semi[0])) ** 2 + ((q[1] / np.float32(semi[1])) ** 2
                                                          + (q[2] / np.float32(semi[2])) ** 2) / taper**2)
    mask, _ = _fit(cv, sl, rho, cv.free(sl, also=(LIVER,)), rng.uniform(*_VOLUME_ML[GALLBLADDER]), s_max)
    cv.paint_organ(sl, mask, GALLBLADDER, BILE)


def _paint_stomach(cv: _Canvas, pt: _Patient, rng) -> np.ndarray:
    """Stomach (7): a J-shaped tube from the fundus under the left dome down the left upper
    quadrant and across to the pylorus; 4-6 mm wall, lumen with fluid and a gas cap in front.
    Returns the gastro-oesophageal junction (mm)."""
    h, z1 = pt.level, pt.z_l1
    ya = float(pt.y_front(z1))
    j = lambda s: rng.normal(0, s)  # noqa: E731
    z_gej = pt.dome[1] - rng.uniform(16, 24)
    ctrl = np.array([
        [-26 + j(3), ya + 26 + j(3), z_gej],  # cardia
        [-50 + j(4), ya + 14 + j(4), pt.dome[1] - 18 + j(3)],  # fundus
        [-70 + j(5), ya + 40 + j(4), z1 + 1.2 * h + j(4)],  # body
        [-58 + j(5), ya + 62 + j(4), z1 - 0.1 * h + j(4)],
        [-20 + j(5), ya + 72 + j(4), z1 - 0.7 * h + j(4)],  # antrum
        [18 + j(3), ya + 62 + j(3), z1 - 0.4 * h + j(3)],  # pylorus
    ])
    radii = np.array([12.0, 28.0, 30.0, 26.0, 18.0, 11.0]) * rng.uniform(0.9, 1.1, 6)
    pts, rs = _spline(ctrl, radii, step=10.0)
    rs = _wobble_radii(rng, pts, rs, 0.08)
    s_max = 1.4
    sl = _tube_box(cv, [(pts, rs)], s_max)
    X, Y, Z = cv.coords(sl)
    field = _tube(cv, sl, [(pts, rs)], s_max)
    allowed = cv.free(sl) & (Z < _diaphragm_floor(pt, X, Y))
    mask, _ = _fit(cv, sl, field, allowed, rng.uniform(*_VOLUME_ML[STOMACH]), s_max)
    mask = cv.paint_organ(sl, mask, STOMACH, ORGAN + STOMACH)
    # lumen: deeper than the wall thickness; gas floats anteriorly (patient supine)
    wall_mm, gas_fraction = rng.uniform(4, 6), rng.uniform(0.0, 0.35)
    lumen = ndimage.binary_erosion(mask, _ball(wall_mm, cv.spacing))
    if lumen.any():
        y_gas = np.quantile(np.broadcast_to(Y, lumen.shape)[lumen], 1.0 - gas_fraction)
        cv.paint(sl, lumen, tissue=GASTRIC_FLUID)
        cv.paint(sl, lumen & (Y > np.float32(y_gas)), tissue=GAS)
    return ctrl[0]


def _paint_esophagus(cv: _Canvas, pt: _Patient, rng, gej: np.ndarray) -> None:
    """Esophagus (5): a 14-18 mm tube descending just left of the midline in front of the aorta,
    through the hiatus into the stomach's cardia."""
    z1, h = pt.z_l1, pt.level
    r = rng.uniform(7.0, 8.8)
    ctrl = np.array([
        [-1 + rng.normal(0, 2), float(pt.y_front(z1 + 5 * h)) + 8.0, z1 + 600.0],
        [-4 + rng.normal(0, 2), float(pt.y_front(z1 + 4 * h)) + 10.0, z1 + 4 * h],
        [-12 + rng.normal(0, 2), float(pt.y_front(gej[2] + 25)) + 22.0, gej[2] + 25.0],
        [gej[0], gej[1], gej[2] - 4.0],
    ])
    pts, rs = _spline(ctrl, [r * 0.9, r, r, r], step=8.0)
    rs = _wobble_radii(rng, pts, rs, 0.1)
    sl = _tube_box(cv, [(pts, rs)])
    mask = (_tube(cv, sl, [(pts, rs)]) < 1.0) & cv.free(sl)
    cv.paint_organ(sl, mask, ESOPHAGUS, ORGAN + ESOPHAGUS)


def _paint_portal_splenic(cv: _Canvas, pt: _Patient, rng, pancreas: dict, hilum: np.ndarray) -> None:
    """Portal vein and splenic vein (10): the splenic vein runs along the back of the pancreas
    from the splenic hilum to the confluence behind the pancreatic neck, the portal vein rises
    obliquely from there to the liver hilum."""
    h, z1 = pt.level, pt.z_l1
    ya = pancreas["y_front"]
    c = pancreas["ctrl"]
    conf = np.array([c[2, 0] + 4.0, c[2, 1] - 16.0, c[2, 2] - 3.0])
    splenic = np.array([
        conf,
        [c[3, 0], c[3, 1] - 14.0, c[3, 2]],
        [c[4, 0], c[4, 1] - 11.0, c[4, 2] + 2.0],
        hilum,
    ])
    pv_top = np.array([rng.uniform(40, 50), ya + rng.uniform(36, 46), z1 + rng.uniform(1.0, 1.3) * h])
    portal = np.array([conf, (conf + pv_top) / 2 + np.array([0.0, 4.0, 0.0]), pv_top,
                       pv_top + np.array([rng.uniform(10, 16), rng.uniform(-4, 4), rng.uniform(4, 8)])])
    r_pv, r_sv = rng.uniform(6.0, 7.0), rng.uniform(4.2, 5.2)
    curves = [_spline(splenic, [r_pv * 0.9, r_sv, r_sv, r_sv * 0.9], step=5.0),
              _spline(portal, [r_pv, r_pv, r_pv * 0.9, r_pv * 0.7], step=5.0)]
    curves = [(p, _wobble_radii(rng, p, r, 0.08)) for p, r in curves]
    s_max = 1.6
    sl = _tube_box(cv, curves, s_max)
    field = _tube(cv, sl, curves, s_max)
    allowed = cv.free(sl, also=(PANCREAS, LIVER))
    mask, _ = _fit(cv, sl, field, allowed, rng.uniform(*_VOLUME_ML[PORTAL_SPLENIC]), s_max)
    cv.paint_organ(sl, mask, PORTAL_SPLENIC, ORGAN + PORTAL_SPLENIC)


# --- unlabeled structures -----------------------------------------------------------------------

def _paint_tubes(cv: _Canvas, curves, tissue: int, where=None, lumen=None) -> None:
    """Paint tubes into cavity fat (or into voxels of label ``where``) as ``tissue``; with
    ``lumen=(fraction, tissue)`` the inner part of each tube gets the second tissue."""
    sl = _tube_box(cv, curves)
    if sl is None:
        return
    field = _tube(cv, sl, curves)
    ok = cv.free(sl) if where is None else cv.label[sl] == where
    cv.paint(sl, ok & (field < 1.0), tissue=tissue)
    if lumen is not None:
        cv.paint(sl, ok & (field < lumen[0]), tissue=lumen[1])


def _paint_small_vessels(cv: _Canvas, pt: _Patient, rng, vessels: dict, kidneys: dict, pancreas: dict) -> None:
    """Renal veins, superior mesenteric artery and vein, iliac vessels, hepatic veins and
    intrahepatic portal branches: unlabeled, but enhanced like their labeled parents."""
    h, z1 = pt.level, pt.z_l1
    ya = pancreas["y_front"]
    x_ao, r_ao, x_ivc = vessels["x_ao"], vessels["r_ao"], vessels["x_ivc"]
    ivc_y = float(pt.y_front(z1)) + vessels["r_ivc"] + 2.0
    veins = []
    for lab in (KIDNEY_R, KIDNEY_L):
        hil = kidneys[lab]["hilum"]
        if lab == KIDNEY_L:  # crosses in front of the aorta, below the SMA
            mid = [x_ao, ya + 2 * r_ao + 4.0, hil[2] + 8.0]
            veins.append(_spline([hil, mid, [x_ivc, ivc_y, hil[2] + 10.0]], [5.0, 4.5, 5.0]))
        else:
            veins.append(_spline([hil, [x_ivc, ivc_y, hil[2] + 5.0]], [5.0, 5.5]))
    conf = pancreas["ctrl"][2] + np.array([4.0, -16.0, -3.0])
    veins.append(_spline([conf, conf + [4.0, 8.0, -30.0], conf + [6.0, 12.0, -120.0]], [5.0, 4.8, 4.0]))  # SMV
    z_ivc0 = z1 - 3.6 * h
    for side in (1.0, -1.0):
        veins.append(_spline([vessels["ivc_ctrl"][0], [side * 40.0, ivc_y - 6.0, z_ivc0 - 60.0],
                              [side * 60.0, ivc_y - 12.0, z_ivc0 - 200.0]], [8.0, 7.0, 7.0]))
    _paint_tubes(cv, veins, VEIN)
    z_bif = vessels["z_bif"]
    y_bif = float(pt.y_front(z_bif)) + r_ao
    sma_top = np.array([x_ao, float(pt.y_front(z1)) + 2 * r_ao, z1 + 0.15 * h])
    arteries = [_spline([sma_top, sma_top + [2.0, 16.0, -20.0], sma_top + [4.0, 22.0, -120.0]], [3.5, 3.5, 3.0])]
    for side in (1.0, -1.0):
        arteries.append(_spline([[x_ao * 0.5, y_bif, z_bif + 5.0], [side * 35.0, y_bif + 4.0, z_bif - 50.0],
                                 [side * 55.0, y_bif - 4.0, z_bif - 200.0]], [6.5, 6.0, 5.5]))
    _paint_tubes(cv, arteries, ARTERY)
    # inside the liver: three hepatic veins fanning out from the IVC under the dome, portal branches
    ca, cb_ant, _ = pt.cavity
    top = np.array([x_ivc - 4.0, float(pt.y_front(pt.dome[0])) + 28.0, pt.dome[0] - 18.0])
    hepatic = []
    for tip in ([ca * 0.7, 0.0, pt.dome[0] - 60.0], [ca * 0.3, cb_ant - 40.0, pt.dome[0] - 70.0],
                [-30.0, cb_ant - 30.0, pt.dome[0] - 40.0]):
        tip = np.array(tip) + rng.normal(0, 6, 3)
        hepatic.append(_spline([top, (top + tip) / 2 + rng.normal(0, 5, 3), tip], [5.5, 4.0, 2.5]))
    _paint_tubes(cv, hepatic, HEPATIC_VEIN, where=LIVER)
    hil = np.array([rng.uniform(48, 60), ya + rng.uniform(36, 46), z1 + 1.3 * h])
    branches = []
    for mid, tip, radii in (([30, -5, 10], [65, -10, 5], [5.0, 3.5, 2.5]),  # right branch
                            ([-35, 10, 15], [-70, 15, 20], [4.5, 3.0, 2.0])):  # left branch
        branches.append(_spline([hil, hil + mid + rng.normal(0, 5, 3), hil + tip + rng.normal(0, 6, 3)], radii))
    _paint_tubes(cv, branches, PORTAL_BRANCH, where=LIVER)


def _random_walk(rng, start, n: int, step: float, lo, hi) -> np.ndarray:
    """A smooth random walk of ``n`` steps (mm) that stays inside the box [lo, hi]."""
    pts = [np.asarray(start, float)]
    heading = rng.normal(size=3)
    for _ in range(n):
        heading = heading / _norm(heading) + rng.normal(0, 0.7, 3)
        heading /= _norm(heading)
        nxt = pts[-1] + heading * step
        out = (nxt < lo) | (nxt > hi)
        heading[out] *= -1  # bounce off the box
        pts.append(np.clip(pts[-1] + heading * step, lo, hi))
    return np.array(pts)


def _paint_bowel(cv: _Canvas, pt: _Patient, rng) -> None:
    """Duodenum, colon (gas and stool) and small bowel loops (fluid, collapsed or gas) in the
    cavity fat left below the diaphragm."""
    ca, cb_ant, _ = pt.cavity
    h, z1 = pt.level, pt.z_l1
    ya = float(pt.y_front(z1))
    duodenum = _spline([[18, ya + 62, z1 - 0.4 * h], [45, ya + 52, z1 - 0.3 * h], [58, ya + 32, z1 - 1.3 * h],
                        [40, ya + 32, z1 - 2.3 * h], [0, ya + 30, z1 - 2.5 * h], [-25, ya + 40, z1 - 1.6 * h]],
                       [11.0] * 6)
    _paint_tubes(cv, [duodenum], BOWEL_WALL, lumen=(0.6, BOWEL_FLUID))
    xr, xl = ca - rng.uniform(22, 30), -(ca - rng.uniform(22, 30))
    colon = _spline([[xr, ya + 10, z1 - 6 * h], [xr, ya + 15, z1 - 2.5 * h],  # ascending
                     [xr - 10, ya + 35, z1 - 1.2 * h],  # hepatic flexure
                     [30, cb_ant - 28, z1 - 2.2 * h], [-30, cb_ant - 26, z1 - 2.0 * h],  # transverse
                     [xl + 5, ya + 40, z1 + 0.2 * h],  # splenic flexure
                     [xl, ya + 5, z1 - 1.0 * h], [xl, ya, z1 - 6 * h]],  # descending
                    [22.0, 22.0, 20.0, 18.0, 18.0, 18.0, 17.0, 17.0], step=10.0)
    colon = (colon[0], _wobble_radii(rng, *colon, 0.15))
    sl = _tube_box(cv, [colon])
    X, Y, Z = cv.coords(sl)
    field = _tube(cv, sl, [colon])
    ok = cv.free(sl) & (Z < _diaphragm_floor(pt, X, Y))
    cv.paint(sl, ok & (field < 1.0), tissue=BOWEL_WALL)
    # stool in the dependent (posterior) part, gas above it
    inner = ok & (field < 0.8)
    cv.paint(sl, inner, tissue=STOOL)
    cv.paint(sl, inner & (np.sin(X * 0.21) * np.sin(Y * 0.17) * np.sin(Z * 0.19) > 0.35), tissue=GAS)
    gas_fraction = rng.uniform(0.1, 0.5)  # drawn even if unused: the random stream must not depend on the grid
    if inner.any():
        y_gas = np.quantile(np.broadcast_to(Y, inner.shape)[inner], 1.0 - gas_fraction)
        cv.paint(sl, inner & (Y > np.float32(y_gas)), tissue=GAS)
    # small bowel loops fill the lower abdomen in front of the kidneys
    lo = np.array([-ca + 35, ya + 20, z1 - 5 * h])
    hi = np.array([ca - 35, cb_ant - 14, z1 - 0.6 * h])
    for _ in range(int(rng.integers(3, 6))):
        pts = _random_walk(rng, rng.uniform(lo, hi), 14, 18.0, lo, hi)
        r = rng.uniform(10, 14)
        loop = _spline(pts, np.full(len(pts), r), step=6.0)
        content = [BOWEL_FLUID, BOWEL_FLUID, GAS, BOWEL_WALL][int(rng.integers(0, 4))]
        _paint_tubes(cv, [loop], BOWEL_WALL, lumen=(0.65, content))


def _paint_thorax(cv: _Canvas, pt: _Patient, rng) -> None:
    """Diaphragm muscle, lung bases in the recesses above it, and the heart's inferior wall."""
    X, Y, Z = cv.coords((slice(None),) * 3)
    zd = pt.diaphragm(X, Y).astype(np.float32)  # [I, J, 1]
    top = cv.box((-1e4, -1e4, float(zd.min()) - 5.0), (1e4, 1e4, 1e4))
    if top is None:
        return
    tissue = cv.tissue[top]
    zz, zd = Z[..., top[2]], zd
    fat = tissue == CAVITY_FAT
    # heart on the central tendon, its blood enhanced
    hc = np.array([-20.0, float(pt.y_front(pt.dome[0])) + 70.0, pt.dome[0] + rng.uniform(25, 40)])
    rho = _ellipsoid(X, Y, zz, hc, _rot(0, 0, math.radians(-25)), (68.0, 52.0, 55.0))
    heart = fat & (rho < 1.0) & (zz > zd + 3.0)
    tissue[heart] = HEART_WALL
    tissue[heart & (rho < 0.8)] = HEART_BLOOD
    fat = tissue == CAVITY_FAT
    tissue[fat & (np.abs(zz - zd + 1.5) < 2.5)] = MUSCLE  # diaphragm, ~5 mm
    mediastinum = (np.abs(X + 5.0) < 26.0) & (Y > pt.y_vb - 25.0) & (Y < pt.y_vb + 45.0)  # behind the heart
    tissue[(tissue == CAVITY_FAT) & (zz > zd + 1.0) & ~mediastinum] = LUNG


# --- intensities ----------------------------------------------------------------------------

def _tissue_hu(pt: _Patient, rng) -> np.ndarray:
    """HU of each tissue class for this case: [64] float32."""
    u = rng.uniform
    c = pt.contrast
    hu = np.zeros(_N_TISSUES, np.float32)
    fat = u(-110, -90)
    hu[[AIR, SKIN, FAT, MUSCLE, CAVITY_FAT]] = [-1000, u(20, 40), fat, 45 + 8 * c + u(-5, 5), fat + u(0, 10)]
    hu[PERIRENAL_FAT] = hu[CAVITY_FAT]
    hu[[CORTICAL, CANCELLOUS, CANAL, DISC, LUNG, BONE]] = [u(600, 800), u(170, 280), u(5, 25), u(70, 100),
                                                          u(-880, -820), u(350, 500)]
    hu[[HEART_WALL, HEART_BLOOD]] = [u(90, 120), 45 + 130 * c + u(-10, 10)]
    hu[[BOWEL_WALL, BOWEL_FLUID, GAS, STOOL, URINE, BILE]] = [35 + 20 * c, u(0, 25), u(-1000, -980), u(-120, 0),
                                                             u(5, 25), u(0, 15)]
    for lab, (base, enh) in _ORGAN_HU.items():
        hu[ORGAN + lab] = base + c * enh + u(-3, 3)
    hu[GASTRIC_FLUID] = u(5, 40)
    hu[[HEPATIC_VEIN, VEIN, PORTAL_BRANCH]] = hu[ORGAN + IVC] + u(-5, 5), hu[ORGAN + IVC], hu[ORGAN + PORTAL_SPLENIC]
    hu[ARTERY] = hu[ORGAN + AORTA]
    return hu


def _render(cv: _Canvas, pt: _Patient, rng, noise_rng) -> np.ndarray:
    """HU image of the field of view: tissue lookup, correlated Gaussian noise, partial-volume
    blur; rounded and clipped to the CT range [-1024, 3071]. Returns [I, J, K] int16."""
    hu = _tissue_hu(pt, rng)
    image = hu[cv.tissue[cv.fov]]
    sigma = [b / s for b, s in zip(pt.blur_mm, cv.spacing)]
    # white noise blurred with the image; scale it so its sd after the blur is noise_sd
    gain = 1.0
    for s in sigma:
        delta = np.zeros(33, np.float32)
        delta[16] = 1.0
        gain *= float(np.sqrt(np.sum(ndimage.gaussian_filter1d(delta, s, mode="constant") ** 2)))
    image += noise_rng.standard_normal(image.shape, dtype=np.float32) * np.float32(pt.noise_sd / gain)
    image = ndimage.gaussian_filter(image, sigma, mode="nearest")
    np.clip(np.rint(image), -1024, 3071, out=image)
    return image.astype(np.int16)
