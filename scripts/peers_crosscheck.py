"""Cross-check of the in-house self-supervised baselines against deepinv's own losses: one case, several seeds.

Why: a gap between two implementations of one method is a bug only when it exceeds what changing the training
seed alone does. Every method of the preset (``configs/benchmark/peers.yaml``) is fitted and scored as
``diffdenoise benchmark`` does it (``run_method``), on one prepared case, once per training seed; the data and
its noise stay fixed (the preset's seed).

Writes OUT/crosscheck.json (per-slice PSNR of every method and seed, fit seconds, commit) and prints mean PSNR per
method and seed, its gain over the noisy input, and each method's mean +- sd over the seeds.

Usage: python scripts/peers_crosscheck.py --preset peers --data ../shared/data --out runs/peers_crosscheck
    --seeds 0,1 [--methods noisy,neighbor2neighbor,deepinv_n2n]
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import fire
import numpy as np
import torch

from diffdenoise.benchmark import METHODS, FitSettings, _test_items, build_cases, load_preset, prepare_case, run_method
from diffdenoise.data import load_datalist


def main(preset: str = "peers", data: str = "../shared/data", out: str = "runs/peers_crosscheck", seeds=(0, 1),
         methods=None):
    """Fits every method of the preset's single case once per seed in ``seeds``; writes OUT/crosscheck.json."""
    config = load_preset(preset, methods=methods)
    (case,) = build_cases(config)
    out = Path(out)
    datalist = prepare_case(case, data, out / case.name, config["seed"])
    items = _test_items(datalist, config["max_test_slices"])
    train = [np.load(item["image"]) for item in load_datalist(datalist, "training")]
    torch.set_num_threads(config["torch_threads"] or torch.get_num_threads())
    records = []
    for seed in (seeds if isinstance(seeds, (list, tuple)) else [seeds]):
        for name in config["methods"]:
            if reason := METHODS[name].missing():
                print(f"skipped {name}: {reason}")
                continue
            settings = FitSettings(case, datalist.parent, config["bundle_preset"], int(seed),
                                   config["method_settings"].get(name, {}))
            record = run_method(name, settings, train, items, out / case.name / "work" / f"{name}-{seed}",
                                items[len(items) // 2]["id"])
            record.pop("figure")
            records.append({**record, "seed": int(seed), "options": dict(settings.options)})
            print(f"{name} seed {seed}: {np.mean(record['psnr']):.2f} dB, fit {record['fit_seconds']:.0f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (out / "crosscheck.json").write_text(json.dumps({"preset": config["path"], "case": case.name, "commit": commit,
                                                     "records": records}, indent=1))
    noisy = {r["seed"]: np.mean(r["psnr"]) for r in records if r["method"] == "noisy"}
    print("\n| method | seed | PSNR (dB) | gain over noisy (dB) | fit (s) |\n|---|---|---|---|---|")
    for r in records:
        gain = np.mean(r["psnr"]) - noisy[r["seed"]] if r["seed"] in noisy else float("nan")
        print(f"| {r['label']} | {r['seed']} | {np.mean(r['psnr']):.2f} | {gain:+.2f} | {r['fit_seconds']:.0f} |")
    for name in dict.fromkeys(r["method"] for r in records):
        means = [np.mean(r["psnr"]) for r in records if r["method"] == name]
        spread = f" +- {np.std(means, ddof=1):.2f}" if len(means) > 1 else ""
        print(f"{METHODS[name].label}: {np.mean(means):.2f}{spread} dB over {len(means)} seed(s)")


if __name__ == "__main__":
    fire.Fire(main)
