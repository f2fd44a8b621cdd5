"""`medmim data samples`: small real CT and MRI datasets built from scans shipped inside packages.

Three packages on the Python package index carry openly licensed real scans. Each is fetched with
``pip download --no-deps`` into a cache folder and unpacked there (nothing is installed):

- ``pyradiomics==3.0.1`` (source archive), ``data/``: two chest CTs with lesion masks (lung1,
  lung2; 512 x 512 x ~50 voxels of ~0.6 x 0.6 x 5 mm, HU), two contrast T1 brain MRIs with
  lesion masks (brain1, brain2) and a small breast MRI with a lesion mask (breast1), all NRRD;
- ``nilearn`` (wheel), ``nilearn/datasets/data/``: the MNI ICBM152 2009 T1 template and its
  grey- and white-matter probability maps, 1 mm, stored as uint8 (probability x 255);
- ``TotalSegmentator`` (wheel), ``totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz``: a CT
  brain template, 1 mm.

They become three Decathlon folders (``dataset.json`` + ``imagesTr/labelsTr/imagesTs``), because a
Decathlon folder has one label set and the tumour masks and the tissue map do not share one:

- ``ct/``          CT;  labels 0 background, 1 lesion; training lung1, lung2; test ct_brain_atlas
- ``mri/``         MRI; labels 0 background, 1 lesion; training brain1, brain2, breast1;
                   test mni152_t1 (the template, unlabeled, so ``mri/`` pools every MR scan)
- ``mri-tissue/``  MRI; labels 0 background, 1 grey matter, 2 white matter; training mni152_t1

Images keep their real geometry: NRRD is read through :func:`medmim.data.io.read_image` (LPS
converted to RAS+) and written with :func:`medmim.data.io.write_nifti`. A mask is binarised
(any non-zero value -> 1) and, if its grid differs from its image's, resampled onto the image grid
with nearest neighbour. Each folder gets a ``SOURCES.md`` naming, for every file, the package, its
version and the licence as the package states it, and a ``licenses/`` folder with the packages'
licence files.

The tissue map (``mri-tissue``): with ``p_gm``, ``p_wm`` the probability maps (uint8 / 255), a voxel
is grey matter (1) or white matter (2), whichever is more probable, when that probability is at
least :data:`TISSUE_THRESHOLD` (0.5), else background (0; CSF and everything outside the brain).
"""

from __future__ import annotations

import email.parser
import fnmatch
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from medmim.data.io import Image, read_image, write_nifti
from medmim.errors import MedmimError
from medmim.fileio import atomic_write_json

# a voxel is grey or white matter when the larger of the two probabilities reaches this
TISSUE_THRESHOLD = 0.5
# image and mask grids must agree to this many mm to count as the same grid (as in data check)
GRID_TOL_MM = 1e-3
PIP_TIMEOUT_S = 3600


# --- what to fetch ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplePackage:
    """A package whose archive holds sample scans.

    ``members``: glob patterns of the files to unpack, relative to the package root (an sdist's
    top folder ``name-version/`` is stripped; a wheel's root is the archive root).
    """

    key: str  # short name used in logs and file names
    name: str  # the distribution name given to pip
    version: str
    sdist: bool  # True: a source archive (pip builds its metadata), False: a wheel
    pip_options: tuple[str, ...]
    members: tuple[str, ...]
    notes: tuple[str, ...] = ()  # files inside the package that may say something about the data's licence

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def archive_matches(self, filename: str) -> bool:
        stem = f"{_normalise(self.name)}-{self.version}"
        fn = filename.lower()
        if self.sdist:
            return fn in (f"{stem}.tar.gz", f"{self.name.lower()}-{self.version}.tar.gz")
        return fn.startswith(stem + "-") and fn.endswith(".whl")


_META_FILES = ("PKG-INFO", "*.dist-info/METADATA", "LICENSE*", "LICENCE*", "COPYING*",
               "*.dist-info/LICENSE*", "*.dist-info/licenses/*")

