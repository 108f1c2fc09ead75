"""Preprocess: lesion-preserving resampling, exact geometry, orientation, crop, splits, the whole stage."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import yaml
from PIL import Image

from mammoseg.cli import main
from mammoseg.config import stage_config
from mammoseg.data import IMAGE_SCALE, load_example, mask_path
from mammoseg.errors import UserError
from mammoseg.preprocessing import (
    MASK_CHANNELS,
    PreprocessParams,
    Transform,
    chest_wall_on_right,
    preprocess,
    quantize,
    to_original_grid,
    to_target_grid,
)
from mammoseg.stages.ingest import MANIFEST_COLUMNS
from mammoseg.stages.preprocess import INDEX_COLUMNS, SPLITS, assign_splits, run
from tests.conftest import write_dicom

REPO = Path(__file__).resolve().parents[2]
LABEL_BOX = (slice(20, 60), slice(-90, -40))  # a bright marker in the background, away from the breast


def _params(size: int = 128, **changes) -> PreprocessParams:
    values = {"size": size, "percentiles": (0.5, 99.9), "crop_margin_px": 8, "otsu_side": 128,
              "zero_background": True, "apply_voi": False, **changes}
    return PreprocessParams(**values)


def _phantom(rows: int, columns: int, side: str, seed: int = 0) -> np.ndarray:
    """A left breast (chest wall at column 0; mirrored for R) with texture, a black border and a label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    breast = ((yy - rows / 2) / (rows * 0.42)) ** 2 + (xx / (columns * 0.6)) ** 2 < 1
    pixels = np.where(breast, 1300 + 250 * np.sin(xx / 9) * np.cos(yy / 13), 80)
    pixels += rng.normal(0, 15, pixels.shape)
    pixels[:6], pixels[-6:] = 0, 0  # black border rows, as scanners leave them
    pixels[LABEL_BOX] = 4095
    pixels = np.clip(pixels, 0, 4095).astype(np.uint16)
    return pixels[:, ::-1].copy() if side == "R" else pixels


def _mass(rows: int, columns: int, centre: tuple[int, int], radii: tuple[float, float]) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:columns]
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1


def _points(rows: int, columns: int, points) -> np.ndarray:
    mask = np.zeros((rows, columns), bool)
    for r, c in points:
        mask[r, c] = True
    return mask


def _mirror(mask: np.ndarray, side: str) -> np.ndarray:
    return mask[:, ::-1].copy() if side == "R" else mask


# --- pixels and geometry ----------------------------------------------------------------------------


