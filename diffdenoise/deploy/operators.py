"""MONAI Deploy operators: a float-preserving denoiser and a DICOM image-series writer.

``DenoiseOperator`` replaces the SDK's ``MonaiBundleInferenceOperator``, which casts image outputs to
uint8 (it was built for label maps) and would destroy a denoised image. It runs
``diffdenoise.denoise.denoise_volume`` on the SDK ``Image``: normalisation as in training, slice batches,
the inverse mapping with values outside the normalisation range passed through, float32 out in the input's
units. ``DICOMSeriesWriterOperator`` writes that array as a derived DICOM series (the SDK writes only
SEG, SR and PDF) with ``diffdenoise.deploy.dicom.write_series``.

Example (inside ``Application.compose``; see ``diffdenoise.deploy.app``)::

    denoise_op = DenoiseOperator(self, model_path=Path("models/model.ts"), name="denoise_op")
    writer_op = DICOMSeriesWriterOperator(self, output_folder=Path("output"), name="writer_op")
    self.add_flow(series_to_vol_op, denoise_op, {("image", "image")})
    self.add_flow(series_selector_op, denoise_op, {("study_selected_series_list", "study_selected_series_list")})
    self.add_flow(denoise_op, writer_op, {("image", "image")})
    self.add_flow(series_selector_op, writer_op, {("study_selected_series_list", "study_selected_series_list")})
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from monai.deploy.core import ConditionType, Fragment, Image, Operator, OperatorSpec

from diffdenoise import __version__
from diffdenoise.data import NORMALISATION_RULE
from diffdenoise.denoise import denoise_volume
from diffdenoise.deploy.dicom import check_invertible, polarity, write_series
from diffdenoise.deploy.model import load_denoiser
from diffdenoise.io import DICOM_MODALITIES, Volume

__all__ = ["DenoiseOperator", "DICOMSeriesWriterOperator", "REPORT_KEY"]

REPORT_KEY = "diffdenoise"  # Image metadata key holding the denoising report (statistics, model, timings)


class DenoiseOperator(Operator):
    """Denoises an SDK ``Image`` (``(D, H, W)``, e.g. from ``DICOMSeriesToVolumeOperator``) slice by slice.

    Named inputs:
        image: the volume; values in physical units (CT in HU), slices along the first axis.
        study_selected_series_list: optional; when connected, the series the image came from is checked
            (``check_invertible``) before the model runs, and MONOCHROME1 is negated so that, as in
            training, higher is brighter.

    Named output:
        image: float32 ``(D, H, W)`` in the input's units, the input's metadata plus ``metadata()["diffdenoise"]``
            (noise sigma before/after, intensity range, model, timings, ``derivation``).

    Args:
        fragment: the Application.
        model_path: TorchScript file, folder holding one, or bundle folder (``diffdenoise.deploy.model``).
        device: "cpu", "cuda"; None picks cuda when available.
        modality: "mri", "ct", "xray" or "other" as given to ``prepare`` in training; None maps the DICOM
            Modality (MR, CT, CR/DX, ...).
        ct_window: HU mapped to [0, 1] for CT, as in training.
        batch_size: slices per forward pass.
        mode, config: for a bundle folder without ``model.ts`` (see ``diffdenoise.denoise.load_model``).
        inferer_key: inferer key in the configs embedded in a TorchScript file.

    The model is loaded here, so a bad model path fails before any DICOM is read.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        model_path: Path,
        device: str | None = None,
        modality: str | None = None,
        ct_window: Sequence[float] = (-100.0, 200.0),
        batch_size: int = 8,
        mode: str | None = None,
        config: Sequence[str] = (),
        inferer_key: str = "inferer",
        **kwargs,
    ):
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.model = load_denoiser(model_path, device, mode, config, inferer_key)
        self.modality, self.ct_window, self.batch_size = modality, tuple(ct_window), int(batch_size)
        self.input_name_image, self.input_name_series = "image", "study_selected_series_list"
        self.output_name_image = "image"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_image)
        spec.input(self.input_name_series).condition(ConditionType.NONE)  # optional
        spec.output(self.output_name_image)

    def compute(self, op_input, op_output, context):
        image = op_input.receive(self.input_name_image)
        try:
            series_list = op_input.receive(self.input_name_series)
        except Exception:  # not connected
            series_list = None
        op_output.emit(self.denoise(image, series_list), self.output_name_image)

    def denoise(self, image: Image, series_list=None) -> Image:
        """The denoised ``Image``; ``series_list`` as the optional input (may be None)."""
        started = time.perf_counter()
        metadata = dict(image.metadata() or {})
        array = np.asarray(image.asnumpy(), dtype=np.float32)
        if array.ndim == 2:
            array = array[None]
        datasets = find_series_datasets(series_list, metadata.get("SeriesInstanceUID")) if series_list else []
        for ds in datasets:
            check_invertible(ds)
        sign = polarity(datasets[0]) if datasets else 1
        modality = self.modality or DICOM_MODALITIES.get(str(metadata.get("Modality") or "").upper(), "other")
        uid = str(metadata.get("SeriesInstanceUID") or "image")
        volume = Volume(array * sign if sign < 0 else array, uid, uid, uid, modality, {"format": "dicom"})
        self._logger.info("denoising %s: %d slices of %dx%d, modality %s, model %s (%s) on %s", uid, *array.shape,
                          modality, self.model.path, self.model.inferer_name, self.model.device)  # fmt: skip
        denoised, stats = denoise_volume(volume, self.model, modality, self.ct_window, self.batch_size)
        if sign < 0:
            denoised = -denoised
        metadata[REPORT_KEY] = {
            **stats,
            "normalisation": NORMALISATION_RULE,
            "noise_sigma_method": "skimage.restoration.estimate_sigma per normalised slice, mean over slices",
            "polarity": "MONOCHROME1 negated while denoising" if sign < 0 else "as stored",
            "denoise_s": time.perf_counter() - started,
            "model_file": str(self.model.path),
            "model_sha256": self.model.sha256,
            "inferer": self.model.inferer_name,
            "device": str(self.model.device),
            "derivation": self.model.derivation,
            "diffdenoise_version": __version__,
        }
        self._logger.info("noise sigma %.5f -> %.5f in %.1f s", stats["noise_sigma_before"],
                          stats["noise_sigma_after"], metadata[REPORT_KEY]["denoise_s"])  # fmt: skip
        return Image(denoised, metadata)