PACKAGES: dict[str, SamplePackage] = {
    # the source archive: its data/ folder is not in the wheels. pip builds the sdist's metadata
    # even for a download; setup.py imports numpy and its vendored versioneer, and an isolated build
    # environment would lack numpy, so the build runs in this environment (numpy, setuptools here)
    "pyradiomics": SamplePackage(
        "pyradiomics", "pyradiomics", "3.0.1", True, ("--no-build-isolation",),
        ("data/*.nrrd", "data/README.md") + _META_FILES, ("data/README.md",)),
    "nilearn": SamplePackage(
        "nilearn", "nilearn", "0.14.1", False, (),
        ("nilearn/datasets/data/mni_icbm152_*_converted.nii.gz",
         "nilearn/datasets/description/icbm152_2009.rst") + _META_FILES,
        ("nilearn/datasets/description/icbm152_2009.rst",)),
    "totalsegmentator": SamplePackage(
        "totalsegmentator", "TotalSegmentator", "2.18.0", False, (),
        ("totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",) + _META_FILES),
}

_PYRAD = "data/{}.nrrd"
_MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class SampleCase:
    """One case of an output folder: image and label, as paths inside a package's root.

    ``label_kind``: ``"mask"`` (one file, non-zero -> 1), ``"tissue"`` (grey- and white-matter
    probability maps -> 0/1/2 label map), or ``None`` (unlabeled, listed under ``test``).
    """

    case_id: str
    package: str
    image: str
    label: tuple[str, ...] = ()
    label_kind: str | None = None


@dataclass(frozen=True)
class SampleFolder:
    name: str
    modality: str
    labels: dict[int, str]
    description: str
    cases: tuple[SampleCase, ...]


LESION = {0: "background", 1: "lesion"}
FOLDERS: tuple[SampleFolder, ...] = (
    SampleFolder("ct", "CT", LESION,
                 "Real CT samples: two chest CTs (HU) with lesion masks, unlabeled CT brain template",
                 (SampleCase("lung1", "pyradiomics", _PYRAD.format("lung1_image"), (_PYRAD.format("lung1_label"),), "mask"),
                  SampleCase("lung2", "pyradiomics", _PYRAD.format("lung2_image"), (_PYRAD.format("lung2_label"),), "mask"),
                  SampleCase("ct_brain_atlas", "totalsegmentator", "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz"))),
    SampleFolder("mri", "MRI", LESION,
                 "Real MRI samples: two contrast T1 brain MRIs and a breast MRI with lesion masks, "
                 "unlabeled MNI ICBM152 2009 T1 template",
                 (SampleCase("brain1", "pyradiomics", _PYRAD.format("brain1_image"), (_PYRAD.format("brain1_label"),), "mask"),
                  SampleCase("brain2", "pyradiomics", _PYRAD.format("brain2_image"), (_PYRAD.format("brain2_label"),), "mask"),
                  SampleCase("breast1", "pyradiomics", _PYRAD.format("breast1_image"), (_PYRAD.format("breast1_label"),), "mask"),
                  SampleCase("mni152_t1", "nilearn", _MNI.format("t1")))),
    SampleFolder("mri-tissue", "MRI", {0: "background", 1: "grey matter", 2: "white matter"},
                 f"MNI ICBM152 2009 T1 template with a tissue map from its grey/white matter probability "
                 f"maps (the more probable of the two where it reaches {TISSUE_THRESHOLD}, else background)",
                 (SampleCase("mni152_t1", "nilearn", _MNI.format("t1"), (_MNI.format("gm"), _MNI.format("wm")), "tissue"),)),
)


