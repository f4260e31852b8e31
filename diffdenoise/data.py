"""From images to training data: normalised 2D slices, leak-free splits and a MONAI datalist.

``prepare`` is the pipeline's first stage. It reads volumes (``diffdenoise.io``), maps each to [0, 1]
(the paper's noise levels are defined there), cuts 2D slices along the acquisition axis, drops slices
that are only background, optionally adds one fixed realisation of synthetic noise per slice, splits
train/validation/test without putting neighbouring slices or one patient's images in two splits, and
writes ``.npy`` slices plus ``datalist.json`` for ``monai.data.load_decathlon_datalist``.
"""

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist

from diffdenoise import __version__
from diffdenoise.errors import InputError
from diffdenoise.io import MODALITIES, Volume, atomic_folder, file_stem, scan_volumes
from diffdenoise.noise import NOISE_MODELS, PAPER_LEVELS, SyntheticNoise
from diffdenoise.progress import Progress

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
BACKGROUND_THRESHOLD = 0.1  # normalised intensity that counts as signal
BACKGROUND_MIN_FRACTION = 0.05  # a slice with less signal than this is background
NORMALISATION_RULE = (
    "x01 = clip((x - lo) / (hi - lo), 0, 1) per volume. CT: (lo, hi) = ct_window in HU, the same for every "
    "scan, so a tissue keeps its value. MRI, X-ray, other (arbitrary units): lo = min, hi = 99.9th "
    "percentile of the volume (not the max, so a few hot pixels do not darken it). (lo, hi) is stored per "
    "volume as intensity_range: x = lo + x01 (hi - lo) inverts it inside the range."
)


def intensity_range(array, modality: str, ct_window=(-100.0, 200.0)) -> tuple[float, float]:
    """The physical values (lo, hi) that ``normalise`` maps to 0 and 1; see ``NORMALISATION_RULE``.

    Args:
        array: a volume in physical units (HU for CT), any shape.
        modality: one of ``diffdenoise.io.MODALITIES``.
        ct_window: (low, high) HU window, used for CT only.

    Raises:
        ValueError: an unknown modality, or a CT window with low >= high.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    if modality == "ct":
        low, high = (float(v) for v in ct_window)
        if not low < high:
            raise ValueError(f"ct_window {tuple(ct_window)} must be (low, high) HU, low < high: (-100, 200)")
        return low, high
    return float(np.min(array)), float(np.percentile(array, 99.9))


def normalise(array, modality: str, ct_window=(-100.0, 200.0)) -> np.ndarray:
    """Maps a volume to float32 in [0, 1], where the paper's noise levels apply.

    Rule: CT: clip to the HU window ``ct_window`` and map it linearly to [0, 1] (a fixed window, so a
    tissue looks the same in every scan). MRI, X-ray, other: per volume (x - min) / (p99.9 - min),
    clipped to [0, 1] (units are arbitrary; p99.9, not the max, so hot pixels do not darken the image).
    A constant volume maps to 0.

    Args:
        array: volume in physical units, e.g. ``Volume.array`` (Z, H, W).
        modality: "mri", "ct", "xray" or "other".
        ct_window: (low, high) HU, CT only.

    Returns:
        float32 array of the input's shape, values in [0, 1].

    Example::

        import numpy as np
        from diffdenoise.data import normalise

        hu = np.array([[-1000.0, 40.0, 1000.0]])
        print(normalise(hu, "ct"))  # [[0. 0.46666667 1.]]
    """
    low, high = intensity_range(array, modality, ct_window)
    return scale_to_unit(array, low, high)


def _area_downsample(slices: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks of each (H, W) slice of a (Z, H, W) stack; edges that do not fill a block are cut."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"downsample must be an integer >= 1, got {k!r}; use 2 for 2x2 area averaging")
    if k == 1:
        return slices
    z, h, w = slices.shape
    return slices[:, : h - h % k, : w - w % k].reshape(z, h // k, k, w // k, k).mean(axis=(2, 4)).astype(np.float32)


def scale_to_unit(array, low: float, high: float) -> np.ndarray:
    """Maps [low, high] linearly to [0, 1] and clips; a zero-width range maps to 0."""
    scaled = (np.asarray(array, dtype=np.float32) - low) / ((high - low) or 1.0)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def is_background(
    slice_, threshold: float = BACKGROUND_THRESHOLD, min_fraction: float = BACKGROUND_MIN_FRACTION
) -> bool:
    """True when too little of a slice is above ``threshold`` to be worth training on.

    Args:
        slice_: a normalised slice, values in [0, 1].
        threshold: intensity that counts as signal.
        min_fraction: fewest signal pixels, as a fraction of the slice, for it to count as foreground.
    """
    return float(np.mean(np.asarray(slice_) > threshold)) < min_fraction


def evenly_spaced(count: int, most: int) -> np.ndarray:
    """Indices of up to ``most`` items spread evenly over ``count`` (first and last included): a fixed rule for
    which slices a score or an estimate reads, never chosen by their content."""
    return np.unique(np.linspace(0, count - 1, min(most, count)).round().astype(int))


def load_datalist(path, split: str = "training") -> list[dict]:
    """Loads one split of a prepared datalist with absolute ``image`` (and ``clean``) paths.

    Wraps ``monai.data.load_decathlon_datalist`` with ``base_dir`` = the datalist's folder, so a
    prepared folder can be moved as a whole. An empty split gives ``[]`` (MONAI's loader fails on an
    empty "test" list).

    Args:
        path: ``datalist.json`` written by ``prepare``.
        split: "training", "validation" or "test".

    Raises:
        InputError: the datalist is missing.
        ValueError: an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such datalist; run prepare first")
    if json.loads(path.read_text()).get(split) == []:
        return []
    return load_decathlon_datalist(path, data_list_key=split, base_dir=path.parent)


