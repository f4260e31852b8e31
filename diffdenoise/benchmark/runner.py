"""Running the benchmark: each (case, method) fitted, timed and scored, stored once and skipped on a rerun with the
same fingerprint, cases side by side in worker processes; ``main`` is ``diffdenoise benchmark``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import queue
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from diffdenoise.allocator import retain_freed_memory
from diffdenoise.benchmark.cases import Case, _test_items, build_cases, prepare_case
from diffdenoise.benchmark.methods import METHODS, PIPELINE_METHODS, FitSettings, Fitted
from diffdenoise.benchmark.preset import load_preset, runs_on
from diffdenoise.benchmark.report import write_report
from diffdenoise.benchmark.store import result_fingerprint, save_atomic
from diffdenoise.convergence import CURVE_SUFFIX
from diffdenoise.data import load_datalist
from diffdenoise.errors import InputError
from diffdenoise.metrics import noise_leak, psnr, ssim

logger = logging.getLogger(__name__)


def run_method(name: str, settings: FitSettings, train: list[np.ndarray], items: Sequence[dict], workdir: Path,
               figure_slice: str) -> dict:
    """Fits one method, denoises the test ``items`` and scores them against ``clean``.

    Returns:
        The record stored as ``<method>.json``: per-slice ``slices``, ``psnr``, ``ssim``; ``fit_seconds`` and
        ``denoise_seconds_per_slice`` (wall) with their process-CPU twins ``*_cpu_*`` (all threads; they
        estimate costs on a machine shared with other jobs); ``figure``, the output on ``figure_slice``; ``curves``,
        the training curves the fit left in ``workdir`` (``diffdenoise.convergence``), by name, when it left any.

    Raises:
        RuntimeError: the denoiser returned another shape or non-finite values.
    """
    method = METHODS[name]
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started, cpu = time.perf_counter(), time.process_time()
    denoiser = method.fit(train, workdir, settings)
    fit_seconds, fit_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    if isinstance(denoiser, Fitted):
        denoiser, fit_seconds, fit_cpu_seconds = denoiser.denoise, denoiser.seconds, denoiser.cpu_seconds
    record = {"case": settings.case.name, "method": name, "label": method.label, "kind": method.kind,
              "fit_seconds": fit_seconds, "fit_cpu_seconds": fit_cpu_seconds, "slices": [], "psnr": [], "ssim": [], "leak": []}
    curves = {path.name.removesuffix(CURVE_SUFFIX): json.loads(path.read_text())
              for path in sorted(workdir.rglob(f"*{CURVE_SUFFIX}"))}
    if curves:
        record["curves"] = curves
    seconds = cpu_seconds = 0.0
    for item in items:
        noisy = np.load(item["image"])
        started, cpu = time.perf_counter(), time.process_time()
        out = np.asarray(denoiser(noisy), dtype=np.float32)
        seconds, cpu_seconds = seconds + time.perf_counter() - started, cpu_seconds + time.process_time() - cpu
        if out.shape != noisy.shape or not np.isfinite(out).all():
            raise RuntimeError(
                f"method '{name}' on case {settings.case.name}, slice {item['id']}: returned shape {out.shape} with "
                f"{int(np.size(out) - np.isfinite(out).sum())} non-finite values; a denoiser must return a finite "
                f"image of the input's shape {noisy.shape}"
            )
        reference = np.load(item["clean"])
        record["slices"].append(item["id"])
        record["psnr"].append(psnr(out, reference))
        record["ssim"].append(ssim(out, reference))
        record["leak"].append(noise_leak(out, noisy, reference))
        if item["id"] == figure_slice:
            record["figure"] = out
    record["denoise_seconds_per_slice"] = seconds / max(len(items), 1)
    record["denoise_cpu_seconds_per_slice"] = cpu_seconds / max(len(items), 1)
    return record


def run_benchmark(
    preset: str | os.PathLike = "smoke",
    data_root: str | os.PathLike = "../shared/data",
    out: str | os.PathLike = "runs/bench",
    datasets=None,
    noises=None,
    methods=None,
    references=None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    command: str | None = None,
    workers: int = 1,
) -> Path:
    """Runs datasets x noises x references x methods of a preset, resuming finished pairs, and writes the report.

    Args:
        preset: ``smoke``, ``cpu``, ``paper`` (``configs/benchmark/<name>.yaml``) or a YAML path.
        data_root: folder holding the datasets (``../shared/data``).
        out: output folder; rerunning on the same folder resumes.
        datasets, noises, methods, references: lists or comma-separated strings replacing the preset's.
        progress: show a tqdm bar over (case, method) pairs.
        callback: called with ``{"event": "prepare" | "start" | "fit" | "resume" | "skip", "case": ..., "method": ...}``.
        command: the command line recorded in the report (default: this process's ``sys.argv``).
        workers: cases run side by side in this many spawned processes, each with the preset's
            ``torch_threads`` (cases are independent; the costliest go first). 1 runs them in this process.

    Returns:
        The path of ``OUT/results.md`` (beside it ``results.csv``; figures in ``OUT/figures``).

    Example::

        from diffdenoise.benchmark import run_benchmark

        report = run_benchmark("smoke", "../shared/data", "runs/bench_smoke")
        print(report.read_text())  # a rerun on the same folder refits nothing
    """
    started = time.perf_counter()
    config = load_preset(preset, datasets=datasets, noises=noises, methods=methods, references=references)
    out = Path(out).absolute()  # datalists hold paths relative to their own folder
    cases = build_cases(config)
    emit = callback or (lambda info: None)
    skipped = {name: reason for name in config["methods"] if (reason := METHODS[name].missing())}
    names = [name for name in config["methods"] if name not in skipped]
    for name, reason in skipped.items():
        logger.warning("skipping %s: %s", name, reason)
        emit({"event": "skip", "method": name, "reason": reason})
    _check_workers(workers)
    pairs = sum(runs_on(config, name, case) for case in cases for name in names)
    bar = tqdm(total=pairs, desc="benchmark", unit="run", disable=not progress)

    def report(info: dict) -> None:
        if info["event"] == "start":
            bar.set_postfix_str(f"{info['case']}: {info['method']}")
        elif info["event"] in ("fit", "resume"):
            bar.update()
        emit(info)

    threads = config["torch_threads"] or torch.get_num_threads()
    jobs = [(case, names, config, Path(data_root), out / "cases" / case.name) for case in cases]
    try:
        if workers == 1:
            with _torch_threads(threads):
                for job in jobs:
                    _run_case(*job, report)
        else:
            _run_cases_in_workers(jobs, workers, threads, report)
    finally:
        bar.close()
    header = {
        "command": command or shlex.join(sys.argv),
        "commit": _commit(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"with {threads} thread(s) in each of {workers} process(es)",
        "preset": f"{config['path']} (bundle preset `{config['bundle_preset']}`, seed {config['seed']}, "
                  f"max_test_slices {config['max_test_slices']})",
        "wall time of this run": f"{time.perf_counter() - started:.0f} s",
    }
    return write_report(out, cases, names, skipped, header, config["max_test_slices"])


def _check_workers(workers) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {workers!r}")


@contextlib.contextmanager
def _torch_threads(threads: int):
    """torch's intra-op thread count set for a block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_cases_in_workers(jobs: Sequence[tuple], workers: int, threads: int, report: Callable[[dict], None]) -> None:
    """Runs ``_run_case`` for each job in spawned processes; their events come back through a managed queue.

    A managed queue's ``put`` returns only once the event is stored, so every event of a case is here before its
    future completes. A case that fails stops the run: the cases not yet started are cancelled and the error is
    raised here once the running ones have finished (each leaves only finished, atomically written results, so a
    rerun resumes).
    """
    context = multiprocessing.get_context("spawn")
    costliest_first = sorted(jobs, key=lambda job: -sum(runs_on(job[2], name, job[0]) for name in job[1]))
    with context.Manager() as manager:
        events = manager.Queue()

        def drain() -> None:
            while True:
                try:
                    report(events.get_nowait())
                except queue.Empty:
                    return

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                    initargs=(events, threads)) as pool:
            pending = {pool.submit(_run_case_in_worker, *job) for job in costliest_first}
            try:
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.5)
                    drain()
                    for future in done:
                        future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                drain()


