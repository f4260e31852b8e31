"""MONAI Deploy application: denoise a DICOM series with a diffdenoise model, write a derived series.

Pipeline: ``DICOMDataLoaderOperator`` (every DICOM file under the input folder) ->
``DICOMSeriesSelectorOperator`` (MR, CT, CR or DX series; the one with the most instances goes first) ->
``DICOMSeriesToVolumeOperator`` (the first selected series, sorted along the slice normal, rescaled) ->
``DenoiseOperator`` (float kept) -> ``DICOMSeriesWriterOperator`` (derived series + JSON report).

Run it as the SDK documents for its apps (the ``monai-deploy`` command of SDK < 3 is gone in 4.0)::

    python -m diffdenoise.deploy.app -i DICOM_FOLDER -o OUTPUT_FOLDER -m models/model.ts
    python -m diffdenoise.deploy -i ... -o ... -m ...        # the same
    # or with HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH set (the MAP convention)

``-m`` takes a TorchScript file, a folder holding ``model.ts`` / ``models/model.ts`` /
``<name>/model.ts``, or a bundle folder (see ``diffdenoise.deploy.model``). The SDK's argument parser
accepts only ``-i -o -m -w -l -t``, so the app's own options are environment variables:

====================================  ==========================================================
``DIFFDENOISE_DEVICE``                cpu or cuda (default: cuda when available)
``DIFFDENOISE_BATCH_SIZE``            slices per forward pass (default 8)
``DIFFDENOISE_MODALITY``              mri, ct, xray or other, as in training (default: from DICOM)
``DIFFDENOISE_CT_WINDOW``             HU window for CT, as in training (default ``-100,200``)
``DIFFDENOISE_SERIES_RULES``          SDK selection rules: JSON text or file, or ``all`` (every series)
``DIFFDENOISE_INFERER_KEY``           inferer key in model.ts's embedded configs (default ``inferer``)
``DIFFDENOISE_MODE``                  bundle folder only: bsn, student or srds (default: student, else bsn)
``DIFFDENOISE_CONFIG``                bundle folder only: comma-separated overlays used in training
====================================  ==========================================================

Python::

    import sys
    from diffdenoise.deploy.app import DenoiseApp
    DenoiseApp([sys.executable, "app", "-i", "in", "-o", "out", "-m", "model.ts"], device="cpu").run()
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator, DICOMSeriesToVolumeOperator

from diffdenoise.deploy.operators import DenoiseOperator, DICOMSeriesWriterOperator
from diffdenoise.errors import InputError

__all__ = ["DEFAULT_RULES", "DenoiseApp", "main"]

# One selection: every MR, CT, CR or DX series of a study; with sort_by_sop_instance_count the largest
# comes first, and DICOMSeriesToVolumeOperator converts only that one.
DEFAULT_RULES = json.dumps(
    {"selections": [{"name": "MR, CT, CR or DX", "conditions": {"Modality": "(?i)^(MR|CT|CR|DX)$"}}]}
)

_ENV = {  # option -> environment variable
    "device": "DIFFDENOISE_DEVICE",
    "batch_size": "DIFFDENOISE_BATCH_SIZE",
    "modality": "DIFFDENOISE_MODALITY",
    "ct_window": "DIFFDENOISE_CT_WINDOW",
    "rules": "DIFFDENOISE_SERIES_RULES",
    "inferer_key": "DIFFDENOISE_INFERER_KEY",
    "mode": "DIFFDENOISE_MODE",
    "config": "DIFFDENOISE_CONFIG",
}


class DenoiseApp(Application):
    """DICOM folder in, a derived (denoised) DICOM series and a JSON report out.

    Args:
        argv: ``[python, app, -i IN, -o OUT, -m MODEL, ...]``; default ``sys.argv``.
        **options: ``device``, ``batch_size``, ``modality``, ``ct_window``, ``rules`` (JSON text, or "" /
            "all" for every series), ``inferer_key``, ``mode``, ``config``; each overrides its
            environment variable (see the module docstring).
    """

    def __init__(self, *args, **options):
        unknown = set(options) - set(_ENV)
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(_ENV)}")
        self._options = options
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(*args)

    def compose(self):
        app_context = Application.init_app_context(self.argv)
        options = _options(self._options)
        self._logger.info("input %s, output %s, model %s, options %s", app_context.input_path,
                          app_context.output_path, app_context.model_path, options)  # fmt: skip
        rules = options.pop("rules")
        loader_op = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(app_context.input_path), name="study_loader_op"
        )
        selector_op = DICOMSeriesSelectorOperator(
            self, rules=rules, all_matched=True, sort_by_sop_instance_count=True, name="series_selector_op"
        )
        to_volume_op = DICOMSeriesToVolumeOperator(self, name="series_to_vol_op")
        denoise_op = DenoiseOperator(self, model_path=Path(app_context.model_path), name="denoise_op", **options)
        writer_op = DICOMSeriesWriterOperator(self, output_folder=Path(app_context.output_path), name="writer_op")

        series = {("study_selected_series_list", "study_selected_series_list")}
        self.add_flow(loader_op, selector_op, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector_op, to_volume_op, series)
        self.add_flow(to_volume_op, denoise_op, {("image", "image")})
        self.add_flow(selector_op, denoise_op, series)
        self.add_flow(denoise_op, writer_op, {("image", "image")})
        self.add_flow(selector_op, writer_op, series)


def _options(given: dict) -> dict:
    """Options from keyword arguments, else the environment, parsed and checked."""
    raw = {key: given.get(key, os.environ.get(env)) for key, env in _ENV.items()}
    options = {key: value for key, value in raw.items() if value is not None and value != ""}
    if "batch_size" in options:
        try:
            options["batch_size"] = int(options["batch_size"])
        except ValueError:
            raise InputError(_ENV["batch_size"], f"{options['batch_size']!r} is not an integer") from None
        if options["batch_size"] < 1:
            raise InputError(_ENV["batch_size"], f"must be >= 1, got {options['batch_size']}")
    if isinstance(options.get("ct_window"), str):
        try:
            low, high = (float(v) for v in options["ct_window"].split(","))
        except ValueError:
            raise InputError(_ENV["ct_window"], f"{options['ct_window']!r} is not LOW,HIGH") from None
        options["ct_window"] = (low, high)
    if isinstance(options.get("config"), str):
        options["config"] = [c.strip() for c in options["config"].split(",") if c.strip()]
    options["rules"] = _rules(raw["rules"])
    return options


def _rules(value) -> str:
    """Selection rules as JSON text: the default, "" for every series, or the given JSON text or file."""
    if value is None:
        return DEFAULT_RULES
    value = str(value).strip()
    if value.lower() in ("", "all"):
        return ""  # DICOMSeriesSelectorOperator selects every series without rules
    text = Path(value).read_text() if not value.startswith("{") and Path(value).is_file() else value
    try:
        rules = json.loads(text)
    except ValueError as exc:
        raise InputError(_ENV["rules"], f"not JSON nor a JSON file ({exc})") from None
    if not isinstance(rules, dict) or not rules.get("selections"):
        raise InputError(_ENV["rules"], 'selection rules need a "selections" list (see DICOMSeriesSelectorOperator)')
    return text


def main(argv=None) -> int:
    """Runs the app on the command line; bad input ends as one line on stderr and exit status 2."""
    try:
        DenoiseApp([sys.executable, *(sys.argv if argv is None else argv)]).run()
    except InputError as exc:
        print(f"diffdenoise deploy: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
