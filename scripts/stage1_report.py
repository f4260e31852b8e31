"""Stage 1 under the box and the learned prior, from a finished benchmark folder. Issue 17, docs/results.md.

For every case and every stage-1 run the benchmark trained (``work/pipeline/``: the box prior, trained with the
MSE loss; ``work/pipeline_learned/``: the learned prior, trained by the likelihood), on the case's scored test
slices: the PSNR of the blind mean x_c and of the posterior mean (the stage-1 denoiser), so the posterior's own
gain shows (with a correlated-noise blind spot too); how calibrated the posterior std is (mean predicted variance
over the squared error actually made); and, where the level was learned (``noise_level`` null), the learned
level beside the true one and the patch-PCA estimate on the training slices (``diffdenoise.noise_level``).

    OMP_NUM_THREADS=1 python scripts/stage1_report.py runs/bench_leak_free runs/bench_b17_unknown
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from diffdenoise.benchmark import _test_items
from diffdenoise.metrics import psnr
from diffdenoise.noise_level import estimate_from_datalist
from diffdenoise.pipeline import pipeline_steps
from diffdenoise.prior_likelihood import learned_noise_level
from diffdenoise.stages import stage_parser


def stage_one(case: Path, run_dir: Path) -> dict | None:
    """One stage-1 run of a case scored on its test slices, or None where it has not trained stage 1."""
    state = json.loads((run_dir / "state.json").read_text())
    if "train_bsn" not in state["seconds"]:
        return None
    keys, overlays = state["run"]["keys"], state["run"]["overlays"]
    step = next(s for s in pipeline_steps(Path(keys["dataset_dir"])) if s.name == "infer_bsn")
    parser = stage_parser(step.config, [*overlays, *step.overlays], **{**keys, **step.keys})
    parser.get_parsed_content("initialize")
    network, posterior = parser.get_parsed_content("network").eval(), parser.get_parsed_content("bsn_denoiser")
    items = _test_items(case / "data" / "datalist.json", 8)
    blind, denoised, calibration = [], [], []
    with torch.inference_mode():
        for item in items:
            y = torch.from_numpy(np.load(item["image"]))[None, None]
            clean = np.load(item["clean"])
            mean, std = posterior.posterior(y, network)
            blind.append(psnr(posterior.blind_inferer(y, network)[0, 0].numpy(), clean))
            denoised.append(psnr(mean[0, 0].numpy(), clean))
            calibration.append(float(std.square().mean()) / float(np.mean((mean[0, 0].numpy() - clean) ** 2)))
    row = {"case": case.name, "prior": posterior.prior, "model": keys["noise_model"], "blind": np.mean(blind),
           "posterior": np.mean(denoised), "calibration": np.mean(calibration), "level": keys.get("noise_level")}
    if row["level"] is None and posterior.prior == "learned":
        datalist = case / "data" / "datalist.json"
        row["true"] = json.loads(datalist.read_text())["meta"]["arguments"]["level"]
        row["learned"] = learned_noise_level(network, keys["noise_model"])
        row["pca"] = estimate_from_datalist(datalist, keys["noise_model"], keys.get("noise_correlation_sigma", 0.0))
    return row


def _level(row: dict, key: str) -> str:
    scale, unit = (255, "/255") if row["model"] in ("gaussian", "rician") else (1, "")
    text = f"{row[key] * scale:.4g}{unit}"
    return text if row.get("true") is None or key == "true" else f"{text} ({row[key] / row['true'] - 1:+.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benches", type=Path, nargs="+", help="benchmark --out folders")
    parser.add_argument("--cases", default="*", help="glob of case folders under BENCH/cases")
    args = parser.parse_args()
    print("| bench | case | prior | level | blind mean x_c | posterior | posterior gain | predicted / actual MSE "
          "| learned level (error) | patch PCA (error) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bench in args.benches:
        for case in sorted((bench / "cases").glob(args.cases)):
            if not (case / "data" / "datalist.json").is_file():
                continue
            for run_dir in (case / "work" / "pipeline", case / "work" / "pipeline_learned"):
                if not (run_dir / "state.json").is_file() or (row := stage_one(case, run_dir)) is None:
                    continue
                if "true" in row:
                    level, learned, pca = f"learned; true {_level(row, 'true')}", _level(row, "learned"), _level(row, "pca")
                else:
                    level, learned, pca = ("given" if row["level"] is not None else "per image (box)"), "", ""
                print(f"| {bench.name} | {case.name} | {row['prior']} | {level} | {row['blind']:.2f} | "
                      f"{row['posterior']:.2f} | {row['posterior'] - row['blind']:+.2f} | {row['calibration']:.2f} | "
                      f"{learned} | {pca} |", flush=True)


if __name__ == "__main__":
    main()
