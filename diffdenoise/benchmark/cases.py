"""What the benchmark runs on: datasets, the cases (dataset x noise x reference) a preset makes of them, and each
case's prepared slices, so that every method sees the same data and is scored against the same reference."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffdenoise.data import SPLITS, evenly_spaced, load_datalist, prepare
from diffdenoise.errors import InputError
from diffdenoise.io import atomic_folder
from diffdenoise.noise import NOISE_MODELS, PAPER_LEVELS

REFERENCES = ("full", "down2", "strong", "repeats")
# The stronger levels (level = sigma | lambda | alpha, beta = alpha); presets restate them.
STRONG_LEVELS = {"gaussian": 15 / 255, "poisson": 50.0, "gamma": 25.0, "rician": 15 / 255}
_NOISE_NAME = re.compile(rf"^({'|'.join(NOISE_MODELS)})(?:_corr(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Dataset:
    """Where a dataset lies under the data root and how ``prepare`` reads it.

    Args:
        label: display name.
        src: folder under the data root.
        modality: passed to ``prepare``; picks the paper's noise levels.
        groups: CSV under the data root grouping images by patient (split by patient), or None.
        noisy_volume: real noise only: the repeat that is trained on and denoised.
        reference_volumes: real noise only: repeats whose mean is the reference.
        correlation: real noise only: the noise's correlation kernel sigma in pixels, which picks the BSN's
            blind spot (measured for the phantom: lag-1 autocorrelation of repeat differences 0.03, i.i.d.).
    """

    label: str
    src: str
    modality: str
    groups: str | None = None
    noisy_volume: str | None = None
    reference_volumes: tuple[str, ...] = ()
    correlation: float = 0.0

    @property
    def real(self) -> bool:
        """True for real noise (repeats), False for clean-ish images that get synthetic noise."""
        return self.noisy_volume is not None


DATASETS = {
    "studyforrest": Dataset("brain MRI (studyforrest T1)", "brain_mri_t1_axial_studyforrest/series", "mri"),
    "chest_xray": Dataset("chest X-ray (Hannover)", "chest_xray_mhh/png", "xray",
                          groups="chest_xray_mhh/data_subset.csv"),
    "head_ct": Dataset("head CT (GE)", "head_ct_ge/series", "ct"),
    # volume 1 (0063) is not at steady state; volumes 2-5 are repeats of one another
    "phantom": Dataset("EPI phantom, real noise", "phantom_mri_epi_repeats/series", "mri", noisy_volume="0126",
                       reference_volumes=("0189", "0252", "0315")),
}


@dataclass(frozen=True)
class Case:
    """One dataset x noise x reference variant; ``name`` is its folder under ``OUT/cases``."""

    dataset: str
    noise: str  # a NOISE_MODELS name, or "real"
    level: float | None
    correlation: float
    reference: str

    @property
    def name(self) -> str:
        if self.noise == "real":
            return f"{self.dataset}-real"
        corr = f"_corr{self.correlation:g}" if self.correlation else ""
        return f"{self.dataset}-{self.noise}{corr}-{self.reference}"

    def describe(self) -> str:
        """One line for the report: dataset, noise and reference."""
        dataset = DATASETS[self.dataset]
        if dataset.real:
            refs = ", ".join(dataset.reference_volumes)
            return (f"{dataset.label}: trained on and denoising repeat {dataset.noisy_volume}; reference = mean of "
                    f"repeats {refs} at the same slice, in the test volume's intensity scale")
        symbol = {"gaussian": "sigma", "rician": "sigma", "poisson": "lambda", "gamma": "alpha = beta"}[self.noise]
        value = f"{self.level * 255:.3g}/255" if symbol == "sigma" else f"{self.level:g}"
        corr = f", correlated (kernel sigma {self.correlation:g} px)" if self.correlation else ", i.i.d."
        ref = {"full": "full resolution", "down2": "2x2 area-downsampled images", "strong": "stronger noise level"}
        return f"{dataset.label}, {self.noise} {symbol} = {value}{corr}; reference: {ref[self.reference]}"


def parse_noise(name: str) -> tuple[str, float]:
    """``gaussian`` -> ("gaussian", 0.0); ``poisson_corr1.2`` -> ("poisson", 1.2): model and kernel sigma (pixels)."""
    match = _NOISE_NAME.match(name)
    if match is None:
        raise ValueError(
            f"noise {name!r} is not <model>[_corr<kernel sigma>] with model one of {', '.join(NOISE_MODELS)}; "
            "e.g. gaussian, poisson_corr1.2"
        )
    return match.group(1), float(match.group(2) or 0.0)


def build_cases(config: Mapping[str, Any]) -> list[Case]:
    """Datasets x noises x references of a loaded preset; a real-noise dataset is one case of its own."""
    cases = []
    for name in config["datasets"]:
        dataset = DATASETS[name]
        if dataset.real:
            cases.append(Case(name, "real", None, dataset.correlation, "repeats"))
            continue
        for noise in config["noises"]:
            model, correlation = parse_noise(noise)
            for reference in config["references"]:
                levels = config["strong_levels"] if reference == "strong" else PAPER_LEVELS[dataset.modality]
                cases.append(Case(name, model, float(levels[model]), correlation, reference))
    return cases


def prepare_case(case: Case, data_root: str | os.PathLike, case_dir: Path, seed: int = 0,
                 progress: bool = False) -> Path:
    """The case's prepared slices in ``case_dir/data`` (made once, atomically; an existing one is reused).

    Synthetic noise: ``prepare`` with the case's noise, level and correlation (``downsample=2`` for
    ``down2``). Real noise: see ``_prepare_repeats``.

    Returns:
        The path of ``case_dir/data/datalist.json``.

    Raises:
        InputError: the dataset is not under ``data_root``.
    """
    datalist = case_dir / "data" / "datalist.json"
    if datalist.is_file():
        return datalist
    dataset = DATASETS[case.dataset]
    src = Path(data_root) / dataset.src
    if not src.exists():
        raise InputError(src, f"dataset '{case.dataset}' not found; pass --data pointing at ../shared/data, or drop it")
    if dataset.real:
        return _prepare_repeats(dataset, src, case_dir, seed, progress)
    groups = None if dataset.groups is None else Path(data_root) / dataset.groups
    return prepare(src, case_dir / "data", noise=case.noise, level=case.level, correlation=case.correlation,
                   modality=dataset.modality, seed=seed, groups=groups,
                   downsample=2 if case.reference == "down2" else 1, progress=progress)


def _prepare_repeats(dataset: Dataset, src: Path, case_dir: Path, seed: int, progress: bool) -> Path:
    """Real noise: train on and denoise one repeat; the reference is the mean of other repeats.

    All repeats are prepared together into ``case_dir/repeats`` (one ``prepare`` call, so one slicing and
    one split of slice blocks, identical across repeats). ``case_dir/data/datalist.json`` keeps only
    ``noisy_volume``'s slices in each split; each slice gets ``clean`` = the mean over
    ``reference_volumes`` of the same slice position, taken in physical units (each repeat's normalisation
    inverted with its stored ``intensity_range``) and normalised with the noisy volume's range, so reference
    and input share one intensity scale. The reference still carries noise of 1/sqrt(n) of the input's.
    Test slices are scored against it; training and validation slices have it only for the supervised bound
    (its targets), as synthetic-noise cases have their clean slices.
    """
    repeats = case_dir / "repeats"
    if not (repeats / "datalist.json").is_file():
        prepare(src, repeats, modality=dataset.modality, seed=seed, progress=progress)
    listing = json.loads((repeats / "datalist.json").read_text())
    volumes = listing["meta"]["volumes"]
    absent = [v for v in (dataset.noisy_volume, *dataset.reference_volumes) if v not in volumes]
    if absent:
        raise InputError(src, f"repeat volume(s) {absent} not found; prepare found {sorted(volumes)}")
    low, high = volumes[dataset.noisy_volume]["intensity_range"]
    with atomic_folder(case_dir / "data") as tmp:  # also removes what a killed earlier run left there
        (tmp / "reference").mkdir()
        datalist = {split: [] for split in SPLITS}
        for split in SPLITS:
            for item in listing[split]:
                if item["volume"] != dataset.noisy_volume:
                    continue
                item = {**item, "image": f"../repeats/{item['image']}",
                        "clean": f"reference/{item['slice_index']:04d}.npy"}
                physical = [_physical(repeats, volumes, v, item["slice_index"]) for v in dataset.reference_volumes]
                reference = np.clip((np.mean(physical, axis=0) - low) / ((high - low) or 1.0), 0.0, 1.0)
                np.save(tmp / item["clean"], reference.astype(np.float32))
                datalist[split].append(item)
        datalist["meta"] = {
            "created_by": "diffdenoise.benchmark",
            "protocol": _prepare_repeats.__doc__.split("\n\n")[1].strip(),
            "noisy_volume": dataset.noisy_volume,
            "reference_volumes": list(dataset.reference_volumes),
            "repeats_datalist": "../repeats/datalist.json",
            "counts": {split: len(datalist[split]) for split in SPLITS},
        }
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return case_dir / "data" / "datalist.json"


def _physical(repeats: Path, volumes: Mapping[str, Any], volume: str, k: int) -> np.ndarray:
    """Slice k of a prepared repeat back in physical units: lo + x (hi - lo)."""
    path = repeats / "slices" / volume / f"{k:04d}_noisy.npy"
    if not path.is_file():
        raise InputError(path, f"repeat {volume} has no slice {k} (background or guard); the repeats must align")
    low, high = volumes[volume]["intensity_range"]
    return low + np.load(path).astype(np.float64) * (high - low)


def _test_items(datalist: Path, max_slices: int | None) -> list[dict]:
    """The scored test slices: all, or ``max_slices`` evenly spaced ones (a fixed rule, never chosen by score)."""
    items = load_datalist(datalist, "test")
    if not items or "clean" not in items[0]:
        raise InputError(datalist, "the test split is empty or has no reference ('clean') slices to score against")
    if max_slices and len(items) > max_slices:
        items = [items[i] for i in evenly_spaced(len(items), max_slices)]
    return items