def test_one_pixel_calcifications_survive_where_nearest_neighbour_drops_them():
    rows, columns = 900, 720
    rng = np.random.default_rng(3)
    breast_points = [(int(r), int(c)) for r, c in zip(rng.integers(200, 700, 40), rng.integers(5, 350, 40),
                                                      strict=True)]
    calc = _points(rows, columns, breast_points)
    out = preprocess(_phantom(rows, columns, "L"), False, _params(128), [np.zeros_like(calc), calc])
    target = out.masks[1]
    labels, n = ndi.label(calc)
    back = to_original_grid(target, out.transform)
    assert n == len(set(breast_points))
    assert set(np.unique(labels[back & (labels > 0)])) == set(range(1, n + 1))  # every one kept
    assert target.sum() <= n  # one target pixel each at most: the any-pixel rule does not smear
    # The test means something: a nearest-neighbour resize of the same crop keeps almost none.
    t = out.transform
    rr = t.crop_r0 + (np.arange(t.content_rows) * t.crop_shape[0] // t.content_rows)
    cc = t.crop_c0 + (np.arange(t.content_columns) * t.crop_shape[1] // t.content_columns)
    assert calc[np.ix_(rr, cc)].sum() < n // 4


def test_right_breast_is_flipped_and_maps_back_exactly():
    rows, columns = 800, 640
    mass_l = _mass(rows, columns, (380, 150), (60, 45))
    calc_l = _points(rows, columns, [(300, 60), (301, 61), (520, 200), (450, 330)])
    left = preprocess(_phantom(rows, columns, "L"), False, _params(), [mass_l, calc_l])
    right = preprocess(_phantom(rows, columns, "R"), True, _params(),
                       [_mirror(mass_l, "R"), _mirror(calc_l, "R")])
    assert right.transform.flip and not left.transform.flip
    # The mirrored image of a right breast preprocesses to exactly what its left twin gives.
    np.testing.assert_array_equal(right.image, left.image)
    np.testing.assert_array_equal(right.masks, left.masks)
    assert right.chest_wall_left and right.image[:, :20].mean() > right.image[:, -20:].mean()
    assert chest_wall_on_right(_phantom(rows, columns, "R"), _params())
    assert not chest_wall_on_right(_phantom(rows, columns, "L"), _params())
    # Back on the original grid, the right breast's mask is the mirror of the left one's.
    back_r = to_original_grid(right.masks, right.transform)
    back_l = to_original_grid(left.masks, left.transform)
    np.testing.assert_array_equal(back_r, back_l[..., ::-1])
    assert back_r[1][300, columns - 1 - 60] and back_r[1][450, columns - 1 - 330]
    iou = (back_r[0] & mass_l[:, ::-1]).sum() / (back_r[0] | mass_l[:, ::-1]).sum()
    assert iou > 0.9


@pytest.mark.parametrize("side", ["L", "R"])
def test_round_trips_are_exact(side):
    rows, columns = 700, 560
    rng = np.random.default_rng(11)
    mass = _mirror(_mass(rows, columns, (350, 120), (90, 70)), side)
    calc = _mirror(_points(rows, columns, zip(rng.integers(150, 550, 30), rng.integers(0, 250, 30),
                                                strict=True)), side)
    out = preprocess(_phantom(rows, columns, side), side == "R", _params(96), [mass, calc])
    t = out.transform
    # A target-grid mask (0 in the padding) -> original grid -> target grid is the identity, both rules.
    noise = rng.random((2, t.size, t.size)) < 0.3
    noise[:, t.content_rows:, :] = False
    noise[:, :, t.content_columns:] = False
    back = to_original_grid(noise, t)
    assert back.shape == (2, rows, columns)
    np.testing.assert_array_equal(to_target_grid(back, t, "any"), noise)
    np.testing.assert_array_equal(to_target_grid(back, t, "area"), noise)
    # Full-resolution masks forward and back: every calcification component kept, the mass nearly equal.
    full_back = to_original_grid(out.masks, t)
    labels, n = ndi.label(calc)
    assert len(np.unique(labels[full_back[1] & (labels > 0)])) == n
    assert (full_back[0] & mass).sum() / (full_back[0] | mass).sum() > 0.9
    # Mass area at the target scale is kept within a few percent (area rule, not max pooling).
    expected = mass.sum() * t.content_rows / t.crop_shape[0] * t.content_columns / t.crop_shape[1]
    assert abs(out.masks[0].sum() / expected - 1) < 0.05
    # Target pixels outside the crop content are padding: zero in image and masks.
    assert not out.masks[:, t.content_rows:, :].any() and not out.image[:, t.content_columns:].any()
    # The transform survives the index (a namedtuple row and a dict).
    record = t.to_record()
    assert Transform.from_record(record) == t
    assert Transform.from_record(pd.DataFrame([record]).iloc[0]) == t


def test_a_mass_sliver_lost_by_the_area_rule_is_restored():
    rows, columns = 900, 720
    sliver = np.zeros((rows, columns), bool)
    sliver[300:340, 150] = True  # 1 px wide: covers ~1/7 of each block at 128 px, below one half
    blob = _mass(rows, columns, (600, 200), (50, 40))
    out = preprocess(_phantom(rows, columns, "L"), False, _params(128), [sliver | blob, None])
    assert out.restored_components == 1 and not out.masks[1].any()
    back = to_original_grid(out.masks[0], out.transform)
    assert back[sliver].any() and back[blob].mean() > 0.9


def test_upsampled_crop_maps_back_to_the_same_pixels():
    rows, columns = 60, 44  # smaller than the target: each target pixel takes its source pixel
    mask = np.zeros((rows, columns), bool)
    mask[10:15, 5:9] = mask[40, 30] = True
    t = Transform(rows, columns, True, 0, rows, 0, columns, 128, 128, round(columns * 128 / rows))
    np.testing.assert_array_equal(to_original_grid(to_target_grid(mask, t, "area"), t), mask)
    np.testing.assert_array_equal(to_original_grid(to_target_grid(mask, t, "any"), t), mask)


def test_crop_ignores_label_and_black_border_and_normalises_inside_the_breast():
    rows, columns = 800, 640
    out = preprocess(_phantom(rows, columns, "L"), False, _params(crop_margin_px=8), None)
    t = out.transform
    assert out.breast_found and out.masks is None
    # The breast spans rows 400 +- 336 and columns [0, 384); the label sits at columns >= 550.
    assert t.crop_c0 == 0 and 384 - 16 <= t.crop_c1 <= 384 + 24 < columns - 90
    assert 64 - 24 <= t.crop_r0 <= 64 + 8 and 736 - 8 <= t.crop_r1 <= 736 + 24
    assert t.content_rows == 128 and t.content_columns == round(t.crop_shape[1] * 128 / t.crop_shape[0])
    assert out.image.dtype == np.float32 and out.image.min() >= 0 and out.image.max() <= 1
    assert 200 < out.intensity_low < 1100 < out.intensity_high < 1700  # breast tissue: not air, not the label
    assert out.image[0, -1] == 0 and out.image[:, t.content_columns:].max() == 0


def test_labels_never_shape_the_input_and_outside_lesions_are_counted():
    rows, columns = 800, 640
    pixels = _phantom(rows, columns, "L")
    calc = _points(rows, columns, [(400, 600), (300, 100)])  # one far right of the breast, one inside
    mass = _mass(rows, columns, (500, 120), (40, 30))
    params = _params()
    with_masks = preprocess(pixels, False, params, [mass, calc])
    without = preprocess(pixels, False, params, None)
    np.testing.assert_array_equal(with_masks.image, without.image)  # bit-identical
    assert with_masks.transform == without.transform and with_masks.transform.crop_c1 < 600
    calc_outside = int(calc[:, 600 - 3:].sum())
    assert with_masks.lesion_px_outside_crop == (0, calc_outside) and calc_outside > 0
    # The background stays zero where the lost lesion lies, and the mask keeps only what the crop holds.
    assert to_original_grid(with_masks.masks[1], with_masks.transform)[300, 100]
    assert not to_original_grid(with_masks.masks[1], with_masks.transform)[400, 600]


def test_image_is_on_the_storage_grid():
    out = preprocess(_phantom(400, 320, "R"), True, _params(), None)
    np.testing.assert_array_equal(quantize(out.image).astype(np.float32) / np.float32(IMAGE_SCALE), out.image)


def test_flat_image_keeps_everything():
    out = preprocess(np.full((300, 200), 500, np.uint16), False, _params(), None)
    assert not out.breast_found and out.transform.crop_box == (0, 300, 0, 200)
    assert np.isfinite(out.image).all()


def test_params_are_checked():
    with pytest.raises(UserError, match="percentiles"):
        _params(percentiles=(99.0, 1.0))
    with pytest.raises(UserError, match="size"):
        _params(size=0)
    assert PreprocessParams.from_dict(_params().to_dict()) == _params()


# --- splits -----------------------------------------------------------------------------------------


def _patients_frame(flags: list[tuple[bool, bool]], images_per_patient: int = 2) -> pd.DataFrame:
    rows = []
    for index, (mass, calc) in enumerate(flags):
        for view in range(images_per_patient):
            rows.append({"image_id": f"{index:06d}{view:02d}", "patient_id": f"{index:016x}",
                         "mass_px": int(mass and view == 0) * 50, "calc_px": int(calc) * 7})
    return pd.DataFrame(rows)


def test_splits_are_by_patient_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    flags = [(bool(m), bool(c)) for m, c in zip(rng.random(40) < 0.3, rng.random(40) < 0.6, strict=True)]
    frame = _patients_frame(flags)
    splits = assign_splits(frame, [0.7, 0.15, 0.15], seed=5)
    assert set(splits) == set(frame["patient_id"]) and set(splits.values()) == set(SPLITS)
    assert splits == assign_splits(frame.sample(frac=1, random_state=1), [0.7, 0.15, 0.15], seed=5)
    assert splits != assign_splits(frame, [0.7, 0.15, 0.15], seed=6)
    per_patient = frame.groupby("patient_id")[["mass_px", "calc_px"]].max()
    for split in SPLITS:
        members = per_patient.loc[[p for p, s in splits.items() if s == split]]
        assert (members["mass_px"] > 0).any() and (members["calc_px"] > 0).any(), split
    counts = pd.Series(splits).value_counts()
    assert abs(counts["train"] - 28) <= 2 and abs(counts["val"] - 6) <= 2 and abs(counts["test"] - 6) <= 2


def test_splits_with_too_few_patients_per_class_say_how_many():
    flags = [(True, True), (True, False), (False, True), (False, True), (False, False)]
    with pytest.raises(UserError, match="2 have masses and 3 have calcifications"):
        assign_splits(_patients_frame(flags), [0.7, 0.15, 0.15], seed=0, where="m.parquet")
    # Without a val split two patients with masses are enough.
    splits = assign_splits(_patients_frame(flags), [0.8, 0.0, 0.2], seed=0)
    assert set(splits.values()) == {"train", "test"}
    with pytest.raises(UserError, match="split_fractions"):
        assign_splits(_patients_frame(flags), [0.5, 0.5, 0.5], seed=0)


# --- the stage --------------------------------------------------------------------------------------


def _write_dataset(root: Path, patients: int = 9, rows: int = 400, columns: int = 320) -> tuple[Path, Path, Path]:
    """Write DICOMs, ingest-style masks and a manifest: patient i has a mass when i % 3 != 2, and
    calcifications when i % 3 != 1, on its left CC; its right CC is normal.

    Returns:
        The raw folder (the manifest's DICOM paths are relative to it), the manifest, the masks.
    """
    masks_dir = root / "masks"
    masks_dir.mkdir(parents=True)
    records = []
    for index in range(patients):
        patient = f"{index + 1:016x}"
        for side, view in (("L", "CC"), ("R", "CC")):
            image_id = f"{20000000 + 2 * index + (side == 'R'):08d}"
            dicom = write_dicom(root / "dicoms" / f"{image_id}_{patient}_MG_{side}_{view}_ANON.dcm",
                                _phantom(rows, columns, side, seed=index))
            lesions = side == "L"
            mass = _mass(rows, columns, (200, 60), (30, 20)) & lesions & (index % 3 != 2)
            calc = _points(rows, columns, [(150, 40), (260, 90)]) & lesions & (index % 3 != 1)
            for name, mask in zip(MASK_CHANNELS, (mass, calc), strict=True):
                Image.fromarray(mask).save(mask_path(masks_dir, image_id, name))
            records.append({"image_id": image_id, "patient_id": patient, "laterality": side, "view": view,
                            "acquisition_date": "201001", "acr": 2, "birads": "2", "rows": rows,
                            "columns": columns, "dicom_path": dicom.relative_to(root).as_posix(),
                            "dicom_sha256": "0" * 64,
                            "n_mass": int(mass.any()), "n_calcification": 2 * int(calc.any()),
                            "n_other": 0, "n_points_out_of_bounds": 0, "mass_px": int(mass.sum()),
                            "calc_px": int(calc.sum())})
    manifest = root / "manifest.parquet"
    pd.DataFrame(records, columns=list(MANIFEST_COLUMNS)).astype(MANIFEST_COLUMNS).to_parquet(manifest)
    return root, manifest, masks_dir


@pytest.fixture
def config():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return stage_config("preprocess", params, {"size": 128, "workers": 1, "crop_margin_px": 8})


def test_stage_writes_index_contract_and_loadable_examples(tmp_path, config):
    inbreast, manifest, masks_dir = _write_dataset(tmp_path / "data")
    out = tmp_path / "dataset"
    code = main(["--params", str(REPO / "params.yaml"), "preprocess", "--inbreast", str(inbreast),
                 "--manifest", str(manifest), "--masks",
                 str(masks_dir), "--dataset-out", str(out), "--size", "128", "--workers", "2",
                 "--crop-margin-px", "8"])
    assert code == 0
    index = pd.read_parquet(out / "index.parquet")
    assert list(index.columns) == list(INDEX_COLUMNS) and len(index) == 18
    assert (index.groupby("patient_id")["split"].nunique() == 1).all()  # no patient in two splits
    for split in SPLITS:
        rows = index[index["split"] == split]
        assert (rows["mass_px"] > 0).any() and (rows["calc_px"] > 0).any(), split
    assert (index["flip"] == (index["laterality"] == "R")).all() and index["chest_wall_left"].all()
    source = pd.read_parquet(manifest).set_index("image_id")
    assert ((index.set_index("image_id")["calc_px"] > 0) == (source["calc_px"] > 0)).all()
    contract = json.loads((out / "dataset.json").read_text())
    assert contract["size"] == 128 and contract["percentiles"] == [0.5, 99.9]
    assert len(contract["manifest_sha256"]) == 64
    assert PreprocessParams.from_dict(contract).size == 128
    assert sum(contract["split_images"].values()) == 18
    for row in index.itertuples(index=False):
        image, mask = load_example(out, row)
        assert image.shape == (2, 128, 128) and image.dtype == np.float32  # block mean and block maximum
        assert 0 <= image.min() <= image.max() <= 1
        assert mask.shape == (2, 128, 128) and mask.dtype == np.uint8
        assert int(mask[0].sum()) == row.mass_px and int(mask[1].sum()) == row.calc_px
        full = np.array(Image.open(mask_path(masks_dir, row.image_id, "calcification")))
        back = to_original_grid(mask[1].astype(bool), Transform.from_record(row))
        assert back[full].all() if row.calc_px else not full.any()  # 1-px calcifications land back exactly
    # Same inputs and seed: the same split and the same arrays (the output is rewritten completely).
    run(config, inbreast, manifest, masks_dir, out)
    again = pd.read_parquet(out / "index.parquet")
    pd.testing.assert_frame_equal(again[["image_id", "split"]], index[["image_id", "split"]])
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "images", "index.parquet", "masks",
                                                     "native_masks"]
    for row in index.itertuples(index=False):  # ingest's masks travel with the dataset, byte for byte
        for name in MASK_CHANNELS:
            assert (out / "native_masks" / f"{row.image_id}_{name}.png").read_bytes() == \
                mask_path(masks_dir, row.image_id, name).read_bytes()


def test_every_input_is_label_free_and_equal_to_what_predict_computes(tmp_path, config):
    from mammoseg.dicom import read_image
    from mammoseg.stages.predict import network_input

    inbreast, manifest, masks_dir = _write_dataset(tmp_path / "data")
    out = tmp_path / "dataset"
    run(config, inbreast, manifest, masks_dir, out)
    params = PreprocessParams.from_dict(json.loads((out / "dataset.json").read_text()))
    index = pd.read_parquet(out / "index.parquet")
    dicoms = pd.read_parquet(manifest).set_index("image_id")["dicom_path"]
    assert set(index["split"]) == set(SPLITS)
    for row in index.itertuples(index=False):  # every image of every split
        stored, _ = load_example(out, row)
        dicom = inbreast / dicoms[row.image_id]
        predicted = network_input(dicom, params)
        assert predicted.laterality == row.laterality
        np.testing.assert_array_equal(predicted.prepared.network_input, stored)
        masks = [np.array(Image.open(mask_path(masks_dir, row.image_id, name))).astype(bool)
                 for name in MASK_CHANNELS]
        pixels = read_image(dicom, apply_voi=params.apply_voi).pixels
        with_masks = preprocess(pixels, row.laterality == "R", params, masks)
        np.testing.assert_array_equal(with_masks.image, predicted.prepared.image)
        assert with_masks.transform == Transform.from_record(row)


def test_undecodable_dicom_is_one_line_error_and_keeps_the_old_dataset(tmp_path, config):
    inbreast, manifest, masks_dir = _write_dataset(tmp_path / "data", patients=3)
    out = tmp_path / "dataset"
    run(dataclasses.replace(config, split_fractions=[0.5, 0.0, 0.5]), inbreast, manifest, masks_dir, out)
    before = (out / "index.parquet").read_bytes()
    broken = inbreast / pd.read_parquet(manifest)["dicom_path"].iloc[3]
    broken.write_bytes(b"DICM" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "mammoseg.cli", "--params", str(REPO / "params.yaml"), "preprocess",
         "--inbreast", str(inbreast), "--manifest", str(manifest), "--masks", str(masks_dir),
         "--dataset-out", str(out), "--size", "128",
         "--split-fractions", "0.5", "0.0", "0.5"],
        capture_output=True, text=True, check=False)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("mammoseg: error:")]
    assert len(error_lines) == 1 and str(broken) in error_lines[0] and "cannot decode" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert (out / "index.parquet").read_bytes() == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".dataset")] == []


