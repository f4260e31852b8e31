"""The ``diffdenoise`` command (fire): ``prepare``, ``stage``, ``demo``, ``fit``, ``export``, ``denoise``, ``benchmark``.

Bad input ends with one line on stderr naming the file and the problem, and exit status 2; no traceback.
"""

from __future__ import annotations

import sys

import fire

from diffdenoise.errors import InputError


def prepare(src: str, out: str, noise: str | None = None, level: float | None = None, correlation: float = 0.0,
            modality: str | None = None, seed: int = 0, ct_window: tuple = (-100.0, 200.0),
            groups: str | None = None, downsample: int = 1) -> str:
    """Cut DICOM/NIfTI/PNG/TIFF input into normalised 2D slices with train/val/test splits and a datalist.

    Without --noise the input is taken as already noisy (the real use case). With --noise (gaussian,
    poisson, gamma, rician) a fixed noisy realisation is written and the clean slice kept for scoring;
    --level is sigma, lambda or alpha (default: the paper's level for the modality); --correlation is
    the Gaussian kernel sigma of spatially correlated noise.

    --downsample 2 averages 2x2 pixel blocks first, halving the noise a "clean" reference carries.

    Example: diffdenoise prepare ../shared/data/brain_mri_t1_axial_studyforrest/series runs/data/sf --noise gaussian --level 0.0235
    """
    from diffdenoise.data import prepare as prepare_slices

    return str(prepare_slices(src, out, noise=noise, level=level, correlation=correlation, modality=modality,
                              seed=seed, ct_window=tuple(ct_window), groups=groups,
                              downsample=downsample))


def stage(name: str, *overlays: str, **overrides) -> None:
    """Run one bundle stage from the shipped configs, e.g. ``diffdenoise stage train_bsn presets/cpu --dataset_dir runs/data/sf``.

    Same as ``python -m monai.bundle run --config_file "[common.yaml, NAME.yaml, overlays...]" --key value``.
    """
    from diffdenoise.stages import run_stage

    run_stage(name, overlays, **overrides)


def demo(out: str = "diffdenoise_demo", preset: str = "demo", noise: str = "gaussian", level: float = 15 / 255,
         seed: int = 0, downsample: int = 2, method: str | None = None) -> str:
    """Run every built stage on the MNI152 template shipped with nilearn (offline) and write OUT/report.md.

    --method leak_free|paper picks stages 2-3 (default: the leak-free path)."""
    from diffdenoise.demo import run_demo
    from diffdenoise.pipeline import DEFAULT_METHOD

    report = run_demo(out=out, preset=preset, noise=noise, level=level, seed=seed, downsample=downsample,
                      method=method or DEFAULT_METHOD)
    print(report.read_text())
    return str(report)


def _with_presets(command):
    """Puts the presets found on disk, each with its use and cost, in place of {presets} in a command's help."""
    from diffdenoise.resources import presets

    lines = "\n".join(f"        {name}: {text}" for name, text in presets().items())
    command.__doc__ = command.__doc__.replace("    {presets}", lines)
    return command


@_with_presets
def fit(src: str, run_dir: str, preset: str = "cpu", overlays: tuple = (), modality: str | None = None, seed: int = 0,
        iterations: int = 1, onnx: bool = False, overwrite: bool = False, method: str | None = None,
        quiet: bool = False, verbose: bool = False, **overrides) -> str:
    """Train every stage on noisy scans (no clean images) and leave a finished bundle in RUN_DIR.

    Every slice trains but a small validation split (whole volumes when there are several); there is no test split.
    Before training each stage is timed briefly and the plan is printed, a line per stage with its work and its
    estimated time on this machine; each stage then shows its progress (a bar on a terminal, a line a minute in a
    log), and a table ends the run: each stage's time, output and estimated gain. --quiet prints only warnings,
    errors and the final report; --verbose also MONAI's and ignite's own lines (per-epoch metrics).

    --preset, from configs/presets:
    {presets}

    The student ships as models/model.ts (TorchScript) and, with --onnx, models/model.onnx. --method picks
    stages 2-3: leak_free (the default: a recorrupted target, antithetic Tweedie) or paper (BSN(y) condition,
    DDIM pairs, as published); see README "Which path". After training, each mode's gain over the noisy input is
    estimated on the validation slices without a reference (SURE/PURE), printed and written to RUN_DIR/report.md;
    the best becomes the bundle's default mode (none, when no mode is estimated to help).

    Example: ``diffdenoise fit scans/ runs/my_bundle --preset demo``, then
    ``diffdenoise denoise new_scan/ out/ --bundle runs/my_bundle`` or
    ``python -m monai.bundle run --config_file runs/my_bundle/configs/inference.yaml``.
    """
    from diffdenoise.fit import fit as fit_bundle
    from diffdenoise.logs import NORMAL, QUIET, VERBOSE, configure
    from diffdenoise.pipeline import DEFAULT_METHOD

    if quiet and verbose:
        raise InputError("--quiet", "and --verbose contradict each other; pass one")
    configure(QUIET if quiet else VERBOSE if verbose else NORMAL)
    overlays = (overlays,) if isinstance(overlays, str) else tuple(overlays)
    bundle = fit_bundle(src, run_dir, preset=preset, overlays=overlays, modality=modality, seed=seed,
                        iterations=iterations, onnx=onnx, overwrite=overwrite, method=method or DEFAULT_METHOD,
                        **overrides)
    print((bundle / "report.md").read_text())
    return str(bundle)


