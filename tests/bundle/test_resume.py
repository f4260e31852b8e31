"""Interruption-safe training, for each training stage: a smoke run killed (SIGKILL, as a preempted job) after
its first resume checkpoint and rerun with `--resume true` continues from the stored iteration, mid-epoch, stops
at the same total and ends with bitwise the weights of an uninterrupted run (the checkpoints keep every random
stream: diffdenoise.resume). One torch thread per run, so the arithmetic is the same in every run."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffdenoise.stages import run_stage, stage_config_files, stage_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_EPOCHS, EPOCH_LENGTH, INTERVAL = 3, 8, 4
TOTAL = MAX_EPOCHS * EPOCH_LENGTH
# stage -> (resume prefix, best checkpoint, network config key, stage-specific arguments)
STAGES = {
    "train_bsn": ("bsn", "bsn.pt", "bsn_def", ["--max_epochs", str(MAX_EPOCHS), "--epoch_length", str(EPOCH_LENGTH)]),
    "train_diffusion": ("diffusion", "diffusion.pt", "diffusion_def",
                        ["--max_epochs", str(MAX_EPOCHS), "--epoch_length", str(EPOCH_LENGTH)]),
    "train_student": ("student", "model.pt", "student_def",
                      ["--student_max_epochs", str(MAX_EPOCHS), "--student_epoch_length", str(EPOCH_LENGTH),
                       "--student_target_key", "bsn"]),
}  # fmt: skip


def command(stage, data, bundle_root, *extra):
    args = STAGES[stage][3] + (["--student_datalist_path", str(data / "datalist_bsn.json")]
                               if stage == "train_student" else [])  # fmt: skip
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file",
            str(stage_config_files(stage, ["presets/smoke"])), "--dataset_dir", str(data),
            "--bundle_root", str(bundle_root), "--resume_interval", str(INTERVAL), *args, *extra]


def start(cmd, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def stored_iterations(resume_dir, prefix):
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in resume_dir.glob(f"{prefix}_iteration_*.pt"))


def logged_steps(events_files):
    steps = []
    for events in events_files:
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train_loss" in accumulator.Tags()["scalars"]:
            steps += [e.step for e in accumulator.Scalars("train_loss")]
    return steps


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[0]}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(stage, trained, tmp_path):
    data, stage1_root, _ = trained
    if stage != "train_bsn" and not (data / "datalist_bsn.json").is_file():
        run_stage("infer_bsn", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(stage1_root))
    prefix, best, network_key, _ = STAGES[stage]
    reference_root, bundle_root = tmp_path / "uninterrupted", tmp_path / "bundle"
    resume_dir, logs = bundle_root / "models" / "resume", bundle_root / "logs"

    reference = start(command(stage, data, reference_root), tmp_path / "uninterrupted.log")
    run = start(command(stage, data, bundle_root), tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    while not stored_iterations(resume_dir, prefix):
        assert run.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no resume checkpoint within 300 s"
        time.sleep(0.05)
    run.kill()
    run.wait()
    stored = stored_iterations(resume_dir, prefix)[-1]
    assert stored < TOTAL
    killed_events = set(logs.glob("events.out.tfevents.*"))

    done = subprocess.run(command(stage, data, bundle_root, "--resume", "true"), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert reference.wait(timeout=600) == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    # the resumed run trained exactly the iterations after the stored one, so the total matches an uninterrupted run
    resumed_events = set(logs.glob("events.out.tfevents.*")) - killed_events
    assert logged_steps(resumed_events) == list(range(stored + 1, TOTAL + 1))
    # the last two files are kept, the killed run's included in the pruning
    assert stored_iterations(resume_dir, prefix) == [TOTAL - INTERVAL, TOTAL]
    final = torch.load(resume_dir / f"{prefix}_iteration_{TOTAL}.pt", weights_only=True)
    expected = torch.load(reference_root / "models" / "resume" / f"{prefix}_iteration_{TOTAL}.pt", weights_only=True)
    assert final["trainer"]["iteration"] == TOTAL
    # same crops, flips, batches (and diffusion t and eps) after the resume: bitwise the uninterrupted weights,
    # EMA included, and the same best checkpoint
    for part in ("network", "ema"):
        if part in expected:
            assert_same_weights(final[part], expected[part])
    assert_same_weights(torch.load(bundle_root / "models" / best, weights_only=True),
                        torch.load(reference_root / "models" / best, weights_only=True))  # fmt: skip
    if "lr_scheduler" in final:
        assert final["lr_scheduler"]["last_epoch"] == TOTAL
    network = stage_parser(stage, ["presets/smoke"]).get_parsed_content(network_key)
    network.load_state_dict(final["network"])
