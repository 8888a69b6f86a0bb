"""Reliability of the data-reading path: bad COCO jsons, image files PIL decodes surprisingly (16-bit, EXIF
orientation, decompression bombs), corrupt files in skip mode, and the ``python -m zoo.data.check`` command."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.data.coco import BadAnnotationError, CocoDataset, CocoIndex, load_rgb

ROOT = Path(__file__).resolve().parents[1]
PRE = {"input_size": [32, 32], "resize": "stretch", "mean": [0.5] * 3, "std": [0.25] * 3}
CATS = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]


def _img(i: int, w: int = 60, h: int = 40, name: str | None = None) -> dict:
    return {"id": i, "file_name": name or f"{i}.jpg", "width": w, "height": h}


def _ann(i: int, img: int, bbox=(2, 2, 10, 10), cat: int = 3) -> dict:
    x, y, w, h = bbox
    seg = [[x, y, x + w, y, x + w, y + h, x, y + h]] if all(isinstance(v, (int, float)) for v in bbox) else []
    return {"id": i, "image_id": img, "category_id": cat, "bbox": list(bbox), "area": 100.0, "iscrowd": 0,
            "segmentation": seg}


def _write(tmp: Path, images: list[dict], anns: list[dict], *, cats: list[dict] | None = None,
           extra: dict | None = None) -> tuple[Path, Path]:
    """A COCO json plus one solid-grey JPEG per distinct images[].file_name (sized as its first entry says)."""
    img_dir = tmp / "imgs"
    img_dir.mkdir(exist_ok=True)
    for im in images:
        f = img_dir / im["file_name"]
        if not f.exists():
            Image.fromarray(np.full((im["height"], im["width"], 3), 90, np.uint8)).save(f)
    doc = {"images": images, "annotations": anns, "categories": CATS if cats is None else cats, **(extra or {})}
    ann_file = tmp / "ann.json"
    ann_file.write_text(json.dumps(doc))
    return ann_file, img_dir


# ----------------------------------------------------------------------------------------- 1. duplicate / orphan ids
def test_duplicate_image_ids_are_refused_or_dropped(tmp_path: Path) -> None:
    images = [_img(1, name="a.jpg"), _img(1, name="b.jpg"), _img(2)]
    ann, imgs = _write(tmp_path, images, [_ann(1, 1), _ann(2, 2)])
    with pytest.raises(BadAnnotationError, match=r"image ids \[1\].*more than once.*unique id"):
        CocoIndex(ann, imgs)
    idx = CocoIndex(ann, imgs, on_bad="skip")
    assert idx.skipped == {"duplicate image ids": 2}  # both entries: which file the annotations belong to is unknown
    assert [r.image_id for r in idx.records] == [2]


def test_duplicate_annotation_ids_are_refused_or_dropped(tmp_path: Path) -> None:
    # the same annotation id on two images of different sizes: masks are looked up by id
    images = [_img(1, 60, 40), _img(2, 30, 20), _img(3, 30, 20)]
    anns = [_ann(7, 1, (30, 20, 20, 15)), _ann(7, 2, (1, 1, 5, 5)), _ann(8, 3, (1, 1, 5, 5))]
    ann, imgs = _write(tmp_path, images, anns)
    with pytest.raises(BadAnnotationError, match=r"annotation ids \[7\].*more than once.*renumber"):
        CocoIndex(ann, imgs)
    idx = CocoIndex(ann, imgs, on_bad="skip")
    assert idx.skipped == {"duplicate annotation ids": 2}
    assert [len(r.boxes) for r in idx.records] == [0, 0, 1]
    sem = CocoDataset(idx, "semantic", **PRE)
    for i in range(len(sem)):  # used to raise IndexError (a 60x40 mask painted into a 30x20 image)
        sem[i]


def test_annotations_of_unknown_images_are_refused_or_counted(tmp_path: Path) -> None:
    ann, imgs = _write(tmp_path, [_img(1)], [_ann(1, 1), _ann(2, 99), _ann(3, 98)])
    with pytest.raises(BadAnnotationError, match=r"2 annotations \(ids \[2, 3\]\).*image_id \(\[98, 99\]\).*not in "
                                                  r"images"):
        CocoIndex(ann, imgs)
    idx = CocoIndex(ann, imgs, on_bad="skip")
    assert idx.skipped == {"annotations of unknown images": 2}
    assert idx.examples["annotations of unknown images"]
    assert len(idx.records) == 1 and len(idx.records[0].boxes) == 1


# ------------------------------------------------------------------------------------------ 2. bad-json messages
def test_json_without_images_key_is_refused(tmp_path: Path) -> None:
    ann = tmp_path / "instances_val.json"
    ann.write_text(json.dumps({"annotations": [], "categories": CATS}))
    with pytest.raises(BadAnnotationError, match=r"instances_val\.json has no \"images\" key"):
        CocoIndex(ann, tmp_path)


@pytest.mark.parametrize("bbox", [["1", "2", "3", "4"], [1, 2, 3, None], [1, 2, 3, True], "1 2 3 4", 5])
def test_non_numeric_bbox_is_a_malformed_box(tmp_path: Path, bbox) -> None:
    bad = {"id": 1, "image_id": 1, "category_id": 3, "bbox": bbox, "area": 1.0, "iscrowd": 0, "segmentation": []}
    ann, imgs = _write(tmp_path, [_img(1)], [bad, _ann(2, 1)])
    with pytest.raises(BadAnnotationError, match="annotation id 1 .*expected \\[x, y, width, height\\]"):
        CocoIndex(ann, imgs)
    idx = CocoIndex(ann, imgs, on_bad="skip")
    assert idx.skipped == {"malformed boxes": 1} and len(idx.records[0].boxes) == 1


def test_no_annotations_at_all_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann, imgs = _write(tmp_path, [_img(1), _img(2)], [])
    with caplog.at_level(logging.WARNING, logger="zoo.data.coco"):
        CocoIndex(ann, imgs)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no image has annotations" in m and "mAP -1" in m for m in msgs), msgs
    caplog.clear()
    ann, imgs = _write(tmp_path, [_img(1)], [_ann(1, 1)])
    with caplog.at_level(logging.WARNING, logger="zoo.data.coco"):
        CocoIndex(ann, imgs)
    assert not any("no image has annotations" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ 3. 16-bit PNGs
def _png16(path: Path, arr: np.ndarray) -> None:
    """Write a 16-bit PNG (grey ``(H, W)`` or RGB ``(H, W, 3)`` uint16) byte by byte, whatever PIL would write."""
    h, w = arr.shape[:2]
    colour = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_grey_png_is_scaled_not_saturated(tmp_path: Path) -> None:
    from zoo.predictor import to_rgb_array

    rng = np.random.default_rng(0)
    eight = rng.integers(60, 141, size=(24, 32)).astype(np.uint16)  # 8-bit equivalent, mean ~100
    path = tmp_path / "grey16.png"
    _png16(path, eight * 257 + rng.integers(0, 200, size=eight.shape).astype(np.uint16))
    assert Image.open(path).mode.startswith("I")
    for arr in (load_rgb(path), to_rgb_array(path), to_rgb_array(str(path)), to_rgb_array(path.read_bytes())):
        assert arr.shape == (24, 32, 3) and arr.dtype == np.uint8
        assert abs(float(arr.mean()) - float(eight.mean())) < 1.0
        assert np.abs(arr[..., 0].astype(int) - eight).max() <= 1
    # PIL's own 16-bit modes (as saved by PIL itself)
    Image.fromarray(eight * 257).save(tmp_path / "pil16.png")
    assert abs(float(load_rgb(tmp_path / "pil16.png").mean()) - float(eight.mean())) < 1.0


def test_16bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    arr = np.zeros((8, 10, 3), np.uint16)
    arr[..., 0], arr[..., 1], arr[..., 2] = 100 * 257, 50 * 257, 200 * 257
    _png16(tmp_path / "rgb16.png", arr)
    out = load_rgb(tmp_path / "rgb16.png")
    assert out.shape == (8, 10, 3)
    assert np.abs(out.reshape(-1, 3).astype(int) - [100, 50, 200]).max() <= 1


# ----------------------------------------------------------------------------------------------- 4. EXIF orientation
def _rotated_jpeg(path: Path) -> None:
    """A 60x40 JPEG, top half red and bottom half blue, tagged Orientation=6 (show it turned 90 degrees clockwise)."""
    a = np.zeros((40, 60, 3), np.uint8)
    a[:20, :, 0] = 255
    a[20:, :, 2] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied_in_datasets_and_predictor(tmp_path: Path) -> None:
    from zoo.predictor import to_rgb_array

    path = tmp_path / "rot.jpg"
    _rotated_jpeg(path)
    for arr in (load_rgb(path), to_rgb_array(path), to_rgb_array(path.read_bytes())):
        assert arr.shape == (60, 40, 3)  # portrait, as photo viewers show it
        right, left = arr[:, 30:].reshape(-1, 3).mean(0), arr[:, :10].reshape(-1, 3).mean(0)
        assert right[0] > 200 and right[2] < 60  # the top (red) turned to the right
        assert left[2] > 200 and left[0] < 60
    # a json giving the rotated size works; one giving the stored size says why it does not match
    ann, imgs = _write(tmp_path, [_img(1, 40, 60, "rot.jpg")], [_ann(1, 1, (25, 5, 10, 40))])
    shutil.copy(path, imgs / "rot.jpg")
    assert CocoDataset(CocoIndex(ann, imgs), "detection", **PRE)[0]["orig_size"] == (60, 40)
    ann.write_text(json.dumps({"images": [_img(1, 60, 40, "rot.jpg")], "annotations": [], "categories": CATS}))
    with pytest.raises(BadAnnotationError, match="EXIF Orientation"):
        CocoDataset(CocoIndex(ann, imgs), "detection", **PRE)[0]


# ------------------------------------------------------------------------------------------ 5. decompression bombs
@pytest.mark.parametrize("limit", [4000, 6000], ids=["error", "warning"])  # 10000 pixels: > 2x limit, > limit
def test_decompression_bomb_is_a_clear_value_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   limit: int) -> None:
    from zoo.preprocess import decode_rgb

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ValueError, match=r"big\.png.*PIL\.Image\.MAX_IMAGE_PIXELS"):
        decode_rgb(path, str(path))
    with pytest.raises(BadAnnotationError, match="MAX_IMAGE_PIXELS"):
        load_rgb(path)
    from zoo.preprocess import check_decodable  # the index's cheap decode check says the same

    with pytest.raises(ValueError, match=r"big\.png.*PIL\.Image\.MAX_IMAGE_PIXELS"):
        check_decodable(path, str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)
    assert decode_rgb(path, str(path)).shape == (100, 100, 3)


# --------------------------------------------------------------------------- 7. corrupt images with verify_images
def test_verify_images_drops_corrupt_files_in_skip_mode(tmp_path: Path) -> None:
    ann, imgs = _write(tmp_path, [_img(1), _img(2), _img(3)], [_ann(1, 1), _ann(2, 2), _ann(3, 3)])
    (imgs / "2.jpg").write_bytes(np.random.default_rng(0).bytes(500))  # random bytes
    good = (imgs / "1.jpg").read_bytes()
    (imgs / "3.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG: opens, fails to decode
    # without verify_images the skip-mode index keeps them, and the DataLoader meets them later
    ds = CocoDataset(CocoIndex(ann, imgs, on_bad="skip"), "detection", **PRE)
    assert len(ds) == 3
    with pytest.raises(BadAnnotationError):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(BadAnnotationError, match=r"2\.jpg"):
        CocoIndex(ann, imgs, verify_images=True)
    idx = CocoIndex(ann, imgs, on_bad="skip", verify_images=True)
    assert idx.skipped == {"corrupt image files": 2}
    assert [r.image_id for r in idx.records] == [1]
    ds = CocoDataset(idx, "detection", **PRE)
    assert [ds[i]["image_id"] for i in range(len(ds))] == [1]


# ---------------------------------------------------------------------------------------------- 6. check command
def _check(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "zoo.data.check", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def test_check_command_reports_a_corrupt_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ann, imgs = _write(tmp_path, [_img(1), _img(2), _img(3)], [_ann(1, 1), _ann(2, 2, cat=17)])
    (imgs / "2.jpg").write_bytes(np.random.default_rng(1).bytes(300))
    out = _check(ann, imgs)
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    assert "1 corrupt image files" in text and "2.jpg" in text and "image id 2" in text
    assert "3 in the json, 2 usable" in text and "FAILED" in text
    assert "3 cat" in text and "17 dog" in text  # categories listed
    # skip mode drops it: the dataset trains (exit 0), the problem is still reported (in-process: fast)
    from zoo.data.check import main

    assert main([str(ann), str(imgs), "--on-bad", "skip"]) == 0
    assert "corrupt image files (dropped in skip mode by an index built with verify_images=True)" in \
        capsys.readouterr().out
    assert main([str(ann), str(imgs), "--no-decode"]) == 0  # not decoded: the corrupt file goes unnoticed
    assert "not decoded" in capsys.readouterr().out


def test_check_dataset_size_mismatch_and_modes(tmp_path: Path) -> None:
    from zoo.data.check import check_dataset

    ann, imgs = _write(tmp_path, [_img(1), _img(2, 30, 20)], [_ann(1, 1), _ann(2, 99)])
    Image.fromarray(np.zeros((20, 31, 3), np.uint8)).save(imgs / "2.jpg")  # json says 30x20
    rep = check_dataset(ann, imgs)
    assert rep.problems == {"annotations of unknown images": 1, "size mismatches": 1} and not rep.ok
    assert "31x20" in rep.examples["size mismatches"][0]
    rep = check_dataset(ann, imgs, on_bad="skip")
    assert rep.failing == {"size mismatches": 1}  # skip mode cannot drop these: CocoDataset raises
    rep = check_dataset(ann, imgs, decode=False)
    assert rep.problems == {"annotations of unknown images": 1}
    rep = check_dataset(tmp_path / "nope.json", imgs)
    assert rep.fatal and "nope.json" in rep.fatal


def test_check_command_passes_a_clean_dataset(tmp_path: Path) -> None:
    """3 real coco128 images with their annotations (synthetic ones when ../shared/data is absent)."""
    coco128 = ROOT.parent / "shared" / "data" / "coco128"
    (tmp_path / "train2017").mkdir()
    if (coco128 / "annotations" / "instances_train2017.json").is_file():
        doc = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
        images = doc["images"][:3]
        ids = {im["id"] for im in images}
        doc["images"], doc["annotations"] = images, [a for a in doc["annotations"] if a["image_id"] in ids]
        for im in images:
            shutil.copy(coco128 / "train2017" / im["file_name"], tmp_path / "train2017")
    else:
        doc = {"images": [_img(i) for i in (1, 2, 3)], "annotations": [_ann(1, 1), _ann(2, 3)], "categories": CATS}
        for im in doc["images"]:
            Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "train2017" / im["file_name"])
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    out = _check(tmp_path / "ann.json", tmp_path / "train2017")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "problems: none" in out.stdout and "result: OK" in out.stdout
    assert "3 in the json, 3 usable" in out.stdout and f"{len(doc['annotations'])} in the json" in out.stdout


def test_verify_images_option_reaches_the_coco_index(tmp_path: Path) -> None:
    """``data.verify_images=true data.on_bad_annotation=skip``: a corrupt file is skipped when the data is built."""
    from tests.conftest import compose
    from zoo.config import TrainConfig, validate
    from zoo.data.datamodule import datamodule_from_config

    root = tmp_path / "ds"
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    images, anns = [], []
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(root / "train" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 32, "height": 32})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100,
                     "iscrowd": 0})
    (root / "train" / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    cfg = validate(compose("train", ["data=coco", f"data.root={root}", "data.train_split=train", "data.val_split=train",
                                     "data.num_workers=0",
                                     "data.verify_images=true", "data.on_bad_annotation=skip"], output_dir=tmp_path),
                   TrainConfig)
    pre = {"input_size": [32, 32], "resize": "stretch", "mean": [0.5] * 3, "std": [0.5] * 3}
    dm = datamodule_from_config(cfg.data, "detection", pre, stages=("train",))
    assert len(dm.train_set) == 2
