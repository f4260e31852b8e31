"""Denoising scans with a trained bundle: DICOM/NIfTI/PNG/TIFF in, the same format out, plus a JSON report.

Per volume: read (``diffdenoise.io``); normalise as in training (``diffdenoise.data.intensity_range``: CT
through the HU window, other modalities min..p99.9 of the volume); denoise slice by slice along the
acquisition axis, a batch at a time; map back to physical units, replacing only values inside the
normalisation range, because clipping destroyed the others (they pass through unchanged); write in the
input's format (``diffdenoise.io.write_volume``). The output folder appears whole or not at all.

Models come from a bundle folder ``DIR/configs/*.yaml`` + ``DIR/models/*.pt``. ``MODES`` says per mode
which checkpoint to load and which config keys build its network and inferer, so a new stage is one row.

Example::

    from diffdenoise.denoise import denoise

    out = denoise("../shared/data/head_ct_ge/series", "/tmp/head_ct_denoised", bundle="bundles/diffdenoise",
                  mode="bsn", config=["presets/cpu"], device="cpu")
    # /tmp/head_ct_denoised/series_<hash>/01.dcm ... (a derived DICOM series) + series_<hash>.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pydicom
import torch
from monai.bundle import ConfigParser
from skimage.restoration import estimate_sigma
from tqdm import tqdm

from diffdenoise import __version__
from diffdenoise.data import NORMALISATION_RULE, evenly_spaced, intensity_range, scale_to_unit
from diffdenoise.distributed import Shard, shard_group
from diffdenoise.errors import InputError, one_line
from diffdenoise.io import (
    MODALITIES,
    DerivedSeriesUIDs,
    Volume,
    VolumeSource,
    atomic_folder,
    check_output_folder,
    scan_volumes,
    write_volume,
)
from diffdenoise.quality import estimate_gain, resolve_noise_level
from diffdenoise.stages import bundle_dir, overlay_path

MIN_SLICE_SIZE = 16  # pixels per side: below this a blind-spot net has almost no context to predict from


class Mode(NamedTuple):
    """Where a denoising mode's model lives in a bundle."""

    checkpoint_key: str  # config key of the weights file (a later iteration's bundle names another file)
    network_key: str  # config key of the network definition
    inferer_key: str  # config key of the inferer, called as inferer(inputs, network)
    configs: tuple[str, ...]  # files under DIR/configs that define these keys, in merge order
    trained_by: str  # the stage that writes the checkpoint, for the error when it is missing


MODES = {
    "bsn": Mode("bsn_ckpt", "bsn_def", "bsn_denoiser", ("common.yaml",), "stage 1"),
    "student": Mode("student_ckpt", "network_def", "inferer", ("common.yaml", "inference.yaml"), "stage 4"),
    "srds": Mode("diffusion_ckpt", "diffusion_def", "srds_inferer", ("common.yaml", "sample_srds.yaml"), "stage 2"),
}
# the mode that takes the bundle's ``default_mode``: the one ``diffdenoise fit`` estimated best (diffdenoise.assessment)
AUTO_MODE = "auto"
# slices per volume whose gain is estimated without a reference (diffdenoise.quality); each costs two more passes
ESTIMATE_SLICES = 8
# the uncertainty map beside each output: <volume_id>_uncertainty (+ the input's suffix), its own DICOM series
UNCERTAINTY_SUFFIX = "_uncertainty"
UNCERTAINTY_SERIES_SUFFIX = " [diffdenoise std]"