class DICOMSeriesWriterOperator(Operator):
    """Writes a processed ``Image`` as a derived DICOM series of the series it was made from.

    Named inputs:
        image: ``(D, H, W)`` values in the SDK volume's units, metadata with the source SeriesInstanceUID
            (as ``DICOMSeriesToVolumeOperator`` sets it) and optionally the ``diffdenoise`` report.
        study_selected_series_list: from ``DICOMSeriesSelectorOperator``; the source series is found in it
            by SeriesInstanceUID, its SOP instances in the order the volume operator sorted them.

    Output: ``output_folder/<volume_id>/`` with one file per source file (same names), or
    ``<volume_id>.dcm`` for one file, plus ``<volume_id>.json`` (the report, output path, new and source
    SeriesInstanceUID). See ``diffdenoise.deploy.dicom.write_series``.

    Args:
        fragment: the Application.
        output_folder: where to write.
        derivation: DerivationDescription; default the report's ``derivation``.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, derivation: str | None = None, **kwargs):
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.output_folder = Path(output_folder)
        self.derivation = derivation
        self.input_name_image, self.input_name_series = "image", "study_selected_series_list"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_image)
        spec.input(self.input_name_series)

    def compute(self, op_input, op_output, context):
        image = op_input.receive(self.input_name_image)
        series_list = op_input.receive(self.input_name_series)
        self.write(image, series_list)

    def write(self, image: Image, series_list) -> Path:
        """Writes ``image``; returns the written series (folder or file)."""
        started = time.perf_counter()
        metadata = image.metadata() or {}
        datasets = find_series_datasets(series_list, metadata.get("SeriesInstanceUID"))
        array = np.asarray(image.asnumpy(), dtype=np.float32)
        report = dict(metadata.get(REPORT_KEY) or {})
        derivation = self.derivation or report.get("derivation", f"diffdenoise {__version__}")
        written = write_series(datasets, array.reshape(len(datasets), *array.shape[-2:]), self.output_folder,
                               derivation, report)  # fmt: skip
        self._logger.info("wrote %s (%d slices) in %.1f s", written, len(datasets), time.perf_counter() - started)
        return written


def find_series_datasets(series_list, series_uid) -> list:
    """The native pydicom datasets of the selected series ``series_uid``, in the SDK's volume order.

    ``DICOMSeriesToVolumeOperator`` sorts a series' SOP instances in place along the slice normal (and drops
    slices without position) before stacking them, so ``get_sop_instances()`` is in the volume's order once
    it has run; the order is checked here.

    Raises:
        ValueError: the series is not in ``series_list``, or its instances are not sorted along the normal.
    """
    for study_selected in series_list or []:
        for selected in study_selected.selected_series:
            if str(selected.series.SeriesInstanceUID) == str(series_uid):
                datasets = [sop.get_native_sop_instance() for sop in selected.series.get_sop_instances()]
                _check_sorted(datasets)
                return datasets
    raise ValueError(f"series {series_uid} is not among the selected series; connect the selector's output")


def _check_sorted(datasets) -> None:
    """Slice positions along the normal must not decrease, as DICOMSeriesToVolumeOperator leaves them."""
    if len(datasets) < 2:
        return
    try:
        iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        along = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in datasets]
    except (AttributeError, ValueError):
        raise ValueError("slices without ImagePositionPatient/ImageOrientationPatient; cannot check their order")
    if np.any(np.diff(along) < -1e-4):
        raise ValueError("the series' SOP instances are not in the volume's order (sorted along the slice "
                         "normal); run DICOMSeriesToVolumeOperator on this series first")  # fmt: skip
