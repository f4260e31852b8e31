"""The denoising model of the Deploy app: a TorchScript file, or a bundle folder as a fallback.

Needs no MONAI Deploy: ``load_denoiser`` returns a callable that maps float32 ``(B, H, W)`` slices in
[0, 1] to denoised ones, the interface ``diffdenoise.denoise.denoise_volume`` takes.

Accepted model paths (the app's ``-m``):

- a TorchScript file (``models/model.ts`` from ``python -m monai.bundle ckpt_export``, or any
  ``torch.jit.save``-d module) mapping ``(B, 1, H, W)`` float in [0, 1] to the same shape;
- a folder holding ``model.ts``, ``models/model.ts`` (a bundle), or one subfolder with one TorchScript file
  (the MONAI Application Package layout ``/opt/holoscan/models/<name>/model.ts``);
- a bundle folder without ``model.ts`` (``configs/common.yaml`` + ``models/*.pt``): built with
  ``diffdenoise.denoise.load_model`` (``mode`` and ``config`` as for ``diffdenoise denoise``).

A TorchScript file made by ``ckpt_export`` embeds its bundle configs (``<root>/extra/*.json``). When they
define ``inferer_key`` (default ``inferer``, the student's key in ``inference.yaml``), the network is run
through that inferer, as ``monai.bundle`` would; otherwise it is called directly.

Example::

    from diffdenoise.deploy.model import load_denoiser

    denoiser = load_denoiser("bundles/diffdenoise/models/model.ts", device="cpu")
    y = denoiser(x)          # x: float32 (B, H, W) in [0, 1] -> float32 (B, H, W)
    print(denoiser.derivation)
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from diffdenoise import __version__
from diffdenoise.denoise import file_sha256, load_model, resolve_device
from diffdenoise.errors import InputError, one_line

logger = logging.getLogger(__name__)

TORCHSCRIPT_NAMES = ("model.ts", "models/model.ts")  # looked for, in this order, inside a model folder


class TorchScriptDenoiser:
    """A TorchScript denoiser, optionally run through the inferer its embedded bundle configs define.

    Args:
        path: the TorchScript file.
        device: "cpu", "cuda" or "cuda:N"; None picks cuda when available.
        inferer_key: config key of the inferer in the embedded configs; absent means a direct call.

    Raises:
        InputError: not a TorchScript file, an unusable device.
    """

    def __init__(self, path, device: str | None = None, inferer_key: str = "inferer"):
        self.path = Path(path).resolve()
        self.device = resolve_device(device, option="device")
        try:
            self.network = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as exc:
            problem = (f"not a TorchScript model ({one_line(exc).split('. ')[0]}); "
                       "export one with python -m monai.bundle ckpt_export")
            raise InputError(self.path, problem) from exc
        self.sha256 = file_sha256(self.path)
        self.configs = embedded_configs(self.path)
        self.inferer, self.inferer_name = self._inferer(inferer_key)
        self.derivation = (
            f"diffdenoise {__version__} deploy ({self.path.name} sha256 {self.sha256[:12]}, {self.inferer_name})"
        )

    def _inferer(self, key: str) -> tuple[Callable | None, str]:
        """The embedded configs' inferer under ``key``, or None (direct call) when they have none."""
        # The archive keeps the configs by file name only, not their merge order: common first, then
        # inference, then the rest (overlays) by name.
        order = sorted((n for n in self.configs if n != "metadata"), key=lambda n: (n != "common", n != "inference", n))
        merged = {}
        for name in order:
            merged.update(self.configs[name])
        if key not in merged:
            return None, "direct call"
        parser = ConfigParser(merged)
        try:
            inferer = parser.get_parsed_content(key)
        except Exception as exc:
            logger.warning("%s: the embedded `%s` cannot be built (%s); calling the network directly",
                           self.path, key, one_line(exc)[:200])  # fmt: skip
            return None, "direct call"
        return inferer, f"embedded `{key}`: {type(inferer).__name__}"

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """Denoises float32 ``(B, H, W)`` slices in [0, 1]; returns float32 ``(B, H, W)``, not clipped."""
        x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None].to(self.device)
        with torch.inference_mode():
            y = self.network(x) if self.inferer is None else self.inferer(inputs=x, network=self.network)
        if tuple(y.shape) != tuple(x.shape):
            raise InputError(self.path, f"maps input {tuple(x.shape)} to {tuple(y.shape)}; a denoiser must map "
                             "(B, 1, H, W) to the same shape")  # fmt: skip
        return y[:, 0].float().cpu().numpy()


class BundleDenoiser:
    """A bundle folder's model (``diffdenoise.denoise.load_model``), with ``TorchScriptDenoiser``'s attributes."""

    def __init__(self, bundle, mode: str | None = None, device: str | None = None, config: Sequence[str] = ()):
        self.model = load_model(bundle, mode, device, config)
        self.path, self.sha256, self.device = self.model.checkpoint, self.model.sha256, self.model.device
        self.inferer_name = f"{self.model.mode} mode"
        self.derivation = (
            f"diffdenoise {__version__} {self.model.mode} ({self.path.name} sha256 {self.sha256[:12]})"
        )

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        return self.model(slices)


def load_denoiser(path, device: str | None = None, mode: str | None = None, config: Sequence[str] = (),
                  inferer_key: str = "inferer"):  # fmt: skip
    """The denoiser at ``path``: a TorchScript file or folder holding one, else a bundle folder.

    Args:
        path: see the module docstring.
        device: "cpu", "cuda" or "cuda:N"; None picks cuda when available.
        mode, config: for a bundle folder without ``model.ts`` only, as in ``diffdenoise.denoise.load_model``.
        inferer_key: the embedded configs' inferer key, for TorchScript.

    Returns:
        ``TorchScriptDenoiser`` or ``BundleDenoiser``: callables on float32 ``(B, H, W)`` in [0, 1] with
        ``path``, ``sha256``, ``device``, ``inferer_name`` and ``derivation`` (for DerivationDescription).

    Raises:
        InputError: nothing usable at ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such model file or folder; pass -m models/model.ts or a bundle folder")
    if path.is_file():
        return TorchScriptDenoiser(path, device, inferer_key)
    for name in TORCHSCRIPT_NAMES:
        if (path / name).is_file():
            return TorchScriptDenoiser(path / name, device, inferer_key)
    if (path / "configs" / "common.yaml").is_file():
        return BundleDenoiser(path, mode, device, config)
    entries = list(path.iterdir())
    if len(entries) == 1 and entries[0].is_dir():  # MAP layout: models/<name>/<one file>
        files = [p for p in entries[0].iterdir() if p.is_file()]
        if len(files) == 1:
            return TorchScriptDenoiser(files[0], device, inferer_key)
    raise InputError(path, "no model.ts, models/model.ts, models/<name>/<file> or bundle configs/common.yaml "
                     "in this folder")  # fmt: skip


def embedded_configs(path) -> dict[str, dict]:
    """The JSON files ``ckpt_export`` stores under ``<root>/extra/`` of a TorchScript archive, by stem."""
    configs = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[1] == "extra" and parts[2].endswith(".json"):
                try:
                    configs[parts[2][:-5]] = json.loads(archive.read(name))
                except ValueError:
                    logger.warning("%s: embedded %s is not JSON; ignored", path, name)
    return configs
