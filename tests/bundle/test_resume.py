"""Interruption-safe training: a smoke run killed (SIGKILL, as a preempted job) after its first resume
checkpoint and rerun with `--resume true` continues from the stored iteration, mid-epoch, and stops at the
same total as an uninterrupted run."""

import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffdenoise.stages import stage_config_files, stage_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_EPOCHS, EPOCH_LENGTH, INTERVAL = 3, 8, 4
TOTAL = MAX_EPOCHS * EPOCH_LENGTH


def command(data, bundle_root, *extra):
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file",
            str(stage_config_files("train_bsn", ["presets/smoke"])), "--dataset_dir", str(data),
            "--bundle_root", str(bundle_root), "--max_epochs", str(MAX_EPOCHS), "--epoch_length", str(EPOCH_LENGTH),
            "--resume_interval", str(INTERVAL), *extra]


def stored_iterations(resume_dir):
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in resume_dir.glob("bsn_iteration_*.pt"))


def logged_steps(events_files):
    steps = []
    for events in events_files:
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train_loss" in accumulator.Tags()["scalars"]:
            steps += [e.step for e in accumulator.Scalars("train_loss")]
    return steps


def test_killed_run_resumes_to_the_same_total(trained, tmp_path):
    data, _, _ = trained
    bundle_root = tmp_path / "bundle"
    resume_dir, logs = bundle_root / "models" / "resume", bundle_root / "logs"
    with open(tmp_path / "killed.log", "w") as log:
        run = subprocess.Popen(command(data, bundle_root), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not stored_iterations(resume_dir):
            assert run.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no resume checkpoint within 300 s"
            time.sleep(0.05)
        run.kill()
        run.wait()
    stored = stored_iterations(resume_dir)[-1]
    assert stored < TOTAL
    killed_events = set(logs.glob("events.out.tfevents.*"))

    done = subprocess.run(command(data, bundle_root, "--resume", "true"), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # the resumed run trained exactly the iterations after the stored one, so the total matches an uninterrupted run
    resumed_events = set(logs.glob("events.out.tfevents.*")) - killed_events
    assert logged_steps(resumed_events) == list(range(stored + 1, TOTAL + 1))
    # the last two files are kept, the killed run's included in the pruning
    assert stored_iterations(resume_dir) == [TOTAL - INTERVAL, TOTAL]
    final = torch.load(resume_dir / f"bsn_iteration_{TOTAL}.pt", weights_only=True)
    assert final["trainer"]["iteration"] == TOTAL and final["lr_scheduler"]["last_epoch"] == TOTAL
    network = stage_parser("train_bsn", ["presets/smoke"]).get_parsed_content("bsn_def")
    network.load_state_dict(final["network"])
    network.load_state_dict(torch.load(bundle_root / "models" / "bsn.pt", weights_only=True))