def test_stage_refuses_bad_inputs(tmp_path, config):
    inbreast, manifest, masks_dir = _write_dataset(tmp_path / "data", patients=3)
    with pytest.raises(UserError, match="need at least 3 each"):
        run(config, inbreast, manifest, masks_dir, tmp_path / "dataset")
    config = dataclasses.replace(config, split_fractions=[0.5, 0.0, 0.5])
    foreign = tmp_path / "artifacts"
    (foreign / "keep.txt").parent.mkdir()
    (foreign / "keep.txt").write_text("not a dataset")
    with pytest.raises(UserError, match="not a preprocess dataset"):
        run(config, inbreast, manifest, masks_dir, foreign)
    ids = pd.read_parquet(manifest)["image_id"]  # 0: left breast with lesions, 1: its normal right one
    calc = mask_path(masks_dir, ids.iloc[0], "calcification")
    original = calc.read_bytes()
    Image.fromarray(np.ones((400, 320), bool)).save(calc)
    with pytest.raises(UserError, match="mask has 128000 lesion pixels, the manifest says 2"):
        run(config, inbreast, manifest, masks_dir, tmp_path / "dataset")
    calc.write_bytes(original)
    mask_path(masks_dir, ids.iloc[1], "mass").unlink()
    with pytest.raises(UserError, match=f"{ids.iloc[1]}_mass.png: mask not found"):
        run(config, inbreast, manifest, masks_dir, tmp_path / "dataset")
    with pytest.raises(UserError, match="manifest not found"):
        run(config, inbreast, tmp_path / "absent.parquet", masks_dir, tmp_path / "dataset")


