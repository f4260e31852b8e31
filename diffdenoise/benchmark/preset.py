"""Benchmark presets (``configs/benchmark/*.yaml``): read and checked before anything runs, and which methods a
preset runs on which case."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from diffdenoise.benchmark.cases import DATASETS, REFERENCES, STRONG_LEVELS, Case, parse_noise
from diffdenoise.benchmark.methods import METHODS, PIPELINE_METHODS
from diffdenoise.errors import InputError
from diffdenoise.stages import overlay_path

_PRESET_KEYS = {"bundle_preset", "seed", "max_test_slices", "torch_threads", "datasets", "noises", "references",
                "methods", "method_settings", "pipeline_settings", "method_cases", "strong_levels"}


def _names(value, allowed: Sequence[str], what: str) -> list[str]:
    """A list from a YAML list, a comma-separated string or ``all``, every entry checked against ``allowed``."""
    if isinstance(value, str):
        value = value.split(",")
    value = [str(v).strip() for v in value if str(v).strip()]
    value = list(allowed) if value == ["all"] else value
    unknown = [v for v in value if v not in allowed]
    if unknown or not value:
        raise ValueError(f"{what} {unknown or value} not known; choose from: {', '.join(allowed)} (or all)")
    return value


def load_preset(preset: str | os.PathLike, **selection) -> dict:
    """Reads and checks a benchmark preset (a name in ``configs/benchmark/`` or a YAML path) before anything runs.

    Args:
        preset: e.g. ``smoke``, ``cpu``, ``paper`` or ``my_preset.yaml``.
        selection: ``datasets``, ``noises``, ``references``, ``methods`` replacing the preset's lists (None keeps them).

    Raises:
        InputError: no such preset (the message lists the shipped ones).
        ValueError: an unknown key, dataset, noise, reference or method; the message lists the choices.
    """
    shipped = overlay_path("benchmark/smoke").parent
    path = Path(preset) if str(preset).endswith((".yaml", ".yml")) else shipped / f"{preset}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in shipped.glob("*.yaml")))
        raise InputError(path, f"no such benchmark preset; choose {names} or a YAML file of your own")
    config = yaml.safe_load(path.read_text()) or {}
    unknown = set(config) - _PRESET_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(_PRESET_KEYS))}")
    config = {"bundle_preset": "smoke", "seed": 0, "max_test_slices": None, "torch_threads": None, "noises": [],
              "references": ["full"], "methods": "all", "method_settings": {}, "pipeline_settings": {},
              "method_cases": {}, **config}
    config.update({k: v for k, v in selection.items() if v is not None})
    config["path"] = str(path)
    config["datasets"] = _names(config.get("datasets", []), list(DATASETS), "datasets")
    noises = config["noises"].split(",") if isinstance(config["noises"], str) else config["noises"]
    config["noises"] = [str(n).strip() for n in noises if str(n).strip()]
    for noise in config["noises"]:
        parse_noise(noise)
    if not config["noises"] and not all(DATASETS[d].real for d in config["datasets"]):
        raise ValueError(f"{path}: no noises for the synthetic-noise datasets; set e.g. noises: [gaussian, "
                         "poisson_corr1.2]")
    config["references"] = _names(config["references"], REFERENCES[:3], "references")
    config["methods"] = _names(config["methods"], list(METHODS), "methods")
    stray = set(config["method_settings"]) - set(METHODS)
    if stray:
        raise ValueError(f"{path}: method_settings for unknown method(s) {sorted(stray)}; known: {', '.join(METHODS)}")
    stray = set(config["method_cases"]) - set(METHODS)
    if stray:
        raise ValueError(f"{path}: method_cases for unknown method(s) {sorted(stray)}; known: {', '.join(METHODS)}")
    for name, patterns in config["method_cases"].items():
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{path}: method_cases.{name} must be a list of case-name patterns, e.g. ['*-down2', "
                             f"'phantom-real'], not {patterns!r}")
    shared = set(config["method_settings"]) & set(PIPELINE_METHODS)
    if shared:
        raise ValueError(f"{path}: method_settings for {sorted(shared)}: {', '.join(PIPELINE_METHODS)} share one "
                         "pipeline run per case; put its bundle keys under pipeline_settings")
    config["strong_levels"] = {**STRONG_LEVELS, **config.get("strong_levels", {})}
    return config


def runs_on(config: Mapping[str, Any], name: str, case: Case) -> bool:
    """Whether a preset runs a method on a case: everywhere, unless ``method_cases`` limits it to the cases whose
    names match one of its fnmatch patterns (how a CPU preset keeps an expensive method to the cases it can afford)."""
    patterns = config["method_cases"].get(name)
    return patterns is None or any(fnmatch.fnmatchcase(case.name, pattern) for pattern in patterns)
