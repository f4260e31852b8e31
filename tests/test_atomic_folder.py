"""atomic_folder after ``kill -9``: the next run removes the dead run's hidden folder, never a live run's."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffdenoise.io import atomic_folder, partial_path, remove_stale_partials

# Enters atomic_folder, writes half an output, says where, then waits to be killed.
KILLED_INSIDE = """
import sys, time
from diffdenoise.io import atomic_folder
with atomic_folder(sys.argv[1], overwrite=sys.argv[2] == "1") as tmp:
    (tmp / "half.txt").write_text("half written")
    print(tmp, flush=True)
    time.sleep(600)
"""


def _killed_inside(out: Path, overwrite: bool) -> tuple[Path, int]:
    """Runs KILLED_INSIDE, SIGKILLs it once its partial folder exists; returns (partial folder, dead pid)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_INSIDE, str(out), "1" if overwrite else "0"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        partial = Path(proc.stdout.readline().strip())
        assert (partial / "half.txt").is_file(), "the child never entered atomic_folder"
    finally:
        proc.kill()  # SIGKILL: no finally, no except in the child runs
        proc.wait()  # reaped: a zombie would still answer os.kill(pid, 0)
        proc.stdout.close()
    assert proc.returncode == -9
    return partial, proc.pid


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_rerun_removes_what_a_killed_run_left_and_keeps_a_live_runs_folder(tmp_path, caplog, existing):
    out = tmp_path / "results"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("earlier results")
    partial, pid = _killed_inside(out, overwrite=existing)
    _, name, host, pid_text, _, suffix = partial.name.split(".")
    assert partial.parent == tmp_path and (name, pid_text, suffix) == ("results", str(pid), "partial")
    assert partial.is_dir()  # the kill left it: the problem being fixed
    assert (sorted(p.name for p in out.iterdir()) == ["old.txt"]) if existing else not out.exists()  # untouched

    live = tmp_path / f".results.{host}.{os.getpid()}.0123abcd.partial"  # a concurrent run (this process)
    other_host = tmp_path / ".results.elsewhere.1.89abcdef.partial"  # a shared filesystem
    old_scheme = tmp_path / ".results.fedcba98.partial"  # made before the pid was in the name
    other_output = tmp_path / f".results2.{host}.{pid}.01234567.partial"  # same dead run, another output
    for folder in (live, other_host, old_scheme, other_output):
        folder.mkdir()
        (folder / "x.txt").write_text("in progress")

    with caplog.at_level(logging.WARNING, logger="diffdenoise.io"):
        with atomic_folder(out, overwrite=existing) as tmp:
            assert not partial.exists()  # removed on entry, before any work
            (tmp / "done.txt").write_text("complete")
    assert not partial.exists()
    assert [p.name for p in out.iterdir()] == ["done.txt"] and (out / "done.txt").read_text() == "complete"
    for folder in (live, other_host, old_scheme, other_output):
        assert (folder / "x.txt").read_text() == "in progress", folder
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(str(folder) in warning for folder in (live, other_host, old_scheme))
    assert f"process {os.getpid()} is running" in warning and str(other_output) not in warning
    hidden = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}
    assert hidden == {live.name, other_host.name, old_scheme.name, other_output.name}


def test_a_run_killed_between_its_two_renames_gets_the_previous_output_back(tmp_path):
    """With --overwrite, ``out`` is moved to ``<partial>.old`` before the new one is renamed in."""
    out, pid = tmp_path / "results", _dead_pid()
    host = partial_path(out).name.split(".")[2]
    moved_aside = tmp_path / f".results.{host}.{pid}.0badf00d.old"
    moved_aside.mkdir()
    (moved_aside / "old.txt").write_text("earlier results")
    new_partial = tmp_path / f".results.{host}.{pid}.0badf00d.partial"
    new_partial.mkdir()
    assert sorted(remove_stale_partials(out)) == sorted([moved_aside, new_partial])
    assert (out / "old.txt").read_text() == "earlier results" and not new_partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]

    # Killed after the rename into place, while deleting the old output: the leftover just goes.
    moved_aside.mkdir()
    (moved_aside / "old.txt").write_text("earlier results")
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"] and [p.name for p in out.iterdir()] == ["new.txt"]


def test_an_existing_output_is_refused_on_entry_without_overwrite(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "old.txt").write_text("earlier results")
    with pytest.raises(Exception, match="output already exists"):
        with atomic_folder(out):
            pytest.fail("the block ran although its result could not be renamed into place")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_prepare_removes_a_killed_runs_partial_output(tmp_path):
    """prepare, the benchmark's data, the stages' outputs and the deploy writer go through the same cleanup."""
    from diffdenoise.data import prepare  # imports MONAI: only here

    src, out, pid = tmp_path / "in", tmp_path / "data", _dead_pid()
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(30, 220, (48, 40), dtype=np.uint8)).save(src / "a.png")
    host = partial_path(out).name.split(".")[2]
    dead = tmp_path / f".data.{host}.{pid}.abcdef01.partial"
    (dead / "slices").mkdir(parents=True)
    prepare(src, out, noise="gaussian", level=0.05, seed=0, progress=False)
    assert not dead.exists() and (out / "datalist.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]