@dataclass
class Model:
    """A network with its inferer, denoising batches of normalised slices; the provenance goes in reports.

    Args:
        mode: a key of ``MODES``.
        network: the torch module, in eval mode on ``device``.
        inferer: called as ``inferer(inputs, network)`` on (B, 1, H, W) tensors in [0, 1].
        device: where batches are sent.
        checkpoint: the weights file.
        sha256: its hash.
        configs: the config files the network and inferer were built from.
        precision: ``"float32"``, or ``"bfloat16"``: the forward passes run under bf16 autocast.
        noise: the bundle's ``noise_model``, ``noise_level`` (None: unknown) and ``noise_correlation_sigma``, for
            the no-reference estimate of what the mode gained.
    """

    mode: str
    network: torch.nn.Module
    inferer: Callable
    device: torch.device
    checkpoint: Path
    sha256: str
    configs: list[str] = field(default_factory=list)
    precision: str = "float32"
    noise: dict = field(default_factory=lambda: {"model": "gaussian", "level": None, "correlation_sigma": 0.0})

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """Denoises float32 (B, H, W) slices in [0, 1]; returns float32 (B, H, W), not clipped."""
        return self._run(self.inferer, slices)

    @property
    def has_posterior(self) -> bool:
        """Whether the inferer gives a posterior std (stage 1's ``PosteriorReinjection``); the diffusion
        sampler and the student give one estimate, not a distribution."""
        return callable(getattr(self.inferer, "posterior", None))

    def posterior_std(self, slices: np.ndarray) -> np.ndarray:
        """The posterior standard deviation of float32 (B, H, W) slices in [0, 1], in those units."""
        if not self.has_posterior:
            raise InputError("--uncertainty", f"mode '{self.mode}' has no posterior; use --mode bsn")
        return self._run(lambda x, network: self.inferer.posterior(x, network)[1], slices)

    def _run(self, inferer: Callable, slices: np.ndarray) -> np.ndarray:
        """``inferer(x, network)`` on (B, H, W) slices as a (B, 1, H, W) batch, at the model's precision."""
        x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None].to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bfloat16"
                    else nullcontext())
        with torch.inference_mode(), autocast:
            y = inferer(x, self.network)
        return y[:, 0].float().cpu().numpy()


PRECISIONS = ("auto", "float32", "bfloat16")


