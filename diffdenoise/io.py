"""Reading and writing image volumes for denoising: DICOM series, multi-frame DICOM, NIfTI, PNG and TIFF.

Every reader gives a ``Volume``: a float32 ``(Z, H, W)`` array in physical units (HU for CT) with slices
along the acquisition axis, plus the geometry and identifiers a writer needs to put a denoised volume
back (``Volume.meta``, JSON-safe). Folders are searched recursively and DICOM files are recognised by
content, not extension; files that are not images are skipped with a logged warning. Bad input raises
``InputError`` naming the file and the problem in one line. Input files are only ever opened for reading.

``write_volume`` is the inverse: a processed array goes back in the format it came from, with the input's
geometry, identifiers and stored bit depth (a DICOM becomes a derived series), and ``atomic_folder``
makes a whole output folder appear at once or not at all.

Example::

    from diffdenoise.io import atomic_folder, read_volumes, write_volume

    with atomic_folder("/tmp/smoothed") as tmp:
        for volume in read_volumes("../shared/data/head_ct_ge/series"):
            print(volume.volume_id, volume.modality, volume.array.shape, volume.meta["spacing"])
            write_volume(volume, volume.array, tmp / volume.volume_id, derivation="unchanged copy")
"""

import hashlib
import logging
import numbers
import os
import re
import shutil
import socket
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, ImageSequence
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from diffdenoise.errors import InputError, one_line

logger = logging.getLogger(__name__)

