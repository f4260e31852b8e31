"""The offline demo: real brain MRI that ships inside an installed package, known noise, every built stage.

Data: the MNI152 T1 template (ICBM 2009a, 1 mm) that nilearn installs with itself, so the demo needs
neither ``../shared`` nor a network. It is an average of many scans and nearly noise-free, which makes it
a fair clean reference for synthetic noise. The demo prepares noisy slices, runs the stages in order
with one preset, scores every stage on the test split and writes ``report.md`` with a figure.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from diffdenoise.data import evenly_spaced, load_datalist, prepare
from diffdenoise.metrics import score_datalist
from diffdenoise.pipeline import DEFAULT_METHOD, DENOISER_OUTPUTS, LABELS, bundle_overlays, run_pipeline, stage_keys
from diffdenoise.quality import estimate_mse, psnr_from_mse, resolve_noise_level
from diffdenoise.report import save_visual_grid, score_table
from diffdenoise.stages import stage_denoiser

logger = logging.getLogger(__name__)


def demo_volume() -> Path:
    """Path of the MNI152 T1 template NIfTI bundled with nilearn (no download)."""
    from nilearn.datasets import MNI152_FILE_PATH

    return Path(MNI152_FILE_PATH)


def run_demo(out: str = "diffdenoise_demo", preset: str = "demo", noise: str = "gaussian",
             level: float = 15 / 255, seed: int = 0, downsample: int = 2, method: str = DEFAULT_METHOD) -> Path:
    """Prepare the demo data, run every built stage with ``configs/presets/<preset>.yaml``, write a report.

    Args:
        out: a new or empty folder for data, models, logs and the report.
        preset: ``smoke`` (minutes), ``demo`` (about 15 minutes on 2 cores), ``cpu`` or ``paper`` (GPU).
        noise, level: the synthetic noise added to the clean template (see ``diffdenoise.noise``).
        method: stages 2-3, ``leak_free`` or ``paper`` (``diffdenoise.pipeline.DIFFUSION_METHODS``).
        seed: fixes the noise realisation and the training.
        downsample: average the template over k x k blocks first (2: 2 mm slices, a quarter of the pixels,
            which keeps SRDS over every slice within the demo's time).

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    started = time.perf_counter()
    data_dir = out / "data"
    datalist = prepare(demo_volume(), data_dir, noise=noise, level=level, modality="mri", seed=seed,
                       downsample=downsample)
    timings = {"prepare": time.perf_counter() - started}
    # the noise is known here, so the stage-1 denoiser re-injects with the true level
    overlays = bundle_overlays(preset, method)
    settings = {"seed": seed, "noise_model": noise, "noise_level": level}
    datalist, seconds = run_pipeline(data_dir, out / "bundle", overlays, **settings)
    keys = {"dataset_dir": str(data_dir), "bundle_root": str(out / "bundle"), **stage_keys(data_dir), **settings}
    timings.update(seconds)
    estimates = no_reference_table(datalist, overlays, keys)
    timings["total"] = time.perf_counter() - started
    return write_report(out, datalist, estimates, preset=preset, noise=noise, level=level, timings=timings)


def no_reference_table(datalist: Path, overlays, keys: dict, max_slices: int = 8) -> str:
    """Each denoising stage's PSNR on up to ``max_slices`` test slices, true (against the clean template) and
    estimated from the noisy slices alone (``diffdenoise.quality``): with the known noise level, and with the level
    measured on the slices, as ``diffdenoise denoise`` does for a scan whose level is unknown."""
    items = load_datalist(datalist, "test")
    picks = evenly_spaced(len(items), max_slices)
    noisy = [np.load(items[k]["image"]) for k in picks]
    clean = [np.load(items[k]["clean"]) for k in picks]
    model, known = keys["noise_model"], keys["noise_level"]
    measured, _ = resolve_noise_level(noisy, model, None)
    rows = [f"Noise level known: {known:.5f}; measured on the slices (diffdenoise.noise_level): {measured:.5f}. "
            f"{len(noisy)} test slices; outputs clipped to [0, 1] as `diffdenoise denoise` writes them. An estimate "
            "is only as good as its level: a level too high by a few percent can drive the estimated MSE of a "
            "strong denoiser to zero (100 dB).", "",
            "| output | true PSNR (dB) | estimated, known level (dB) | estimated - true | estimated, measured level "
            "(dB) | estimated - true |", "|---|---|---|---|---|---|"]
    denoisers = {"image": lambda batch: batch}
    denoisers.update({key: stage_denoiser(config, overlays, keys, inferer) for key, (config, inferer)
                      in DENOISER_OUTPUTS.items() if key in items[0]})
    for key, denoiser in denoisers.items():
        true = psnr_from_mse([np.mean((np.clip(denoiser(y), 0, 1) - x) ** 2) for y, x in zip(noisy, clean)]).mean()
        with_known, with_measured = (psnr_from_mse(estimate_mse(denoiser, noisy, model, level)).mean()
                                     for level in (known, measured))
        rows.append(f"| {LABELS[key]} | {true:.2f} | {with_known:.2f} | {with_known - true:+.2f} | "
                    f"{with_measured:.2f} | {with_measured - true:+.2f} |")
    return "\n".join(rows)


def write_report(out: Path, datalist: Path, estimates: str = "", **facts) -> Path:
    """Score the test split of ``datalist`` for the noisy input and every stage output; figure + markdown."""
    keys = [k for k in LABELS if k in load_datalist(datalist, "test")[0]]
    scores = score_datalist(datalist, keys)
    items = load_datalist(datalist, "test")
    middle = items[len(items) // 2]
    clean = np.load(middle["clean"])
    figure = save_visual_grid([np.load(middle[k]) for k in keys] + [clean],
                              [LABELS[k] for k in keys] + ["clean reference"], clean,
                              out / "figures" / "demo_comparison.png")
    facts["seconds"] = {k: round(v, 1) for k, v in facts.pop("timings").items()}
    lines = [
        "# diffdenoise demo report",
        "",
        "Data: MNI152 T1 template (nilearn), synthetic noise added once with a fixed seed; scores on the "
        "test split against the clean template (clean slices never train anything).",
        "",
        score_table(scores, LABELS),
        "",
        *(["## Without a clean image: the no-reference estimate (SURE)", "", estimates, ""] if estimates else []),
        f"![comparison]({figure.relative_to(out)})",
        "",
        "```json",
        json.dumps(facts, indent=1),
        "```",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
