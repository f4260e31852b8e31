"""The stage order and the iteration chain of `diffdenoise.pipeline`, without training anything."""

import pytest

from diffdenoise.cli import main
from diffdenoise.pipeline import output_label, pipeline_steps, stage_keys


def test_later_iterations_repeat_stages_2_to_4_with_the_iteration_overlay(tmp_path):
    steps = pipeline_steps(tmp_path, iterations=3)
    assert [s.name for s in steps] == [
        "train_bsn", "infer_bsn", "train_diffusion", "sample_srds", "train_student", "inference",
        "train_diffusion@2", "sample_srds@2", "train_student@2", "inference@2",
        "train_diffusion@3", "sample_srds@3", "train_student@3", "inference@3"]
    assert all(s.overlays == () and s.keys == {} for s in steps[:6])
    assert all(s.overlays == ("iteration",) and s.keys["iteration"] == int(s.name[-1]) for s in steps[6:])
    # iteration k reads and writes its own datalists; iteration 1's keys are those of a single run
    assert steps[-1].keys["student_datalist_path"] == str(tmp_path / "datalist_srds_iter3.json")
    assert stage_keys(tmp_path) == {"student_datalist_path": str(tmp_path / "datalist_srds.json"),
                                    "inference_datalist_path": str(tmp_path / "datalist_srds.json")}


def test_output_labels_name_the_iteration():
    assert output_label("student") == "student (stage 4)"
    assert output_label("student_iter3") == "student (stage 4), iteration 3"
    assert output_label("srds_iter2") == "SRDS (stages 2-3), iteration 2"
    assert output_label("clean") is None and output_label("student_iterx") is None


@pytest.mark.parametrize("iterations", [0, -1, 1.5])
def test_bad_iteration_counts_are_refused(iterations, tmp_path):
    with pytest.raises(ValueError, match="iterations"):
        pipeline_steps(tmp_path, iterations)


def test_fit_refuses_a_bad_iteration_count_before_any_work(tmp_path, capsys):
    src = tmp_path / "scan.png"
    src.write_bytes(b"")
    assert main(["fit", str(src), str(tmp_path / "run"), "--iterations", "0"]) == 2
    assert "--iterations" in capsys.readouterr().err and not (tmp_path / "run").exists()
