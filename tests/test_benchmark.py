"""The benchmark harness: the smoke preset end to end on real MRI (every method, DiffDenoise included), resume, the
``diffdenoise benchmark`` command, the phantom protocol, and the paired-test marking on synthetic scores."""

import csv
import json
import re
import shutil

import numpy as np
import torch
import pytest

from diffdenoise import cli
from diffdenoise.benchmark import (
    _CSV_COLUMNS,
    METHODS,
    PIPELINE_METHODS,
    Case,
    FitSettings,
    Method,
    bsn_overlay,
    build_cases,
    load_preset,
    losses_line,
    prepare_case,
    run_benchmark,
    run_method,
    runs_on,
)
from diffdenoise.data import load_datalist
from diffdenoise.report import paired_best, significance_table

CASE = "studyforrest-gaussian-down2"
ROW = re.compile(r"^\| ([^|]+?) \| \**([\d.]+) \+- ([\d.]+)\**(?: \(n\.s\.\))? \| \**([\d.]+) \+- ([\d.]+)", re.M)


def _available():
    return [name for name, method in METHODS.items() if method.missing() is None]


@pytest.fixture(scope="module")
def smoke(shared_data, tmp_path_factory):
    """The smoke preset run once (every method on 3 test slices), with the events it reported."""
    out = tmp_path_factory.mktemp("bench") / "out"
    events = []
    report = run_benchmark("smoke", shared_data, out, progress=False, callback=events.append, command="pytest smoke")
    return out, report, events


def _tables(report_text: str) -> str:
    """Everything below the header (whose wall time differs between runs)."""
    return report_text[report_text.index("## Summary"):]


