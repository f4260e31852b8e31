"""Where the shipped bundle and the config overlays are, and which presets there are.

They lie beside the package in a clone (editable install) or under ``<prefix>/share/diffdenoise`` in a wheel. The
module imports nothing heavy: the command line's help lists the presets from it (``diffdenoise fit --help``).
"""

from __future__ import annotations

import sys
from pathlib import Path


def _resource_root() -> Path:
    """The folder holding ``bundles/`` and ``configs/``: the clone (editable install) or ``<prefix>/share``."""
    for root in (Path(__file__).resolve().parents[1], Path(sys.prefix) / "share" / "diffdenoise"):
        if (root / "bundles" / "diffdenoise" / "configs" / "common.yaml").is_file():
            return root
    raise FileNotFoundError(
        "bundle configs not found beside the package nor under <prefix>/share/diffdenoise; "
        "reinstall with `pip install -e .` from the repository root"
    )


def bundle_dir() -> Path:
    """The shipped bundle ``bundles/diffdenoise``."""
    return _resource_root() / "bundles" / "diffdenoise"


def overlay_path(name: str) -> Path:
    """An overlay from ``configs/``, e.g. ``presets/cpu`` or ``noise/correlated``, as a file path."""
    path = _resource_root() / "configs" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(str(p.relative_to(path.parents[1]))[:-5] for p in path.parents[1].glob("*/*.yaml"))
        raise ValueError(f"overlay '{name}' not found; available: {', '.join(available)}")
    return path


def presets() -> dict[str, str]:
    """Each preset in ``configs/presets`` by name, with the first line of its header comment (its use and cost)."""
    found = {}
    for path in sorted((_resource_root() / "configs" / "presets").glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        found[path.stem] = first.lstrip("# ").strip()
    return found