MODALITIES = ("mri", "ct", "xray", "other")
DICOM_MODALITIES = {"MR": "mri", "CT": "ct", "CR": "xray", "DX": "xray", "RG": "xray", "XA": "xray"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
RASTER_SUFFIXES = (".png", ".tif", ".tiff")
_GRAY_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I", "F")  # PIL modes of single-channel images
# Header fields copied to Volume.meta as they are (same for every slice of a series).
_DICOM_KEYWORDS = (
    "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "FrameOfReferenceUID", "SOPClassUID", "Manufacturer", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "PixelPaddingValue",
)  # fmt: skip


@dataclass
class Volume:
    """One image volume in physical units, with what is needed to split, normalise and write it back.

    Attributes:
        array: float32 ``(Z, H, W)``; Z is the acquisition (slice) axis. CT in HU (RescaleSlope and
            RescaleIntercept applied); MONOCHROME1 inverted so that higher is brighter.
        source: file or folder it came from.
        volume_id: unique, filesystem-safe id (file stem, or series folder + SeriesInstanceUID hash).
        group: patient, for splitting without leaks: DICOM PatientID, else ``volume_id``.
        modality: one of ``MODALITIES``, from the DICOM Modality; "other" for NIfTI, PNG and TIFF.
        meta: JSON-safe geometry and identifiers (``format``, ``files``, ``spacing`` (dz, dy, dx) in mm,
            NIfTI ``affine``, DICOM ``ImagePositionPatient`` per slice, ``ImageOrientationPatient``,
            ``SOPInstanceUIDs``, ``monochrome1_inverted``, ...).
    """

    array: np.ndarray
    source: str
    volume_id: str
    group: str
    modality: str
    meta: dict = field(default_factory=dict)


@dataclass
class VolumeSource:
    """A volume found by ``scan_volumes`` from headers alone; ``read()`` decodes its pixels.

    Scanning first means a large folder is checked, and its ids and groups are fixed, before any pixel
    is decoded, and callers can stream volumes one at a time instead of holding all in memory.
    """

    kind: str  # "dicom" (a series of single-frame files, or one multi-frame file), "nifti" or "raster"
    files: list[Path]
    source: str
    volume_id: str
    group: str
    modality: str

    def read(self) -> Volume:
        """Decodes the volume.

        Raises:
            InputError: undecodable, truncated, colour or 4D data, or NaN/Inf values.
        """
        with _lenient_headers():
            array, meta = _READERS[self.kind](self.files)
        bad = ~np.isfinite(array)
        if bad.any():
            z = int(np.argwhere(bad)[0][0])
            path = meta["files"][z] if len(meta["files"]) == len(array) else meta["files"][0]
            raise InputError(path, f"{int(bad.sum())} NaN/Inf values; replace them (e.g. by 0) first")
        return Volume(array, self.source, self.volume_id, self.group, self.modality, meta)


def read_volumes(src) -> list[Volume]:
    """Reads every image volume in a file or folder.

    Args:
        src: a DICOM file (single- or multi-frame), a NIfTI (.nii, .nii.gz), PNG or TIFF file, or a folder
            holding any mix of them, searched recursively. Single-frame DICOM files are grouped into
            series by SeriesInstanceUID (and image size); several series give several volumes.

    Returns:
        The volumes, ordered by their first file's path.

    Raises:
        InputError: a missing path, a folder without images, or a file that cannot be used (see
            ``scan_volumes`` and ``VolumeSource.read``).
    """
    return [source.read() for source in scan_volumes(src)]


def scan_volumes(src) -> list[VolumeSource]:
    """Finds the volumes in ``src`` from file headers, without decoding pixels.

    Args:
        src: as in ``read_volumes``.

    Returns:
        One ``VolumeSource`` per volume, ordered by first file path, with unique ``volume_id``s.

    Raises:
        InputError: ``src`` is missing; a folder holds no image; a file given directly is not an image
            (e.g. a DICOM SR); a DICOM header is damaged.
    """
    src = Path(src)
    if not src.exists():
        raise InputError(src, "no such file or folder")
    with _lenient_headers():
        if src.is_file():
            kind, header, problem = _sniff(src)
            if kind is None:
                raise InputError(src, problem)
            found = [(src, kind, header)]
        else:
            found = []
            for path in sorted(p for p in src.rglob("*") if p.is_file()):
                kind, header, problem = _sniff(path)
                if kind is None:
                    logger.warning("%s: skipped, %s", path, problem)
                else:
                    found.append((path, kind, header))
            if not found:
                raise InputError(src, "no images found (searched recursively for DICOM, NIfTI, PNG, TIFF)")
        return _volume_sources(found)


def _sniff(path: Path):
    """Tells what a file is: returns ``(kind, DICOM header or None, problem)``, kind None for non-images."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti", None, ""
    if name.endswith(RASTER_SUFFIXES):
        return "raster", None, ""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None, None, "not a DICOM, NIfTI (.nii, .nii.gz), PNG or TIFF file"
    except Exception as exc:
        raise InputError(path, f"damaged DICOM header ({one_line(exc)})") from exc
    if "Rows" not in header:
        return None, None, _no_pixels(header)
    return "dicom", header, ""


def _no_pixels(ds) -> str:
    """The problem text for a DICOM object that carries no image (SR, presentation state, DICOMDIR)."""
    sop_class = ds.get("SOPClassUID")
    return (
        f"DICOM {ds.get('Modality', '')} object without pixel data "
        f"({getattr(sop_class, 'name', sop_class) or 'no SOP class'}); it is not an image"
    )


def _is_multiframe(header) -> bool:
    """Multi-frame files (Enhanced MR/CT, cine) are volumes on their own, never merged into a series."""
    return int(header.get("NumberOfFrames") or 1) > 1 or "PerFrameFunctionalGroupsSequence" in header


def _volume_sources(found) -> list[VolumeSource]:
    """Groups sniffed files into volumes and gives each a unique, filesystem-safe id."""
    series: dict[tuple, list] = {}
    volumes = []  # (kind, files, id, patient, modality)
    for path, kind, header in found:
        if kind == "dicom" and not _is_multiframe(header):
            key = (str(header.get("SeriesInstanceUID") or path), int(header.Rows), int(header.Columns))
            series.setdefault(key, []).append((path, header))
        else:
            volumes.append((kind, [path], file_stem(path), *_dicom_identity(header)))
    for (uid, _, _), members in series.items():
        paths = [path for path, _ in members]
        volume_id = file_stem(paths[0]) if len(paths) == 1 else f"{paths[0].parent.name}_{_short_hash(uid)}"
        volumes.append(("dicom", paths, volume_id, *_dicom_identity(members[0][1])))
    volumes.sort(key=lambda v: str(v[1][0]))

    sources, taken = [], set()
    for kind, files, volume_id, patient, modality in volumes:
        volume_id = _safe_id(volume_id)
        unique, n = volume_id, 1
        while unique in taken:
            n += 1
            unique = f"{volume_id}_{n}"
        taken.add(unique)
        source = files[0] if len(files) == 1 else Path(os.path.commonpath(files))
        sources.append(VolumeSource(kind, files, str(source), unique, patient or unique, modality))
    return sources


def _dicom_identity(header) -> tuple[str, str]:
    """Returns (patient id, modality) from a DICOM header; ("", "other") for files without one."""
    if header is None:
        return "", "other"
    modality = DICOM_MODALITIES.get(str(header.get("Modality") or "").upper(), "other")
    return str(header.get("PatientID") or "").strip(), modality


def file_stem(path: Path) -> str:
    """File name without its image suffix (both parts of .nii.gz): the name group CSVs refer to."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *RASTER_SUFFIXES, ".dcm", ".dicom", ".ima"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe_id(text: str) -> str:
    """Keeps ids usable as folder names on every OS."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "volume"


def _short_hash(text: str) -> str:
    """8 hex digits that tell series in one folder apart, stable across runs."""
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _plain(value):
    """Converts pydicom values (DS, IS, UID, MultiValue, PersonName) to JSON-safe built-ins."""
    if value is None:
        return None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Number):
        return float(value)
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return str(value)


def _frame_attr(ds, frame: int, sequence: str, keyword: str):
    """Looks a value up in a frame's functional groups, then the shared ones, then the top level.

    Enhanced (multi-frame) DICOM keeps geometry and rescale inside functional-group sequences; classic
    DICOM keeps them at the top level. One lookup serves both.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for groups in (per_frame[frame : frame + 1], shared[:1]):
        for item in groups:
            values = item.get(sequence)
            if values and keyword in values[0]:
                return values[0].get(keyword)
    return ds.get(keyword)


def _dicom_pixels(ds, path: Path) -> np.ndarray:
    """Decodes a DICOM's frames to float32 ``(F, H, W)`` physical values, MONOCHROME1 inverted."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(path, _no_pixels(ds))
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2")
    if int(ds.get("SamplesPerPixel") or 1) != 1 or not photometric.startswith("MONOCHROME"):
        raise InputError(path, f"{photometric} colour image; only grayscale (MONOCHROME1/2) can be denoised")
    try:
        raw = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        problem = f"cannot decode the pixel data ({getattr(syntax, 'name', syntax)}): {one_line(exc)}."
        raise InputError(path, f"{problem} {_decode_hint(syntax)}") from exc
    raw = raw.reshape(-1, int(ds.Rows), int(ds.Columns)).astype(np.float64)
    if photometric == "MONOCHROME1":  # 0 is white: mirror within the stored range
        raw = sum(_stored_range(ds)) - raw
    slope, intercept = np.array([_rescale(ds, f) for f in range(len(raw))]).T[:, :, None, None]
    return (raw * slope + intercept).astype(np.float32)


def _decode_hint(syntax) -> str:
    """What to do when pixel data cannot be decoded: install a plugin, convert the file, or it is damaged."""
    if syntax is None or not syntax.is_compressed:
        return "The file may be truncated or damaged."
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return "pydicom has no decoder for it; convert the file to uncompressed DICOM (e.g. gdcmconv --raw)."
    if not decoder.is_available:
        return "Install its decoder: pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg (or gdcm)."
    return "The file may be truncated or damaged."


def _stored_range(ds) -> tuple[int, int]:
    """The lowest and highest stored pixel value that BitsStored and PixelRepresentation allow."""
    bits = int(ds.get("BitsStored") or 16)
    if ds.get("PixelRepresentation") == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _rescale(ds, frame: int) -> list[float]:
    """RescaleSlope and RescaleIntercept of one frame (stored value to physical unit, e.g. HU)."""
    return [
        float(_frame_attr(ds, frame, "PixelValueTransformationSequence", keyword) or default)
        for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0))
    ]


def _slice_order(positions, orientations, fallback_keys, path) -> tuple[list[int], list[float] | None]:
    """Orders slices along the acquisition axis and returns their positions on it (mm), if known.

    DICOM files and frames come in no guaranteed order. Each slice's ImagePositionPatient projected on
    the normal of its ImageOrientationPatient gives the physical order, also for oblique and
    gantry-tilted stacks. Without full geometry, with mixed orientations, or when slices share a
    position (repeats, time points), ``fallback_keys`` (InstanceNumber, file, frame) decide instead.
    """
    fallback = sorted(range(len(fallback_keys)), key=fallback_keys.__getitem__), None
    if any(p is None for p in positions) or any(o is None for o in orientations):
        return fallback
    iop = np.asarray(orientations, dtype=float)
    if not np.allclose(iop, iop[0], atol=1e-4):
        return fallback
    along = np.asarray(positions, dtype=float) @ np.cross(iop[0, :3], iop[0, 3:])
    order = np.argsort(along, kind="stable")
    if len(order) > 1 and np.min(np.diff(along[order])) < 1e-3:
        logger.warning("%s: slices share a position (repeats, time points?); ordered by InstanceNumber", path)
        return fallback
    return order.tolist(), along[order].tolist()


def _read_dicom(files: list[Path]):
    """Stacks a series of single-frame files, or the frames of one multi-frame file, along Z."""
    frames, positions, orientations, keys, origins, rescale = [], [], [], [], [], []
    for n, path in enumerate(files):
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise InputError(path, f"cannot read DICOM, truncated or damaged ({one_line(exc)})") from exc
        pixels = _dicom_pixels(ds, path)
        if n == 0:
            first = ds
        for f, frame in enumerate(pixels):
            frames.append(frame)
            positions.append(_plain(_frame_attr(ds, f, "PlanePositionSequence", "ImagePositionPatient")))
            orientation = _frame_attr(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
            orientations.append(_plain(orientation))
            keys.append((int(ds.get("InstanceNumber") or 0), n, f))
            origins.append((str(path), f, _plain(ds.get("SOPInstanceUID"))))
            rescale.append(_rescale(ds, f))
    order, along = _slice_order(positions, orientations, keys, files[0])
    pixel_spacing = _frame_attr(first, 0, "PixelMeasuresSequence", "PixelSpacing")
    pixel_spacing = _plain(pixel_spacing or first.get("ImagerPixelSpacing"))
    thickness = _plain(_frame_attr(first, 0, "PixelMeasuresSequence", "SliceThickness"))
    if along and len(along) > 1:
        dz = float(np.median(np.diff(along)))
    else:
        dz = _plain(_frame_attr(first, 0, "PixelMeasuresSequence", "SpacingBetweenSlices")) or thickness
    meta = {
        "format": "dicom",
        "files": list(dict.fromkeys(origins[i][0] for i in order)),
        "frame_numbers": [origins[i][1] for i in order],
        "SOPInstanceUIDs": [origins[i][2] for i in order],
        "ImagePositionPatient": [positions[i] for i in order],
        "ImageOrientationPatient": orientations[order[0]],
        "slice_positions_mm": along,
        "PixelSpacing": pixel_spacing,
        "SliceThickness": thickness,
        "spacing": [dz, *(pixel_spacing or [None, None])],
        "rescale_slope_intercept": [rescale[i] for i in order],
        "monochrome1_inverted": first.get("PhotometricInterpretation") == "MONOCHROME1",
        "TransferSyntaxUID": str(first.file_meta.get("TransferSyntaxUID", "")),
        **{k: _plain(first.get(k)) for k in _DICOM_KEYWORDS},
    }
    return np.stack([frames[i] for i in order]), meta


def _read_nifti(files: list[Path]):
    """Reads a 2D/3D NIfTI with slices along its last axis: ``array[z, h, w] = data[h, w, z]``."""
    path = files[0]
    try:
        image = nib.load(path)
        data = image.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI ({one_line(exc)})") from exc
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise InputError(path, f"{len(shape)}D data of shape {shape}; expected 2D or 3D. Split the volumes")
    data = data.reshape(*data.shape[:2], -1)
    zooms = ([float(z) for z in image.header.get_zooms()[:3]] + [None])[:3]  # no slice spacing in 2D
    meta = {
        "format": "nifti",
        "files": [str(path)],
        "affine": image.affine.tolist(),
        "spacing": [zooms[2], zooms[0], zooms[1]],
        "axes": "array[z, h, w] = nifti[h, w, z]",
        "nifti_shape": list(shape),
        "nifti_dtype": str(image.get_data_dtype()),
    }
    return np.ascontiguousarray(np.moveaxis(data, -1, 0)), meta


def _read_raster(files: list[Path]):
    """Reads an 8/16-bit grayscale PNG or TIFF; TIFF pages become slices."""
    path = files[0]
    try:
        with Image.open(path) as image:
            pages = [(page.mode, np.array(page)) for page in ImageSequence.Iterator(image)]
    except Exception as exc:
        raise InputError(path, f"cannot read image ({one_line(exc)})") from exc
    modes = sorted({mode for mode, _ in pages})
    if any(mode not in _GRAY_MODES for mode in modes):
        raise InputError(path, f"{'/'.join(modes)} image; only 8/16-bit grayscale is supported. Convert it")
    if len({pixels.shape for _, pixels in pages}) > 1:
        raise InputError(path, "TIFF pages differ in size; save them as separate files")
    meta = {"format": path.suffix.lower()[1:], "files": [str(path)], "mode": modes[0], "spacing": [None] * 3}
    return np.stack([pixels for _, pixels in pages]).astype(np.float32), meta


def _lenient_headers():
    """Skips pydicom's value checks, whose warnings (e.g. on anonymised UIDs) say nothing about pixels."""
    return pydicom.config.disable_value_validation()


_READERS = {"dicom": _read_dicom, "nifti": _read_nifti, "raster": _read_raster}

# ---- writing ----

DERIVED_SERIES_SUFFIX = " [diffdenoise]"  # appended to SeriesDescription of a written DICOM series
# Header fields a changed image may contradict; they are optional, so they are dropped rather than guessed.
_STALE_DICOM_KEYWORDS = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
)  # fmt: skip
# PIL mode -> pixel type written back (the reader accepts these and "1", which denoising refuses).
_RASTER_DTYPES = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I": np.int32,
                  "F": np.float32}  # fmt: skip