def test_every_method_returns_finite_images_of_the_input_shape(smoke):
    out, _, events = smoke
    case_dir = out / "cases" / CASE
    assert {e["method"] for e in events if e["event"] == "fit"} == set(_available())
    noisy = load_datalist(case_dir / "data" / "datalist.json", "test")
    for name in _available():
        record = json.loads((case_dir / f"{name}.json").read_text())
        figure_slice = next(i for i in noisy if i["id"] == record["slices"][len(record["slices"]) // 2])
        output = np.load(case_dir / f"{name}.npy")
        assert output.shape == np.load(figure_slice["image"]).shape and np.isfinite(output).all(), name
        assert len(record["psnr"]) == 3 and np.isfinite(record["psnr"] + record["ssim"]).all(), name


def test_report_has_one_row_per_method_with_mean_and_sd(smoke):
    _, report, _ = smoke
    text = report.read_text()
    for key in ("command: pytest smoke", "commit:", "machine:", "smoke.yaml", "wall time of this run"):
        assert key in text, key
    section = text[text.index(f"## {CASE}"):]
    rows = {label: values for label, *values in ROW.findall(section)}
    assert set(rows) == {METHODS[name].label for name in _available()}
    assert {"DiffDenoise SRDS (stages 1-3)", "DiffDenoise student (stage 4, iteration 1)"} <= set(rows)
    assert "noisy input" in rows and float(rows["noisy input"][0]) > 20
    if section.startswith(f"## {CASE} (under-trained)"):
        # the smoke oracle's 20 steps may not beat BM3D: then the oracle gate's line replaces the claims
        # (tests/test_convergence.py checks both branches on fixed scores)
        assert "**Under-trained:**" in section and "Paired Wilcoxon" not in section and "loses here" not in section
    else:
        assert "DiffDenoise loses here" in section or "DiffDenoise (" in section  # the verdict line is there
        assert "Paired Wilcoxon" in section
    assert f"figures/{CASE}.png" in section
    skipped = [name for name in METHODS if name not in _available()]
    assert all(f"skipped {name}:" in text for name in skipped)


def test_cost_counts_each_shared_pipeline_step_once(smoke):
    out, report, _ = smoke
    case_dir = out / "cases" / CASE
    records = [json.loads(path.read_text()) for path in case_dir.glob("*.json")]
    # each diffusion method and stage-1 prior has its pipeline run; the leak-free one takes stage 1 from the
    # paper's (``shared``), the learned prior trains its own
    states = [json.loads(path.read_text()) for path in (case_dir / "work").glob("pipeline*/state.json")]
    assert len(states) == 3 and sum(bool(state.get("shared")) for state in states) == 1
    own = [seconds for state in states for name, seconds in state["seconds"].items()
           if name not in state.get("shared", [])]
    expected = sum(own) + sum(r["denoise_seconds_per_slice"] * len(r["slices"]) for r in records) + sum(
        r["fit_seconds"] for r in records if r["method"] not in PIPELINE_METHODS)
    row = re.search(rf"^\| {CASE}(?: \(under-trained\))? \| (\d+) \| (\d+) \|$", report.read_text(), re.M)
    assert row, "no cost row for the case"
    assert int(row.group(1)) == round(expected)


def test_csv_has_one_row_per_case_method_and_slice(smoke):
    out, _, _ = smoke
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == _CSV_COLUMNS
    assert len(rows) == 3 * len(_available())
    assert {r["method"] for r in rows} == set(_available()) and {r["case"] for r in rows} == {CASE}
    assert all(np.isfinite(float(r["psnr"])) and 0 <= float(r["ssim"]) <= 1 for r in rows)


def test_visual_grid_is_written_as_a_palette_png(smoke):
    from PIL import Image

    out, _, _ = smoke
    figure = out / "figures" / f"{CASE}.png"
    assert figure.stat().st_size > 20_000
    with Image.open(figure) as image:
        assert image.mode == "P" and len(image.getcolors(256)) > 16  # grey slices and a colour map, in 256 colours


def test_rerun_resumes_without_refitting_and_writes_identical_tables(smoke, shared_data):
    out, report, _ = smoke
    first_md, first_csv = report.read_text(), (out / "results.csv").read_bytes()
    events = []
    run_benchmark("smoke", shared_data, out, progress=False, callback=events.append, command="pytest smoke")
    assert not [e for e in events if e["event"] in ("fit", "prepare")]
    assert {e["method"] for e in events if e["event"] == "resume"} == set(_available())
    assert (out / "results.csv").read_bytes() == first_csv
    assert _tables(report.read_text()) == _tables(first_md)


def test_changed_settings_rerun_only_that_method(smoke, shared_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(smoke[0], out)
    preset = load_preset("smoke")
    custom = tmp_path / "custom.yaml"
    settings = {**preset["method_settings"], "noise2self": {**preset["method_settings"]["noise2self"], "iterations": 3}}
    custom.write_text(json.dumps({"bundle_preset": "smoke", "max_test_slices": 3, "datasets": ["studyforrest"],
                                  "noises": ["gaussian"], "references": ["down2"], "methods": ["noisy", "noise2self"],
                                  "method_settings": settings}))
    events = []
    run_benchmark(custom, shared_data, out, progress=False, callback=events.append)
    assert [e["method"] for e in events if e["event"] == "fit"] == ["noise2self"]


def test_diffdenoise_methods_share_one_pipeline_run_trained_on_noisy_slices_only(smoke):
    out, _, _ = smoke
    case_dir = out / "cases" / CASE
    # stage 1 trained once for all methods: the leak-free pipeline takes a copy of it, marked shared
    paper, leak_free = (case_dir / "work" / name / "bundle" / "models" / "bsn.pt" for name in
                        ("pipeline", "pipeline_leak_free"))
    assert paper.read_bytes() == leak_free.read_bytes()
    shared = json.loads((case_dir / "work" / "pipeline_leak_free" / "state.json").read_text())["shared"]
    assert shared == ["train_bsn", "infer_bsn"]
    state = json.loads((case_dir / "work" / "pipeline" / "state.json").read_text())
    iterated = [f"{config}@{k}" for k in (2, 3) for config in ("train_diffusion", "sample_srds", "train_student")]
    assert list(state["seconds"]) == ["train_bsn", "infer_bsn", "train_diffusion", "sample_srds", "train_student",
                                      "inference", *iterated[:3], "inference@2", *iterated[3:]]
    pipeline_data = json.loads((case_dir / "work" / "pipeline" / "data" / "datalist.json").read_text())
    assert pipeline_data["test"] == [] and pipeline_data["training"]
    assert not any("clean" in item for split in ("training", "validation") for item in pipeline_data[split])
    fit = {name: json.loads((case_dir / f"{name}.json").read_text())["fit_seconds"] for name in PIPELINE_METHODS}
    assert fit["bsn"] == pytest.approx(state["seconds"]["train_bsn"])  # each method pays for the stages it needs
    assert fit["bsn"] < fit["srds"] < fit["student"] < fit["student_iter2"] < fit["student_iter3"]
    assert fit["student_iter3"] == pytest.approx(sum(state["seconds"].values()))
    # iterations 2 and 3: the previous student is the condition; each iteration keeps its own networks
    models = case_dir / "work" / "pipeline" / "bundle" / "models"
    assert {p.name for p in models.glob("*.pt")} >= {f"{net}{s}.pt" for net in ("diffusion", "model")
                                                      for s in ("", "_iter2", "_iter3")}
    item = json.loads((case_dir / "work" / "pipeline" / "data" / "datalist_srds_iter3.json").read_text())["training"][0]
    assert {"bsn", "srds", "student", "srds_iter2", "student_iter2", "srds_iter3"} <= set(item)
    assert all(METHODS[name].kind == "diffdenoise" for name in PIPELINE_METHODS if not name.startswith("bsn"))
    # the learned prior is another stage 1: its own run trains a BSN with a variance head, shared with no one
    learned = json.loads((case_dir / "work" / "pipeline_learned" / "state.json").read_text())
    assert "shared" not in learned and list(learned["seconds"]) == ["train_bsn"]
    assert "stage1/learned_prior" in learned["run"]["overlays"]
    assert "noise_log_scale" in torch.load(case_dir / "work" / "pipeline_learned" / "bundle" / "models" / "bsn.pt")


def test_learned_results_keep_the_training_curves_of_the_stages_they_needed(smoke):
    out, report, _ = smoke
    case_dir = out / "cases" / CASE
    curves = {name: json.loads((case_dir / f"{name}.json").read_text()).get("curves", {})
              for name in ("bsn", "srds", "student", "student_iter2", "tweedie", "supervised", "noise2self")}
    assert set(curves["bsn"]) == {"bsn"} and set(curves["srds"]) == set(curves["tweedie"]) == {"bsn", "diffusion"}
    assert set(curves["student"]) == {"bsn", "diffusion", "student"}
    assert set(curves["student_iter2"]) == {"bsn", "diffusion", "student", "diffusion_iter2", "student_iter2"}
    assert set(curves["supervised"]) == {"student"} and curves["noise2self"] == {}  # the smoke preset sets no rule
    # without a rule every stage runs its budget (20 iterations, validated once) and the report says so
    student = curves["student"]["student"]
    assert student["rule"] is None and student["steps_run"] == student["cap"] == 20 and student["steps"] == [20]
    assert "student: 20/20 steps, no rule" in report.read_text()


def test_cli_benchmark_runs_the_harness_and_resumes(smoke, shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(smoke[0], out)
    stored = (out / "cases" / CASE / "srds.json").read_bytes()
    assert cli.main(["benchmark", "--preset", "smoke", "--data", str(shared_data), "--out", str(out),
                     "--method", "noisy,srds", "--progress", "False"]) == 0
    assert (out / "cases" / CASE / "srds.json").read_bytes() == stored  # resumed, not refitted
    text = (out / "results.md").read_text()
    assert "DiffDenoise SRDS" in text and "| NLM |" not in text
    assert cli.main(["benchmark", "--preset", "nosuch", "--out", str(out)]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_pipeline_methods_take_pipeline_settings_not_method_settings(tmp_path):
    custom = tmp_path / "custom.yaml"
    custom.write_text(json.dumps({"datasets": ["studyforrest"], "noises": ["gaussian"],
                                  "method_settings": {"srds": {"srds_steps": 4}}}))
    with pytest.raises(ValueError, match="pipeline_settings"):
        load_preset(custom)


def test_method_cases_limit_a_method_to_matching_cases():
    config = load_preset("cpu")
    cases = {case.name: case for case in build_cases(config)}
    for name in ("srds", "student", "student_iter2", "student_iter3", "supervised"):
        ran = {case for case in cases if runs_on(config, name, cases[case])}
        assert ran == {"studyforrest-gaussian-down2", "studyforrest-poisson-down2",
                       "studyforrest-gaussian_corr1.2-down2", "phantom-real"}, name
    assert all(runs_on(config, "bsn", case) for case in cases.values())
    with pytest.raises(ValueError, match="list of case-name patterns"):
        load_preset("smoke", method_cases={"srds": "*-down2"})


def test_a_denoiser_returning_nan_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "broken", Method("broken", "classical", lambda *_: lambda x: x * np.nan))
    image = np.full((16, 16), 0.5, dtype=np.float32)
    np.save(tmp_path / "x.npy", image)
    item = {"id": "v/0000", "image": str(tmp_path / "x.npy"), "clean": str(tmp_path / "x.npy")}
    settings = FitSettings(Case("studyforrest", "gaussian", 0.1, 0.0, "full"), tmp_path, "smoke", 0)
    with pytest.raises(RuntimeError, match="non-finite"):
        run_method("broken", settings, [image], [item], tmp_path / "work", "v/0000")


def test_phantom_reference_is_the_mean_of_other_repeats_in_the_test_volume_scale(shared_data, tmp_path):
    case = build_cases(load_preset("smoke", datasets="phantom"))[0]
    assert case == Case("phantom", "real", None, 0.0, "repeats") and case.name == "phantom-real"
    datalist = prepare_case(case, shared_data, tmp_path / case.name)
    splits = {s: load_datalist(datalist, s) for s in ("training", "validation", "test")}
    assert all(item["volume"] == "0126" for items in splits.values() for item in items)
    assert all("clean" in item for items in splits.values() for item in items)  # training ones: supervised only
    train_slices = {item["slice_index"] for item in splits["training"]}
    assert not train_slices & {item["slice_index"] for item in splits["test"]}
    repeats = tmp_path / case.name / "repeats"
    volumes = json.loads((repeats / "datalist.json").read_text())["meta"]["volumes"]
    ranges = {volume: meta["intensity_range"] for volume, meta in volumes.items()}

    def in_test_scale(volume, k):
        (low, high), (test_low, test_high) = ranges[volume], ranges["0126"]
        physical = low + np.load(repeats / "slices" / volume / f"{k:04d}_noisy.npy") * (high - low)
        return (physical - test_low) / (test_high - test_low)

    for item in splits["test"] + splits["training"][::8]:
        noisy, reference = np.load(item["image"]), np.load(item["clean"])
        refs = [in_test_scale(v, item["slice_index"]) for v in ("0189", "0252", "0315")]
        np.testing.assert_allclose(reference, np.clip(np.mean(refs, axis=0), 0, 1), atol=1e-6)
        one_repeat = refs[0]
        assert abs(reference.mean() / noisy.mean() - 1) < 0.01  # one intensity scale
        # averaging three repeats leaves a third of the noise variance of one: closer to the noisy input
        assert np.mean((reference - noisy) ** 2) < 0.8 * np.mean((one_repeat - noisy) ** 2)


@pytest.mark.parametrize("correlation,overlay", [(0.0, "noise/iid"), (0.5, "noise/correlated_mild"),
                                                 (1.2, "noise/correlated")])
def test_blind_spot_follows_the_noise_correlation(correlation, overlay):
    assert bsn_overlay(correlation) == overlay


def test_presets_expand_to_the_documented_cases():
    cpu = build_cases(load_preset("cpu"))
    assert len(cpu) == 2 * 3 * 3 + 1
    assert {c.reference for c in cpu} == {"full", "down2", "strong", "repeats"}
    chest = next(c for c in cpu if c.name == "chest_xray-poisson-full")
    strong = next(c for c in cpu if c.name == "studyforrest-gaussian_corr1.2-strong")
    assert chest.level == 700 and strong.level == pytest.approx(15 / 255) and strong.correlation == 1.2
    assert load_preset("smoke")["methods"] == list(METHODS)


@pytest.mark.parametrize("selection,match", [
    ({"methods": "bm3d,bsnn"}, "bsnn.*choose from"),
    ({"noises": "gaussian_corr"}, "poisson_corr1.2"),
    ({"datasets": "knee"}, "studyforrest"),
    ({"references": "half"}, "down2"),
])
def test_bad_selection_names_the_choices(selection, match):
    with pytest.raises(ValueError, match=match):
        load_preset("smoke", **selection)


def _scores(**psnr):
    return {name: {"psnr": np.asarray(v), "ssim": np.asarray(v) / 40} for name, v in psnr.items()}


def test_clear_winner_is_bold():
    base = np.linspace(28.0, 32.0, 10)
    test = paired_best({"bsn": base + 1.0, "noisy": base, "tv": base + 0.5})
    assert test.best == "bsn" and test.significant and test.p_values["noisy"] == pytest.approx(2 / 2**10)
    table = significance_table(_scores(bsn=base + 1.0, noisy=base, tv=base + 0.5))
    assert re.search(r"^\| bsn \| \*\*31\.00 \+- 1\.35\*\* \| \*\*", table, re.M), table
    assert "(n.s.)" not in table and re.search(r"^\| noisy \| 30\.00 \+- 1\.35 \| .* \| 0\.00195 \|", table, re.M)


def test_ties_are_not_significant():
    base = np.linspace(28.0, 32.0, 10)
    alternating = base + np.where(np.arange(10) % 2, 0.1, -0.1)
    for other in (base, alternating):
        table = significance_table(_scores(nlm=base, bm3d=other))
        assert "**" not in table and "(n.s.)" in table, table
    same = paired_best({"a": base, "b": base})
    assert not same.significant and same.p_values["b"] == 1


def test_too_few_slices_never_reach_significance():
    assert not paired_best({"a": np.arange(5.0) + 1, "b": np.arange(5.0)}).significant  # p >= 2 / 2**5


def test_losses_line_names_where_diffdenoise_loses():
    base = np.linspace(28.0, 32.0, 10)
    labels = {"srds": "SRDS", "bm3d": "BM3D", "noisy": "noisy input"}
    kinds = {"srds": "diffdenoise", "bm3d": "classical", "noisy": "input"}
    line = losses_line(_scores(srds=base + 0.5, bm3d=base + 1.0, noisy=base), kinds, labels)
    assert line.startswith("**DiffDenoise loses here:**")
    assert "SRDS < BM3D in PSNR (30.50 vs 31.00, p = 0.00195)" in line
    assert "noisy input" not in line
    assert "highest" in losses_line(_scores(srds=base + 2.0, bm3d=base + 1.0, noisy=base), kinds, labels)
    assert losses_line(_scores(bm3d=base, noisy=base), kinds, labels) is None


def test_workers_run_cases_side_by_side_with_the_same_scores(shared_data, tmp_path):
    preset = tmp_path / "two_cases.yaml"
    preset.write_text(json.dumps({"bundle_preset": "smoke", "max_test_slices": 3, "datasets": ["studyforrest"],
                                  "noises": ["gaussian"], "references": ["down2", "strong"], "methods": ["noisy", "tv"]}))
    scores = {}
    for workers in (1, 2):
        events = []
        out = tmp_path / f"workers{workers}"
        report = run_benchmark(preset, shared_data, out, progress=False, callback=events.append, workers=workers)
        fitted = {(e["case"], e["method"]) for e in events if e["event"] == "fit"}
        assert fitted == {(case, method) for case in ("studyforrest-gaussian-down2", "studyforrest-gaussian-strong")
                          for method in ("noisy", "tv")}
        assert f"in each of {workers} process(es)" in report.read_text()
        scores[workers] = {path.relative_to(out).as_posix(): json.loads(path.read_text())["psnr"]
                           for path in sorted(out.glob("cases/*/*.json"))}
    assert scores[1] == scores[2] and len(scores[2]) == 4


def test_a_failing_case_in_a_worker_stops_the_run_and_keeps_finished_results(shared_data, tmp_path):
    preset = tmp_path / "failing.yaml"
    preset.write_text(json.dumps({"bundle_preset": "smoke", "max_test_slices": 3, "datasets": ["studyforrest"],
                                  "noises": ["gaussian"], "references": ["down2", "strong"], "methods": ["noisy", "tv"],
                                  "method_settings": {"tv": {"no_such_knob": 1}}}))
    with pytest.raises(TypeError, match="no_such_knob"):
        run_benchmark(preset, shared_data, tmp_path / "out", progress=False, workers=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("cases/*/*.json")) == ["noisy.json", "noisy.json"]
    assert not (tmp_path / "out" / "results.md").exists()


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_bad_worker_count_fails_before_anything_runs(workers, tmp_path, capsys):
    assert cli.main(["benchmark", "--preset", "smoke", "--out", str(tmp_path / "out"), "--workers", workers]) == 2
    assert "--workers must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