# --- cache and fetching ----------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$MEDMIM_CACHE/samples``, else ``~/.cache/medmim/samples``."""
    base = os.environ.get("MEDMIM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "medmim") / "samples"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pip_command(pkg: SamplePackage, dest: str | os.PathLike) -> list[str]:
    """The ``pip download`` command that fetches ``pkg``'s archive into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", *pkg.pip_options,
            "--dest", str(dest), pkg.requirement]


def _find_archive(folder: Path, pkg: SamplePackage) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(f for f in folder.iterdir() if f.is_file() and pkg.archive_matches(f.name))
    return found[0] if found else None


# pyradiomics 3.0.1 vendors versioneer 0.17, which needs configparser names that Python 3.12 removed;
# a sitecustomize on PYTHONPATH restores them in pip's metadata-building subprocess
_PY312_SHIM = '''"""medmim: configparser names that versioneer 0.17 (vendored by pyradiomics 3.0.1) needs."""
import configparser
if not hasattr(configparser, "SafeConfigParser"):
    configparser.SafeConfigParser = configparser.ConfigParser
if not hasattr(configparser.ConfigParser, "readfp"):
    configparser.ConfigParser.readfp = configparser.ConfigParser.read_file
'''


def _pip_env(pkg: SamplePackage, cache: Path) -> tuple[dict[str, str] | None, str]:
    """Environment for pip (None: inherit) and the prefix to show in a hand-run command."""
    if not (pkg.sdist and sys.version_info >= (3, 12)):
        return None, ""
    shim = cache / "pip-compat"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(_PY312_SHIM, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env, f"PYTHONPATH={shlex.quote(str(shim))} "


def _pip_tail(proc: subprocess.CompletedProcess) -> str:
    text = "\n".join(str(t) for t in (proc.stdout, proc.stderr) if t)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    last = (errors or lines or [f"exit status {proc.returncode}"])[-1]
    return last[:300]


def fetch_archive(pkg: SamplePackage, cache_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print) -> Path:
    """The package's archive in ``cache_dir/downloads/``, downloaded with pip if not there yet.

    Raises :class:`MedmimError` naming the package and the pip command to run by hand when pip fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    downloads = cache / "downloads"
    found = _find_archive(downloads, pkg)
    if found is not None:
        log(f"{pkg.requirement}: using cached {found}")
        return found
    env, prefix = _pip_env(pkg, cache)
    by_hand = prefix + shlex.join(pip_command(pkg, downloads))
    hint = f"; fetch it by hand with: {by_hand}"
    if pkg.sdist:
        missing = [m for m in ("setuptools", "numpy") if importlib.util.find_spec(m) is None]
        if missing:
            raise MedmimError(f"{pkg.requirement}: pip builds this source archive's metadata with {' and '.join(missing)}, "
                              f"which {sys.executable} lacks; install {' '.join(missing)} into it, or{hint[1:]}")
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"{pkg.requirement}: downloading with pip into {downloads}")
    # pip writes into a fresh folder, moved in whole: the cache never holds half an archive
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=downloads))
    try:
        try:
            proc = subprocess.run(pip_command(pkg, tmp), capture_output=True, encoding="utf-8",
                                  errors="replace", env=env,
                                  timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MedmimError(f"{pkg.requirement}: pip download failed ({type(e).__name__}: {e}){hint}")
        if proc.returncode != 0:
            raise MedmimError(f"{pkg.requirement}: pip download failed ({_pip_tail(proc)}){hint}")
        got = _find_archive(tmp, pkg)
        if got is None:
            names = ", ".join(sorted(f.name for f in tmp.iterdir())) or "nothing"
            raise MedmimError(f"{pkg.requirement}: pip saved {names}, not the expected "
                              f"{'source archive' if pkg.sdist else 'wheel'}{hint}")
        target = downloads / got.name
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _safe_rel(name: str) -> PurePosixPath | None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return p


def unpack_archive(pkg: SamplePackage, archive: Path, cache_dir: str | os.PathLike | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """Unpack the files of ``pkg.members`` from ``archive`` into the cache; returns the package root.

    An sdist's top folder (``name-version/``) is stripped, so paths match a wheel's layout rules.
    Reuses an earlier complete unpacking.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = archive.name.removesuffix(".tar.gz").removesuffix(".whl")
    root = cache / "unpacked" / stem
    if (root / ".complete").is_file():
        return root
    log(f"{pkg.requirement}: unpacking {archive.name}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))

    def wanted(rel: PurePosixPath) -> bool:
        return any(fnmatch.fnmatchcase(str(rel), pat) for pat in pkg.members)

    def put(rel: PurePosixPath, data) -> None:
        dst = tmp.joinpath(*rel.parts)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as out:
            shutil.copyfileobj(data, out)

    n = 0
    try:
        try:
            if archive.name.endswith(".whl"):
                with zipfile.ZipFile(archive) as z:
                    for info in z.infolist():
                        rel = _safe_rel(info.filename)
                        if rel is not None and not info.is_dir() and wanted(rel):
                            with z.open(info) as f:
                                put(rel, f)
                            n += 1
            else:
                with tarfile.open(archive, "r:gz") as t:
                    for m in t:
                        rel = _safe_rel(m.name)
                        if rel is None or not m.isfile() or len(rel.parts) < 2:
                            continue
                        rel = PurePosixPath(*rel.parts[1:])  # strip "name-version/"
                        if wanted(rel):
                            put(rel, t.extractfile(m))
                            n += 1
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
            raise MedmimError(f"{archive}: cannot unpack {pkg.requirement}'s archive ({type(e).__name__}: {e}); "
                              f"delete it and run again to download it anew")
        if n == 0:
            raise MedmimError(f"{archive}: holds none of the expected files ({', '.join(pkg.members[:2])}, ...)")
        (tmp / ".complete").write_text(f"{archive.name}\n", encoding="utf-8")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# --- licences as the packages state them -----------------------------------------------------

@dataclass
class PackageInfo:
    """What a package says about itself: metadata name/version and licence, licence files."""

    key: str
    name: str
    version: str
    licence: list[str]  # "License-Expression: ...", "License: ...", "Classifier: License :: ..."
    licence_files: list[Path]
    notes: dict[str, str]  # file inside the package -> what it says about licences
    archive: str = ""
    sha256: str = ""


def _metadata_file(root: Path) -> Path | None:
    for pat in ("PKG-INFO", "*.dist-info/METADATA"):
        got = sorted(root.glob(pat))
        if got:
            return got[0]
    return None


def _rst_section(text: str, title: str) -> str | None:
    lines = text.splitlines()
    for n in range(len(lines) - 1):
        if lines[n].strip().lower() == title.lower() and re.fullmatch(r"[-=~^]{3,}", lines[n + 1].strip()):
            body = []
            for ln in lines[n + 2:]:
                if body and re.fullmatch(r"[-=~^]{3,}", ln.strip()):
                    body.pop()  # the next section's title
                    break
                body.append(ln)
            return " ".join(" ".join(body).split()) or None
    return None


def _licence_note(text: str) -> str:
    for title in ("License", "Licence", "Licensing"):
        sec = _rst_section(text, title)
        if sec:
            return f'its "{title}" section says: "{sec[:300]}"'
    hits = [" ".join(ln.split()) for ln in text.splitlines() if re.search(r"licen[cs]", ln, re.I)]
    if hits:
        return "it says: " + " / ".join(f'"{h[:200]}"' for h in hits[:3])
    return "it states no licence"


def package_info(pkg: SamplePackage, root: Path) -> PackageInfo:
    """Read name, version and licence from the package's own metadata and licence files."""
    meta_path = _metadata_file(root)
    name, version, licence = pkg.name, pkg.version, []
    if meta_path is not None:
        msg = email.parser.Parser().parsestr(meta_path.read_text(encoding="utf-8", errors="replace"), headersonly=True)
        name, version = msg.get("Name", name), msg.get("Version", version)
        for field in ("License-Expression", "License"):
            val = msg.get(field)
            if val and val.strip() and val.strip().upper() != "UNKNOWN":
                first = " ".join(val.strip().splitlines()[0].split())
                licence.append(f"{field}: {first[:200]}")
        licence += [f"Classifier: {c}" for c in msg.get_all("Classifier", []) if c.startswith("License ::")]
    files = []
    for pat in ("LICENSE*", "LICENCE*", "COPYING*", "*.dist-info/LICENSE*", "*.dist-info/licenses/*"):
        files += [f for f in sorted(root.glob(pat)) if f.is_file() and f not in files]
    notes = {}
    for rel in pkg.notes:
        f = root / rel
        if f.is_file():
            notes[rel] = _licence_note(f.read_text(encoding="utf-8", errors="replace"))
    return PackageInfo(pkg.key, name, version, licence, files, notes)


# --- conversion ------------------------------------------------------------------------------

def same_grid(a: Image, b: Image, tol_mm: float = GRID_TOL_MM) -> bool:
    return a.shape[:3] == b.shape[:3] and float(np.abs(a.affine - b.affine).max()) <= tol_mm


def resample_nearest(array: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
                     target_affine: np.ndarray, fill: float = 0) -> np.ndarray:
    """Nearest-neighbour resampling of ``array`` ([I, J, K], on ``affine``) onto the grid ``shape``/``target_affine``.

    Target voxels whose centre falls outside the source volume get ``fill``. Done slice by slice
    along k, so memory stays a few slices' worth.
    """
    vox = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)  # target -> source index
    out = np.full(shape, fill, dtype=array.dtype)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    src_shape = np.array(array.shape[:3])[:, None]
    for k in range(shape[2]):
        pts = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)]).astype(np.float64)
        idx = np.rint(vox[:3, :3] @ pts + vox[:3, 3:]).astype(np.int64)  # [3, I*J]
        ok = np.all((idx >= 0) & (idx < src_shape), axis=0)
        sl = out[:, :, k].reshape(-1)
        sl[ok] = array[idx[0, ok], idx[1, ok], idx[2, ok]]
        out[:, :, k] = sl.reshape(shape[:2])
    return out


