"""Stage 4 as a user runs it: train_student.yaml and the model zoo commands from the command line.

Two smoke students on the studyforrest slices of the ``trained`` fixture: (a) self-supervised, distilled
from the BSN's x_c (a stand-in pseudo-target for SRDS), (b) supervised on clean slices (the upper bound).
The commands run in parallel, one torch thread each, to keep the file near a minute on 2 cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata

from diffdenoise.data import load_datalist
from diffdenoise.denoise import load_model
from diffdenoise.errors import InputError
from diffdenoise.metrics import score_datalist
from diffdenoise.stages import run_stage, stage_config_files, stage_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = "bundles/diffdenoise/configs"
META = f"{CONFIGS}/metadata.json"
SCHEMA = f"{CONFIGS}/metadata_schema.json"
INFERENCE = str([f"{CONFIGS}/common.yaml", f"{CONFIGS}/inference.yaml", "configs/presets/smoke.yaml"])
TRAIN = str([f"{CONFIGS}/common.yaml", f"{CONFIGS}/train_student.yaml", "configs/presets/smoke.yaml"])


def _start(name: str, args: list, logs: Path) -> tuple:
    """``python -m monai.bundle ARGS`` in the background, output to a file (pipes would block the parallel runs)."""
    log = logs / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "monai.bundle", *args], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return name, proc, log


def _finish(started: list, done: dict) -> None:
    for name, proc, log in started:
        proc.wait(timeout=600)
        done[name] = (proc.returncode, log.read_text())


@pytest.fixture(scope="module")
def students(trained, tmp_path_factory):
    """Runs the command lines; returns (data dir, {name: bundle_root}, {command: (exit code, output)})."""
    data, bsn_root, _ = trained
    root = tmp_path_factory.mktemp("student_stage")
    roots = {"bsn": root / "bundle_bsn", "clean": root / "bundle_clean"}
    model_ts = roots["clean"] / "models" / "model.ts"

    def train(target: str, datalist: str) -> list:
        return ["run", "--config_file", TRAIN, "--dataset_dir", str(data), "--bundle_root", str(roots[target]),
                "--student_datalist_path", str(data / datalist), "--student_target_key", target]  # fmt: skip

    # two rounds of about equal length: what the BSN-target student needs (x_c) is written in the first
    first = [_start("train_clean", train("clean", "datalist.json"), root)]
    if not (data / "datalist_bsn.json").is_file():
        infer_bsn = str([f"{CONFIGS}/common.yaml", f"{CONFIGS}/infer_bsn.yaml", "configs/presets/smoke.yaml"])
        first.append(_start("infer_bsn", ["run", "--config_file", infer_bsn, "--dataset_dir", str(data),
                                          "--bundle_root", str(bsn_root)], root))  # fmt: skip
    done: dict = {}
    _finish(first, done)
    assert done.get("infer_bsn", (0,))[0] == 0, done["infer_bsn"][1][-3000:]
    second = [
        _start("train_bsn_target", train("bsn", "datalist_bsn.json"), root),
        _start("ckpt_export", ["ckpt_export", "network_def", "--filepath", str(model_ts), "--ckpt_file",
                               str(roots["clean"] / "models" / "model.pt"), "--meta_file", META,
                               "--config_file", INFERENCE], root),
        _start("verify_metadata", ["verify_metadata", "--meta_file", META, "--filepath", SCHEMA], root),
        _start("verify_net_in_out", ["verify_net_in_out", "network_def", "--meta_file", META, "--config_file",
                                     INFERENCE, "--any", "37"], root),
    ]  # fmt: skip
    _finish(second, done)
    return data, roots, done


def _ok(done: dict, name: str) -> str:
    code, log = done[name]
    assert code == 0, f"{name} failed:\n{log[-3000:]}"
    return log


def _test_split_only(data: Path, folder: Path) -> Path:
    """A datalist of the test slices alone, so inference.yaml writes (and the test waits for) only what is scored."""
    folder.mkdir()
    items = load_datalist(data / "datalist.json", "test")
    test = [{"id": i["id"], "image": i["image"], "clean": i["clean"]} for i in items]
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": [], "validation": [], "test": test}))
    return path


def test_training_logs_the_target_loss_and_monitoring_psnr(students):
    _, roots, done = students
    for name, target in (("train_bsn_target", "bsn"), ("train_clean", "clean")):
        log = _ok(done, name)
        assert "val_target_mse" in log and "val_psnr" in log and "val_ssim" in log
        assert (roots[target] / "models" / "model.pt").is_file()
        assert list((roots[target] / "logs").glob("events.out.tfevents.*")), "TensorBoard logs missing"


def test_both_students_beat_the_noisy_input_and_supervision_wins(students, tmp_path, one_thread):
    data, roots, done = students
    datalist = _test_split_only(data, tmp_path / "test_split")
    psnr = {}
    for target in ("bsn", "clean"):
        _ok(done, "train_bsn_target" if target == "bsn" else "train_clean")
        key = f"student_{target}"
        run_stage("inference", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(roots[target]),
                  inference_datalist_path=str(datalist), output_key=key)  # fmt: skip
        scores = score_datalist(tmp_path / "test_split" / f"datalist_{key}.json", ["image", key])
        psnr["noisy"], psnr[target] = scores["image"]["psnr"].mean(), scores[key]["psnr"].mean()
        assert (scores[key]["psnr"] > scores["image"]["psnr"]).all()
    print("test PSNR (dB): " + ", ".join(f"{k} {v:.2f}" for k, v in psnr.items()))
    assert psnr["bsn"] > psnr["noisy"] + 0.5 and psnr["clean"] > psnr["noisy"] + 2.0, psnr
    assert psnr["clean"] > psnr["bsn"] + 1.0, psnr


def test_exported_torchscript_equals_the_checkpoint_on_a_real_slice(students):
    data, roots, done = students
    _ok(done, "ckpt_export")
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(roots["clean"] / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads((REPO_ROOT / META).read_text())["version"]
    network = stage_parser("inference", ["presets/smoke"]).get_parsed_content("network_def")
    network.load_state_dict(torch.load(roots["clean"] / "models" / "model.pt", weights_only=True))
    item = load_datalist(data / "datalist.json", "test")[0]
    x = torch.from_numpy(np.load(item["image"]))[None, None]
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network.eval()(x))


def test_denoise_mode_student_loads_the_bundle(students, tmp_path):
    """``diffdenoise denoise --mode student`` builds network_def/inferer from inference.yaml and loads model.pt."""
    data, roots, _ = students
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").symlink_to(REPO_ROOT / CONFIGS)
    (bundle / "models" / "model.pt").symlink_to(roots["clean"] / "models" / "model.pt")
    model = load_model(bundle, mode="student", device="cpu", config=["presets/smoke"])
    noisy = np.load(load_datalist(data / "datalist.json", "test")[0]["image"])[None]
    assert model(noisy).shape == noisy.shape and np.abs(model(noisy) - noisy).mean() > 0.01


def test_model_zoo_checks_pass_from_the_command_line(students):
    _, _, done = students
    assert "metadata is verified with no error" in _ok(done, "verify_metadata")
    assert "data shape of network is verified with no error" in _ok(done, "verify_net_in_out")


def test_local_schema_rejects_bad_metadata(tmp_path):
    """The shipped schema is a real check, not a stamp: a wrong dtype and a missing version both fail."""
    meta = json.loads((REPO_ROOT / META).read_text())
    assert meta["version"] in meta["changelog"], "the model zoo wants a changelog entry for the current version"
    for name, broken in (("dtype", {**meta, "network_data_format": {**meta["network_data_format"], "inputs": {
            "image": {**meta["network_data_format"]["inputs"]["image"], "dtype": "float"}}}}),
            ("version", {k: v for k, v in meta.items() if k != "version"})):  # fmt: skip
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="Failed validating"):
            verify_metadata(meta_file=str(path), filepath=str(REPO_ROOT / SCHEMA))


def test_missing_target_is_one_clear_error(trained, tmp_path):
    """A datalist without the pseudo-target (stage 3 not run) stops before training, naming the key and the fix."""
    data, _, _ = trained
    with pytest.raises(Exception) as caught:
        run_stage("train_student", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(tmp_path),
                  student_datalist_path=str(data / "datalist.json"))  # fmt: skip
    err = caught.value
    while err is not None and not isinstance(err, InputError):
        err = err.__cause__ or err.__context__
    assert err is not None, f"no InputError behind {caught.value!r}"
    assert "student_target_key" in str(err) and "'srds'" in str(err) and not (tmp_path / "models").exists()


def test_onnx_export_takes_any_size_and_matches_the_checkpoint_in_onnx_runtime(students):
    """Two real 384 x 274 slices (not a multiple of NAFNet's 4) through the graph traced on 1 x 64 x 64."""
    import onnxruntime

    from diffdenoise.export import export_student

    data, roots, _ = students
    files = stage_config_files("inference", ["presets/smoke"])
    (onnx_file,) = export_student(files, roots["clean"], ["onnx"])
    assert onnx_file == roots["clean"] / "models" / "model.onnx" and not list(onnx_file.parent.glob(".partial*"))
    network = stage_parser("inference", ["presets/smoke"]).get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(roots["clean"] / "models" / "model.pt", weights_only=True))
    batch = np.stack([np.load(i["image"]) for i in load_datalist(data / "datalist.json", "test")[:2]])[:, None]
    assert batch.shape[2:] == (384, 274)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = network(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(session.run(None, {"image": batch})[0], expected, atol=1e-5)


def test_export_formats_are_checked_before_any_work(tmp_path):
    from diffdenoise.export import check_formats

    with pytest.raises(InputError, match="torchscript, onnx"):
        check_formats(["tensorrt"])
    with pytest.raises(InputError, match="configs/inference.yaml"):
        from diffdenoise.cli import export

        export(str(tmp_path))
