"""What each trained stage of a fitted bundle is estimated to gain over the noisy input, and the default mode.

``diffdenoise fit`` has no clean scan to score its stages against, yet the stages differ in how well they
denoise a given dataset (docs/results.md). So after training it runs every mode ``diffdenoise denoise`` offers
on the validation slices (never trained on) and scores it from the noisy slices alone (``diffdenoise.quality``:
SURE / PURE), then:

- writes the table to ``RUN_DIR/report.md`` and ``RUN_DIR/configs/metadata.json`` (``diffdenoise_assessment``);
- sets ``default_mode`` in the bundle's configs to the mode with the highest estimated gain, and to null when
  no mode is estimated to beat the input: a mode that does not help is never the default, and
  ``denoise --mode auto`` then stops and says so.

With several iterations the bundle's SRDS and student are the last iteration's, and so are their rows.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser

from diffdenoise.data import evenly_spaced, load_datalist
from diffdenoise.denoise import load_model, trained_modes
from diffdenoise.noise_level import estimate_from_datalist
from diffdenoise.quality import QualityEstimate, estimate_gain

logger = logging.getLogger(__name__)

MODE_LABELS = {"bsn": "stage 1: BSN + re-injection", "srds": "stages 2-3: diffusion (SRDS / antithetic Tweedie)",
               "student": "stage 4: distilled student"}
REPORT = "report.md"
METADATA_KEY = "diffdenoise_assessment"
# slices each mode is scored on: each costs every mode two evaluations (diffdenoise.quality)
ASSESSED_SLICES = 8


@dataclass(frozen=True)
class Assessment:
    """Each mode's estimate on the same slices with the same noise, and the mode chosen as the default."""

    estimates: dict[str, QualityEstimate]
    seconds: dict[str, float]
    split: str
    noise_level_source: str
    default_mode: str | None

    def table(self) -> str:
        """Markdown: one row per mode, estimated PSNR of the input and the output and the gain, the default marked."""
        rows = ["| mode | stage | estimated PSNR input (dB) | estimated PSNR output (dB) | estimated gain (dB) | "
                "seconds | note |", "|---|---|---|---|---|---|---|"]
        for mode, estimate in self.estimates.items():
            chosen = " (default)" if mode == self.default_mode else ""
            note = (f"{estimate.implausible_slices} slices estimated noise-free: the noise level is probably too "
                    "high; set noise_level if you know it" if estimate.implausible_slices else "")
            rows.append(f"| `{mode}`{chosen} | {MODE_LABELS[mode]} | {np.mean(estimate.psnr_input):.2f} | "
                        f"{np.mean(estimate.psnr_output):.2f} | {estimate.gain_db:+.2f} | {self.seconds[mode]:.0f} | "
                        f"{note} |")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        first = next(iter(self.estimates.values()))
        noise = {k: v for k, v in first.summary().items() if k.startswith("noise_")}
        return {"default_mode": self.default_mode, "split": self.split, "slices": len(first.psnr_input),
                "noise_level_source": self.noise_level_source, **noise,
                "estimator": "diffdenoise.quality (SURE / generalised SURE / PURE, Monte-Carlo divergence)",
                "modes": {mode: {k: v for k, v in e.summary().items() if not k.startswith("noise_")}
                          for mode, e in self.estimates.items()}}


def choose_default(estimates: dict[str, QualityEstimate]) -> str | None:
    """The mode with the highest estimated gain, or None when none is estimated above the input."""
    best = max(estimates, key=lambda mode: estimates[mode].gain_db, default=None)
    return best if best is not None and estimates[best].gain_db > 0 else None


def assessed_items(datalist, max_slices: int = ASSESSED_SLICES) -> tuple[str, list[dict]]:
    """The split and the slices ``assess_bundle`` scores: up to ``max_slices`` evenly spaced validation slices, or
    training slices when there are no validation slices."""
    split = "validation" if load_datalist(datalist, "validation") else "training"
    items = load_datalist(datalist, split)
    return split, [items[k] for k in evenly_spaced(len(items), max_slices)]