def _on_grid(img: Image, other: Image, what: str, log: Callable[[str], None]) -> np.ndarray:
    arr = other.array
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if same_grid(img, other):
        return arr
    diff = float(np.abs(img.affine - other.affine).max())
    log(f"  {what}: grid {other.shape[:3]} differs from its image's {img.shape[:3]} (affines up to {diff:.3g} mm apart); "
        f"resampled onto the image grid with nearest neighbour")
    return resample_nearest(arr, other.affine, img.shape[:3], img.affine)


def tissue_map(p_gm: np.ndarray, p_wm: np.ndarray, threshold: float = TISSUE_THRESHOLD) -> np.ndarray:
    """Label map from grey/white matter probability maps ([I, J, K], values 0..1).

    1 (grey) or 2 (white), whichever probability is larger, where it is ``>= threshold``; else 0.
    Returns uint8 [I, J, K].
    """
    tissue = np.where(p_wm > p_gm, 2, 1).astype(np.uint8)
    return np.where(np.maximum(p_gm, p_wm) >= threshold, tissue, 0).astype(np.uint8)


def _probability(arr: np.ndarray) -> np.ndarray:
    # nilearn's "converted" maps store probabilities as uint8 0..255
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


def _volume_stats(arr: np.ndarray, img: Image) -> dict:
    return {"shape": tuple(int(s) for s in arr.shape), "spacing": tuple(round(s, 4) for s in img.spacing),
            "orientation": img.orientation, "dtype": str(arr.dtype),
            "min": float(arr.min()), "max": float(arr.max())}


