"""How close are the no-reference PSNR estimates (diffdenoise.quality) to the true PSNR? Issue 19, docs/results.md.

Reads a finished benchmark folder (``diffdenoise benchmark --out OUT``): for every case with clean references
and every DiffDenoise pipeline it trained (``work/pipeline*/state.json``: the paper's and the leak-free one),
builds each trained stage's denoiser as the benchmark does, and scores it on the case's test slices twice:
against the clean slices (true PSNR) and from the noisy slices alone (SURE / PURE, with the case's known noise
level and with the level ``diffdenoise.noise_level`` estimates on the noisy test slices). Outputs are clipped to
[0, 1] in both, as ``diffdenoise denoise`` writes them.

    OMP_NUM_THREADS=1 python scripts/quality_check.py runs/bench_leak_free --out docs/quality_check.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffdenoise.benchmark import _test_items
from diffdenoise.pipeline import DENOISER_OUTPUTS, LABELS, STAGES, pipeline_steps
from diffdenoise.quality import estimate_gain, psnr_from_mse, resolve_noise_level
from diffdenoise.stages import stage_denoiser

def check_case(case: Path, max_slices: int) -> list[dict]:
    items = _test_items(case / "data" / "datalist.json", max_slices)
    noisy = [np.load(item["image"]) for item in items]
    clean = [np.load(item["clean"]) for item in items]
    rows = []
    for state_file in sorted(case.glob("work/pipeline*/state.json")):
        run = json.loads(state_file.read_text())
        keys, overlays = run["run"]["keys"], run["run"]["overlays"]
        if keys.get("noise_level") is None:
            continue
        model, level, corr = keys["noise_model"], keys["noise_level"], keys.get("noise_correlation_sigma", 0.0)
        estimated_level, _ = resolve_noise_level(noisy, model, None, corr)
        steps = {step.name: step for step in pipeline_steps(Path(keys["dataset_dir"]))}
        for key, (config, inferer_key) in DENOISER_OUTPUTS.items():
            trained_by = next(stage.configs[0] for stage in STAGES if key in stage.outputs)
            if trained_by not in run["seconds"]:
                continue
            started = time.perf_counter()
            denoiser = stage_denoiser(config, overlays + list(steps[config].overlays), keys, inferer_key)
            true = psnr_from_mse([np.mean((np.clip(denoiser(y[None])[0], 0, 1) - x) ** 2) for y, x in zip(noisy, clean)])
            known = estimate_gain(denoiser, noisy, model, level, corr)
            guessed = estimate_gain(denoiser, noisy, model, estimated_level, corr)
            true_input = psnr_from_mse([np.mean((np.clip(y, 0, 1) - x) ** 2) for y, x in zip(noisy, clean)])
            rows.append({"case": case.name, "pipeline": state_file.parent.name, "stage": LABELS[key],
                         "true_input": true_input.mean(), "true": true.mean(),
                         "estimated": known.psnr_output.mean(), "estimated_input": known.psnr_input.mean(),
                         "estimated_level": guessed.psnr_output.mean(), "level": level,
                         "estimated_level_input": guessed.psnr_input.mean(),
                         "level_estimate": estimated_level, "slices": len(noisy),
                         "seconds": time.perf_counter() - started})
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | pipeline | stage | true PSNR input | estimated input | true PSNR output | estimated (known level) "
             "| error (dB) | true gain | estimated gain | level: known / estimated | estimated gain (estimated level) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['pipeline']} | {r['stage']} | {r['true_input']:.2f} | "
                     f"{r['estimated_input']:.2f} | {r['true']:.2f} | {r['estimated']:.2f} | "
                     f"{r['estimated'] - r['true']:+.2f} | {r['true'] - r['true_input']:+.2f} | "
                     f"{r['estimated'] - r['estimated_input']:+.2f} | {r['level']:.4g} / {r['level_estimate']:.4g} | "
                     f"{r['estimated_level'] - r['estimated_level_input']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="a benchmark --out folder")
    parser.add_argument("--cases", default="*", help="glob of case folders under BENCH/cases")
    parser.add_argument("--max_slices", type=int, default=8, help="test slices per case, evenly spaced")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    rows = [row for case in sorted((args.bench / "cases").glob(args.cases)) for row in check_case(case, args.max_slices)]
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
