"""The paper's Fig. 4 for one trained snapshot: PSNR of N single DDIM samples vs N SRDS runs, one seed each.

Why: SRDS's claim is that pairing eps with -eps removes the sample-to-sample spread of a single deterministic
sample and lifts its mean; a spread over seeds shows both at once. Every run denoises the same crop (the
centre 128 x 128 of the middle test slice, as scripts/srds_variants.py) with the sampler of
``sample_srds.yaml`` (its step count and x0 clamp); run k uses seed k for both methods, so SRDS run k starts
from the single sample k's noise and its negation.

Writes OUT.json (every PSNR, the references, the settings) and OUT.png (the two distributions with the noisy,
x_c and stage-1 lines), prints a summary.

Usage: python scripts/srds_seeds.py DATASET_DIR SNAPSHOT --out docs/figures/srds_seeds [--seeds 50] [--preset cpu]
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffdenoise.data import load_datalist  # noqa: E402
from diffdenoise.inferers import SRDSInferer  # noqa: E402
from diffdenoise.metrics import psnr  # noqa: E402
from diffdenoise.stages import stage_parser  # noqa: E402


def main(dataset: str, snapshot: str, out: str = "docs/figures/srds_seeds", seeds: int = 50, preset: str = "cpu"):
    """Scores ``seeds`` single samples and ``seeds`` SRDS runs of one crop; writes OUT.json and OUT.png."""
    parser = stage_parser("sample_srds", [f"presets/{preset}"], dataset_dir=dataset)
    network = parser.get_parsed_content("diffusion_def")
    network.load_state_dict(torch.load(snapshot, map_location="cpu", weights_only=True))
    network.eval()
    steps, clip = int(parser["srds_steps"]), parser["srds_clip_x0"]
    items = load_datalist(f"{dataset}/datalist_bsn_posterior.json", "test")
    item = items[len(items) // 2]
    crop = {k: torch.from_numpy(np.load(item[k])[128:256, 80:208].copy())[None, None]
            for k in ("image", "bsn", "clean", "bsn_posterior")}
    noisy, x_c, clean = crop["image"], crop["bsn"], crop["clean"][0, 0]
    references = {"noisy input": psnr(noisy[0, 0], clean), "x_c (BSN, blind)": psnr(x_c[0, 0], clean),
                  "stage-1 denoiser": psnr(crop["bsn_posterior"][0, 0], clean)}
    scores = {"single": [], "srds": []}
    for seed in range(seeds):
        sampler = SRDSInferer(parser.get_parsed_content("noise_scheduler"), num_inference_steps=steps,
                              target=parser["diffusion_target"], residual_scale=parser["residual_scale"],
                              seed=seed, clip_x0=clip)
        eps = torch.randn(noisy.shape, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            scores["single"].append(psnr(sampler.sample(noisy, network, x_c, eps)[0, 0], clean))
            scores["srds"].append(psnr(sampler(noisy, network, condition=x_c)[0, 0], clean))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"slice": item["id"], "crop": "[128:256, 80:208]", "snapshot": str(snapshot), "steps": steps,
              "clip_x0": list(clip) if clip else None, "preset": preset, "commit": commit,
              "references": references, "psnr": scores}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    _plot(scores, references, out.with_suffix(".png"), f"{item['id']}, {steps} DDIM steps, {seeds} seeds")
    for name, values in scores.items():
        print(f"{name}: {np.mean(values):.2f} +- {np.std(values, ddof=1):.2f} dB "
              f"[{np.min(values):.2f}, {np.max(values):.2f}]")
    print(", ".join(f"{k} {v:.2f} dB" for k, v in references.items()))


def _plot(scores: dict, references: dict, path: Path, title: str) -> None:
    """Two jittered columns of per-seed PSNR with horizontal reference lines."""
    fig, ax = plt.subplots(figsize=(5, 4))
    jitter = np.random.default_rng(0)
    for x, (name, values) in enumerate(scores.items()):
        ax.scatter(x + jitter.uniform(-0.15, 0.15, len(values)), values, s=10, label=f"{name} (mean {np.mean(values):.2f})")
    for (name, value), style in zip(references.items(), (":", "--", "-.")):
        ax.axhline(value, color="gray", linestyle=style, label=f"{name} {value:.2f}")
    ax.set_xticks(range(len(scores)), ["single DDIM sample", "SRDS (eps, -eps)"])
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    fire.Fire(main)