def _convert_case(case: SampleCase, root: Path, folder: Path, labeled: bool,
                  log: Callable[[str], None]) -> dict:
    img = read_image(root / case.image)
    if img.array.ndim == 4 and img.array.shape[3] == 1:
        img.array = img.array[..., 0]
    sub = "imagesTr" if labeled else "imagesTs"
    write_nifti(folder / sub / f"{case.case_id}.nii.gz", img.array, img.affine)
    out = {"case_id": case.case_id, "image": f"./{sub}/{case.case_id}.nii.gz", **_volume_stats(img.array, img)}
    if case.label_kind == "mask":
        mask = read_image(root / case.label[0])
        lab = (_on_grid(img, mask, f"{case.case_id}: {case.label[0]}", log) != 0).astype(np.uint8)
    elif case.label_kind == "tissue":
        gm, wm = (_on_grid(img, read_image(root / rel), f"{case.case_id}: {rel}", log) for rel in case.label)
        lab = tissue_map(_probability(gm), _probability(wm))
    else:
        lab = None
    if lab is not None:
        write_nifti(folder / "labelsTr" / f"{case.case_id}.nii.gz", lab, img.affine)
        out["label"] = f"./labelsTr/{case.case_id}.nii.gz"
        counts = np.bincount(lab.ravel(), minlength=1)
        out["label_voxels"] = {int(v): int(c) for v, c in enumerate(counts) if c}
    log(f"  {case.case_id}: {out['shape']} voxels of {out['spacing']} mm, {out['orientation']}, "
        f"{out['dtype']} {out['min']:g}..{out['max']:g}"
        + (f", label voxels {out['label_voxels']}" if lab is not None else ""))
    return out