class DerivedSeriesUIDs(dict):
    """Source SeriesInstanceUID -> the derived series' UID, made on first use from the source UID and a salt.

    One salt per run: every volume of a source series joins one derived series, even when the processes of
    a torchrun launch write its files separately (they share the salt), and two runs give two series.
    """

    def __init__(self, salt: str | None = None):
        super().__init__()
        self.salt = uuid.uuid4().hex if salt is None else salt

    def __missing__(self, source_uid: str) -> str:
        self[source_uid] = generate_uid(entropy_srcs=[self.salt, str(source_uid)])
        return self[source_uid]


def write_volume(volume: Volume, array, dest, derivation: str = "", series_uids: dict | None = None,
                 series_suffix: str = DERIVED_SERIES_SUFFIX) -> Path:
    """Writes ``array`` in the format, geometry and bit depth ``volume`` was read with; inverse of the readers.

    DICOM becomes a derived series: new SeriesInstanceUID (one per source series, shared through
    ``series_uids``) and SOPInstanceUIDs, ImageType DERIVED\\SECONDARY, SeriesDescription + ``series_suffix``,
    DerivationDescription; geometry, patient and study tags kept; stored values of the input's
    BitsAllocated/BitsStored/PixelRepresentation under the input's rescale, MONOCHROME1 inverted back;
    compressed input is written as Explicit VR Little Endian. A multi-frame file stays multi-frame.
    NIfTI is written as float32 with the input's affine and header (``scl_slope`` 1: the values are
    physical, so nothing is re-quantised). PNG/TIFF keep their bit depth (PIL mode) and pages.
    Integer outputs are rounded and clipped to what the stored type holds.

    Args:
        volume: the volume as read (its ``meta`` and source files are used, never modified).
        array: float ``(Z, H, W)`` in the physical units of ``volume.array`` (HU for CT).
        dest: output path without suffix. A DICOM series of several files becomes the folder ``dest``
            holding one file per input file, named as the input's; anything else becomes one file,
            ``dest`` + the input's suffix (``.dcm`` for DICOM).
        derivation: what was done, for DICOM DerivationDescription and the NIfTI ``descrip`` field.
        series_uids: maps source SeriesInstanceUIDs to new ones (a ``DerivedSeriesUIDs``); pass one for all
            volumes of a run so that the multi-frame files of one source series stay one derived series.
        series_suffix: appended to a DICOM SeriesDescription (LO, 64 characters: the source's is cut to fit).

    Returns:
        The written file or folder.

    Raises:
        ValueError: ``array`` has another shape than ``volume.array``.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.shape != volume.array.shape:
        raise ValueError(f"array shape {array.shape} differs from the volume's {volume.array.shape}")
    dest, meta = Path(dest), volume.meta
    if meta["format"] == "dicom":
        with _lenient_headers():
            uids = DerivedSeriesUIDs() if series_uids is None else series_uids
            return _write_dicom(meta, array, dest, derivation, uids, series_suffix)
    if meta["format"] == "nifti":
        return _write_nifti(meta, array, dest, derivation)
    return _write_raster(meta, array, dest)


def check_output_folder(out, src, overwrite: bool = False) -> None:
    """Refuses an output folder that would destroy results or input, before any work is done.

    Args:
        out: the output folder to be created.
        src: the input file or folder.
        overwrite: allow replacing an existing ``out``.

    Raises:
        InputError: ``out`` is named like an image file (it is a folder), lies inside ``src`` (it would be
            read back as input), holds ``src`` (replacing it would delete the input), or exists, is not
            an empty folder and ``overwrite`` is off.
    """
    out, src = Path(out), Path(src)
    if out.name.lower().endswith((*NIFTI_SUFFIXES, *RASTER_SUFFIXES, ".dcm")):
        raise InputError(out, "the output is a folder (one output and one .json report per input); name a folder")
    src_abs, out_abs = src.resolve(), out.resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise InputError(out, f"output is inside the input folder {src}; put it elsewhere")
    if out_abs in src_abs.parents:
        raise InputError(out, f"output folder holds the input {src}; replacing it would delete the input")
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(out, "output already exists; replace it with --overwrite or pick a new folder")


@contextmanager
def atomic_folder(out, overwrite: bool = False):
    """Yields a hidden folder beside ``out`` that becomes ``out`` only if the block finishes.

    Readers never see a half-written output, and a failure leaves none: the folder is built under a
    temporary name on the same filesystem and renamed. With ``overwrite`` an existing ``out`` is moved
    aside first and deleted after the rename; otherwise ``out`` may only be an empty folder (checked on
    entry, before any work).

    A run killed inside the block (``kill -9``, power loss) cannot clean up, so the next ``atomic_folder``
    for the same ``out`` does it on entry, see ``remove_stale_partials``: the hidden folder is named
    ``.<out name>.<host>.<pid>.<8 hex>.partial``, and leftovers of processes of this host that have
    ended are removed, while those of a live process (a concurrent run writing the same output) are kept.

    Args:
        out: the output folder to create.
        overwrite: replace an existing ``out``.

    Raises:
        InputError: ``out`` exists, is not an empty folder and ``overwrite`` is off.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    if not overwrite and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(out, "output already exists; replace it with --overwrite or pick a new folder")
    tmp = partial_path(out)
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stick
    stale = tmp.with_suffix(".old")
    try:
        yield tmp
        if overwrite and out.exists():
            out.rename(stale)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if stale.exists() and not out.exists():  # the rename failed: put the old output back
            stale.rename(out)
        raise
    _remove(stale)