_worker_events = None


def _start_worker(events, threads: int) -> None:
    """Worker-process set-up: the event queue back to the parent, the torch thread count, the allocator."""
    global _worker_events
    _worker_events = events
    torch.set_num_threads(threads)
    retain_freed_memory()


def _run_case_in_worker(*job) -> None:
    _run_case(*job, _worker_events.put)


def _run_case(case: Case, names: Sequence[str], config: Mapping[str, Any], data_root: Path, case_dir: Path,
              emit: Callable[[dict], None]) -> None:
    """Prepares one case if needed, then runs each method that has no stored result with the same fingerprint."""
    datalist = case_dir / "data" / "datalist.json"
    if not datalist.is_file():
        prepare_case(case, data_root, case_dir, config["seed"], progress=False)
        emit({"event": "prepare", "case": case.name})
    items = _test_items(datalist, config["max_test_slices"])
    train = None
    for name in [n for n in names if runs_on(config, n, case)]:
        options = config["pipeline_settings"] if name in PIPELINE_METHODS else config["method_settings"].get(name)
        settings = FitSettings(case, datalist.parent, config["bundle_preset"], config["seed"], options or {})
        path = case_dir / f"{name}.json"
        fingerprint = result_fingerprint(settings, items)
        if path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
            emit({"event": "resume", "case": case.name, "method": name})
            continue
        emit({"event": "start", "case": case.name, "method": name})
        train = train or [np.load(item["image"]) for item in load_datalist(datalist, "training")]
        record = run_method(name, settings, train, items, case_dir / "work" / name, items[len(items) // 2]["id"])
        figure = record.pop("figure")
        save_atomic(case_dir / f"{name}.npy", lambda f: np.save(f, figure))
        record["fingerprint"] = fingerprint
        save_atomic(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
        emit({"event": "fit", "case": case.name, "method": name, "seconds": record["fit_seconds"]})


def _commit() -> str:
    """``git rev-parse --short HEAD`` of the package's checkout, or 'unknown'."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def main(preset: str = "smoke", data: str = "../shared/data", out: str = "runs/bench", noise=None, dataset=None,
         method=None, reference=None, progress: bool = True, workers: int = 1) -> str:
    """``diffdenoise benchmark``: run a preset's datasets x noises x methods; rerun the same OUT to resume.

    Example: ``diffdenoise benchmark --preset smoke --data ../shared/data --out runs/bench``;
    ``--noise gaussian,poisson_corr1.2 --dataset studyforrest --method noisy,bm3d,srds --reference full,down2``
    narrow the preset's lists; ``--workers 2`` runs two cases at a time (one per core at ``torch_threads: 1``).
    A bad preset, selection or worker count fails before anything runs, as one ``InputError`` naming the preset.
    Returns the path of ``OUT/results.md``.
    """
    try:
        load_preset(preset, datasets=dataset, noises=noise, methods=method, references=reference)
        _check_workers(workers)
    except InputError:
        raise
    except ValueError as err:
        raise InputError(preset, str(err)) from None
    return str(run_benchmark(preset, data, out, datasets=dataset, noises=noise, methods=method, references=reference,
                             progress=progress, workers=workers))