def _fmt_licence(info: PackageInfo) -> str:
    return "; ".join(info.licence) or "no licence field in the package metadata"


def _write_sources(folder: Path, spec: SampleFolder, written: list[dict], infos: dict[str, PackageInfo]) -> Path:
    used = [k for k in dict.fromkeys(c.package for c in spec.cases)]
    lic_dir = folder / "licenses"
    copied: dict[str, list[str]] = {}
    for key in used:
        info = infos[key]
        for f in info.licence_files:
            dst = lic_dir / f"{info.key}-{info.version}-{f.name}"
            lic_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
            copied.setdefault(key, []).append(f"licenses/{dst.name}")
    rows = []
    for case, w in zip(spec.cases, written):
        info = infos[case.package]
        rows.append(f"| `{w['image'][2:]}` | `{case.image}` | {info.name} | {info.version} | {_fmt_licence(info)} |")
        if "label" in w:
            how = ("binarised mask (non-zero -> 1)" if case.label_kind == "mask"
                   else f"tissue map from {' and '.join(f'`{r}`' for r in case.label)}")
            src = ", ".join(f"`{r}`" for r in case.label)
            rows.append(f"| `{w['label'][2:]}` | {src} ({how}) | {info.name} | {info.version} | {_fmt_licence(info)} |")
    labels = ", ".join(f"{v} {n}" for v, n in sorted(spec.labels.items()))
    lines = [
        f"# Sources of `{spec.name}/`", "",
        f"{spec.description}. Written by `medmim data samples` from files inside packages fetched with "
        f"`pip download --no-deps` (nothing installed). Labels: {labels}.", "",
        "Images keep the geometry of their source files (NRRD read as LPS and converted to RAS+, written as NIfTI "
        "with qform = sform). Masks are on their image's grid.", "",
        "Label sets: a Decathlon folder has one label set, so lesion masks (`ct/`, `mri/`: 1 lesion) and the MNI "
        "tissue map (`mri-tissue/`: 1 grey matter, 2 white matter) live in separate folders; the template is "
        "unlabeled in `mri/`.", "",
    ]
    if any(c.label_kind == "tissue" for c in spec.cases):
        lines += [f"Tissue map: probabilities are the maps' uint8 values / 255; a voxel is grey (1) or white (2) "
                  f"matter, whichever is more probable, where that probability is >= {TISSUE_THRESHOLD}, "
                  f"else background (0).", ""]
    lines += ["| file | from (inside the package) | package | version | licence as stated by the package metadata |",
              "|---|---|---|---|---|", *rows, "", "## Packages", ""]
    for key in used:
        info = infos[key]
        lines.append(f"- **{info.name} {info.version}**: archive `{info.archive}`"
                     + (f" (sha256 `{info.sha256}`)" if info.sha256 else "") + ".")
        lines.append(f"  - metadata licence: {_fmt_licence(info)}.")
        if info.licence_files:
            firsts = []
            for f in info.licence_files:
                first = next((ln.strip() for ln in f.read_text(encoding='utf-8', errors='replace').splitlines() if ln.strip()), "")
                firsts.append(f"`{f.name}` "
                              f"(first line: \"{first[:120]}\")")
            lines.append(f"  - licence file(s): {', '.join(firsts)}; copied here as "
                         f"{', '.join(f'`{c}`' for c in copied.get(key, []))}.")
        else:
            lines.append("  - no licence file in the archive.")
        for rel, note in info.notes.items():
            lines.append(f"  - about the data, `{rel}`: {note}.")
        if not info.notes:
            lines.append("  - no statement specific to the data files was found in the archive.")
    path = folder / "SOURCES.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def convert_samples(out_dir: str | os.PathLike, roots: dict[str, str | os.PathLike],
                    infos: dict[str, PackageInfo] | None = None, log: Callable[[str], None] = print,
                    folders: tuple[SampleFolder, ...] = FOLDERS) -> dict[str, dict]:
    """Write the Decathlon folders of :data:`FOLDERS` from unpacked package roots.

    ``roots``: package key (``"pyradiomics"``, ``"nilearn"``, ``"totalsegmentator"``) -> folder
    laid out as the package (``data/lung1_image.nrrd``, ``nilearn/datasets/data/...``).
    Returns ``{folder name: {"path", "labeled", "unlabeled", "cases": [per-case stats]}}``.
    """
    out_dir = Path(out_dir)
    roots = {k: Path(v) for k, v in roots.items()}
    if infos is None:
        infos = {k: package_info(PACKAGES[k], r) for k, r in roots.items()}
    result = {}
    for spec in folders:
        folder = out_dir / spec.name
        log(f"writing {folder}")
        written, training, test = [], [], []
        for case in spec.cases:
            src = roots[case.package] / case.image
            if not src.is_file():
                raise MedmimError(f"{src}: missing from the unpacked {case.package} package")
            w = _convert_case(case, roots[case.package], folder, case.label_kind is not None, log)
            written.append(w)
            if "label" in w:
                training.append({"image": w["image"], "label": w["label"]})
            else:
                test.append(w["image"])
        desc = {
            "name": spec.name, "description": spec.description,
            "reference": ", ".join(f"{infos[k].name} {infos[k].version}" for k in dict.fromkeys(c.package for c in spec.cases)),
            "licence": "see SOURCES.md", "release": "medmim data samples",
            "tensorImageSize": "3D", "modality": {"0": spec.modality},
            "labels": {str(v): n for v, n in sorted(spec.labels.items())},
            "numTraining": len(training), "numTest": len(test),
            "training": training, "test": test,
        }
        atomic_write_json(folder / "dataset.json", desc)
        _write_sources(folder, spec, written, infos)
        result[spec.name] = {"path": folder, "labeled": len(training), "unlabeled": len(test), "cases": written}
    return result


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_samples(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print, check: bool = True) -> dict:
    """Fetch (or reuse) the sample packages and write ``OUT_DIR/ct``, ``OUT_DIR/mri``, ``OUT_DIR/mri-tissue``.

    ``cache_dir``: where archives are downloaded and unpacked (default :func:`default_cache_dir`);
    an archive already there is reused, so a second run downloads nothing.
    ``check``: run :func:`medmim.data.check.check_dataset` on every folder written.
    Returns ``{"cache_dir": Path, "datasets": {name: {"path", "labeled", "unlabeled", "cases"}}}``.
    Raises :class:`MedmimError` when a package cannot be fetched (naming the pip command to run).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    roots, infos = {}, {}
    for key, pkg in PACKAGES.items():
        archive = fetch_archive(pkg, cache, log)
        roots[key] = unpack_archive(pkg, archive, cache, log)
        info = package_info(pkg, roots[key])
        info.archive, info.sha256 = archive.name, _sha256(archive)
        infos[key] = info
    datasets = convert_samples(out_dir, roots, infos, log)
    if check:
        from medmim.data.check import check_dataset

        for name, d in datasets.items():
            report = check_dataset(d["path"])
            if not report.ok:
                raise MedmimError(f"{d['path']}: written sample dataset fails data check: {report.problems[0]}")
    return {"cache_dir": cache, "datasets": datasets}