def assess_bundle(bundle, dataset_dir, max_slices: int = ASSESSED_SLICES, device: str | None = None,
                  seed: int = 0) -> Assessment:
    """Scores every mode the bundle holds a checkpoint for, on up to ``max_slices`` evenly spaced validation slices
    of its prepared dataset (the training slices when there are no validation slices, said in ``split``).

    The noise is the bundle's (``noise_model``, ``noise_correlation_sigma``, and ``noise_level``, or where that is
    null the level the leak-free stage trained with: ``estimate_from_datalist`` on the training slices)."""
    bundle, datalist = Path(bundle), Path(dataset_dir) / "datalist.json"
    common = ConfigParser.load_config_file(bundle / "configs" / "common.yaml")
    model, corr = common.get("noise_model", "gaussian"), float(common.get("noise_correlation_sigma") or 0.0)
    level, source = common.get("noise_level"), "bundle"
    if level is None:
        level, source = estimate_from_datalist(datalist, model, corr), "estimated on the training slices"
    split, items = assessed_items(datalist, max_slices)
    noisy = [np.load(item["image"]) for item in items]
    estimates, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        # fit assesses the bundle before it is renamed into place: its configs name the final dataset_dir
        overlay = Path(tmp) / "dataset.yaml"
        overlay.write_text(json.dumps({"dataset_dir": str(Path(dataset_dir).absolute())}))
        denoisers = {mode: load_model(bundle, mode, device, [str(overlay)]) for mode in trained_modes(bundle)}
    for mode, denoiser in denoisers.items():
        started = time.perf_counter()
        estimates[mode] = estimate_gain(denoiser, noisy, model, float(level), corr, seed)
        seconds[mode] = time.perf_counter() - started
        logger.info("%s: estimated gain %+.2f dB on %d %s slices", mode, estimates[mode].gain_db, len(noisy), split)
    return Assessment(estimates, seconds, split, source, choose_default(estimates))


def write_assessment(bundle, assessment: Assessment) -> Path:
    """``report.md``, the metadata entry and ``default_mode`` in every config of the bundle that sets it."""
    bundle = Path(bundle)
    configs = bundle / "configs"
    for path in sorted(configs.glob("*.yaml")):
        config = ConfigParser.load_config_file(path)
        if "default_mode" in config:
            config["default_mode"] = assessment.default_mode
            ConfigParser.export_config_file(config, str(path), fmt="yaml", sort_keys=False)
    metadata_path = configs / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata[METADATA_KEY] = assessment.as_dict()
    metadata_path.write_text(json.dumps(metadata, indent=4) + "\n")
    report = bundle / REPORT
    report.write_text(_report_text(assessment))
    return report


def _report_text(assessment: Assessment) -> str:
    first = next(iter(assessment.estimates.values()))
    default = (f"`diffdenoise denoise` uses `{assessment.default_mode}` unless told otherwise (`--mode auto`)."
               if assessment.default_mode else
               "No mode is estimated to beat the noisy input, so the bundle has no default: `diffdenoise denoise` "
               "needs `--mode` to run one anyway.")
    return (f"# What each stage is estimated to gain\n\n"
            f"No clean image was used. Each mode denoised {len(first.psnr_input)} {assessment.split} slices, and its "
            f"PSNR was estimated from the noisy slices alone (diffdenoise.quality: SURE for Gaussian noise, "
            f"generalised SURE for correlated Gaussian, PURE for Poisson), with the noise model "
            f"`{first.noise_model}`, level {first.noise_level:.6g} ({assessment.noise_level_source}) and correlation "
            f"kernel {first.noise_correlation_sigma:g} px. Estimates assume that noise model and level: with the "
            f"true level they were within 0.2 dB of the true PSNR on synthetic cases, while a level a few percent "
            f"too high overstates a strong denoiser's gain by dBs, and white noise assumed where the noise is "
            f"spatially correlated favours outputs that copy it (docs/results.md, issue 19). Pass `--noise_level` "
            f"and `--overlays noise/correlated` when you know them.\n\n{assessment.table()}\n\n{default}\n")
