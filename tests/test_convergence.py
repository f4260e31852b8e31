"""Training to convergence (issue 18): the plateau rule on synthetic histories, the ignite handler stopping a tiny
MONAI trainer, the U-Net baselines' fit stopping early with its curve in the benchmark result, the bundle wiring,
and the report's oracle gate on a synthetic result set."""

import json

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanSquaredError, ValidationHandler, from_engine

from diffdenoise.baselines import train_noise2self
from diffdenoise.benchmark import Case, run_benchmark, write_report
from diffdenoise.convergence import PlateauRule, PlateauStopping, TrainingCurve
from diffdenoise.stages import stage_parser

STEPS = list(range(100, 3001, 100))


def _falling(step):
    """A power-law fall: each fifth of the run gains the same share, so it never plateaus."""
    return 1.0 / (1.0 + step / 100)


def test_a_flat_tail_converges_and_a_steady_fall_does_not():
    rule = PlateauRule()
    flat = [max(_falling(s), _falling(1500)) for s in STEPS]
    assert rule.converged(STEPS, flat)
    assert not rule.converged(STEPS, [_falling(s) for s in STEPS])


def test_the_rule_is_relative_to_the_best_before_the_window():
    rule = PlateauRule(window=0.2, min_improvement=0.01)
    before = [1.0] * 8
    # the last 20% of the steps (2 of 10 points) gain 0.5% on the best before them: converged; 2%: not
    assert rule.converged(list(range(1, 11)), before + [0.995, 0.996])
    assert not rule.converged(list(range(1, 11)), before + [0.98, 0.99])
    # negative losses (a likelihood) compare by magnitude
    assert rule.converged(list(range(1, 11)), [-1.0] * 8 + [-1.005, -1.004])
    assert not rule.converged(list(range(1, 11)), [-1.0] * 8 + [-1.05, -1.0])


def test_no_verdict_before_min_evaluations():
    assert not PlateauRule(min_evaluations=10).converged(list(range(1, 10)), [1.0] * 9)
    assert PlateauRule(min_evaluations=5).converged(list(range(1, 6)), [1.0] * 5)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"window": 1}, {"min_improvement": -0.1},
                                    {"min_evaluations": 1}])
def test_bad_rule_arguments_name_the_knob(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PlateauRule(**kwargs)


def test_the_curve_reports_the_cap_when_hit_unconverged():
    curve = TrainingCurve(PlateauRule(), cap=3000)
    assert not any(curve.add(step, _falling(step)) for step in STEPS)
    record = curve.record()
    assert record["cap_hit"] and not record["converged"] and record["steps_run"] == 3000
    assert record["steps"] == STEPS and record["rule"] == {"window": 0.2, "min_improvement": 0.01,
                                                           "min_evaluations": 10}
    flat = TrainingCurve(PlateauRule(), cap=3000)
    stopped_at = next(step for step in STEPS if flat.add(step, 1.0))
    assert stopped_at == 1000 and flat.record()["converged"] and not flat.record()["cap_hit"]


def test_a_curve_without_a_rule_records_and_never_stops():
    curve = TrainingCurve.from_settings(None)
    assert not any(curve.add(step, 1.0) for step in STEPS)
    with pytest.raises(ValueError, match="diverged"):
        curve.add(3100, float("nan"))


def _tiny_trainer(lr: float, max_epochs: int, path, rule):
    """A MONAI trainer of a 1x1 conv on constant data, validated each epoch on MSE, with the handler attached."""
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 1, 1)
    data = [{"image": torch.full((1, 1, 8, 8), 0.5), "label": torch.full((1, 1, 8, 8), 0.2)}] * 2
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=data, network=network,
                                    key_val_metric={"val_mse": MeanSquaredError(output_transform=from_engine(
                                        ["pred", "label"]))})
    handler = PlateauStopping(evaluator, str(path), rule)
    trainer = SupervisedTrainer(device="cpu", max_epochs=max_epochs, epoch_length=2, train_data_loader=data,
                                network=network, optimizer=torch.optim.SGD(network.parameters(), lr=lr),
                                loss_function=torch.nn.MSELoss(),
                                train_handlers=[ValidationHandler(1, evaluator, epoch_level=True), handler])
    return trainer, handler


