"""prepare on every image folder of ../shared/data: slice counts, value ranges, leak-free splits."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from diffdenoise.data import SPLITS, is_background, load_datalist, normalise, prepare
from diffdenoise.errors import InputError
from diffdenoise.io import read_volumes

# folder -> prepare arguments; real-noise folders (phantom repeats) run without synthetic noise.
CASES = {
    "brain_mri_t1_axial_studyforrest/series": {"noise": "gaussian"},
    "brain_mri_t1_sagittal_siemens/series": {"noise": "poisson", "correlation": 0.5},
    "head_ct_ge/series": {"noise": "gaussian", "ct_window": (-100.0, 200.0)},
    "chest_xray_mhh/png": {"noise": "poisson", "modality": "xray", "groups": "chest_xray_mhh/data_subset.csv"},
    "phantom_mri_epi_repeats/series": {},
    "nifti_volumes": {"noise": "gamma", "modality": "mri"},
    "dicom_single_files": {"noise": "rician", "level": 0.02},
    "dicom_12bit_edgecase": {"noise": "gaussian", "correlation": 1.2},
}


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """Runs prepare once per folder: ``prepared(folder)`` -> (OUT, datalist dict)."""
    cache = {}

    def _prepare(folder):
        if folder not in cache:
            kwargs = dict(CASES[folder])
            if "groups" in kwargs:
                kwargs["groups"] = shared_data / kwargs["groups"]
            out = tmp_path_factory.mktemp("prepared") / "out"
            path = prepare(shared_data / folder, out, seed=0, progress=False, **kwargs)
            cache[folder] = out, json.loads(path.read_text())
        return cache[folder]

    return _prepare


def _items(datalist):
    return [item for name in SPLITS for item in datalist[name]]


@pytest.mark.parametrize("folder", CASES)
def test_writes_every_foreground_slice_once(prepared, shared_data, folder):
    out, datalist = prepared(folder)
    items = _items(datalist)
    assert len({item["id"] for item in items}) == len(items)
    written = sorted(str(path.relative_to(out)) for path in out.glob("slices/*/*_noisy.npy"))
    assert written == sorted(item["image"] for item in items)
    assert datalist["meta"]["counts"] == {name: len(datalist[name]) for name in SPLITS}
    modality, ct_window = CASES[folder].get("modality"), CASES[folder].get("ct_window", (-100.0, 200.0))
    for volume in read_volumes(shared_data / folder):
        clean = normalise(volume.array, modality or volume.modality, ct_window)
        foreground = [k for k in range(len(clean)) if not is_background(clean[k])]
        written = sorted(i["slice_index"] for i in items if i["volume"] == volume.volume_id)
        guards = datalist["meta"]["volumes"][volume.volume_id]["guard_slices"]
        assert written == sorted(set(foreground) - set(guards)) and len(guards) in (0, 2)


@pytest.mark.parametrize("folder", CASES)
def test_slice_values(prepared, folder):
    out, datalist = prepared(folder)
    for item in _items(datalist):
        noisy = np.load(out / item["image"])
        assert noisy.dtype == np.float32 and noisy.ndim == 2 and np.isfinite(noisy).all()
        if "noise" not in CASES[folder]:
            assert "clean" not in item and 0 <= noisy.min() and noisy.max() <= 1
            continue
        clean = np.load(out / item["clean"])
        assert clean.dtype == np.float32 and clean.shape == noisy.shape
        assert 0 <= clean.min() and clean.max() <= 1 and not np.array_equal(noisy, clean)
    if "noise" not in CASES[folder]:
        assert not list(out.glob("slices/*/*_clean.npy"))


@pytest.mark.parametrize("folder", CASES)
def test_splits_do_not_leak(prepared, folder):
    _, datalist = prepared(folder)
    if datalist["meta"]["split_by"] == "group":
        for key in ("group", "volume"):
            owners = defaultdict(set)
            for name in SPLITS:
                for item in datalist[name]:
                    owners[item[key]].add(name)
            assert all(len(splits) == 1 for splits in owners.values()), key
        assert all(datalist[name] for name in SPLITS)
        return
    split_of = {(item["volume"], item["slice_index"]): name for name in SPLITS for item in datalist[name]}
    for (volume, k), name in split_of.items():
        assert split_of.get((volume, k + 1), name) == name, (volume, k)


def test_split_modes_and_counts(prepared):
    """The measured slice counts per split; they document what each folder gives."""
    expected = {
        "brain_mri_t1_axial_studyforrest/series": ("slice_blocks", [45, 8, 9]),
        "head_ct_ge/series": ("slice_blocks", [20, 3, 3]),
        "phantom_mri_epi_repeats/series": ("slice_blocks", [220, 45, 40]),
        "chest_xray_mhh/png": ("group", [85, 18, 17]),
        "dicom_12bit_edgecase": ("slice_blocks", [1, 0, 0]),  # one mosaic slice: too few for blocks
    }
    for folder, (split_by, counts) in expected.items():
        meta = prepared(folder)[1]["meta"]
        assert (meta["split_by"], [meta["counts"][name] for name in SPLITS]) == (split_by, counts), folder


@pytest.mark.parametrize("folder, split_by, guards", [("brain_mri_t1_axial_studyforrest/series", "slice_blocks", 1),
                                                    ("head_ct_ge/series", "slice_blocks", 1),
                                                    ("nifti_volumes", "group", 0)])
def test_a_zero_test_share_trains_on_every_slice_but_validation(shared_data, tmp_path, folder, split_by, guards):
    """`fit`'s split: no test split, and every foreground slice is in training or validation, but the one guard
    slice between the two blocks of a volume cut by slices."""
    kwargs = {k: v for k, v in CASES[folder].items() if k != "noise" and k != "correlation"}
    datalist = json.loads(prepare(shared_data / folder, tmp_path / "out", split=(0.85, 0.15, 0.0), progress=False,
                                  **kwargs).read_text())
    meta = datalist["meta"]
    foreground = sum(len(v["guard_slices"]) + v["slices_written"] for v in meta["volumes"].values())
    assert meta["split_by"] == split_by and datalist["test"] == [] and datalist["validation"]
    assert meta["counts"]["training"] + meta["counts"]["validation"] == foreground - guards
    assert sum(len(v["guard_slices"]) for v in meta["volumes"].values()) == guards
    split_of = {(item["volume"], item["slice_index"]): name for name in SPLITS for item in datalist[name]}
    for (volume, k), name in split_of.items():
        assert split_of.get((volume, k + 1), name) == name, (volume, k)


def test_groups_csv_sets_patients(prepared):
    _, datalist = prepared("chest_xray_mhh/png")
    items = _items(datalist)
    assert len({item["group"] for item in items}) == 71  # patients, from data_subset.csv
    assert all(item["group"] != item["volume"] for item in items)


def test_load_datalist_matches_monai(prepared):
    out, _ = prepared("brain_mri_t1_axial_studyforrest/series")
    items = load_datalist(out / "datalist.json", "validation")
    assert items == load_decathlon_datalist(out / "datalist.json", data_list_key="validation", base_dir=out)
    assert all(Path(item["image"]).is_file() and Path(item["clean"]).is_file() for item in items)
    assert load_datalist(prepared("dicom_12bit_edgecase")[0] / "datalist.json", "test") == []


def test_same_seed_same_noise(shared_data, tmp_path):
    src = shared_data / "brain_mri_t1_sagittal_siemens/series"
    runs = [prepare(src, tmp_path / name, noise="gaussian", seed=seed, progress=False) for name, seed in
            (("a", 0), ("b", 0), ("c", 1))]  # fmt: skip
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").glob("slices/*/*_noisy.npy"))
    same = [np.array_equal(np.load(tmp_path / "a" / f), np.load(tmp_path / "b" / f)) for f in files]
    assert files and all(same)
    assert not np.array_equal(np.load(tmp_path / "a" / files[0]), np.load(tmp_path / "c" / files[0]))
    assert json.loads(runs[0].read_text())["training"] == json.loads(runs[1].read_text())["training"]


def _png_folder(folder, count=1):
    folder.mkdir()
    for n in range(count):
        Image.fromarray(np.full((16, 16), 100 + n, dtype=np.uint8)).save(folder / f"img{n}.png")
    return folder


def test_refuses_existing_output_and_output_inside_input(tmp_path):
    src = _png_folder(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("results")
    with pytest.raises(InputError, match="out: output already exists and is not an empty folder"):
        prepare(src, tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="inside the input"):
        prepare(src, src / "prepared", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_failure_mid_way_leaves_no_output(tmp_path):
    src = _png_folder(tmp_path / "src", count=3)
    (src / "zz.nii").write_bytes(b"\x00" * 10)  # found by name, fails when read, after the PNGs were written
    with pytest.raises(InputError, match=r"zz\.nii: cannot read NIfTI"):
        prepare(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"split": (0.8, 0.0, 0.2)}, ValueError, "split"),
        ({"level": 0.1}, ValueError, "level and correlation only apply with noise"),
        ({"noise": "speckle"}, ValueError, "noise 'speckle' is not one of"),
        ({"noise": "gaussian"}, InputError, "modality 'other' has no paper noise level"),
        ({"modality": "pet"}, ValueError, "modality 'pet'"),
    ],
)
def test_bad_arguments_fail_before_writing(tmp_path, kwargs, error, match):
    src = _png_folder(tmp_path / "src")
    with pytest.raises(error, match=match):
        prepare(src, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_groups_csv(tmp_path):
    src = _png_folder(tmp_path / "src")
    (tmp_path / "groups.csv").write_text("patient,image\np1,img0\n")
    with pytest.raises(InputError, match=r"groups\.csv: needs columns patient_id and image_id"):
        prepare(src, tmp_path / "out", groups=tmp_path / "groups.csv", progress=False)


def test_normalise_rules():
    hu = np.array([-1000.0, -100.0, 50.0, 200.0, 3000.0])
    np.testing.assert_allclose(normalise(hu, "ct"), [0, 0, 0.5, 1, 1])
    mri = np.arange(10001, dtype=np.float64) + 5  # a ramp from 5: its top 0.1% clip to 1
    scaled = normalise(mri, "mri")
    assert scaled.dtype == np.float32 and scaled[0] == 0 and scaled[-1] == 1
    assert scaled[5000] == pytest.approx(5000 / (np.percentile(mri, 99.9) - 5))
    assert not normalise(np.full((2, 4, 4), 7.0), "xray").any()
    assert is_background(np.zeros((10, 10))) and not is_background(np.pad(np.ones((3, 3)), 3))


def test_downsample_averages_2x2_blocks_before_the_noise(shared_data, tmp_path):
    """The reference is the exact 2x2 block mean of the full-size clean slice (i.i.d. noise in it halves),
    and the synthetic noise keeps its level at the new size."""
    src = shared_data / "brain_mri_t1_axial_studyforrest" / "series"
    full = load_datalist(prepare(src, tmp_path / "full", noise="gaussian", level=6 / 255, progress=False), "test")
    half = load_datalist(prepare(src, tmp_path / "half", noise="gaussian", level=6 / 255, downsample=2,
                                 progress=False), "test")
    a, b = np.load(full[0]["clean"]), np.load(half[0]["clean"])
    h, w = a.shape[0] // 2, a.shape[1] // 2
    np.testing.assert_allclose(b, a[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3)), atol=1e-6)
    noise = np.load(half[0]["image"]) - b
    assert abs(noise.std() * 255 - 6) < 0.3
    with pytest.raises(ValueError, match="downsample"):
        prepare(src, tmp_path / "bad", downsample=0, progress=False)
