"""Read and write 3D medical images together with their geometry.

Convention used everywhere in medmim (the NIfTI / nibabel one): an image is a numpy array
indexed ``[i, j, k]`` (``[i, j, k, c]`` with several channels) and a 4x4 ``affine`` maps voxel
indices to world coordinates in millimetres in the **RAS+** frame: +x towards the patient's
Right, +y Anterior, +z Superior. Files read through SimpleITK (NRRD, MHA, DICOM series) are
stored LPS+; they are converted on reading, so every array/affine pair means the same thing
whatever file it came from.

NIfTI stores its affine in float32, so an image read from NIfTI and written back round-trips its
voxels and affine exactly; an affine from another format is rounded to float32 on writing.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmim.errors import MedmimError
from medmim.fileio import atomic_write, atomic_write_bytes

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
# a header that claims more voxels than this is corrupt, not a CT (a 1024x1024x2048 volume is 2^31)
MAX_VOXELS = 2**31
# deflate expands data at most ~1032-fold: a header declaring more voxel bytes than this many times
# the bytes on disk is corrupt, and is refused before the reader allocates what it declares
MAX_EXPANSION = 1100
# LPS <-> RAS: flip the sign of the first two world axes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Image:
    """A volume and its geometry.

    ``array``: ``[I, J, K]`` or ``[I, J, K, C]``, dtype as stored (int16 HU for most CT).
    ``affine``: ``[4, 4]`` voxel index -> RAS+ world, millimetres.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"``: where each array axis points in the world."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))