def test_the_ignite_handler_stops_a_tiny_trainer_on_a_flat_metric(tmp_path):
    trainer, handler = _tiny_trainer(0.0, 50, tmp_path / "curve.json", {"min_evaluations": 5})
    trainer.run()
    record = json.loads((tmp_path / "curve.json").read_text())
    assert trainer.state.epoch == 5 and record["converged"] and not record["cap_hit"]
    assert record["steps"] == [2, 4, 6, 8, 10] and record["steps_run"] == 10 and record["cap"] == 100
    assert handler.state_dict()["steps"] == record["steps"]


def test_the_ignite_handler_without_a_rule_runs_to_the_cap_and_records(tmp_path):
    trainer, _ = _tiny_trainer(0.0, 6, tmp_path / "curve.json", None)
    trainer.run()
    record = json.loads((tmp_path / "curve.json").read_text())
    assert trainer.state.epoch == 6 and len(record["losses"]) == 6 and record["rule"] is None
    assert record["steps_run"] == record["cap"] == 12


def test_a_resumed_handler_keeps_its_history(tmp_path):
    interrupted, first = _tiny_trainer(0.0, 3, tmp_path / "a.json", {"min_evaluations": 5})
    interrupted.run()
    trainer, resumed = _tiny_trainer(0.0, 50, tmp_path / "b.json", {"min_evaluations": 5})
    resumed.load_state_dict(first.state_dict())
    # as the resume checkpoint's loader does: the trainer continues from iteration 6, epoch 3
    trainer.add_event_handler(Events.STARTED, lambda engine: engine.state.__dict__.update(iteration=6, epoch=3))
    trainer.run()
    assert json.loads((tmp_path / "b.json").read_text())["steps"] == [2, 4, 6, 8, 10]


@pytest.mark.parametrize("stage", ["train_bsn", "train_diffusion", "train_student"])
def test_every_training_stage_attaches_the_handler_and_resumes_it(stage, tmp_path):
    parser = stage_parser(stage, ["presets/smoke"], dataset_dir=str(tmp_path), bundle_root=str(tmp_path / "b"),
                          convergence_rule={"window": 0.25})
    assert "@convergence" in (parser.get("train#base_handlers") or parser.get("train#handlers"))
    assert parser.get("resume_state#convergence") == "@convergence"
    assert parser.get_parsed_content("convergence_rule") == {"window": 0.25}


def _images(seed: int, count: int):
    rng = np.random.default_rng(seed)
    return [np.clip(0.5 + rng.normal(0, 0.06, (64, 64)), 0, 1).astype(np.float32) for _ in range(count)]


def test_the_baselines_fit_stops_early_on_a_flat_validation_loss_and_records_its_curve(one_thread):
    curve = TrainingCurve(PlateauRule(min_evaluations=4))
    train_noise2self(_images(0, 2), iterations=200, patch_size=32, batch_size=2, lr=1e-12,
                     features=(4, 4, 4, 4, 4, 4), validation=_images(1, 1), val_interval=5, curve=curve)
    record = curve.record()
    assert record["converged"] and record["steps"] == [5, 10, 15, 20] and record["steps_run"] == 20
    assert record["cap"] == 200 and not record["cap_hit"]


def test_the_baselines_fit_needs_validation_and_curve_together():
    with pytest.raises(ValueError, match="together"):
        train_noise2self(_images(0, 1), iterations=2, patch_size=32, features=(4,) * 6, validation=_images(1, 1))


