"""DICOM glue between MONAI Deploy's in-memory series and ``diffdenoise.io``; needs no MONAI Deploy.

The SDK's ``DICOMSeriesToVolumeOperator`` stacks a series' slices, sorted along the slice normal, into a
``(D, H, W)`` array of ``apply_rescale`` values (stored value x RescaleSlope + RescaleIntercept), then
``apply_presentation_lut``. The writer here puts a denoised array of those values back into the source
files with ``diffdenoise.io.write_volume``: a derived series with new Series/SOP Instance UIDs, ImageType
DERIVED\\SECONDARY, every other tag kept, and stored values under each file's own bit depth and rescale.

What cannot be inverted is refused, naming the file: a Modality LUT Sequence, a Presentation LUT Sequence
and Presentation LUT Shape INVERSE (the SDK maps x to max(slice) - x, slice by slice), and multi-frame
files (the SDK's volume operator does not stack them either).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from diffdenoise.errors import InputError
from diffdenoise.io import (
    DICOM_MODALITIES,
    DerivedSeriesUIDs,
    Volume,
    file_stem,
    partial_path,
    remove_stale_partials,
    write_volume,
)

__all__ = ["check_invertible", "polarity", "series_volume_id", "write_series"]


def check_invertible(ds) -> None:
    """Refuses a dataset whose SDK volume values cannot be mapped back to stored pixels.

    Raises:
        InputError: multi-frame, Modality LUT Sequence, Presentation LUT Sequence or Shape INVERSE.
    """
    path = getattr(ds, "filename", None) or ds.get("SOPInstanceUID", "dataset")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise InputError(path, "multi-frame DICOM; the Deploy app takes single-frame series "
                         "(use `diffdenoise denoise` for Enhanced/multi-frame files)")  # fmt: skip
    if "ModalityLUTSequence" in ds:
        raise InputError(path, "Modality LUT Sequence (a non-linear stored-to-physical map) cannot be written "
                         "back; use `diffdenoise denoise`")  # fmt: skip
    if "PresentationLUTSequence" in ds:
        raise InputError(path, "Presentation LUT Sequence: MONAI Deploy quantises the volume through it, which "
                         "cannot be undone; use `diffdenoise denoise`")  # fmt: skip
    if str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE":
        raise InputError(path, "Presentation LUT Shape INVERSE: MONAI Deploy maps each slice to max(slice) - x, "
                         "which cannot be undone; use `diffdenoise denoise`")  # fmt: skip


def polarity(ds) -> int:
    """+1 if higher values are brighter (MONOCHROME2), -1 for MONOCHROME1.

    diffdenoise trains on images where higher is brighter (its reader mirrors MONOCHROME1), and the
    SDK's volume keeps MONOCHROME1 as stored; negating it gives the same normalised slices.
    """
    return -1 if str(ds.get("PhotometricInterpretation") or "").strip().upper() == "MONOCHROME1" else 1


def series_volume_id(files: Sequence[str], series_uid: str) -> str:
    """Output name of a series, as ``diffdenoise denoise`` names it: file stem, or folder + UID hash."""
    if len(files) == 1:
        return file_stem(Path(files[0]))
    return f"{Path(files[0]).parent.name}_{hashlib.sha1(series_uid.encode()).hexdigest()[:8]}"


def write_series(datasets: Sequence, array, out, derivation: str = "", report: dict | None = None) -> Path:
    """Writes ``array`` as a derived copy of the series ``datasets`` into the folder ``out``.

    Args:
        datasets: the series' pydicom datasets in the order of ``array``'s first axis, each read from a
            file (``ds.filename``), as the SDK's ``DICOMSeries.get_sop_instances()`` holds them after
            ``DICOMSeriesToVolumeOperator`` sorted them.
        array: ``(D, H, W)`` values in the SDK volume's units (stored x slope + intercept).
        out: folder to write into; created if missing.
        derivation: DerivationDescription.
        report: if given, written beside the series as ``<volume_id>.json`` with the output paths added.

    Returns:
        The written series: ``out/<volume_id>/`` (one file per input file, same names), or
        ``out/<volume_id>.dcm`` for a one-file series. An existing one of that name is replaced, and it
        appears only once complete: it is built in ``out/.<volume_id>.<host>.<pid>.<hex>.partial``, and
        what a killed run left there is removed by the next (``diffdenoise.io.remove_stale_partials``).

    Raises:
        InputError: a slice count or size that differs from ``array``, a dataset not read from a file,
            or one ``check_invertible`` refuses.
    """
    array = np.asarray(array, dtype=np.float32)
    out = Path(out)
    if array.ndim != 3 or len(array) != len(datasets):
        raise InputError(out, f"the image has shape {array.shape} but the series {len(datasets)} slices")
    files = []
    for k, ds in enumerate(datasets):
        check_invertible(ds)
        path = getattr(ds, "filename", None)
        if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
            where = ds.get("SOPInstanceUID", f"slice {k}")
            raise InputError(where, "dataset not read from a file; cannot copy its tags")
        if (int(ds.Rows), int(ds.Columns)) != array.shape[1:]:
            raise InputError(path, f"{ds.Rows}x{ds.Columns} pixels, but the image slices are {array.shape[1:]}")
        files.append(str(path))
    first = datasets[0]
    series_uid = str(first.SeriesInstanceUID)
    volume_id = series_volume_id(files, series_uid)
    meta = {  # the keys diffdenoise.io.write_volume reads for DICOM (see Volume.meta)
        "format": "dicom",
        "files": files,
        "frame_numbers": [0] * len(files),
        "SeriesInstanceUID": series_uid,
        "monochrome1_inverted": False,  # the SDK volume keeps MONOCHROME1 as stored
    }
    modality = DICOM_MODALITIES.get(str(first.get("Modality") or "").upper(), "other")
    source = os.path.commonpath(files) if len(files) > 1 else files[0]
    volume = Volume(array, source, volume_id, str(first.get("PatientID") or volume_id), modality, meta)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out / volume_id)  # what a killed earlier run left
    staging = partial_path(out / volume_id)
    staging.mkdir()
    try:
        series_uids = DerivedSeriesUIDs()
        written = write_volume(volume, array, staging / volume_id, derivation, series_uids)
        final = out / written.name
        if report is not None:
            report = {
                **report,
                "input": str(Path(source).resolve()),
                "output": str(final.resolve()),
                "slices": len(files),
                "SeriesInstanceUID": series_uids[series_uid],
                "source_SeriesInstanceUID": series_uid,
            }
            (staging / f"{volume_id}.json").write_text(json.dumps(report, indent=1, default=_plain))
        for item in sorted(staging.iterdir()):
            target = out / item.name
            if target.exists() or target.is_symlink():  # an older output: deleted with the staging folder
                target.rename(staging / f"{item.name}.replaced")
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _plain(value):
    """JSON fallback for numpy scalars and arrays in a report."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
