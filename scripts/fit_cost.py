"""What `diffdenoise fit` costs and gains on a small folder of scans a user might bring (issue 20, docs/performance.md).

``make`` writes noisy copies of real scans, as a user would hand them to ``fit``: 24 contiguous slices of the
studyforrest T1 series as a DICOM series, or 24 chest X-ray PNGs, each with Gaussian noise of sigma 6/255 of the
scan's [0, 1] range (``diffdenoise.data.intensity_range``), in the scan's own format (``diffdenoise.io.write_volume``
rounds to its stored type). It also writes ``references.json``, which maps each noisy file or series to its clean
source, for scoring only.

``score`` reads a finished ``fit`` run: for every prepared slice (all splits) it scores the noisy input and each
stage's output against the clean source slice, normalised with the range ``prepare`` used for the noisy one, and
prints the means and per-slice values as JSON; ``--common OTHER.json`` also averages over the slices both runs
have (an older ``fit`` left out a test split's guard slice more).

    python scripts/fit_cost.py make brain runs/cost/brain_noisy
    diffdenoise fit runs/cost/brain_noisy runs/cost/brain_fit --preset demo
    python scripts/fit_cost.py score runs/cost/brain_fit runs/cost/brain_noisy/references.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from diffdenoise.data import intensity_range, load_datalist, scale_to_unit
from diffdenoise.io import read_volumes, write_volume
from diffdenoise.metrics import psnr, ssim
from diffdenoise.noise import SyntheticNoise

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = {"brain": SHARED / "brain_mri_t1_axial_studyforrest" / "series", "chest": SHARED / "chest_xray_mhh" / "png"}
SIGMA = 6 / 255
COUNT = 24
OUTPUT_KEYS = ("image", "bsn_posterior", "srds", "student")


def _noisy(volume, modality: str, seed: int) -> np.ndarray:
    """The volume plus Gaussian noise of SIGMA in its own [0, 1] units, back in physical units."""
    low, high = intensity_range(volume.array, modality)
    noise = SyntheticNoise("gaussian", level=SIGMA, seed=seed)
    unit = (volume.array - low) / (high - low)
    noisy = np.stack([noise(s, image_id=f"{volume.volume_id}/{k}") for k, s in enumerate(unit)])
    return low + noisy * (high - low)


def make(dataset: str, out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True)
    references = {}
    if dataset == "brain":
        (volume,) = read_volumes(SOURCES["brain"])
        written = write_volume(volume, _noisy(volume, "mri", seed), out / "full", derivation="+ Gaussian 6/255")
        middle = len(volume.array) // 2 - COUNT // 2
        files = [Path(f) for f in volume.meta["files"][middle:middle + COUNT]]
        (out / "series").mkdir()
        for f in files:
            shutil.move(str(Path(written) / f.name), out / "series" / f.name)
        shutil.rmtree(written)
        clean = out.parent / f"{out.name}_clean"
        clean.mkdir()
        for f in files:
            shutil.copy(f, clean / f.name)
        references[str((out / "series").resolve())] = str(clean.resolve())
    else:
        for png in sorted(SOURCES["chest"].glob("*.png"))[:COUNT]:
            (volume,) = read_volumes(png)
            written = write_volume(volume, _noisy(volume, "xray", seed), out / png.stem)
            references[str(Path(written).resolve())] = str(png.resolve())
    (out / "references.json").write_text(json.dumps(references, indent=1))


def score(run: Path, references: Path, common: Path | None = None) -> dict:
    datalist = run / "data" / "datalist_student.json"
    meta = json.loads((run / "data" / "datalist.json").read_text())["meta"]
    clean_of = json.loads(references.read_text())
    clean_volumes, per_slice = {}, {}
    for split in ("training", "validation", "test"):
        for item in load_datalist(datalist, split):
            volume = meta["volumes"][item["volume"]]
            if item["volume"] not in clean_volumes:
                (clean_volumes[item["volume"]],) = read_volumes(clean_of[volume["source"]])
            low, high = volume["intensity_range"]
            clean = scale_to_unit(clean_volumes[item["volume"]].array[item["slice_index"]], low, high)
            per_slice[item["id"]] = {"split": split}
            for key in OUTPUT_KEYS:
                pred = np.clip(np.load(item[key]), 0, 1)
                per_slice[item["id"]][key] = [round(psnr(pred, clean), 4), round(ssim(pred, clean), 5)]
    splits = [row["split"] for row in per_slice.values()]
    result = {"slices": len(per_slice), "splits": {s: splits.count(s) for s in ("training", "validation", "test")},
              **_means(per_slice)}
    if common is not None:
        shared = set(json.loads(common.read_text())["per_slice"]) & set(per_slice)
        result["common"] = {"slices": len(shared), **_means({k: per_slice[k] for k in shared})}
    assessment = json.loads((run / "configs" / "metadata.json").read_text()).get("diffdenoise_assessment", {})
    result["default_mode"] = assessment.get("default_mode")
    result["estimated_gain_db"] = {m: r["estimated_gain_db"] for m, r in assessment.get("modes", {}).items()}
    return {**result, "per_slice": per_slice}


def _means(per_slice: dict) -> dict:
    """Mean PSNR and SSIM of each output over the given slices."""
    return {key: {m: round(float(np.mean([row[key][i] for row in per_slice.values()])), 4)
                  for i, m in enumerate(("psnr", "ssim"))} for key in OUTPUT_KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("make")
    made.add_argument("dataset", choices=sorted(SOURCES))
    made.add_argument("out", type=Path)
    scored = commands.add_parser("score")
    scored.add_argument("run", type=Path)
    scored.add_argument("references", type=Path)
    scored.add_argument("--common", type=Path, help="another run's score JSON: also average over shared slices")
    args = parser.parse_args()
    if args.command == "make":
        make(args.dataset, args.out)
    else:
        print(json.dumps(score(args.run, args.references, args.common), indent=1))


if __name__ == "__main__":
    main()