def test_the_benchmark_stores_and_reports_a_learned_method_curve(shared_data, tmp_path, one_thread):
    preset = tmp_path / "converge.yaml"
    settings = {"iterations": 30, "patch_size": 32, "batch_size": 2, "lr": 0.002, "features": [4, 4, 4, 4, 4, 4],
                "val_interval": 10, "convergence_rule": {"min_evaluations": 2}}
    preset.write_text(json.dumps({"bundle_preset": "smoke", "max_test_slices": 3, "datasets": ["studyforrest"],
                                  "noises": ["gaussian"], "references": ["down2"], "methods": ["noisy", "noise2self", "supervised"], "torch_threads": 1,
                                  "method_settings": {"noise2self": settings, "supervised": {
                                      "student_max_epochs": 3, "student_epoch_length": 5,
                                      "convergence_rule": {"min_evaluations": 2}}}}))
    out = tmp_path / "out"
    report = run_benchmark(preset, shared_data, out, progress=False).read_text()
    record = json.loads((out / "cases" / "studyforrest-gaussian-down2" / "noise2self.json").read_text())
    curve = record["curves"]["noise2self"]
    assert curve["cap"] == 30 and curve["steps"] == list(range(10, curve["steps_run"] + 1, 10))
    assert curve["converged"] != curve["cap_hit"] and len(curve["losses"]) == len(curve["steps"])
    verdict = "converged" if curve["converged"] else "cap hit"
    assert f"noise2self: {curve['steps_run']}/30 steps, {verdict}" in report
    assert "Training curves" in report and f"{curve['steps'][0]}: {curve['losses'][0]:.4g}" in report
    # the supervised oracle trains in the bundle: its ignite handler left the student stage's curve (MSE to clean)
    oracle = json.loads((out / "cases" / "studyforrest-gaussian-down2" / "supervised.json").read_text())["curves"]
    assert oracle["student"]["cap"] == 15 and oracle["student"]["steps"][0] == 5
    assert oracle["student"]["converged"] != oracle["student"]["cap_hit"]


def _synthetic_results(out, psnr_by_method):
    """A stored result set of one case: every method's per-slice scores, outputs and the case's test datalist."""
    case = Case("studyforrest", "gaussian", 6 / 255, 0.0, "down2")
    case_dir = out / "cases" / case.name
    (case_dir / "data").mkdir(parents=True)
    image = np.full((16, 16), 0.5, dtype=np.float32)
    np.save(case_dir / "data" / "x.npy", image)
    slices = [f"v/{i:04d}" for i in range(8)]
    items = [{"id": s, "image": "x.npy", "clean": "x.npy"} for s in slices]
    (case_dir / "data" / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "test": items}))
    spread = np.linspace(-0.1, 0.1, 8)  # the same for every method: equal means tie exactly
    for name, psnr in psnr_by_method.items():
        np.save(case_dir / f"{name}.npy", image)
        record = {"case": case.name, "method": name, "slices": slices, "psnr": list(psnr + spread),
                  "ssim": list(0.9 + spread / 100), "leak": [0.1] * 8, "fit_seconds": 1.0,
                  "fit_cpu_seconds": 1.0, "denoise_seconds_per_slice": 0.1, "denoise_cpu_seconds_per_slice": 0.1}
        (case_dir / f"{name}.json").write_text(json.dumps(record))
    return case


@pytest.mark.parametrize("oracle,gated", [(35.0, True), (36.0, True), (37.0, False)])
def test_a_case_whose_oracle_does_not_beat_bm3d_is_under_trained_and_claims_nothing(tmp_path, oracle, gated):
    scores = {"noisy": 32.0, "bm3d": 36.0, "noise2self": 38.0, "srds": 37.5, "supervised": oracle}
    case = _synthetic_results(tmp_path, scores)
    report = write_report(tmp_path, [case], list(scores), {}, {}).read_text()
    marked = f"{case.name} (under-trained)"
    if gated:
        assert report.count(marked) == 5  # the PSNR, SSIM, leak and cost tables, and the case's heading
        assert "**Under-trained:**" in report and "Paired Wilcoxon" not in report and "loses here" not in report
        summary_row = next(line for line in report.splitlines() if line.startswith(f"| {marked}"))
        assert "**" not in summary_row and "(n.s.)" not in summary_row
    else:
        assert marked not in report and "**Under-trained:**" not in report
        assert "best PSNR: Noise2Self" in report and "DiffDenoise loses here" in report
