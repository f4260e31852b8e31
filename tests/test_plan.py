"""How a short timing of each stage is scaled to the planned work (diffdenoise.plan), on a prepared folder."""

import numpy as np
import pytest
from PIL import Image

from diffdenoise.data import prepare
from diffdenoise.pipeline import pipeline_steps
from diffdenoise.plan import StepCost, plan
from diffdenoise.progress import Timing


@pytest.fixture
def prepared(tmp_path):
    """Twelve 32 x 32 scans, two of them for validation (fit's split)."""
    src = tmp_path / "scans"
    src.mkdir()
    for n in range(12):
        Image.fromarray(np.random.default_rng(n).integers(30, 220, (32, 32), dtype=np.uint8)).save(src / f"{n}.png")
    return prepare(src, tmp_path / "data", split=(0.85, 0.15, 0.0), progress=False).parent


def _slices(*outputs):
    """A slice-writing config that took 5 s, 2 of them on the two timed slices for each output."""
    return StepCost(5.0, tuple(Timing(key, "slice", 2, (1.0, 1.0), 0.0) for key in outputs))


def test_each_config_is_scaled_from_its_short_run(prepared):
    # a training config: 12 s for 6 iterations in 2 epochs (1 s each after a 0.5 s first; the first epoch's end
    # took 2 s more, the second's 2.5 s), validating on one slice
    training = StepCost(12.0, (Timing("training", "iteration", 6, (0.5, 1.0, 1.0, 3.0, 1.0, 1.0), 2.5),),
                        iterations=100, epochs=2, batch_size=8)
    costs = {"train_bsn": training, "train_diffusion": training, "train_student": training,
             "infer_bsn": _slices("bsn", "bsn_posterior"), "sample_srds": _slices("srds"),
             "inference": _slices("student")}
    planned = plan(costs, prepared)
    assert [p.name for p in planned] == [s.name for s in pipeline_steps(prepared)] + ["assessment"]
    seconds = {p.name: p.seconds for p in planned}
    # start-up 12 - 6 x 1 - 2.5 = 3.5 s; 100 iterations of 1 s x 5 / 8 (the 10 training slices make a batch of 8
    # and one of 2); 2 epoch ends of 2 s (the lesser) on each of the 2 validation slices
    assert seconds["train_bsn"] == pytest.approx(3.5 + 100 * 5 / 8 + 2 * 2 * 2)
    # start-up (5 s less 2 s per output) once per validation slice (stage 3 chooses its rho on them); each output's
    # 2 s on 2 slices scaled to the 12 slices of the same size
    assert seconds["infer_bsn"] == pytest.approx(1 * 2 + 2 * 2 * 12 / 2)
    assert seconds["sample_srds"] == pytest.approx(3 * 2 + 2 * 12 / 2)
    # the 3 denoisers, each twice on the 2 validation slices: 2 x 3 x 2 x 1 s
    assert seconds["assessment"] == pytest.approx(12)
    assert planned[0].work == "100 iterations of 8 crops, validated 2 times on 2 slices"
    assert planned[1].work == "12 slices, 2 outputs (bsn, bsn_posterior)"