def load_model(bundle=None, mode: str | None = None, device: str | None = None, config: Sequence[str] = (),
               precision: str = "auto", compile: bool = False) -> Model:
    """Builds a mode's network and inferer from a bundle's configs and loads its checkpoint.

    Args:
        bundle: folder with ``configs/common.yaml`` and ``models/*.pt``; None is the shipped
            ``bundles/diffdenoise``.
        mode: a key of ``MODES``, or ``auto`` (or None): the bundle's ``default_mode``, which ``diffdenoise fit``
            sets to the mode with the best estimated gain (``report.md``), or "bsn" where that mode is not trained.
        device: "cpu", "cuda" or "cuda:N"; None picks cuda when available.
        config: overlays merged after the bundle's configs, as in training: YAML/JSON paths or shipped
            overlay names (``presets/cpu``). Pass the ones the model was trained with, since they set
            its size.
        precision: ``float32``, ``bfloat16`` (autocast: about 2-3 significant digits, so expect differences of
            ~1e-3 in [0, 1] units), or ``auto``: bfloat16 on a GPU, float32 on a CPU (where bf16 is rarely faster).
        compile: ``torch.compile`` the network (the first batch of each slice size pays the compilation). On a GPU
            the network also goes channels_last, the layout its convolutions run fastest in.

    Raises:
        InputError: no bundle, an unknown mode, device or precision, a missing checkpoint ("train stage N first")
            or config, keys the configs lack, or a checkpoint that does not fit the network they build.
    """
    bundle = bundle_dir() if bundle is None else Path(bundle)
    if not (bundle / "configs" / "common.yaml").is_file():
        problem = "not a bundle: no configs/common.yaml; --bundle needs a folder with configs/*.yaml and models/*.pt"
        raise InputError(bundle, problem)
    if mode in (None, AUTO_MODE):
        mode = _default_mode(bundle, config)
    if mode not in MODES:
        raise InputError("--mode", f"{mode!r} is not one of {', '.join([AUTO_MODE, *MODES])}")
    spec = MODES[mode]
    checkpoint = _checkpoint(bundle, mode, config)
    if not checkpoint.is_file():
        where = checkpoint.relative_to(bundle) if checkpoint.is_relative_to(bundle) else checkpoint
        raise InputError(bundle, f"mode '{mode}' needs {where} (train {spec.trained_by} first)")
    files = [bundle / "configs" / name for name in spec.configs] + [_config_file(c) for c in config]
    parser = _read_configs(bundle, files, mode)
    device = resolve_device(device)
    if precision not in PRECISIONS:
        raise InputError("--precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" else "float32"
    names = ", ".join(path.name for path in files)
    try:
        network = parser.get_parsed_content(spec.network_key)
        inferer = parser.get_parsed_content(spec.inferer_key)
    except Exception as exc:
        raise InputError(bundle / "configs", f"cannot build `{spec.network_key}`/`{spec.inferer_key}` from {names} "
                         f"({one_line(exc)})") from exc  # fmt: skip
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(checkpoint, f"cannot read the checkpoint ({one_line(exc)})") from exc
    try:
        network.load_state_dict(state)
    except Exception as exc:
        problem = f"does not fit `{spec.network_key}` built from {names} ({one_line(exc)[:240]})"
        fix = "pass the overlays used in training, e.g. --config presets/cpu"
        raise InputError(checkpoint, f"{problem}; {fix}") from exc
    network = network.to(device).eval()
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    if compile:
        network = torch.compile(network)
    configs = [str(path.resolve()) for path in files]
    noise = {"model": parser.get("noise_model", "gaussian"), "level": parser.get("noise_level"),
             "correlation_sigma": float(parser.get("noise_correlation_sigma") or 0.0)}
    return Model(mode, network, inferer, device, checkpoint.resolve(), file_sha256(checkpoint), configs, precision,
                 noise)


def _read_configs(bundle: Path, files: Sequence[Path], mode: str) -> ConfigParser:
    """``files`` merged in order, with bundle_root = ``bundle``.

    Raises:
        InputError: a file is missing or does not parse.
    """
    for path in files:
        if not path.is_file():
            raise InputError(path, f"no such config file; mode '{mode}' reads it")
        try:
            ConfigParser.load_config_file(path)
        except Exception as exc:
            raise InputError(path, f"cannot parse the config ({one_line(exc)})") from exc
    parser = ConfigParser()
    parser.read_config([str(path) for path in files])
    parser["bundle_root"] = str(bundle)
    return parser


def _default_mode(bundle: Path, config: Sequence[str]) -> str:
    """The bundle's ``default_mode`` when its checkpoint exists, else "bsn" (a bundle trained up to stage 1).

    Raises:
        InputError: the bundle's default is null: ``diffdenoise fit`` estimated that no mode beats the input.
    """
    common = bundle / "configs" / "common.yaml"
    parser = _read_configs(bundle, [common, *map(_config_file, config)], "default")
    mode = parser.get("default_mode", "bsn")
    if mode is None:
        raise InputError(bundle, "no mode of this bundle was estimated to beat the noisy input on its validation "
                         f"slices ({bundle / 'report.md'}), so it has no default; pass --mode "
                         f"{'|'.join(MODES)} to run one anyway")
    if mode not in MODES:
        raise InputError(common, f"default_mode {mode!r} is not one of {', '.join(MODES)}")
    return mode if _checkpoint(bundle, mode, config).is_file() else "bsn"


def trained_modes(bundle, config: Sequence[str] = ()) -> list[str]:
    """The modes of ``MODES`` whose checkpoint the bundle holds, in ``MODES`` order."""
    return [mode for mode in MODES if _checkpoint(Path(bundle), mode, config).is_file()]


def _checkpoint(bundle: Path, mode: str, config: Sequence[str]) -> Path:
    """The weights file that a mode's configs name (``student_ckpt``: ``models/model.pt``, or the last iteration's).

    The mode's own config may be missing here (a bundle trained only up to stage 1): ``common.yaml`` names
    every stage's default checkpoint, so the error can say which stage to train.

    Raises:
        InputError: a user overlay is missing or unparsable, or the configs cannot resolve the key.
    """
    spec = MODES[mode]
    present = [bundle / "configs" / name for name in spec.configs if (bundle / "configs" / name).is_file()]
    parser = _read_configs(bundle, present + [_config_file(c) for c in config], mode)
    try:
        return Path(parser.get_parsed_content(spec.checkpoint_key))
    except Exception as exc:
        raise InputError(bundle / "configs", f"the configs do not name `{spec.checkpoint_key}` ({one_line(exc)})") \
            from exc


def denoise_volume(
    volume: Volume,
    model: Callable[[np.ndarray], np.ndarray],
    modality: str | None = None,
    ct_window=(-100.0, 200.0),
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Denoises a volume slice-wise in its physical units, passing through what normalisation clipped.

    Memory: the input, the output and one batch of float32 slices (the percentile of the intensity
    range copies the input once, before the output exists).

    Args:
        volume: as read by ``diffdenoise.io``; ``array`` is (Z, H, W), Z the acquisition axis.
        model: maps float32 (B, H, W) slices in [0, 1] to denoised ones, e.g. a ``Model``.
        modality: overrides ``volume.modality`` ("mri", "ct", "xray", "other"); use the one training used.
        ct_window: HU mapped to [0, 1] for CT, as in training.
        batch_size: slices per forward pass.
        progress: show a tqdm bar over slices.

    Returns:
        ``(array, stats)``: float32 (Z, H, W) in the input's units, and the ``intensity_range`` used, the
        count of voxels passed through, and the mean ``estimate_sigma`` of the normalised slices before
        and after.

    Raises:
        InputError: slices under ``MIN_SLICE_SIZE``, a constant or a 1-bit image.
    """
    _check_volume(volume)
    name = modality or volume.modality
    low, high = intensity_range(volume.array, name, ct_window)
    out = np.empty_like(volume.array)
    sigma_before, sigma_after, passed = [], [], 0
    with tqdm(total=len(out), desc=volume.volume_id, unit="slice", leave=False, disable=not progress) as bar:
        for start in range(0, len(out), batch_size):
            x = volume.array[start : start + batch_size]
            x01 = scale_to_unit(x, low, high)
            denoised = low + np.clip(model(x01), 0.0, 1.0) * (high - low)
            inside = (x >= low) & (x <= high)
            out[start : start + len(x)] = np.where(inside, denoised, x)
            passed += int(inside.size - np.count_nonzero(inside))
            sigma_before += [estimate_sigma(s) for s in x01]
            sigma_after += [estimate_sigma(s) for s in scale_to_unit(out[start : start + len(x)], low, high)]
            bar.update(len(x))
    stats = {
        "modality": name,
        "intensity_range": [low, high],
        "voxels_passed_through": passed,
        "noise_sigma_before": float(np.mean(sigma_before)),
        "noise_sigma_after": float(np.mean(sigma_after)),
    }
    return out, stats


def posterior_std_volume(volume: Volume, model: Model, intensity_range, batch_size: int = 8) -> np.ndarray:
    """Stage 1's posterior standard deviation per voxel (``PosteriorReinjection.posterior``), in the volume's
    units: how far the denoised value may be from the clean one, given the prior and the noise model.

    Computed on the slices normalised as ``denoise_volume`` normalised them (``intensity_range``) and scaled
    back by its width; 0 where that pass let a voxel through unchanged (outside the range: not denoised).
    """
    low, high = intensity_range
    std = np.zeros_like(volume.array)
    for start in range(0, len(std), batch_size):
        x = volume.array[start : start + batch_size]
        inside = (x >= low) & (x <= high)
        spread = model.posterior_std(scale_to_unit(x, low, high)) * (high - low)
        std[start : start + len(x)] = np.where(inside, spread, 0.0)
    return std


def estimate_volume_gain(volume: Volume, model: Model, intensity_range, slices: int = ESTIMATE_SLICES,
                         seed: int = 0) -> dict:
    """How much ``model`` is estimated to gain over the noisy volume, with no reference (``diffdenoise.quality``).

    Scored on up to ``slices`` evenly spaced non-constant slices, normalised as they were denoised, with the
    bundle's noise model and level (measured on those slices when the bundle's level is null). Returns the
    numbers for the JSON report, or ``{"skipped": why}`` where no estimate can be made (``slices`` 0, correlated
    Poisson noise, too little texture-free area to measure the noise)."""
    if slices == 0:
        return {"skipped": "estimate_slices is 0"}
    low, high = intensity_range
    picks = evenly_spaced(len(volume.array), slices)
    normalised = [scale_to_unit(volume.array[k], low, high) for k in picks]
    normalised = [s for s in normalised if s.max() > s.min()]
    if not normalised:
        return {"skipped": "every sampled slice is constant after normalisation"}
    noise = model.noise
    try:
        level, source = resolve_noise_level(normalised, noise["model"], noise["level"], noise["correlation_sigma"])
        exact = dataclasses.replace(model, precision="float32")  # bf16 rounding would swamp the probe's difference
        estimate = estimate_gain(exact, normalised, noise["model"], level, noise["correlation_sigma"], seed)
    except ValueError as exc:
        return {"skipped": one_line(exc)}
    where = "the bundle's noise_level" if source == "bundle" else "measured on these slices (diffdenoise.noise_level)"
    return {**estimate.summary(), "noise_level_source": where,
            "estimator": "diffdenoise.quality: SURE / generalised SURE / PURE on the normalised slices"}


def denoise(
    src,
    out,
    bundle=None,
    mode: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    series: str | None = None,
    config: Sequence[str] = (),
    modality: str | None = None,
    ct_window=(-100.0, 200.0),
    batch_size: int = 8,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    precision: str = "auto",
    compile: bool = False,
    estimate_slices: int = ESTIMATE_SLICES,
    uncertainty: bool = False,
) -> Path:
    """Denoises every volume in ``src`` into the folder ``out``, in the input's format, with a report each.

    ``out/<volume_id>`` + the input's suffix (a folder for a DICOM series of several files) and
    ``out/<volume_id>.json``: noise sigma before/after (``skimage.restoration.estimate_sigma`` on the
    normalised slices), slices, intensity range, timings, mode, model file and sha256, version. All
    checks that need no pixels run first; a failure later leaves no output (and an old one in place).

    Args:
        src: DICOM file or series folder, multi-frame DICOM, NIfTI, PNG, TIFF, or a folder of any mix.
        out: output folder; must not exist (or be empty) unless ``overwrite``, nor overlap ``src``.
        bundle, mode, device, config, precision, compile: the model, see ``load_model``.
        overwrite: replace an existing ``out``.
        series: only the DICOM series with this SeriesInstanceUID (default: every volume found).
        modality, ct_window, batch_size: see ``denoise_volume``; modality and ct_window as in training.
        progress: tqdm bars over volumes (when several) and slices.
        callback: called with each volume's report once it is written.
        estimate_slices: slices per volume on which the report's ``quality`` (the estimated gain of the mode over
            the input, without a reference: ``estimate_volume_gain``) is measured; 0 skips it. When the estimate
            says the output is no better than the input, one line on stderr says so.
        uncertainty: also write stage 1's posterior std (``posterior_std_volume``) as ``<name>_uncertainty`` in
            the input's format (DICOM: a derived series of its own, SeriesDescription "... [diffdenoise std]";
            stored in the input's bit depth and rescale, so rounded to its step) and its mean in the report.
            Needs a mode with a posterior: ``bsn``.

    Returns:
        ``out``.

    Raises:
        InputError: bad input, output or model, see ``diffdenoise.io``, ``load_model``, ``denoise_volume``.
    """
    src, out = Path(src), Path(out)
    with shard_group() as shard:
        error = None
        try:
            check_output_folder(out, src, overwrite)
            if modality is not None and modality not in MODALITIES:
                raise InputError("--modality", f"{modality!r} is not one of {', '.join(MODALITIES)}")
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise InputError("--batch_size", f"must be an integer >= 1, got {batch_size!r}")
            if isinstance(estimate_slices, bool) or not isinstance(estimate_slices, int) or estimate_slices < 0:
                raise InputError("--estimate_slices", f"must be an integer >= 0, got {estimate_slices!r}")
            sources = _select_series(scan_volumes(src), series, src)
            if shard.size > 1 and device in (None, "cuda") and torch.cuda.is_available():
                device = f"cuda:{shard.local_rank}"
            model = load_model(bundle, mode, device, config, precision, compile)
            if uncertainty and not model.has_posterior:
                raise InputError("--uncertainty", f"needs --mode bsn, stage 1's posterior; mode '{model.mode}' gives "
                                                  "one estimate, not a distribution")
        except Exception as exc:
            error = exc
        _all_or_none(shard, error, out)
        with atomic_folder(out, overwrite) if shard.rank == 0 else nullcontext() as tmp:
            tmp, salt = shard.broadcast((tmp, uuid.uuid4().hex))
            try:
                _denoise_volumes(shard.take(sources), tmp, out, model, salt, shard, modality, ct_window, batch_size,
                                 progress and shard.rank == 0, callback, estimate_slices, uncertainty)
            except Exception as exc:
                error = exc
            _all_or_none(shard, error, out)
        shard.barrier()  # the output is in place before any rank returns
    return out


def _all_or_none(shard: Shard, error: Exception | None, out: Path) -> None:
    """Raises this rank's error, or, when another rank of a torchrun launch failed, an error saying so; every
    rank waits here, so none goes on (or renames the output into place) past a failure."""
    succeeded = shard.all_succeeded(error is None)
    if error is not None:
        raise error
    if not succeeded:
        raise InputError(out, "another process of the torchrun launch failed (its error is above); no output written")


def _denoise_volumes(sources, tmp: Path, out: Path, model: Model, salt: str, shard: Shard, modality, ct_window,
                     batch_size: int, progress: bool, callback, estimate_slices: int, uncertainty: bool) -> None:
    """Reads, denoises and writes each volume with its JSON report (and its uncertainty map) into ``tmp``, the
    future ``out``. ``salt`` is the run's, shared by a torchrun launch's processes: the outputs of one source
    series form one derived series, its uncertainty maps another."""
    series_uids, std_series_uids = DerivedSeriesUIDs(salt), DerivedSeriesUIDs(f"{salt}-uncertainty")
    derivation = f"diffdenoise {__version__} {model.mode} ({model.checkpoint.name} sha256 {model.sha256[:12]})"
    for source in tqdm(sources, desc="denoise", unit="volume", disable=not progress or len(sources) < 2):
        started = time.perf_counter()
        volume = source.read()
        read = time.perf_counter()
        array, stats = denoise_volume(volume, model, modality, ct_window, batch_size, progress)
        denoised = time.perf_counter()
        quality = estimate_volume_gain(volume, model, stats["intensity_range"], estimate_slices)
        estimated = time.perf_counter()
        written = write_volume(volume, array, tmp / volume.volume_id, derivation, series_uids)
        std_report = {}
        if uncertainty:
            std = posterior_std_volume(volume, model, stats["intensity_range"], batch_size)
            std_written = write_volume(volume, std, tmp / f"{volume.volume_id}{UNCERTAINTY_SUFFIX}",
                                       f"{derivation}: posterior std", std_series_uids, UNCERTAINTY_SERIES_SUFFIX)
            std_report = _uncertainty_report(std, volume, stats, model, out / std_written.relative_to(tmp))
            if volume.meta["format"] == "dicom":
                std_report["SeriesInstanceUID"] = std_series_uids[volume.meta["SeriesInstanceUID"]]
            std_report = {"uncertainty": std_report}
        finished = time.perf_counter()
        report = {
            "input": str(Path(volume.source).resolve()),
            "output": str(out.resolve() / written.relative_to(tmp)),
            "format": volume.meta["format"],
            "volume_id": volume.volume_id,
            "shape": list(volume.array.shape),
            "slices": len(volume.array),
            **stats,
            "normalisation": NORMALISATION_RULE,
            "noise_sigma_method": "skimage.restoration.estimate_sigma per normalised slice, mean over slices",
            "timings_s": {"read": read - started, "denoise": denoised - read, "estimate": estimated - denoised,
                          "write": finished - estimated},
            "mode": model.mode,
            "quality": quality,
            **std_report,
            "model_file": str(model.checkpoint),
            "model_sha256": model.sha256,
            "configs": model.configs,
            "device": str(model.device),
            "precision": model.precision,
            "diffdenoise_version": __version__,
            **({"rank": shard.rank, "world_size": shard.size} if shard.size > 1 else {}),
        }
        if volume.meta["format"] == "dicom":
            report["SeriesInstanceUID"] = series_uids[volume.meta["SeriesInstanceUID"]]
            report["source_SeriesInstanceUID"] = volume.meta["SeriesInstanceUID"]
        (tmp / f"{volume.volume_id}.json").write_text(json.dumps(report, indent=1))
        if quality.get("estimated_gain_db", 1.0) <= 0:
            print(f"diffdenoise: {volume.volume_id}: the '{model.mode}' output is estimated no better than the input "
                  f"({quality['estimated_gain_db']:+.2f} dB without a reference; {out / volume.volume_id}.json)",
                  file=sys.stderr)
        if callback is not None:
            callback(report)


def _uncertainty_report(std: np.ndarray, volume: Volume, stats: dict, model: Model, written: Path) -> dict:
    """The JSON report's ``uncertainty``: where the map is and its mean over the voxels that were denoised."""
    low, high = stats["intensity_range"]
    denoised = (volume.array >= low) & (volume.array <= high)
    mean = float(std[denoised].mean()) if denoised.any() else 0.0
    return {"output": str(written.resolve()), "mean_std": mean, "mean_std_normalised": mean / (high - low),
            "prior": getattr(model.inferer, "prior", None),
            "definition": "stage 1's posterior std sqrt(v s^2 / (v + s^2)) per voxel, in the input's units; the mean "
                          "is over denoised voxels (passed-through ones are 0 in the map); *_normalised: in the [0, 1] "
                          "units of intensity_range"}


