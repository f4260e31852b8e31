"""multi_gpu_train.yaml on a CPU: two gloo processes under torchrun train the BSN and the diffusion smoke presets.

Each run is 2 epochs x 6 iterations, about 30 s on a 2-core box. The checks are the overlay's promises: both
ranks train their own shard, only rank 0 logs and writes, the checkpoint loads into the plain (unwrapped)
network the later stages build, and the training loss falls from its first value.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffdenoise.distributed import leave_process_group
from diffdenoise.stages import run_stage, stage_config_files, stage_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_EPOCHS, EPOCH_LENGTH = 2, 6
ITERATIONS = MAX_EPOCHS * EPOCH_LENGTH


def torchrun(stage, data, bundle_root):
    """The documented launch, with `python -m torch.distributed.run` (= torchrun) of this interpreter.

    `--device cpu` keeps it on gloo on a GPU machine too (one GPU cannot hold two NCCL ranks)."""
    files = stage_config_files(stage, ["presets/smoke"])
    files.insert(2, str(REPO_ROOT / "bundles/diffdenoise/configs/multi_gpu_train.yaml"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee=3",
           "-m", "monai.bundle", "run", "--config_file", str(files), "--dataset_dir", str(data),
           "--bundle_root", str(bundle_root), "--device", "cpu", "--max_epochs", str(MAX_EPOCHS),
           "--epoch_length", str(EPOCH_LENGTH), "--resume_interval", str(EPOCH_LENGTH)]
    # a rank that dies on a signal prints its Python stack (faulthandler), so a failure says where it died
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    return done.stdout + done.stderr


def check_ranks_and_loss(log, bundle_root):
    """Both ranks ran every iteration on half the slices; only rank 0 logged; the loss fell from its start."""
    shards = {}
    for rank, iterations, shard, total in re.findall(r"rank (\d) of 2: (\d+) iterations on (\d+) of (\d+) training", log):
        assert int(iterations) == ITERATIONS
        shards[rank] = (int(shard), int(total))
    assert set(shards) == {"0", "1"}, log[-4000:]
    assert all(2 * shard - total in (0, 1) for shard, total in shards.values())
    assert "[default0]:" in log and re.search(r"\[default0\]:.*Key metric", log)
    assert not re.search(r"\[default1\]:.*(Key metric|Epoch\[\d\] Metrics)", log), "rank 1 logged"
    losses = {}
    for events in (bundle_root / "logs").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train_loss" in accumulator.Tags()["scalars"]:
            losses[events.name] = [e.value for e in accumulator.Scalars("train_loss")]
    assert len(losses) == 1, f"train_loss expected from rank 0 only, got {list(losses)}"
    (loss,) = losses.values()
    assert len(loss) == ITERATIONS
    last_epoch = loss[-EPOCH_LENGTH:]
    assert sum(last_epoch) / len(last_epoch) < 0.8 * loss[0], loss


def test_bsn_on_two_processes(trained, tmp_path):
    data, _, _ = trained
    bundle_root = tmp_path / "bundle"
    log = torchrun("train_bsn", data, bundle_root)
    check_ranks_and_loss(log, bundle_root)
    # rank 0's checkpoint has no DDP `module.` prefix: it loads strictly into the plain BSN that infer_bsn.yaml
    # and `diffdenoise denoise` build
    network = stage_parser("train_bsn", ["presets/smoke"]).get_parsed_content("bsn_def")
    network.load_state_dict(torch.load(bundle_root / "models" / "bsn.pt", weights_only=True))
    resume = torch.load(bundle_root / "models" / "resume" / f"bsn_iteration_{ITERATIONS}.pt", weights_only=True)
    assert resume["trainer"]["iteration"] == ITERATIONS
    network.load_state_dict(resume["network"])
    # every rank's random streams are kept, each its own (the ranks draw different crops), for a resume on 2 ranks
    ranks = resume["randomness"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def test_diffusion_on_two_processes(trained, tmp_path):
    """The DiffusionPrepareBatch subclass and the EMA handler under DDP: the EMA of the unwrapped network is saved."""
    data, stage1_root, _ = trained
    if not (data / "datalist_bsn.json").is_file():
        run_stage("infer_bsn", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(stage1_root))
    bundle_root = tmp_path / "bundle"
    log = torchrun("train_diffusion", data, bundle_root)
    check_ranks_and_loss(log, bundle_root)
    network = stage_parser("train_diffusion", ["presets/smoke"]).get_parsed_content("diffusion_def")
    resume = torch.load(bundle_root / "models" / "resume" / f"diffusion_iteration_{ITERATIONS}.pt", weights_only=True)
    network.load_state_dict(resume["network"])
    network.load_state_dict(resume["ema"])
    # the EMA weights are stored apart from the trained ones (with momentum 0.001 they lag far behind)
    assert any(not torch.equal(resume["ema"][k], resume["network"][k]) for k in resume["ema"])
    network.load_state_dict(torch.load(bundle_root / "models" / "diffusion.pt", weights_only=True))
    out = network(torch.zeros(1, 2, 32, 32), timesteps=torch.tensor([10]))
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()


def test_leave_process_group_frees_the_ddp_reducer_and_the_group(tmp_path):
    """The overlay's finalize: a DDP wrapper keeps no hold on the group that interpreter exit would have to free."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    leave_process_group(ddp)
    assert not torch.distributed.is_initialized()
    assert not hasattr(ddp, "reducer")