@dataclass
class ImageInfo:
    """What a header says, without reading the voxels."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_image_path(path: str | os.PathLike) -> bool:
    """True for a file whose name medmim reads as an image, or a folder (a DICOM series)."""
    p = Path(path)
    name = p.name.lower()
    return name.endswith(IMAGE_SUFFIXES) or name.endswith(".dcm") or (p.is_dir())


def _nifti_header(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise MedmimError(f"{path}: file not found")
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, ValueError, OSError, EOFError,
            zlib.error, gzip.BadGzipFile, IndexError, TypeError, OverflowError, MemoryError) as e:
        raise MedmimError(f"{path}: not a readable NIfTI file ({_short(e)})")
    return img


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def _check_plausible(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> None:
    if any(int(s) <= 0 for s in shape):
        raise MedmimError(f"{path}: header declares an empty image of shape {tuple(shape)}")
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if n > MAX_VOXELS:
        raise MedmimError(f"{path}: header declares {n} voxels (shape {tuple(shape)}), too many for a real image")
    if not np.all(np.isfinite(affine)):
        raise MedmimError(f"{path}: affine contains NaN or Inf")


def _check_data_size(path: Path, shape: tuple[int, ...], itemsize: int, data_file: Path | None, offset: int = 0,
                     exact: bool = False) -> None:
    """Refuse a header that declares more voxel bytes than ``data_file`` can hold.

    ``exact``: the data is stored raw after ``offset`` bytes (uncompressed NIfTI), so the file must hold
    all of it; otherwise (compressed or unknown encoding) at most MAX_EXPANSION times its size.
    """
    if data_file is None:
        return
    try:
        st = data_file.stat()
    except OSError:
        return  # missing: the reader names it
    if not stat.S_ISREG(st.st_mode):
        raise MedmimError(f"{path}: voxel data file {data_file} is not a regular file")
    need = int(np.prod([int(s) for s in shape], dtype=np.float64)) * itemsize
    have = st.st_size - offset if exact else st.st_size * MAX_EXPANSION
    if need > have:
        raise MedmimError(f"{path}: cannot read voxel data, file truncated or corrupt (the header declares shape "
                          f"{tuple(shape)}, {need} bytes or more, but {data_file.name} holds {st.st_size} bytes)")


_DATA_FILE = re.compile(rb"^[ \t]*(?:data ?file|ElementDataFile)[ \t]*[:=][ \t]*(.*?)[ \t]*\r?$", re.I | re.M)


def _sitk_data_file(path: Path) -> Path | None:
    """Where the voxels of a NRRD/MetaImage file are: the file itself, or the one its header names.

    None when that is not one plain file (a LIST or a numbered series): no size check is made then.
    """
    if not path.name.lower().endswith((".nhdr", ".mhd")):
        return path
    try:
        with open(path, "rb") as f:
            m = _DATA_FILE.search(f.read(1 << 16))
    except OSError:
        return None
    if m is None:
        return None
    target = m.group(1).decode("utf-8", "replace")
    if target.upper() == "LOCAL":
        return path
    if not target or target.upper() == "LIST" or " " in target or "%" in target:
        return None
    p = Path(target)
    return p if p.is_absolute() else path.parent / p


def read_info(path: str | os.PathLike) -> ImageInfo:
    """Read only the header: shape, affine (RAS+), dtype. Raises :class:`MedmimError` on a bad file."""
    path = Path(path)
    if not path.exists():
        raise MedmimError(f"{path}: file not found")
    return {"dicom": _dicom_series_info, "nifti": _nifti_info, "sitk": _sitk_info}[_kind(path)](path)


def _nifti_info(path: Path) -> ImageInfo:
    img = _nifti_header(path)
    try:
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        dtype = np.dtype(img.get_data_dtype())
    except Exception as e:  # nibabel raises many types on corrupt headers
        raise MedmimError(f"{path}: corrupt NIfTI header ({_short(e)})")
    _check_plausible(path, shape, affine)
    return ImageInfo(path, shape, affine, dtype)


def _kind(path: Path) -> str:
    """dicom (a series folder), nifti or sitk (NRRD, MHA/MHD, one DICOM file); else an error naming the file."""
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(SITK_SUFFIXES) or name.endswith(".dcm"):
        return "sitk"
    raise MedmimError(f"{path}: unknown image format (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")


def read_image(path: str | os.PathLike) -> Image:
    """Read a NIfTI, NRRD, MHA/MHD file or a DICOM series folder into an :class:`Image` (RAS+).

    Raises :class:`MedmimError` naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    info = read_info(path)  # cheap header check first: refuses absurd sizes before allocating
    kind = _kind(path)
    if kind == "dicom":
        return _read_dicom_series(path)
    if kind == "nifti":
        img = _nifti_header(path)
        try:
            offset, itemsize = int(img.header.get_data_offset()), np.dtype(img.get_data_dtype()).itemsize
        except Exception as e:  # nibabel raises many types on corrupt headers
            raise MedmimError(f"{path}: corrupt NIfTI header ({_short(e)})")
        _check_data_size(path, info.shape, itemsize, path, offset, exact=not path.name.lower().endswith(".gz"))
        try:
            # dataobj keeps the stored dtype (int16 stays int16) and applies scl_slope if set
            array = np.asarray(img.dataobj)
        except Exception as e:
            raise MedmimError(f"{path}: cannot read voxel data, file truncated or corrupt ({_short(e)})")
        if array.ndim == 5 and array.shape[3] == 1:  # NIfTI stores vectors as [I, J, K, 1, C]
            array = array[:, :, :, 0, :]
        return Image(array, info.affine.copy(), path)
    # voxel type unknown until read: count one byte per voxel, a lower bound
    _check_data_size(path, info.shape, 1, _sitk_data_file(path))
    return _read_sitk(path)


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` (``[I, J, K]`` or ``[I, J, K, C]``) with its RAS+ ``affine`` as NIfTI.

    The file appears atomically (written beside, then renamed), so a crash never leaves half a file.
    Both qform and sform are set (code 1, scanner) so every reader agrees on the geometry.
    """
    import nibabel as nib

    path = Path(path)
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    named_gz = path.name.endswith(".gz")
    if compress is None or compress == named_gz:
        atomic_write(path, lambda tmp: nib.save(img, tmp))  # the temporary name keeps the suffix nibabel reads
    else:  # a compression other than the name says: the bytes themselves
        data = img.to_bytes()
        atomic_write_bytes(path, gzip.compress(data) if compress else data)
    return path


def save_image(path: str | os.PathLike, image: Image) -> Path:
    """Write an :class:`Image` as NIfTI with its geometry."""
    return write_nifti(path, image.array, image.affine)


# --- SimpleITK formats (LPS on disk) ---------------------------------------------------------

def _sitk_affine(direction, spacing, origin) -> np.ndarray:
    """LPS direction/spacing/origin of an ITK image -> RAS+ 4x4 affine."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return _LPS_TO_RAS @ lps


_META_NDIMS = re.compile(rb"^[ \t]*NDims[ \t]*=[ \t]*(.*?)[ \t]*\r?$", re.I | re.M)
_META_END = re.compile(rb"^[ \t]*ElementDataFile[ \t]*=.*$", re.I | re.M)


def _check_metaimage_header(path: Path) -> None:
    """Refuse a MetaImage header whose NDims is not 1..10: ITK's MetaIO hangs or crashes the process
    (a segmentation fault, not an exception) on a negative or huge one."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return  # the reader names the problem
    end = _META_END.search(head)
    for m in _META_NDIMS.finditer(head[: end.end()] if end else head):
        v = m.group(1)
        if not re.fullmatch(rb"\+?\d{1,2}", v) or not 1 <= int(v) <= 10:
            raise MedmimError(f"{path}: not a readable image (MetaImage header says NDims = "
                              f"{v[:20].decode('latin-1')!r}; expected 1 to 10)")


def _sitk_reader(path: Path):
    import SimpleITK as sitk

    if path.name.lower().endswith((".mha", ".mhd")):
        _check_metaimage_header(path)

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise MedmimError(f"{path}: not a readable image ({_short(e).split('ITK')[0].strip() or 'SimpleITK could not read it'})")
    return reader


def _sitk_info(path: Path) -> ImageInfo:
    reader = _sitk_reader(path)
    dim = reader.GetDimension()
    size = tuple(int(s) for s in reader.GetSize())
    if dim != 3:
        # keep the true dimensionality so that checks can report it
        affine = np.eye(4)
        ncomp = reader.GetNumberOfComponents()
        shape = size + ((ncomp,) if ncomp > 1 else ())
        _check_plausible(path, shape, affine)
        return ImageInfo(path, shape, affine, np.dtype(np.float32))
    affine = _sitk_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
    ncomp = reader.GetNumberOfComponents()
    shape = size + ((ncomp,) if ncomp > 1 else ())
    _check_plausible(path, shape, affine)
    return ImageInfo(path, shape, affine, np.dtype(np.float32))


def _from_sitk(img, path: Path) -> Image:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # [K, J, I] (+ [C]) in numpy's order
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)
        arr = arr.transpose(tuple(range(arr.ndim - 1, 0, -1)) + (0,))
    else:
        arr = arr.transpose(tuple(range(arr.ndim - 1, -1, -1)))
    arr = np.ascontiguousarray(arr)
    if img.GetDimension() == 3:
        affine = _sitk_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    else:
        affine = np.eye(4)
    return Image(arr, affine, path)


def _read_sitk(path: Path) -> Image:
    reader = _sitk_reader(path)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise MedmimError(f"{path}: cannot read voxel data, file truncated or corrupt ({_short(e)[:120]})")
    return _from_sitk(img, path)


def _dicom_files(folder: Path) -> list[str]:
    import SimpleITK as sitk

    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        ids = ()
    if not ids:
        raise MedmimError(f"{folder}: folder holds no DICOM series")
    # several series in one folder: take the one with the most slices, as viewers do
    best: list[str] = []
    for sid in ids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
        if len(files) > len(best):
            best = files
    return best


def _dicom_series_info(folder: Path) -> ImageInfo:
    files = _dicom_files(folder)
    reader = _sitk_reader(Path(files[0]))
    size = tuple(int(s) for s in reader.GetSize())
    shape = (size[0], size[1], len(files)) if len(files) > 1 else size
    return ImageInfo(folder, shape, _sitk_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin()),
                     np.dtype(np.float32))


def _read_dicom_series(folder: Path) -> Image:
    import SimpleITK as sitk

    files = _dicom_files(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise MedmimError(f"{folder}: cannot read DICOM series ({_short(e)[:120]})")
    out = _from_sitk(img, folder)
    out.meta["dicom_files"] = len(files)
    return out