def export(run_dir: str, formats: tuple = ("onnx",)) -> str:
    """Export a fitted bundle's student again: --formats onnx (default; the onnx extra) and/or torchscript.

    Example: diffdenoise export runs/my_bundle --formats onnx   (writes runs/my_bundle/models/model.onnx)
    """
    from diffdenoise.export import bundle_inference_config, export_student

    formats = [formats] if isinstance(formats, str) else list(formats)
    written = export_student([bundle_inference_config(run_dir)], run_dir, formats)
    return " ".join(str(p) for p in written)


@_with_presets
def denoise(src: str, out: str, bundle: str | None = None, mode: str = "auto", device: str | None = None,
            overwrite: bool = False, series: str | None = None, config: tuple = (), modality: str | None = None,
            ct_window: tuple = (-100.0, 200.0), batch_size: int = 8, precision: str = "auto",
            compile: bool = False, estimate_slices: int = 8, uncertainty: bool = False) -> str:
    """Denoise DICOM series/files, NIfTI, PNG or TIFF (or a folder of them) with a trained bundle.

    Writes OUT/<name> in the input's format (a DICOM series becomes a derived series) and OUT/<name>.json.
    --bundle DIR holds configs/*.yaml and models/*.pt (default: the shipped bundles/diffdenoise); --mode
    auto|bsn|student|srds (auto, the default: the mode `fit` estimated best, see the bundle's report.md); each report
    holds the mode's estimated gain over the input without a reference, on --estimate_slices slices per volume
    (8; 0 skips it), and a line on stderr warns when it is not positive; --uncertainty (with --mode bsn) also
    writes stage 1's posterior std as OUT/<name>_uncertainty (a DICOM series of its own) with its mean in the
    report; --config the overlays the model was trained with (paths or names such as presets/cpu: not needed for
    a bundle `fit` made, which holds its merged configs); --series one SeriesInstanceUID; --modality and
    --ct_window as given to prepare. The GPU fast path: --precision auto|float32|bfloat16 (auto: bf16 autocast
    on a GPU, float32 on a CPU), --compile (torch.compile), channels_last on a GPU.

    Presets (--config presets/NAME, from configs/presets):
    {presets}

    Example: diffdenoise denoise ../shared/data/head_ct_ge/series runs/denoised/head_ct --bundle runs/bundle --config presets/cpu
    """
    from diffdenoise.denoise import denoise as denoise_folder

    config = [config] if isinstance(config, str) else list(config)
    return str(denoise_folder(src, out, bundle=bundle, mode=mode, device=device, overwrite=overwrite,
                              series=None if series is None else str(series), config=config, modality=modality,
                              ct_window=tuple(ct_window), batch_size=batch_size, precision=precision,
                              compile=compile, estimate_slices=estimate_slices, uncertainty=uncertainty))


def benchmark(preset: str = "smoke", data: str = "../shared/data", out: str = "runs/bench", noise=None, dataset=None,
              method=None, reference=None, progress: bool = True, workers: int = 1) -> str:
    """Run every denoiser (baselines, BSN, DiffDenoise SRDS and student, supervised bound) on a preset's cases.

    Writes OUT/results.csv, OUT/results.md (mean +- sd PSNR/SSIM, paired Wilcoxon tests) and OUT/figures;
    rerunning the same OUT resumes. --preset smoke|cpu|paper or a YAML file; --dataset, --noise, --method,
    --reference (comma-separated) narrow its lists; --workers N runs N cases at a time. See docs/benchmark.md.

    Example: diffdenoise benchmark --preset smoke --data ../shared/data --out runs/bench_smoke
    """
    from diffdenoise.benchmark import main as run_benchmark

    return run_benchmark(preset, data, out, noise=noise, dataset=dataset, method=method, reference=reference,
                         progress=progress, workers=workers)


def _input_error(err: BaseException) -> InputError | None:
    """The InputError behind ``err``, also when a MONAI config expression wrapped it in a RuntimeError."""
    while err is not None:
        if isinstance(err, InputError):
            return err
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    from diffdenoise.allocator import retain_freed_memory

    retain_freed_memory()
    try:
        fire.Fire({"prepare": prepare, "stage": stage, "demo": demo, "fit": fit, "export": export, "denoise": denoise,
                   "benchmark": benchmark}, command=argv, name="diffdenoise")
    except Exception as err:  # noqa: BLE001 - only bad input is turned into a one-line message
        cause = _input_error(err)
        if cause is None:
            raise
        print(f"diffdenoise: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