def prepare(
    src,
    out,
    noise: str | None = None,
    level: float | None = None,
    correlation: float = 0.0,
    modality: str | None = None,
    seed: int = 0,
    ct_window=(-100.0, 200.0),
    split=(0.7, 0.15, 0.15),
    groups: str | None = None,
    downsample: int = 1,
    progress: bool = True,
) -> Path:
    """Turns a folder of images into normalised 2D slices, splits and a MONAI datalist.

    Writes ``OUT/slices/<volume_id>/<k:04d>_noisy.npy`` (float32 (H, W)), with ``noise`` also
    ``<k:04d>_clean.npy`` (in [0, 1]), and ``OUT/datalist.json``: ``{"training": [...], "validation":
    [...], "test": [...], "meta": {...}}``, items ``{"image", "clean" (with noise), "id", "group",
    "volume", "slice_index", "source"}`` with paths relative to OUT. Without ``noise`` the input is
    taken as already noisy (the real use case): ``image`` is the normalised input, and there is no
    ``clean``. Background-only slices (``is_background``) are skipped.

    Splits never share a neighbour slice: with a group (patient) per split or more, whole groups go to one split
    (shuffled by ``seed``, proportions near ``split``, each split with a share non-empty); with fewer, each
    volume is cut into contiguous train | validation | test slice blocks and the slice at each block boundary
    is dropped (a volume with too few foreground slices for a slice per block goes to training whole). A test
    share of 0 makes no test split (``diffdenoise fit``: with no clean reference a test split serves nothing).
    The output appears atomically: it is built in a hidden folder beside OUT and renamed.

    Args:
        src: file or folder of images (see ``diffdenoise.io.read_volumes``).
        out: new output folder; it must not exist (or be empty) and must not lie inside ``src``.
        noise: synthetic noise model (``diffdenoise.noise.NOISE_MODELS``) or None for real noisy data.
        level: noise level (sigma, lam or alpha); None takes ``PAPER_LEVELS[modality][noise]``.
        correlation: std in pixels of the kernel that correlates the noise (0 = i.i.d.; paper 0.5, 1.2).
        modality: "mri", "ct", "xray" or "other" for every volume, overriding the detected one (PNG,
            TIFF and NIfTI are detected as "other").
        seed: fixes the noise realisations and the group shuffle.
        ct_window: (low, high) HU mapped to [0, 1] for CT.
        split: fractions (training, validation, test) summing to 1; training and validation > 0, test >= 0.
        groups: CSV with columns ``patient_id`` and ``image_id`` (file stem, or series folder name) that
            groups images by patient, e.g. ``chest_xray_mhh/data_subset.csv``. Unlisted images keep
            their own group (DICOM PatientID, else the volume id).
        downsample: average each slice over k x k pixel blocks before adding noise (1 = off). Halves
            the noise that a "clean" reference carries of its own at k = 2, so scores measure the
            synthetic noise, not the reference's.
        progress: show progress over volumes (``diffdenoise.progress``: a bar on a terminal, else log lines).

    Returns:
        Path of ``OUT/datalist.json``.

    Raises:
        InputError: unusable input (see ``diffdenoise.io``), a bad groups CSV, OUT exists and is not
            empty or is inside ``src``, or no paper noise level for a volume's modality.
        ValueError: an unknown noise model or modality, a bad ``split``, or ``level``/``correlation``
            without ``noise``.

    Example::

        from diffdenoise.data import load_datalist, prepare

        datalist = prepare("../shared/data/head_ct_ge/series", "/tmp/head_ct", noise="gaussian", seed=0)
        train = load_datalist(datalist, "training")
        print(len(train), train[0]["image"], train[0]["clean"])
    """
    src, out = Path(src), Path(out)
    split = _check_split(split)
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    _check_out(src, out)
    sources = scan_volumes(src)
    if groups is not None:
        _apply_groups(sources, Path(groups))
    noisers = _noisers(sources, noise, level, correlation, seed, modality)
    by_group = len({source.group for source in sources}) >= sum(1 for share in split if share)  # one per split

    # atomic_folder also removes what a killed earlier run left beside `out`
    with atomic_folder(out) as tmp, Progress(len(sources), "prepare", "volume", shown=progress) as bar:
        items, split_of, volumes = [], {}, {}
        for source in sources:
            volume = source.read()
            volume_modality = modality or volume.modality
            low, high = intensity_range(volume.array, volume_modality, ct_window)
            clean = _area_downsample(scale_to_unit(volume.array, low, high), downsample)
            foreground = [k for k in range(len(clean)) if not is_background(clean[k])]
            if by_group:  # the split of each group is decided once all slices are counted
                blocks = dict.fromkeys(foreground)
            else:
                blocks = _slice_blocks(foreground, split, volume.volume_id)
            (tmp / "slices" / volume.volume_id).mkdir(parents=True)
            for k, name in blocks.items():
                items.append(_write_slice(tmp, volume, k, clean[k], noisers.get(volume_modality)))
                split_of[items[-1]["id"]] = name
            volumes[volume.volume_id] = {
                "source": _absolute(volume.source),
                "modality": volume_modality,
                "group": volume.group,
                "shape": list(volume.array.shape),
                "spacing": volume.meta.get("spacing"),
                "intensity_range": [low, high],
                "slices_written": len(blocks),
                "background_slices": sorted(set(range(len(clean))) - set(foreground)),
                "guard_slices": sorted(set(foreground) - set(blocks)),
            }
            bar.update()
        if by_group:
            group_split = _split_groups(Counter(item["group"] for item in items), split, seed)
            split_of = {item["id"]: group_split[item["group"]] for item in items}
        datalist = {name: [item for item in items if split_of[item["id"]] == name] for name in SPLITS}
        if not all(datalist[name] for name, share in zip(SPLITS, split) if share):
            logger.warning("%s: a split is empty (too few groups or foreground slices)", src)
        datalist["meta"] = {
            "created_by": "diffdenoise.data.prepare",
            "diffdenoise_version": __version__,
            "arguments": {
                "src": str(src.resolve()),
                "noise": noise,
                "level": level,
                "correlation": correlation,
                "modality": modality,
                "seed": seed,
                "ct_window": list(ct_window),
                "split": list(split),
                "groups": None if groups is None else str(Path(groups).resolve()),
                "downsample": downsample,
            },
            "normalisation": NORMALISATION_RULE,
            "background": {"threshold": BACKGROUND_THRESHOLD, "min_fraction": BACKGROUND_MIN_FRACTION},
            "noise_levels": {name: noiser.level for name, noiser in noisers.items()},
            "split_by": "group" if by_group else "slice_blocks",
            "counts": {name: len(datalist[name]) for name in SPLITS},
            "volumes": volumes,
        }
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return out / "datalist.json"


