"""Tests of the embedded synthetic shapes dataset (zoo.data.shapes): small sets generated into tmp folders."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.data import shapes
from zoo.data.shapes import (
    CATEGORY_IDS,
    COLOR_NAMES,
    PRIMARY_AREA_RATIO,
    SHAPE_NAMES,
    default_cache_dir,
    ensure_shapes_dataset,
    mask_to_rle,
    render_shapes_sample,
)

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

SIZE = 96
N_TRAIN, N_VAL = 100, 16


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _polygon_area(flat: list[float]) -> float:
    p = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        e = out.copy()
        e[1:] &= out[:-1]
        e[:-1] &= out[1:]
        e[:, 1:] &= out[:, :-1]
        e[:, :-1] &= out[:, 1:]
        out = e
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "ds"
    return ensure_shapes_dataset(root, num_train=N_TRAIN, num_val=N_VAL, image_size=SIZE, seed=3)


@pytest.fixture(scope="module")
def train_coco(dataset: Path) -> COCO:
    return _coco(dataset / "annotations" / "instances_train.json")


# ------------------------------------------------------------------------------------------------ layout, json
def test_layout_and_images(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == ["DONE.json", "annotations", "train", "val"]
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        doc = json.loads((dataset / "annotations" / f"instances_{split}.json").read_text())
        assert set(doc) >= {"images", "annotations", "categories", "info", "licenses"}
        assert len(doc["images"]) == n
        files = sorted(p.name for p in (dataset / split).iterdir())
        assert files == sorted(im["file_name"] for im in doc["images"])
        for im in doc["images"][:5]:
            with Image.open(dataset / split / im["file_name"]) as pil:
                assert pil.format == "JPEG" and pil.mode == "RGB" and pil.size == (SIZE, SIZE)
            assert (im["width"], im["height"]) == (SIZE, SIZE)
    done = json.loads((dataset / "DONE.json").read_text())
    assert done["params"] == shapes.shapes_params(num_train=N_TRAIN, num_val=N_VAL, image_size=SIZE, seed=3)


def test_categories_non_contiguous_and_extra_fields(train_coco: COCO) -> None:
    cats = sorted(train_coco.loadCats(train_coco.getCatIds()), key=lambda c: c["id"])
    ids = [c["id"] for c in cats]
    assert [c["name"] for c in cats] == list(SHAPE_NAMES)
    assert ids == [CATEGORY_IDS[n] for n in SHAPE_NAMES]
    assert ids != list(range(ids[0], ids[0] + len(ids))), "category ids must be non-contiguous like COCO's"
    assert all(c["supercategory"] for c in cats)
    anns = train_coco.loadAnns(train_coco.getAnnIds())
    assert len({a["id"] for a in anns}) == len(anns)
    id_to_name = {c["id"]: c["name"] for c in cats}
    for a in anns:
        assert a["color"] in COLOR_NAMES
        assert a["identity"] == f"{a['color']}_{id_to_name[a['category_id']]}"
    # every kind and colour occurs in a set of this size
    assert {a["category_id"] for a in anns} == set(ids)
    assert {a["color"] for a in anns} == set(COLOR_NAMES)


def test_project_coco_reader_accepts_it(dataset: Path) -> None:
    from zoo.data.coco import CocoIndex

    index = CocoIndex(dataset / "annotations" / "instances_val.json", dataset / "val")
    assert index.class_names == list(SHAPE_NAMES)
    assert index.cat_ids == [1, 3, 4, 7, 9, 12]
    assert len(index.records) == N_VAL
    assert not index.skipped


# --------------------------------------------------------------------------------------------------- geometry
def test_polygons_inside_image_and_bbox_area_consistent(train_coco: COCO) -> None:
    n_poly = 0
    for a in train_coco.loadAnns(train_coco.getAnnIds(iscrowd=False)):
        assert a["iscrowd"] == 0
        seg = a["segmentation"]
        assert isinstance(seg, list) and len(seg) == 1
        flat = seg[0]
        assert len(flat) >= 6 and len(flat) % 2 == 0
        xy = np.asarray(flat).reshape(-1, 2)
        assert xy.min() >= 0.0 and xy.max() <= SIZE, f"annotation {a['id']} leaves the image"
        x, y, w, h = a["bbox"]
        assert np.allclose([x, y, x + w, y + h], [xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()],
                           atol=0.011)
        assert w > 0 and h > 0
        assert a["area"] > 0
        assert a["area"] == pytest.approx(_polygon_area(flat), abs=0.02)
        rle = mask_utils.frPyObjects(seg, SIZE, SIZE)
        pix = float(mask_utils.area(mask_utils.merge(rle)))
        if a["area"] > 60:
            assert pix == pytest.approx(a["area"], rel=0.2)
        n_poly += 1
    assert n_poly > N_TRAIN  # 1-4 objects per image


def test_circles_have_many_vertices(train_coco: COCO) -> None:
    circles = train_coco.loadAnns(train_coco.getAnnIds(catIds=[CATEGORY_IDS["circle"]], iscrowd=False))
    assert circles
    inside = [a for a in circles if a["bbox"][0] > 0 and a["bbox"][1] > 0 and a["bbox"][0] + a["bbox"][2] < SIZE
              and a["bbox"][1] + a["bbox"][3] < SIZE]
    assert inside
    for a in inside:  # untruncated circles are >= 24-gons
        assert len(a["segmentation"][0]) // 2 >= 24


def test_some_objects_truncated_by_border(train_coco: COCO) -> None:
    def touches(a: dict) -> bool:
        x, y, w, h = a["bbox"]
        return x <= 0.0 or y <= 0.0 or x + w >= SIZE or y + h >= SIZE

    anns = train_coco.loadAnns(train_coco.getAnnIds(iscrowd=False))
    frac = sum(touches(a) for a in anns) / len(anns)
    assert 0.0 < frac < 0.3


def test_annotation_masks_match_rendered_objects(train_coco: COCO) -> None:
    """pycocotools' rasterised polygons match the renderer's own per-object masks."""
    checked = 0
    for img_id in train_coco.getImgIds()[:30]:
        sample = render_shapes_sample("train", img_id - 1, image_size=SIZE, seed=3)
        anns = sorted(train_coco.loadAnns(train_coco.getAnnIds(imgIds=img_id)), key=lambda a: a["id"])
        assert len(anns) == len(sample.objects)
        for a, obj in zip(anns, sample.objects):
            assert CATEGORY_IDS[obj.shape] == a["category_id"] and obj.color == a["color"]
            m = train_coco.annToMask(a).astype(bool)
            if a["iscrowd"]:
                assert np.array_equal(m, obj.mask)
                continue
            if a["area"] < 40:
                continue
            iou = (m & obj.mask).sum() / (m | obj.mask).sum()
            assert iou > 0.8, f"image {img_id} annotation {a['id']}: IoU {iou:.2f}"
            checked += 1
    assert checked > 30


def test_annotation_masks_match_pixels_in_jpeg(dataset: Path, train_coco: COCO) -> None:
    """In the written JPEG, the pixels closer to the object's colour than to the surrounding background colour
    form (almost) the annotated polygon."""
    checked = 0
    for img_id in train_coco.getImgIds()[:40]:
        info = train_coco.imgs[img_id]
        img = np.asarray(Image.open(dataset / "train" / info["file_name"]).convert("RGB"), dtype=np.float32) / 255
        for a in train_coco.loadAnns(train_coco.getAnnIds(imgIds=img_id, iscrowd=False)):
            if a["area"] < 300:
                continue
            m = train_coco.annToMask(a).astype(bool)
            x, y, w, h = a["bbox"]
            win = np.zeros_like(m)
            win[max(int(y) - 3, 0):int(y + h) + 4, max(int(x) - 3, 0):int(x + w) + 4] = True
            inner, outer = _erode(m, 2), win & _erode(~m, 2)
            if inner.sum() < 10 or outer.sum() < 10:
                continue
            fg, bg = np.median(img[inner], 0), np.median(img[outer], 0)
            region = win & (np.linalg.norm(img - fg, axis=-1) < np.linalg.norm(img - bg, axis=-1))
            iou = (region & m).sum() / (region | m).sum()
            assert iou > 0.8, f"image {img_id} annotation {a['id']}: IoU {iou:.2f} with the drawn colour region"
            checked += 1
    assert checked >= 20


# ------------------------------------------------------------------------------------------- content rules
def test_primary_object_is_clearly_largest(dataset: Path, train_coco: COCO) -> None:
    from zoo.data.coco import CocoIndex

    index = CocoIndex(dataset / "annotations" / "instances_train.json", dataset / "train")
    by_id = {r.image_id: r for r in index.records}
    for img_id in train_coco.getImgIds():
        areas = sorted((a["area"] for a in train_coco.loadAnns(train_coco.getAnnIds(imgIds=img_id, iscrowd=False))),
                       reverse=True)
        if len(areas) >= 2:
            assert areas[0] >= 1.5 * areas[1], f"image {img_id}: areas {areas}"  # the brief: >= 1.5x
            assert areas[0] >= PRIMARY_AREA_RATIO * areas[1] - 1e-6, f"image {img_id}: areas {areas}"
        if areas:  # the renderer's primary object is the one CocoIndex picks as the classification label
            sample = render_shapes_sample("train", img_id - 1, image_size=SIZE, seed=3)
            primary = sample.objects[sample.primary]
            assert not primary.iscrowd
            label = index.primary_label(by_id[img_id])
            assert index.class_names[label] == primary.shape


def test_object_counts_and_sizes(train_coco: COCO) -> None:
    counts = [len(train_coco.getAnnIds(imgIds=i, iscrowd=False)) for i in train_coco.getImgIds()]
    assert max(counts) <= 4
    assert {1, 2, 3} <= set(counts)
    sides = [max(a["bbox"][2], a["bbox"][3]) / SIZE for a in train_coco.loadAnns(train_coco.getAnnIds(iscrowd=False))]
    assert min(sides) < 0.15 and max(sides) > 0.45


def test_negatives_exist(train_coco: COCO) -> None:
    empty = [i for i in train_coco.getImgIds() if not train_coco.getAnnIds(imgIds=i)]
    assert 1 <= len(empty) <= 0.1 * N_TRAIN


def test_crowd_annotations_are_uncompressed_rle(train_coco: COCO) -> None:
    crowd = train_coco.loadAnns(train_coco.getAnnIds(iscrowd=True))
    assert crowd, "a 100-image split should hold ~3 crowd regions"
    assert len(crowd) <= 0.1 * N_TRAIN
    for a in crowd:
        assert a["iscrowd"] == 1
        seg = a["segmentation"]
        assert isinstance(seg, dict) and seg["size"] == [SIZE, SIZE]
        assert isinstance(seg["counts"], list) and all(isinstance(c, int) for c in seg["counts"])
        assert sum(seg["counts"]) == SIZE * SIZE
        m = train_coco.annToMask(a).astype(bool)
        assert m.sum() == a["area"] > 0
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        # crowd images still have a non-crowd primary object
        assert train_coco.getAnnIds(imgIds=a["image_id"], iscrowd=False)
        sample = render_shapes_sample("train", a["image_id"] - 1, image_size=SIZE, seed=3)
        crowd_objs = [o for o in sample.objects if o.iscrowd]
        assert len(crowd_objs) == 1 and len(crowd_objs[0].parts) >= 5
        assert CATEGORY_IDS[crowd_objs[0].shape] == a["category_id"]


def test_mask_to_rle_round_trips_with_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for first in (0, 1):
        m = rng.random((7, 5)) < 0.4
        m[0, 0] = bool(first)
        rle = mask_to_rle(m)
        assert (rle["counts"][0] == 0) == bool(first)
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 7, 5))
        assert np.array_equal(decoded.astype(bool), m)
    assert mask_to_rle(np.zeros((3, 4), bool))["counts"] == [12]


def test_colour_does_not_give_the_class_away(train_coco: COCO, dataset: Path) -> None:
    """Shape and colour are drawn independently: mean image colour predicts the primary shape barely better than
    chance (nearest class centroid fitted on the same images)."""
    from zoo.data.coco import CocoIndex

    index = CocoIndex(dataset / "annotations" / "instances_train.json", dataset / "train")
    feats, labels = [], []
    for rec in index.records:
        lab = index.primary_label(rec)
        if lab is None:
            continue
        feats.append(np.asarray(Image.open(rec.file).convert("RGB"), dtype=np.float32).mean((0, 1)))
        labels.append(lab)
    x, y = np.stack(feats), np.asarray(labels)
    cents = np.stack([x[y == k].mean(0) for k in range(len(SHAPE_NAMES))])
    acc = float((np.argmin(((x[:, None] - cents[None]) ** 2).sum(-1), 1) == y).mean())
    assert acc < 0.45, f"nearest-centroid accuracy on mean colour is {acc:.2f}"


# ------------------------------------------------------------------------------------- determinism, caching
def test_deterministic_bytes_serial_and_pool(tmp_path: Path) -> None:
    kw = dict(num_train=10, num_val=4, image_size=64, seed=11)
    a = ensure_shapes_dataset(tmp_path / "a", **kw)
    b = ensure_shapes_dataset(tmp_path / "b", **kw, num_workers=2)
    ta, tb = _tree_bytes(a), _tree_bytes(b)
    assert ta.keys() == tb.keys() and len(ta) == 10 + 4 + 3
    assert all(ta[k] == tb[k] for k in ta)
    c = ensure_shapes_dataset(tmp_path / "c", **{**kw, "seed": 12})
    tc = _tree_bytes(c)
    assert ta["train/000000000001.jpg"] != tc["train/000000000001.jpg"]
    # train and val draw from different streams
    assert ta["train/000000000001.jpg"] != ta["val/000000000001.jpg"]


def test_render_is_deterministic() -> None:
    s1 = render_shapes_sample("val", 5, image_size=64, seed=1)
    s2 = render_shapes_sample("val", 5, image_size=64, seed=1)
    assert np.array_equal(s1.image, s2.image) and s1.annotations() == s2.annotations()
    assert s1.image.shape == (64, 64, 3) and s1.image.dtype == np.uint8


def test_marker_caching_and_param_change(tmp_path: Path) -> None:
    root = tmp_path / "cache_me"
    kw = dict(num_train=6, num_val=2, image_size=48, seed=0)
    assert ensure_shapes_dataset(root, **kw) == root.absolute()
    done, img = root / "DONE.json", root / "train" / "000000000001.jpg"
    stamps = (done.stat().st_mtime_ns, img.stat().st_mtime_ns, img.stat().st_ino)
    assert ensure_shapes_dataset(root, **kw) == root.absolute()
    assert (done.stat().st_mtime_ns, img.stat().st_mtime_ns, img.stat().st_ino) == stamps
    # a changed parameter regenerates in place
    ensure_shapes_dataset(root, **{**kw, "num_train": 8})
    assert json.loads(done.read_text())["params"]["num_train"] == 8
    assert len(list((root / "train").iterdir())) == 8
    assert img.stat().st_ino != stamps[2]
    # no temp / trash folders left beside it
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["cache_me"]


def test_incomplete_folder_is_regenerated(tmp_path: Path) -> None:
    root = tmp_path / "half"
    (root / "train").mkdir(parents=True)
    (root / "train" / "000000000001.jpg").write_bytes(b"broken")
    ensure_shapes_dataset(root, num_train=3, num_val=1, image_size=40)
    assert (root / "DONE.json").is_file()
    assert len(list((root / "train").iterdir())) == 3
    with Image.open(root / "train" / "000000000001.jpg") as im:
        assert im.size == (40, 40)


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a shapes dataset"):
        ensure_shapes_dataset(root, num_train=2, num_val=1, image_size=40)
    assert (root / "thesis.tex").read_text() == "precious"


def test_default_root_under_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "zc"))
    assert default_cache_dir() == tmp_path / "zc"
    r1 = ensure_shapes_dataset(num_train=2, num_val=1, image_size=40)
    r2 = ensure_shapes_dataset(num_train=2, num_val=1, image_size=40, seed=1)
    assert r1.parent == r2.parent == (tmp_path / "zc" / "datasets").absolute()
    assert r1.name.startswith("shapes-v1-") and r1 != r2
    assert ensure_shapes_dataset(None, num_train=2, num_val=1, image_size=40, num_workers=0) == r1
    monkeypatch.delenv("ZOO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "zoo"


def test_concurrent_callers_share_one_dataset(tmp_path: Path) -> None:
    root = tmp_path / "race"
    kw = dict(num_train=8, num_val=2, image_size=48, seed=5)
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(ensure_shapes_dataset(root, **kw))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [root.absolute()] * 3
    assert len(list((root / "train").iterdir())) == 8
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["race"]


def test_install_race_keeps_the_winner(tmp_path: Path) -> None:
    """Without a lock (e.g. Windows) the loser of a race discards its copy and uses the winner's."""
    params = shapes.shapes_params(num_train=2, num_val=1, image_size=40, seed=0)
    winner = ensure_shapes_dataset(tmp_path / "root", num_train=2, num_val=1, image_size=40)
    loser = tmp_path / ".root.tmp-x"
    shapes._generate(loser, params, 0)
    stamp = (winner / "DONE.json").stat().st_ino
    shapes._install(loser, winner, params)
    assert not loser.exists() and (winner / "DONE.json").stat().st_ino == stamp
    # a stale winner (other params) is replaced by the fresh copy
    fresh = tmp_path / ".root.tmp-y"
    new_params = shapes.shapes_params(num_train=3, num_val=1, image_size=40, seed=0)
    shapes._generate(fresh, new_params, 0)
    shapes._install(fresh, winner, new_params)
    assert json.loads((winner / "DONE.json").read_text())["params"] == new_params
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["root"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_train=0), "num_train"),
    (dict(num_val=-1), "num_val"),
    (dict(image_size=16), "image_size"),
    (dict(num_workers=-2), "num_workers"),
    (dict(layout="grid"), "layout"),
])
def test_bad_parameters(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ensure_shapes_dataset(tmp_path / "x", **{"num_train": 2, "num_val": 1, "image_size": 40, **kwargs})
    assert not (tmp_path / "x").exists()


def test_compositional_layout_gives_captions_of_every_prompt_kind() -> None:
    """layout=compositional: one object, two of different kinds, a counted group of one kind and colour, or a pair in
    opposite halves; never truncated. Its captions then hold counted and related phrases, which the default layout's
    independent draws seldom give; the default layout is not recorded in the parameters (old caches stay)."""
    from zoo.generation.captions import CaptionObject, caption_for_objects

    assert "layout" not in shapes.shapes_params() and shapes.shapes_params(layout="compositional")["layout"]
    kinds: dict[str, int] = {}
    caps = []
    for i in range(120):
        smp = render_shapes_sample("train", i, image_size=32, layout="compositional")
        objs = smp.objects
        assert not any(o.truncated or o.iscrowd for o in objs)
        if not objs:
            kinds["none"] = kinds.get("none", 0) + 1
            continue
        names = {(o.shape, o.color) for o in objs}
        kind = "single" if len(objs) == 1 else "count" if len(names) == 1 else "two"
        if kind == "count":
            assert len(objs) in (2, 3)
        if kind == "two":
            assert len(objs) == 2 and objs[0].shape != objs[1].shape
        kinds[kind] = kinds.get(kind, 0) + 1
        boxes = [[*o.polygon.min(0), *o.polygon.max(0)] for o in objs]
        caps.append(caption_for_objects([CaptionObject(o.shape, o.color, b) for o, b in zip(objs, boxes)], seed=i))
    assert kinds["single"] >= 12 and kinds["count"] >= 15 and kinds["two"] >= 40, kinds
    assert sum(c.startswith(("two ", "three ")) for c in caps) >= 15
    assert sum(any(r in c for r in ("left of", "right of", "above", "below")) for c in caps) >= 15
    default = [render_shapes_sample("train", i, image_size=32) for i in range(120)]
    counted = sum(len({(o.shape, o.color) for o in d.objects if not o.iscrowd}) < len([o for o in d.objects
                                                                                       if not o.iscrowd])
                  for d in default)
    assert 3 * counted <= kinds["count"], (counted, kinds)  # the default layout: seldom two of one kind and colour


def test_render_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        render_shapes_sample("test", 0)


def test_module_is_light() -> None:
    """The generator needs only numpy and PIL at import time (pycocotools only in tests)."""
    src = Path(shapes.__file__).read_text()
    top_imports = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    heavy = ("torch", "pycocotools", "lightning", "hydra", "albumentations", "cv2")
    assert top_imports and not [ln for ln in top_imports if any(h in ln for h in heavy)]
