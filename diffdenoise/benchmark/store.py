"""How a finished (case, method) is kept: files written atomically, and the fingerprint that decides whether a
stored result is reused. Results already under runs/ are recognised by it: change what goes into it only on
purpose."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable, Sequence

from diffdenoise.benchmark.methods.base import FitSettings


def save_atomic(path: Path, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename: a reader sees all or nothing."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def result_fingerprint(settings: FitSettings, items: Sequence[dict]) -> dict:
    """What a stored result depends on; a result with another fingerprint is run again, not reused."""
    raw = {"options": dict(settings.options), "seed": settings.seed, "bundle_preset": settings.bundle_preset,
           "slices": [item["id"] for item in items]}
    return json.loads(json.dumps(raw))