def _host() -> str:
    """This machine's name as it goes into partial names: no dots, so names split unambiguously."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname())[:64].strip("-") or "host"


def partial_path(out) -> Path:
    """A new hidden name beside ``out`` for building it: ``.<out name>.<host>.<pid>.<8 hex>.partial``.

    The host and process id let a later run tell the leftovers of a killed run from the work of a live one
    (``remove_stale_partials``); the random part keeps two folders of one process apart. Nothing is created.
    """
    out = Path(out)
    return out.parent / f".{out.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"


def _pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine; True when it cannot be told (never deletes wrongly)."""
    if os.name != "posix":  # Windows' os.kill(pid, 0) would end the process instead of probing it
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # not a process id this system can have
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    """Deletes a file or folder tree if it (still) exists; another run may be removing it at the same time."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def remove_stale_partials(out) -> list[Path]:
    """Cleans up what runs killed while building ``out`` left beside it, and says where the rest is.

    ``atomic_folder`` (so ``prepare``, ``fit``, ``denoise``, the stage outputs and the benchmark's data)
    and the deploy writer build ``out`` in ``.<out name>.<host>.<pid>.<hex>.partial`` and, when
    overwriting, move the previous ``out`` aside to the same name ending ``.old``. A process killed with
    ``kill -9`` leaves these behind. For each such entry of this ``out`` (other outputs' are never touched):

    - made on this host by a process that no longer exists (``os.kill(pid, 0)`` raises
      ``ProcessLookupError``): removed, except a ``.old`` while ``out`` is missing: the run was killed
      between moving the previous output aside and renaming the new one into place, so the previous
      output is renamed back to ``out`` (as an ordinary failure in ``atomic_folder`` would have done);
    - made by a live process (a concurrent run writing the same output; or a reused process id): kept;
    - made on another host (a shared filesystem), or named in the scheme of diffdenoise before this
      check (``.<out name>.<8 hex>.partial``, no process id): kept, since whether its run is still going
      cannot be told from here; no age limit is used either, as training runs can last days.

    Everything kept is named in one ``logger.warning`` line, so that it can be deleted by hand once no run
    is writing ``out``. A process id reused by another program only keeps a leftover longer (never deletes
    a live run's); two containers with one host name and separate process-id namespaces sharing the
    folder would defeat the check (give them distinct host names).

    Args:
        out: the output path whose leftovers are looked for in its parent folder.

    Returns:
        The paths removed or restored to ``out``.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(  # host and pid absent in the older scheme
        rf"\.{re.escape(out.name)}\.(?:(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>[0-9]+)\.)?[0-9a-f]{{8}}"
        r"\.(?P<kind>partial|old)"
    )
    host, cleaned, kept = _host(), [], []
    # .old first: a killed overwrite's previous output goes back to `out` before anything else happens.
    entries = sorted(out.parent.iterdir(), key=lambda p: not p.name.endswith(".old"))
    for path in entries:
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        if match["pid"] is None:
            kept.append(f"{path} (no process id: made by an older diffdenoise)")
        elif match["host"] != host:
            kept.append(f"{path} (made on host {match['host']})")
        elif _pid_alive(int(match["pid"])):
            kept.append(f"{path} (process {match['pid']} is running)")
        else:
            try:
                if match["kind"] == "old" and not out.exists():
                    path.rename(out)
                    logger.warning("%s: restored from %s, left by a run killed while replacing it", out, path.name)
                else:
                    _remove(path)
                    logger.info("%s: removed, left by a run (process %s) that was killed", path, match["pid"])
            except FileNotFoundError:  # a concurrent run cleaned it first
                continue
            except OSError as exc:  # e.g. another user's folder: say so, never fail the run for it
                kept.append(f"{path} (could not be removed: {one_line(exc)})")
                continue
            cleaned.append(path)
    if kept:
        logger.warning("%s: kept %d unfinished output(s) of other runs beside it: %s; delete them once no run "
                       "is writing %s", out, len(kept), "; ".join(kept), out.name)  # fmt: skip
    return cleaned


def _quantise(values: np.ndarray, dtype, low=None, high=None) -> np.ndarray:
    """Rounds to the nearest value ``dtype`` holds within [low, high] (default: all it holds); floats pass."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    low, high = info.min if low is None else low, info.max if high is None else high
    return np.clip(np.rint(values), low, high).astype(dtype)


def _write_dicom(meta: dict, array: np.ndarray, dest: Path, derivation: str, series_uids: dict,
                 series_suffix: str) -> Path:
    """One output file per input file; slices go back to the file and frame they were read from."""
    files = meta["files"] if len(meta["files"]) == len(array) else meta["files"] * len(array)
    slices_of: dict[str, list[tuple[int, int]]] = {}  # file -> [(frame, slice index)]
    for k, (path, frame) in enumerate(zip(files, meta["frame_numbers"])):
        slices_of.setdefault(path, []).append((frame, k))
    series_uid = series_uids[meta["SeriesInstanceUID"]]
    if len(slices_of) == 1:
        targets = [dest.with_name(dest.name + ".dcm")]
    else:
        names = [Path(path).name for path in slices_of]
        if len(set(names)) < len(names):  # same name in different subfolders
            names = [f"{n:04d}.dcm" for n in range(len(names))]
        dest.mkdir()
        targets = [dest / name for name in names]
    for (path, members), target in zip(slices_of.items(), targets):
        ds = pydicom.dcmread(path, defer_size="1 MB")  # the old pixel data is replaced, never loaded
        low, high = _stored_range(ds)
        stored = np.empty((len(members), int(ds.Rows), int(ds.Columns)), _dicom_dtype(ds, path))
        for frame, k in members:
            slope, intercept = _rescale(ds, frame)
            raw = (array[k].astype(np.float64) - intercept) / slope
            if meta["monochrome1_inverted"]:
                raw = low + high - raw
            stored[frame] = _quantise(raw, stored.dtype, low, high)
        _derive(ds, stored, series_uid, derivation, series_suffix)
        ds.save_as(target, enforce_file_format=True)
    return targets[0] if len(targets) == 1 else dest


def _dicom_dtype(ds, path) -> np.dtype:
    """The integer type of the stored pixels (BitsAllocated, PixelRepresentation)."""
    bits = int(ds.BitsAllocated)
    if "PixelData" not in ds or bits not in (8, 16, 32):
        raise InputError(path, f"{bits}-bit or float pixel data cannot be written back; only 8/16/32-bit integers")
    return np.dtype(f"{'i' if ds.get('PixelRepresentation') == 1 else 'u'}{bits // 8}")


def _derive(ds, stored: np.ndarray, series_uid: str, derivation: str, series_suffix: str) -> None:
    """Turns a source dataset into a derived image of the same geometry that carries ``stored`` pixels."""
    if ds.file_meta.get("TransferSyntaxUID") not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    data = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()
    ds["PixelData"] = DataElement(0x7FE00010, "OB" if stored.itemsize == 1 else "OW", data + b"\0" * (len(data) % 2))
    for keyword in _STALE_DICOM_KEYWORDS:
        if keyword in ds:
            del ds[keyword]
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    image_type = ds.get("ImageType") or []
    ds.ImageType = ["DERIVED", "SECONDARY", *([image_type] if isinstance(image_type, str) else image_type)[2:]]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(groups) or []:  # Enhanced IODs repeat value 1 of ImageType per frame
            for elem in item:
                if elem.keyword.endswith("FrameTypeSequence") and elem.value and "FrameType" in elem.value[0]:
                    elem.value[0].FrameType = ["DERIVED", *elem.value[0].FrameType[1:]]
    description = str(ds.get("SeriesDescription") or "")
    ds.SeriesDescription = (description[: 64 - len(series_suffix)] + series_suffix).lstrip()  # LO
    ds.DerivationDescription = derivation


def _input_suffix(path: str, suffixes: Sequence[str]) -> str:
    """The input's own suffix (``.nii.gz`` counts as one), so the output opens with the same tools."""
    return next(s for s in suffixes if path.lower().endswith(s))


def _write_nifti(meta: dict, array: np.ndarray, dest: Path, derivation: str) -> Path:
    """float32 with the input's affine, header and shape (trailing unit axes included)."""
    path = meta["files"][0]
    source = nib.load(path)
    header = source.header.copy()
    header.set_data_dtype(np.float32)
    header["descrip"] = derivation[:79]  # 80 bytes, NUL-terminated
    data = np.moveaxis(array, 0, -1).reshape(meta["nifti_shape"])
    target = dest.with_name(dest.name + _input_suffix(path, NIFTI_SUFFIXES))
    nib.save(type(source)(data, source.affine, header), target)
    return target


def _write_raster(meta: dict, array: np.ndarray, dest: Path) -> Path:
    """The input's PIL mode (8/16/32-bit integer or float) and page count; TIFF pages stay pages."""
    path = meta["files"][0]
    pages = [Image.fromarray(_quantise(page, _RASTER_DTYPES[meta["mode"]])) for page in array]
    target = dest.with_name(dest.name + _input_suffix(path, RASTER_SUFFIXES))
    pages[0].save(target, save_all=len(pages) > 1, append_images=pages[1:])
    return target
