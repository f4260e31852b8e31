"""Speed benchmark (issue 8): per-slice latency, throughput and peak memory of SRDS, the student, the BSN, BM3D, NLM.

Why: the paper's own limitation is sampling cost (about 5 s per image on a GPU); the distilled student exists to
remove it. Every method here runs on the same real slices in one process, so the ratios it prints are not
confounded by different machines, loads or inputs.

What runs:
- the networks are built from the bundle configs (``diffdenoise.stages.stage_parser``) with the preset's sizes and
  **random weights**: a forward pass costs the same whatever the weight values, so no trained model is needed;
- SRDS is ``sample_srds.yaml``'s ``srds_inferer`` (one (eps, -eps) pair per slice: batch 2 per DDIM step) with x_c
  given, so its row excludes the BSN that computes x_c (the BSN row); the student replaces both;
- the student is ``inference.yaml``'s NAFNet, eager, ``torch.jit.script``ed (what ``ckpt_export`` writes to
  ``model.ts``) and exported to ONNX by ``diffdenoise.export`` (``model.onnx``), run by ONNX Runtime on the CPU with
  torch's thread count (skipped with a note when the onnx extra is absent); BM3D and NLM are ``diffdenoise.baselines.classical`` with the noise sigma given, on the CPU,
  one slice at a time (their throughput is 1 / latency);
- slices: the middle slices of the studyforrest T1 series, normalised like ``diffdenoise prepare``, centre-cropped
  to a square, resized to each size, plus Gaussian noise of sigma 6/255 (the paper's level).

Timing: one warm-up call per (method, size, batch), then ``--repeats`` timed calls; latency is the median at batch 1,
throughput is batch / median time of a batch. SRDS's warm-up is a 1-step call (a DDIM step is one forward of the same
shape). ``--srds_timed_steps K`` times K steps and scales to ``--steps`` (each step is one forward of the same
shape; the table says so). On a GPU the fast path is on: ``torch.inference_mode``, bf16 autocast, channels_last,
cudnn benchmark, and ``torch.compile`` with ``--compile``; inputs are on the device before the clock starts.
Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the process's peak RSS (getrusage), with the
high-water mark reset before each measurement through ``/proc/self/clear_refs`` (Linux).

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_speed.py --sizes 256,512 --out docs/performance.md
    python scripts/bench_speed.py --device cuda --preset paper --compile --out docs/performance.md   # GPU
    python scripts/bench_speed.py --quick --out runs/bench_speed.json                            # seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SERIES = Path("brain_mri_t1_axial_studyforrest") / "series"
NOISE_SIGMA = 6 / 255
METHODS = ("srds", "student", "student_ts", "student_onnx", "bsn", "bm3d", "nlm")
CPU_TARGET_SPEEDUP = 20.0  # issue 8: student >= 20x faster per slice than SRDS at 20 steps, on a CPU
GPU_TARGET_SIZE, GPU_TARGET_SRDS_S, GPU_TARGET_STUDENT_S = 320, 0.25, 0.005  # issue 8, on a GPU
QUICK = {"sizes": "32,64", "steps": 2, "repeats": 1, "batch": 2}


@dataclass
class Method:
    """One thing to time: ``run(x)`` denoises a batch ``x`` (a tensor on ``device``, or (B, H, W) numpy)."""

    key: str
    name: str
    device: str
    run: Callable
    warmup: Callable
    batched: bool = True
    warmup_calls: int = 2  # TorchScript's profiling executor optimizes the graph only after its first two calls
    time_scale: float = 1.0  # SRDS timed on fewer steps: seconds are multiplied by steps / timed steps
    note: str = ""


@dataclass
class Row:
    """One line of the table: a method at one size."""

    size: int
    method: str
    name: str
    device: str
    latency_ms: list[float] = field(default_factory=list)
    throughput: float | None = None
    batch: int = 1
    peak_mib: list[float | None] = field(default_factory=list)
    note: str = ""
    error: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latency_ms) if self.latency_ms else math.nan


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` fills the ones not given with tiny values for the test."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", help="slice sizes, e.g. 256,512 (default: 256,512 on CPU; 256,320,512 on GPU)")
    p.add_argument("--steps", type=int, help="DDIM steps of SRDS (default 20)")
    p.add_argument("--srds_timed_steps", type=int, help="time this many SRDS steps and scale to --steps (default: all)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement (default 5)")
    p.add_argument("--srds_repeats", type=int, help="timed calls for SRDS (default: --repeats)")
    p.add_argument("--batch", type=int, help="batch size for throughput (default 4)")
    p.add_argument("--srds_batch", type=int, help="batch size for SRDS throughput (default: --batch)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "paper"), help="network sizes (configs/presets)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile the eager networks (SRDS U-Net, student, BSN)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="bundle config override for every stage, YAML value,\n"
                   "e.g. diffusion_def#use_flash_attention=true")
    p.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"), help="folder holding " + str(SERIES))
    p.add_argument("--out", action="append", default=[],
                   help="write the results: *.json (all numbers) or *.md (replaces this device's section); repeatable")
    p.add_argument("--quick", action="store_true", help=f"tiny run for the test: {QUICK} unless given")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False (CPU build of torch, or no GPU visible)")
    defaults = {"sizes": "256,512" if args.device == "cpu" else "256,320,512", "steps": 20, "repeats": 5, "batch": 4}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",")]
    except ValueError:
        p.error(f"--sizes takes integers separated by commas, e.g. 256,512; got {args.sizes!r}")
    for srds_key, key in (("srds_timed_steps", "steps"), ("srds_repeats", "repeats"), ("srds_batch", "batch")):
        if getattr(args, srds_key) is None:
            setattr(args, srds_key, getattr(args, key))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    for name in ("steps", "srds_timed_steps", "repeats", "srds_repeats", "batch", "srds_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.sizes) < 16:
        p.error(f"--sizes must be >= 16 pixels, got {args.sizes}")
    if args.srds_timed_steps > args.steps:
        p.error(f"--srds_timed_steps {args.srds_timed_steps} exceeds --steps {args.steps}")
    bad_out = [o for o in args.out if Path(o).suffix not in (".json", ".md")]
    if bad_out:
        p.error(f"--out {bad_out}: use .json or .md files")
    try:
        args.overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    except ValueError:
        p.error(f"--set takes KEY=VALUE, got {args.set}")
    return args


def load_slices(data: Path, sizes: list[int], count: int) -> dict[int, np.ndarray]:
    """The ``count`` middle slices of the studyforrest series, noisy, as float32 (count, size, size) per size."""
    from diffdenoise.data import normalise
    from diffdenoise.io import read_volumes

    src = Path(data) / SERIES
    if not src.is_dir():
        raise SystemExit(f"bench_speed: real slices not found at {src}; pass --data <folder holding {SERIES}>")
    volume = read_volumes(src)[0]
    image = normalise(volume.array, volume.modality)
    mid = len(image) // 2
    stack = torch.from_numpy(image[max(mid - count // 2, 0):][:count])[:, None]
    side = min(stack.shape[-2:])
    top, left = (stack.shape[-2] - side) // 2, (stack.shape[-1] - side) // 2
    square = stack[..., top:top + side, left:left + side]
    generator = torch.Generator().manual_seed(0)
    slices = {}
    for size in sizes:
        clean = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        slices[size] = (clean + NOISE_SIGMA * torch.randn(clean.shape, generator=generator))[:, 0].numpy()
    return slices


def build_methods(args, device: torch.device) -> list[Method]:
    """The methods to time, networks built from the bundle configs with random weights (see module docstring)."""
    from diffdenoise.baselines.classical import denoise_bm3d, denoise_nlm
    from diffdenoise.stages import stage_parser

    overlays = [f"presets/{args.preset}"]
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    def fast(net: torch.nn.Module, compile_it: bool) -> torch.nn.Module:
        net = net.to(device).eval()
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        return torch.compile(net) if compile_it else net

    def torch_call(fn: Callable) -> Callable:
        def call(x):
            with torch.inference_mode(), autocast():
                return fn(x)
        return call

    methods: list[Method] = []
    compiled = " compiled" if args.compile else ""
    if "srds" in args.methods:
        parser = stage_parser("sample_srds", overlays, **{"srds_inferer#condition_fn": None, **args.overrides})
        unet = fast(parser.get_parsed_content("diffusion_def"), args.compile)

        def inferer(steps: int):
            parser["srds_steps"] = steps
            srds = parser.get_parsed_content("srds_inferer", lazy=False)
            return torch_call(lambda x: srds(x, unet, condition=x))  # x_c's values do not change the cost

        scale = args.steps / args.srds_timed_steps
        note = f"{args.srds_timed_steps} of {args.steps} steps timed, x {scale:g}" if scale != 1 else ""
        pairs = parser["srds_pairs"]
        methods.append(Method("srds", f"SRDS, {args.steps} DDIM steps, {pairs} pair{'s' * (pairs > 1)}{compiled}",
                              device.type,
                              inferer(args.srds_timed_steps), inferer(1),
                              time_scale=scale, note=note))
    parser = stage_parser("inference", overlays, **args.overrides)
    if "student" in args.methods:
        student = torch_call(fast(parser.get_parsed_content("network_def"), args.compile))
        methods.append(Method("student", f"student NAFNet, eager{compiled}", device.type, student, student))
    if "student_ts" in args.methods:
        scripted = torch_call(torch.jit.script(fast(parser.get_parsed_content("network_def"), False)))
        methods.append(Method("student_ts", "student NAFNet, TorchScript", device.type, scripted, scripted))
    if "student_onnx" in args.methods:
        if importlib.util.find_spec("onnxruntime") is None:
            print("student_onnx skipped: the onnx extra is not installed (pip install -e '.[onnx]')", file=sys.stderr)
        else:
            methods.append(onnx_student(args, parser.get_parsed_content("network_def")))
    if "bsn" in args.methods:
        bsn_net = fast(parser.get_parsed_content("bsn_def"), args.compile)
        bsn_inferer = parser.get_parsed_content("bsn_inferer")
        bsn = torch_call(lambda x: bsn_inferer(x, bsn_net))
        methods.append(Method("bsn", f"BSN (x_c for SRDS){compiled}", device.type, bsn, bsn))
    for key, name, fn in (("bm3d", "BM3D", denoise_bm3d), ("nlm", "NLM", denoise_nlm)):
        if key in args.methods:
            classical = lambda x, fn=fn: [fn(s, sigma=NOISE_SIGMA) for s in x]  # noqa: E731
            methods.append(Method(key, name, "cpu", classical, classical, batched=False, warmup_calls=1,
                                  note="one slice at a time"))
    return methods


def onnx_student(args, network: torch.nn.Module) -> Method:
    """The student as ``diffdenoise export`` writes it, in an ONNX Runtime session (CPU)."""
    import tempfile

    from diffdenoise.export import export_student
    from diffdenoise.stages import stage_config_files

    root = Path(tempfile.mkdtemp(prefix="bench_speed_onnx_"))
    (root / "models").mkdir()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    files = stage_config_files("inference", [f"presets/{args.preset}"])
    (onnx_file,) = export_student(files, root, ["onnx"])
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"image": x.detach().cpu().numpy()})[0]  # noqa: E731
    return Method("student_onnx", "student NAFNet, ONNX Runtime", "cpu", run, run)


def reset_peak(device: str) -> bool:
    """Start a new peak-memory window; False where the CPU high-water mark cannot be reset (then: process peak)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM (what getrusage's ru_maxrss reports) to the current RSS
        return True
    except OSError:
        return False


def peak_mib(device: str) -> float:
    """Peak GPU memory allocated, or the process's peak RSS, since ``reset_peak``, in MiB."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def current_rss_mib() -> float:
    """The process's resident memory now, the floor under every CPU row's peak (NaN off Linux)."""
    try:
        match = re.search(r"^VmRSS:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return math.nan
    return int(match.group(1)) / 1024 if match else math.nan


def measure(method: Method, x, repeats: int) -> tuple[list[float], float]:
    """Warm up, then time ``repeats`` calls; seconds (scaled by ``time_scale``) and the peak memory."""
    sync = torch.cuda.synchronize if method.device == "cuda" else (lambda: None)
    for _ in range(method.warmup_calls):
        method.warmup(x)
    gc.collect()
    reset_peak(method.device)
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        method.run(x)
        sync()
        seconds.append((time.perf_counter() - start) * method.time_scale)
    return seconds, peak_mib(method.device)


def run_benchmark(args, slices: dict[int, np.ndarray], methods: list[Method], device: torch.device) -> list[Row]:
    """Latency at batch 1 and throughput at the batch size, every method on every size, in the same process."""
    rows = []
    for size in args.sizes:
        for method in methods:
            srds = method.key == "srds"
            repeats, batch = (args.srds_repeats, args.srds_batch) if srds else (args.repeats, args.batch)
            row = Row(size, method.key, method.name, method.device, note=method.note)
            print(f"[bench_speed] {size}x{size} {method.name} ...", file=sys.stderr, flush=True)
            try:
                if method.batched:
                    tensor = torch.from_numpy(slices[size][:, None]).to(device)
                    if device.type == "cuda":
                        tensor = tensor.contiguous(memory_format=torch.channels_last)
                    one, many = tensor[:1], tensor[:batch]
                else:
                    one, batch = slices[size][:1], 1
                seconds, peak_one = measure(method, one, repeats)
                row.latency_ms = [1000 * s for s in seconds]
                row.peak_mib = [peak_one]
                row.batch = batch
                if batch == 1:
                    row.throughput = 1 / statistics.median(seconds)
                else:
                    if many.shape[0] < batch:
                        raise ValueError(f"only {many.shape[0]} slices loaded for batch {batch}")
                    seconds, peak_many = measure(method, many, repeats)
                    row.throughput = batch / statistics.median(seconds)
                    row.peak_mib.append(peak_many)
            except Exception as exc:  # reported in the table and by the exit status, the other rows still run
                row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                print(f"[bench_speed] failed: {row.error}", file=sys.stderr)
            rows.append(row)
            gc.collect()
    return rows


def ratios(args, rows: list[Row]) -> tuple[list[str], dict]:
    """The speed ratios from this run, and the issue's targets next to them."""
    by = {(r.size, r.method): r.median_ms for r in rows if not r.error}
    lines, numbers = [], {}
    steps_note = "" if args.steps == 20 else f" (the targets are defined at 20 steps; this run used {args.steps})"
    for key, name in (("student", "student (eager)"), ("student_ts", "student (TorchScript)"),
                      ("student_onnx", "student (ONNX Runtime)")):
        parts = []
        for size in args.sizes:
            if (size, "srds") in by and (size, key) in by:
                speedup = by[size, "srds"] / by[size, key]
                numbers[f"srds_over_{key}_{size}"] = speedup
                verdict = ("meets" if speedup >= CPU_TARGET_SPEEDUP else "misses") + f" >= {CPU_TARGET_SPEEDUP:g}x"
                parts.append(f"{size}: {fmt(speedup)}x" + (f" ({verdict})" if args.device == "cpu" else ""))
        if parts:
            lines.append(f"- {name} vs SRDS, per-slice speedup: " + "; ".join(parts) + steps_note)
    parts = []
    for size in args.sizes:
        if (size, "srds") in by and (size, "bm3d") in by:
            ratio = by[size, "srds"] / by[size, "bm3d"]
            numbers[f"srds_over_bm3d_{size}"] = ratio
            parts.append(f"{size}: {ratio:.3g}x" + (" (SRDS slower)" if ratio > 1 else " (SRDS faster)"))
    if parts:
        where = "" if args.device == "cpu" else " (SRDS on the GPU, BM3D on the CPU)"
        lines.append("- SRDS vs BM3D, per-slice time ratio SRDS / BM3D: " + "; ".join(parts) + where)
    if args.device == "cuda":
        size = GPU_TARGET_SIZE
        for key, limit in (("srds", GPU_TARGET_SRDS_S), ("student", GPU_TARGET_STUDENT_S)):
            if (size, key) in by:
                seconds = by[size, key] / 1000
                verdict = "meets" if seconds < limit else "misses"
                lines.append(f"- GPU target {key} at {size}x{size} < {limit * 1000:g} ms: {seconds * 1000:.3g} ms, "
                             f"{verdict}{steps_note if key == 'srds' else ''}")
            else:
                lines.append(f"- GPU target {key} at {size}x{size} < {limit * 1000:g} ms: not measured "
                             f"(add {size} to --sizes)")
    else:
        lines.append(f"- GPU targets (SRDS at {GPU_TARGET_SIZE}x{GPU_TARGET_SIZE} < {GPU_TARGET_SRDS_S} s, student "
                     f"< {GPU_TARGET_STUDENT_S * 1000:g} ms per slice): not measured in a CPU run")
    return lines, numbers


def machine(device: torch.device) -> dict:
    """What the numbers depend on: CPU model, threads, GPU, versions, commit, load."""
    import monai

    cpu = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass

    def git(*cmd):
        try:
            done = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
            return done.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes in the tree)"
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def fmt(value: float) -> str:
    """Three significant figures, without scientific notation for the usual ranges."""
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def markdown(args, info: dict, rows: list[Row], ratio_lines: list[str], command: str) -> str:
    """The table, the ratios and the conditions of the run, as markdown."""
    where = f"GPU {info['gpu']}" if info["gpu"] else "CPU"
    lines = [
        f"### {where}: {info['cpu']}",
        "",
        f"- command: `{command}`",
        f"- commit {info['commit']}; torch {info['torch']}, MONAI {info['monai']}, Python {info['python']}",
        f"- {info['logical_cpus']} logical CPUs, {info['torch_threads']} torch thread(s), OMP_NUM_THREADS="
        f"{info['OMP_NUM_THREADS']}; load average (1, 5, 15 min) {info['load_average_start']} at the start, "
        f"{info['load_average_end']} at the end (other jobs share this machine)",
        f"- preset `{args.preset}`, random weights; slices: studyforrest T1, centre square resized, + N(0, (6/255)^2); "
        f"latency at batch 1, median [min, max] of n timed calls after a warm-up",
        f"- peak memory: {'CUDA max_memory_allocated for GPU rows, ' if info['gpu'] else ''}"
        f"peak process RSS for CPU rows (high-water mark reset before each measurement; "
        f"{info['rss_before_mib']:.0f} MiB resident before the first, with the networks and slices loaded), "
        "at batch 1 / at the batch size",
        "",
        "| size | method | runs on | latency ms/slice, median [min, max] (n) | throughput slices/s (batch) "
        "| peak MiB (batch 1 / batch) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            cells = ["failed", "", "", r.error]
        else:
            latency = f"{fmt(r.median_ms)} [{fmt(min(r.latency_ms))}, {fmt(max(r.latency_ms))}] ({len(r.latency_ms)})"
            cells = [latency, f"{fmt(r.throughput)} ({r.batch})", " / ".join(f"{p:,.0f}" for p in r.peak_mib), r.note]
        lines.append("| " + " | ".join([f"{r.size}x{r.size}", r.name, r.device, *cells]) + " |")
    lines += ["", "Ratios, from this run:", "", *ratio_lines, ""]
    return "\n".join(lines)


def write_section(path: Path, device: str, text: str) -> None:
    """Replace this device's section between markers in a markdown file (appended when absent, file made if missing)."""
    begin, end = f"<!-- bench_speed:{device}:begin -->", f"<!-- bench_speed:{device}:end -->"
    block = f"{begin}\n{text}\n{end}"
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main(argv=None) -> int:
    args = parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = "python scripts/bench_speed.py " + " ".join(shlex.quote(a) for a in given)
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " + command
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = machine(device)
    slices = load_slices(Path(args.data), args.sizes, max(args.batch, args.srds_batch))
    methods = build_methods(args, device)
    gc.collect()
    info["rss_before_mib"] = current_rss_mib()
    rows = run_benchmark(args, slices, methods, device)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    ratio_lines, ratio_numbers = ratios(args, rows)
    text = markdown(args, info, rows, ratio_lines, command)
    print(text)
    for out in map(Path, args.out):
        if out.suffix == ".json":
            out.parent.mkdir(parents=True, exist_ok=True)
            rows_json = [r.__dict__ | {"median_ms": None if r.error else r.median_ms} for r in rows]
            out.write_text(json.dumps({"machine": info, "command": command, "args": vars(args), "rows": rows_json,
                                       "ratios": ratio_numbers}, indent=1, default=str))
        else:
            write_section(out, device.type, text)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
