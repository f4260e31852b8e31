"""Memory benchmark (issue 7): peak memory of ``diffdenoise denoise`` on a large CT volume, against its size.

Why: a clinical CT can be 512 x 512 x 600 slices; denoising must not need many times that in RAM. ``denoise``
holds the input volume and the output volume (float32) and one batch of slices; this script measures what a
whole run really peaks at, for a NIfTI file and for a DICOM series of the same volume.

What runs: a synthetic CT (a water cylinder of 0 HU with bone-like rings, in air, plus Gaussian noise of 20 HU),
stored as int16 NIfTI and as an int16 DICOM series; a bundle whose student is an untrained NAFNet of the chosen
preset (the forward pass costs the same whatever the weights); ``diffdenoise denoise`` in a fresh process per
input. Peak memory is that process's peak RSS (``getrusage(RUSAGE_CHILDREN)``), and the same command on an input
of one batch of slices in the same format gives the fixed cost (Python, torch, the model, one batch's
activations), subtracted to give what the volume's length costs. Ratios are to the float32 volume (Z x H x W x 4
bytes): about 2 means input + output and nothing more.

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_memory.py --slices 600 --size 512 --out runs/bench_memory.json
    python scripts/bench_memory.py --slices 40 --size 256          # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.bundle import ConfigParser
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[1]


def synthetic_ct(slices: int, size: int, seed: int = 0) -> np.ndarray:
    """int16 HU (Z, H, W): air, a 0 HU cylinder with a 1000 HU ring, 20 HU Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    radius = np.hypot(yy, xx) / (size / 2)
    section = np.where(radius < 0.8, 0.0, -1000.0) + np.where((radius > 0.6) & (radius < 0.65), 1000.0, 0.0)
    volume = np.empty((slices, size, size), dtype=np.int16)
    for z in range(slices):
        volume[z] = np.rint(section + rng.normal(0.0, 20.0, section.shape)).astype(np.int16)
    return volume


def write_nifti(volume: np.ndarray, path: Path) -> Path:
    """NIfTI (H, W, Z) int16, 0.7 x 0.7 x 1 mm."""
    image = nib.Nifti1Image(np.moveaxis(volume, 0, -1), np.diag([0.7, 0.7, 1.0, 1.0]))
    image.header.set_data_dtype(np.int16)
    nib.save(image, path)
    return path


def write_dicom_series(volume: np.ndarray, folder: Path) -> Path:
    """One CT file per slice, int16 stored values, RescaleIntercept -1024 (stored = HU + 1024)."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for z, pixels in enumerate(volume):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "BENCH", "Bench^Memory"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, z + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(z)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"{z:04d}.dcm", enforce_file_format=True)
    return folder


def untrained_bundle(folder: Path, preset: str) -> Path:
    """A bundle folder whose models/model.pt is a random student of ``preset``'s size."""
    shutil.copytree(REPO_ROOT / "bundles" / "diffdenoise" / "configs", folder / "configs")
    parser = ConfigParser()
    parser.read_config([str(folder / "configs" / "common.yaml"), str(REPO_ROOT / "configs" / "presets" / f"{preset}.yaml")])
    (folder / "models").mkdir()
    torch.save(parser.get_parsed_content("student_def").state_dict(), folder / "models" / "model.pt")
    return folder


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``command`` run in a fresh process (Linux reports ru_maxrss in KiB)."""
    script = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
              "done = subprocess.run(sys.argv[1:]); "
              "print(json.dumps([done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
              "time.perf_counter() - t]))")
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True)
    code, kib, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return kib / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="cpu", help="student size (configs/presets/<name>.yaml)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--formats", default="nifti,dicom")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="bench_memory_"))
    scratch.mkdir(parents=True, exist_ok=True)
    bundle = untrained_bundle(scratch / "bundle", args.preset)
    volume = synthetic_ct(args.slices, args.size)
    volume_mib = volume.size * 4 / 2**20
    writers = {"nifti": lambda v, p: write_nifti(v, p.with_suffix(".nii")), "dicom": write_dicom_series}
    rows = []
    for name in args.formats.split(","):
        sizes = {}
        for label, part in (("one batch", volume[:args.batch_size]), ("volume", volume)):
            src = writers[name](part, scratch / f"{name}_{len(part)}")
            out = scratch / f"denoised_{name}_{len(part)}"
            command = [sys.executable, "-m", "diffdenoise.cli", "denoise", str(src), str(out), "--bundle", str(bundle),
                       "--mode", "student", "--device", "cpu", "--config", f"presets/{args.preset}",
                       "--batch_size", str(args.batch_size)]
            sizes[label] = peak_rss_of(command)
        fixed, (peak, seconds) = sizes["one batch"][0], sizes["volume"]
        rows.append({"format": name, "peak_rss_mib": round(peak, 1), "fixed_cost_mib": round(fixed, 1),
                     "volume_cost_mib": round(peak - fixed, 1), "volume_float32_mib": round(volume_mib, 1),
                     "ratio_to_volume": round((peak - fixed) / volume_mib, 2), "wall_s": round(seconds, 1)})
        print(json.dumps(rows[-1]))
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "shape": [args.slices, args.size, args.size],
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.workdir is None:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