def _absolute(source: str) -> str:
    """Absolute source path, so MONAI's datalist loader never re-roots it under the output folder."""
    return str(Path(source).resolve())


def _write_slice(root: Path, volume: Volume, k: int, clean: np.ndarray, noiser: SyntheticNoise | None):
    """Saves slice k (and its noisy version) under ``root/slices/<volume_id>``; returns its datalist item."""
    item_id = f"{volume.volume_id}/{k:04d}"
    item = {"image": f"slices/{item_id}_noisy.npy"}
    if noiser is None:
        noisy = clean
    else:
        item["clean"] = f"slices/{item_id}_clean.npy"
        np.save(root / item["clean"], clean)
        noisy = noiser(clean, image_id=item_id)
    np.save(root / item["image"], np.asarray(noisy, dtype=np.float32))
    item.update(id=item_id, group=volume.group, volume=volume.volume_id, slice_index=k)
    item["source"] = _absolute(volume.source)
    return item


def _check_split(split) -> tuple[float, float, float]:
    """Validates split fractions before anything is read: training and validation are never empty, test may be."""
    fractions = tuple(float(s) for s in split)
    if len(fractions) != 3 or min(fractions[:2]) <= 0 or fractions[2] < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split {tuple(split)} must be three fractions (training, validation, test) summing to 1, training "
            "and validation > 0, test >= 0, e.g. (0.7, 0.15, 0.15), or (0.85, 0.15, 0) for no test split"
        )
    return fractions


