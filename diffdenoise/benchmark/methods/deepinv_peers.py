"""Peers' own implementations: deepinv's R2R, Neighbor2Neighbor and SURE losses (``diffdenoise.baselines.
deepinv_runner``), trained in the optional peers' environment because deepinv cannot be imported beside this
project's CPU torch build (docs/benchmark.md, "Peers' own implementations").

``fit`` starts the runner with that environment's python (``DIFFDENOISE_BASELINES_PYTHON``, default
``.venv-baselines/bin/python`` in this checkout, made by ``scripts/baselines_env.sh``); the runner trains, then
stays up and denoises the slices sent to it until the denoiser is dropped. Without that python the methods are
skipped with one line saying how to make it.
"""

from __future__ import annotations

import json
import os
import subprocess
import weakref
from pathlib import Path

import numpy as np
import torch

import diffdenoise
from diffdenoise.benchmark.methods.base import Denoiser

PYTHON_VARIABLE = "DIFFDENOISE_BASELINES_PYTHON"


def baselines_python() -> Path:
    """The peers' environment's python: ``$DIFFDENOISE_BASELINES_PYTHON``, else this checkout's ``.venv-baselines``."""
    default = Path(diffdenoise.__file__).resolve().parents[1] / ".venv-baselines" / "bin" / "python"
    return Path(os.environ.get(PYTHON_VARIABLE) or default)


def peers_unavailable() -> str | None:
    """Why the deepinv methods cannot run here (no peers' environment), or None."""
    python = baselines_python()
    if os.access(python, os.X_OK):
        return None
    return (f"the peers' environment is absent ({python} not found): create it with scripts/baselines_env.sh, or "
            f"point {PYTHON_VARIABLE} at a python with deepinv and diffdenoise installed")


class _Served:
    """A denoiser answered by the runner process that trained it: one slice a request, through ``folder``."""

    def __init__(self, process: subprocess.Popen, folder: Path, log: Path):
        self.process, self.folder, self.log = process, folder, log
        weakref.finalize(self, process.stdin.close)  # end of input: the runner exits

    def __call__(self, noisy: np.ndarray) -> np.ndarray:
        source, target = self.folder / "noisy.npy", self.folder / "denoised.npy"
        np.save(source, np.asarray(noisy, dtype=np.float32))
        self.process.stdin.write(f"{source}\t{target}\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != str(target):
            raise RuntimeError(f"the deepinv runner stopped answering (exit {self.process.poll()}); see {self.log}")
        return np.load(target)


def fit_deepinv(loss: str):
    """A ``fit`` training deepinv's ``loss`` (``r2r``, ``n2n`` or ``sure``) with the case's noise model and level;
    knobs (iterations, patch_size, batch_size, lr, features and the loss's own) from the preset."""

    def fit(train_noisy, workdir, settings) -> Denoiser:
        train = workdir / "train"
        train.mkdir()
        for index, image in enumerate(train_noisy):
            np.save(train / f"{index:05d}.npy", np.asarray(image, dtype=np.float32))
        log = workdir / "runner.log"
        command = [str(baselines_python()), "-m", "diffdenoise.baselines.deepinv_runner", "--loss", loss,
                   "--noise", settings.case.noise, "--train", str(train), "--options", json.dumps(dict(settings.options)),
                   "--seed", str(settings.seed), "--threads", str(torch.get_num_threads()),
                   "--log", str(workdir / "training.json")]
        if settings.case.level is not None:
            command += ["--level", repr(settings.case.level)]
        with open(log, "w") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                       text=True)
        if process.stdout.readline().strip() != "ready":
            process.stdin.close()
            tail = "\n".join(log.read_text().strip().splitlines()[-3:])
            raise RuntimeError(f"deepinv {loss} failed to train (exit {process.wait()}; {log}):\n{tail}")
        return _Served(process, workdir, log)

    return fit