def _check_volume(volume: Volume) -> None:
    """Refuses images a denoiser cannot help, naming the file and why."""
    _, h, w = volume.array.shape
    if min(h, w) < MIN_SLICE_SIZE:
        raise InputError(volume.source, f"{h}x{w} pixels is too small; slices need at least "
                         f"{MIN_SLICE_SIZE}x{MIN_SLICE_SIZE} pixels")  # fmt: skip
    if volume.meta.get("mode") == "1":
        raise InputError(volume.source, "1-bit (black and white) image; there is no noise to remove")
    low, high = float(volume.array.min()), float(volume.array.max())
    if low == high:
        raise InputError(volume.source, f"constant image (every pixel is {low:g}); there is no noise to remove")


def _select_series(sources: list[VolumeSource], series: str | None, src: Path) -> list[VolumeSource]:
    """Keeps the volumes of one SeriesInstanceUID, or all when ``series`` is None."""
    if series is None:
        return sources
    uids = [_series_uid(source) for source in sources]
    chosen = [source for source, uid in zip(sources, uids) if uid == str(series)]
    if not chosen:
        found = ", ".join(sorted({uid for uid in uids if uid})) or "none"
        raise InputError(src, f"no DICOM series with SeriesInstanceUID {series}; found: {found}")
    return chosen


def _series_uid(source: VolumeSource) -> str:
    """SeriesInstanceUID of a DICOM volume from its first header; "" for other formats."""
    if source.kind != "dicom":
        return ""
    header = pydicom.dcmread(source.files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    return str(header.get("SeriesInstanceUID", ""))


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """The torch device to run on (None: cuda when available); refuses cuda where torch sees none, rather than
    failing mid-volume. ``option`` names the setting in the error."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise InputError(option, f"{name!r} is not a device ({one_line(exc)}); use cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(option, f"{name} asked for, but torch sees no CUDA device; use cpu")
    return device


def _config_file(name) -> Path:
    """A --config entry: a YAML/JSON path, or a shipped overlay name such as ``presets/cpu``."""
    path = Path(name)
    if path.is_file():
        return path
    try:
        return overlay_path(str(name))
    except (ValueError, FileNotFoundError) as exc:
        raise InputError(name, f"no such config file, and {exc}") from exc


def file_sha256(path: Path) -> str:
    """Hash of a model file, so a report names exactly which weights produced an output."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
