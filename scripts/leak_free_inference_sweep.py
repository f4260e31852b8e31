"""Stage 3 of the leak-free path at other inference settings, on a benchmark case's trained network (no retraining).

Scores the test slices for several (rho, K pairs) with the case's leak-free pipeline run; docs/results.md (issue 16)
uses it to tell whether the inference or the training limits the result:

    OMP_NUM_THREADS=1 python scripts/leak_free_inference_sweep.py runs/bench_leak_free/cases/studyforrest-gaussian-down2
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from diffdenoise.data import evenly_spaced, load_datalist
from diffdenoise.inferers import AntitheticTweedieInferer
from diffdenoise.metrics import psnr
from diffdenoise.stages import stage_parser

SETTINGS = [(0.25, 2), (0.25, 8), (0.5, 2), (0.5, 8), ([0.25, 0.5], 4)]


def main(case_dir: str, max_slices: int = 8) -> None:
    case = Path(case_dir)
    run = json.loads((case / "work" / "pipeline_leak_free" / "state.json").read_text())["run"]
    parser = stage_parser("sample_srds", run["overlays"], **run["keys"])
    parser.get_parsed_content("initialize")
    network = parser.get_parsed_content("network")
    parts = {k: parser.get_parsed_content(k) for k in ("recorruption", "diffusion_condition_fn", "noise_scheduler")}
    items = load_datalist(case / "data" / "datalist.json", "test")
    items = [items[i] for i in evenly_spaced(len(items), max_slices)]
    for rho, pairs in SETTINGS:
        inferer = AntitheticTweedieInferer(parts["recorruption"], parts["noise_scheduler"], rho=rho, num_pairs=pairs,
                                           condition_fn=parts["diffusion_condition_fn"],
                                           pad_multiple=2 ** (len(parser["diffusion_channels"]) - 1))
        scores = [psnr(inferer(torch.as_tensor(np.load(item["image"]))[None, None], network)[0, 0].numpy(),
                       np.load(item["clean"])) for item in items]
        print(f"rho {rho}  pairs {pairs}  PSNR {np.mean(scores):.2f} dB", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
