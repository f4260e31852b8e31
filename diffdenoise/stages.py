"""Running the bundle's stages and handing one stage's outputs to the next.

Each stage is a MONAI bundle config (``bundles/diffdenoise/configs/*.yaml``) merged over ``common.yaml``
and followed by overlays (``configs/presets/*.yaml``, ``configs/noise/*.yaml``; ``diffdenoise.resources`` finds
them). This module runs a stage through ``monai.bundle.run``, and writes per-slice outputs of a trained stage
(x_c of the BSN, say) next to the prepared slices with a datalist that the next stage reads.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from diffdenoise.data import load_datalist
from diffdenoise.errors import InputError, one_line, raise_missing
from diffdenoise.io import atomic_folder
from diffdenoise.progress import Progress
from diffdenoise.resources import bundle_dir, overlay_path

SPLITS = ("training", "validation", "test")


def stage_config_files(stage: str, overlays: Sequence[str] = ()) -> list[str]:
    """``common.yaml``, the stage's config, then the overlays, in merge order."""
    configs = bundle_dir() / "configs"
    stage_file = configs / f"{stage}.yaml"
    if not stage_file.is_file():
        available = sorted(p.stem for p in configs.glob("*.yaml") if p.stem != "common")
        raise ValueError(f"stage '{stage}' has no config; available: {', '.join(available)}")
    return [str(configs / "common.yaml"), str(stage_file)] + [str(overlay_path(o)) for o in overlays]


def run_stage(stage: str, overlays: Sequence[str] = (), **overrides) -> None:
    """Run one stage exactly as ``python -m monai.bundle run --config_file [...] --key value`` would.

    MONAI's warning that configs can run code is silenced here: these are the configs shipped with the package.
    """
    from monai.bundle import run

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
        run(config_file=stage_config_files(stage, overlays), **overrides)


def stage_parser(stage: str, overlays: Sequence[str] = (), **overrides):
    """The parsed config of a stage, so Python code takes its trained network and inferer from the bundle.

    The same files and overrides as ``run_stage``, without running anything: e.g. the benchmark builds
    the BSN of ``infer_bsn.yaml`` and runs its ``initialize`` (which loads ``bsn_ckpt``), then denoises
    slices with ``bsn_inferer``, so no network definition is repeated outside the bundle.

    Returns:
        A ``monai.bundle.ConfigParser``; ``parser.get_parsed_content("network")`` instantiates a key.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(stage_config_files(stage, overlays))
    parser.update(overrides)
    return parser


def stage_denoiser(stage: str, overlays: Sequence[str], keys: Mapping[str, Any], inferer_key: str) -> Callable:
    """A denoiser built from a stage config's ``network`` and ``inferer_key``, after its ``initialize`` (which loads
    the trained checkpoint or fails naming the missing key), so no network is redefined outside the bundle.

    It maps float32 slices (..., H, W) in [0, 1], one (H, W) slice or a (B, H, W) batch, to denoised ones."""
    parser = stage_parser(stage, overlays, **keys)
    parser.get_parsed_content("initialize")
    network, inferer = parser.get_parsed_content("network"), parser.get_parsed_content(inferer_key)
    device = next(network.parameters()).device

    def denoise(noisy: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(noisy, dtype=torch.float32, device=device)
            out = inferer(x.reshape(-1, 1, *x.shape[-2:]), network)
            return out.float().cpu().numpy().reshape(x.shape)

    return denoise


def write_stage_outputs(
    datalist_path: str | os.PathLike,
    key: str,
    network: torch.nn.Module,
    inferer: Callable,
    device: str | torch.device = "cpu",
    input_keys: Sequence[str] = ("image",),
    progress: bool = True,
) -> Path:
    """Run ``inferer(inputs, network)`` on every slice of every split and store the result under ``key``.

    The outputs go to ``<dataset>/<key>/<id>.npy`` (float32, (H, W)) and a datalist
    ``<dataset>/datalist_<key>.json`` repeats the input datalist with ``key`` added to each item, so the
    next stage reads both. Extra ``input_keys`` (e.g. ``("image", "bsn")``) are passed to the inferer as
    ``condition=`` after the first. Files are written to a temporary folder and renamed at the end. With
    ``progress``, a bar on a terminal or a log line a minute otherwise (``diffdenoise.progress``).

    Returns:
        The path of the new datalist.
    """
    datalist_path = Path(datalist_path)
    if not datalist_path.is_file():
        raise InputError(datalist_path, "datalist not found; run `diffdenoise prepare` first")
    dataset_dir = datalist_path.parent
    raw = json.loads(datalist_path.read_text())
    out_dir = dataset_dir / key
    device = torch.device(device)
    network = network.to(device).eval()
    result: dict = {"meta": {**raw.get("meta", {}), "stage_output": key, "inputs": list(input_keys)}}
    # A stage run again replaces its outputs; a killed run's leftovers beside them are removed on entry.
    splits = {split: list(zip(raw.get(split, []), load_datalist(datalist_path, split))) for split in SPLITS}
    with atomic_folder(out_dir, overwrite=True) as tmp_dir, \
            Progress(sum(map(len, splits.values())), key, "slice", shown=progress) as bar:
        for split, items in splits.items():
            result[split] = []
            for raw_item, item in items:
                tensors = [torch.from_numpy(np.load(item[k]))[None, None].float().to(device) for k in input_keys]
                with torch.inference_mode():
                    kwargs = {"condition": tensors[1]} if len(tensors) > 1 else {}
                    pred = inferer(tensors[0], network, **kwargs)
                target = tmp_dir / f"{item['id']}.npy"
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, pred[0, 0].float().cpu().numpy())
                result[split].append({**raw_item, key: f"{key}/{item['id']}.npy"})
                bar.update()
    new_datalist = dataset_dir / f"datalist_{key}.json"
    tmp_json = new_datalist.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(result, indent=1))
    tmp_json.replace(new_datalist)
    return new_datalist


def load_weights(network: torch.nn.Module, path, key: str, hint: str) -> torch.nn.Module:
    """``network`` with a stage's checkpoint loaded, in eval mode: how a later stage uses an earlier one.

    Raises:
        InputError: the checkpoint named by config ``key`` is missing (``hint`` says which stage writes it),
            unreadable, or does not fit the network (usually: other size overlays than in training).
    """
    path = Path(path)
    if not path.is_file():
        raise_missing(key, path, hint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as exc:
        raise InputError(path, f"`{key}` does not fit the network ({one_line(exc)[:240]}); pass the overlays "
                         "it was trained with, e.g. configs/presets/cpu.yaml") from exc
    return network.eval()