def test_dicoms_are_found_under_the_given_folder_only(tmp_path, config):
    inbreast, manifest, masks_dir = _write_dataset(tmp_path / "data", patients=3)
    config = dataclasses.replace(config, split_fractions=[0.5, 0.0, 0.5])
    frame = pd.read_parquet(manifest)
    with pytest.raises(UserError, match=f"^{tmp_path / 'elsewhere'}: INbreast folder not found"):
        run(config, tmp_path / "elsewhere", manifest, masks_dir, tmp_path / "dataset")
    (tmp_path / "empty").mkdir()
    relative = frame["dicom_path"].iloc[0]
    with pytest.raises(UserError) as error:  # one line naming the file, the manifest and the folder
        run(config, tmp_path / "empty", manifest, masks_dir, tmp_path / "dataset")
    assert str(error.value) == (f"{tmp_path / 'empty' / relative}: DICOM of image {frame['image_id'].iloc[0]} not "
                                f"found ({manifest} names it {relative} in the INbreast folder {tmp_path / 'empty'}: "
                                "the folder ingest read?)")
    # A manifest from before relative paths: refused, not read from wherever it once pointed.
    frame["dicom_path"] = [str(inbreast / path) for path in frame["dicom_path"]]
    frame.astype(MANIFEST_COLUMNS).to_parquet(manifest)
    with pytest.raises(UserError, match="is not a path inside the INbreast folder"):
        run(config, inbreast, manifest, masks_dir, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()


@pytest.mark.slow
def test_generated_inbreast_through_ingest_and_preprocess_keeps_every_lesion(tmp_path):
    synth = pytest.importorskip("mammoseg.synth")
    from mammoseg.stages import ingest

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    synth.synthesize(tmp_path / "inbreast", cases=12, seed=1, scale=0.15, workers=2)
    ingest.run(stage_config("ingest", params, {"workers": 2}), tmp_path / "inbreast",
               tmp_path / "manifest.parquet", tmp_path / "masks")
    config = stage_config("preprocess", params, {"size": 128, "workers": 2})
    try:
        result = run(config, tmp_path / "inbreast", tmp_path / "manifest.parquet", tmp_path / "masks",
                     tmp_path / "dataset")
    except UserError as exc:  # the generator drew too few patients with a class for three splits
        pytest.skip(str(exc))
    index = pd.read_parquet(result.index)
    assert (index.groupby("patient_id")["split"].nunique() == 1).all()
    for row in index.itertuples(index=False):
        _, mask = load_example(result.dataset_dir, row)
        back = to_original_grid(mask.astype(bool), Transform.from_record(row))
        for channel, name in enumerate(MASK_CHANNELS):
            full = np.array(Image.open(mask_path(tmp_path / "masks", row.image_id, name)))
            labels, n = ndi.label(full)
            kept = np.unique(labels[back[channel] & (labels > 0)])
            assert len(kept) == n, (row.image_id, name)


@pytest.mark.parametrize("flip", [False, True])
def test_block_maximum_keeps_a_speck_the_mean_averages_away(flip):
    rows, columns = 800, 640
    yy, xx = np.mgrid[:rows, :columns]
    chest_wall = columns - 1 if flip else 0
    breast = (yy - rows / 2) ** 2 + (xx - chest_wall) ** 2 < 330**2
    noise = np.random.default_rng(0).normal(0, 20, (rows, columns))
    pixels = np.where(breast, 1000 + noise, 0).astype(np.float32)
    speck = (300, 500 if flip else 140)  # inside the breast either way
    pixels[speck] = 1100  # one pixel of a ~5x5 block: +5 sigma, about +1 sigma of its block's mean
    params = dataclasses.replace(_params(), max_channel=True)
    out = preprocess(pixels, flip, params, None)
    assert out.network_input.shape == (2, 128, 128) and params.channels == 2
    point = np.zeros((rows, columns), bool)
    point[speck] = True
    ((r, c),) = np.argwhere(to_target_grid(point[None], out.transform, "any")[0])
    assert out.max_image[r, c] == 1.0  # the speck is the block's maximum: clipped to the top
    tissue = out.image[out.image > 0]
    assert (tissue >= out.image[r, c]).mean() > 0.01  # in the mean it hides among ordinary tissue
    assert np.median(out.max_image[out.image > 0]) < 0.9  # its own window: tissue is not clipped
    assert out.max_image[:, out.transform.content_columns:].max() == 0  # the padding stays empty
    without = preprocess(pixels, flip, _params(), None)
    np.testing.assert_array_equal(without.image, out.image)
    assert without.max_image is None