def _check_out(src: Path, out: Path) -> None:
    """Refuses an output that would overwrite results or be read back as input."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(out, "output already exists and is not an empty folder; pick a new one or delete it")
    src_abs, out_abs = src.resolve(), out.resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise InputError(out, f"output is inside the input {src}; put it elsewhere, or it is read as input")


def _apply_groups(sources, path: Path) -> None:
    """Sets each volume's group (patient) from a CSV with columns patient_id, image_id."""
    if not path.is_file():
        raise InputError(path, "no such groups CSV")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"patient_id", "image_id"} <= set(reader.fieldnames or ()):
            raise InputError(path, f"needs columns patient_id and image_id; found {reader.fieldnames}")
        patient_of = {}
        for row in reader:
            image, patient = row["image_id"].strip(), row["patient_id"].strip()
            if patient_of.setdefault(image, patient) != patient:
                raise InputError(path, f"image {image} has two patients, {patient_of[image]} and {patient}")
    unlisted = []
    for source in sources:
        key = file_stem(Path(source.source))
        if key in patient_of:
            source.group = patient_of[key]
        else:
            unlisted.append(key)
    if unlisted:
        logger.warning(
            "%s: %d of %d images not listed (e.g. %s); each keeps its own group",
            path, len(unlisted), len(sources), ", ".join(unlisted[:3]),
        )  # fmt: skip


def _noisers(sources, noise, level, correlation, seed, modality) -> dict[str, SyntheticNoise]:
    """One noise transform per modality present (levels differ by modality); empty without noise."""
    if noise is None:
        if level is not None or correlation:
            raise ValueError("level and correlation only apply with noise; set noise or drop them")
        return {}
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise {noise!r} is not one of {', '.join(NOISE_MODELS)}")
    noisers = {}
    for source in sources:
        name = modality or source.modality
        if name in noisers:
            continue
        if level is None and name not in PAPER_LEVELS:
            known = ", ".join(PAPER_LEVELS)
            problem = f"modality {name!r} has no paper noise level; set modality ({known}) or level"
            raise InputError(source.source, problem)
        noise_level = PAPER_LEVELS[name][noise] if level is None else level
        noisers[name] = SyntheticNoise(noise, level=noise_level, correlation_sigma=correlation, seed=seed)
    return noisers


def _slice_blocks(indices: list[int], split, volume_id: str) -> dict[int, str]:
    """Cuts one volume's slices into contiguous blocks, one per split with a share: training | validation [| test].

    The slice at each block boundary is left out (a guard), so no split holds a neighbour of another
    split's slice. Returns split name by slice index; guards are absent. Too few slices for one per block and
    the guards between them all go to training.
    """
    names = [name for name, share in zip(SPLITS, split) if share]
    n = len(indices)
    if n < 2 * len(names) - 1:
        if n:
            logger.warning("%s: %d foreground slices, too few for %d blocks; all go to training", volume_id, n,
                           len(names))
        return dict.fromkeys(indices, "training")
    blocks, start, share = {}, 0, 0.0
    for i, name in enumerate(names[:-1]):
        share += split[SPLITS.index(name)]
        later = len(names) - 1 - i  # blocks after this one, each needing a guard and a slice
        end = min(max(round(n * share), start + 1), n - 2 * later)
        blocks[name], start = indices[start:end], end + 1  # indices[end] is the guard
    blocks[names[-1]] = indices[start:]
    return {k: name for name, block in blocks.items() for k in block}


def _split_groups(sizes: Counter, split, seed: int) -> dict[str, str]:
    """Assigns whole groups (patients) to splits, deterministically from ``seed``.

    Groups are shuffled; the first ones seed each split with a share (so none of them is empty); each
    further group joins the split furthest below its share of slices.
    """
    groups = sorted(sizes)
    np.random.default_rng(seed).shuffle(groups)
    shortfall = {name: fraction * sum(sizes.values()) for name, fraction in zip(SPLITS, split) if fraction}
    names = list(shortfall)
    assigned = {}
    for i, group in enumerate(groups):
        target = names[i] if i < len(names) else max(names, key=shortfall.get)
        assigned[group] = target
        shortfall[target] -= sizes[group]
    return assigned
