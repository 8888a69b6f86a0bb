"""Loading untrusted bundles and checkpoints safely: bounded sizes from specs, a digest of model.json, clear refusals
of pickled objects (nothing runs), and refusal of NaN/inf weights."""

from __future__ import annotations

import json
import pickle
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import zoo
from zoo.hub.api import model_meta
from zoo.hub.bundle import (
    META_DIGEST_KEY,
    BundleError,
    BundleIntegrityError,
    CheckpointLoadError,
    SpecBoundsError,
    check_spec_bounds,
    meta_digest,
    read_bundle,
    read_lightning_checkpoint,
    save_bundle,
    sha256_file,
)
from zoo.models import create_model

SPEC = {"backbone": {"name": "test_resnet"}, "heads": {"cls": {"type": "classification", "num_classes": 3}},
        "input_size": [32, 32]}
PAYLOAD_MARK = "ZOO-PICKLE-PAYLOAD-RAN"


class CustomThing:
    """A class defined here: weights-only loading must refuse a checkpoint holding it."""

    def __init__(self) -> None:
        self.value = 1


class Payload:
    """A pickle that calls ``print`` on load (a stand-in for ``os.system``)."""

    def __reduce__(self):
        return (print, (PAYLOAD_MARK,))


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo_home"))
    for var in ("ZOO_MAX_INPUT_SIDE", "ZOO_MAX_SIZE_DIVISOR", "ZOO_MAX_HEADS", "ZOO_MAX_HEAD_DIM"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return create_model(dict(SPEC), load_backbone_weights=False).eval()


def write_bundle(folder: Path, model, *, edit_meta=None, edit_state=None) -> Path:
    meta = model_meta(model.spec)
    if edit_meta is not None:
        edit_meta(meta)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if edit_state is not None:
        edit_state(sd)
    return save_bundle(folder, sd, meta)


def rewrite_json(folder: Path, edit) -> None:
    """Edit a bundle's model.json in place (what a tamperer or a careless hand-edit does)."""
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


def full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


# ------------------------------------------------------------------------------------------------ 1. size bounds


def test_huge_input_size_in_bundle_is_refused(tmp_path: Path, small_model) -> None:
    folder = write_bundle(tmp_path / "b", small_model)
    # model.json is not covered by the weights' sha256 in model.json itself; a digest-less (old) bundle edited by
    # hand is what an attacker serves.
    rewrite_json(folder, lambda m: m["spec"].__setitem__("input_size", [20000, 20000]))
    with pytest.raises(SpecBoundsError) as err:
        zoo.load(folder, verify=False)
    msg = str(err.value)
    for part in ("input_size", "20000", "8192", "ZOO_MAX_INPUT_SIDE", "max_input_side", str(folder)):
        assert part in msg, (part, msg)


def test_input_side_override_by_keyword_and_env(tmp_path: Path, small_model, monkeypatch) -> None:
    folder = write_bundle(tmp_path / "b", small_model,
                          edit_meta=lambda m: (m["spec"].__setitem__("input_size", [9000, 9000]),
                                               m.__setitem__("input_size", [9000, 9000])))
    with pytest.raises(SpecBoundsError, match="9000"):
        zoo.load(folder)
    assert zoo.load(folder, max_input_side=9000).spec.input_size == [9000, 9000]
    monkeypatch.setenv("ZOO_MAX_INPUT_SIDE", "10000")
    assert zoo.load(folder).spec.input_size == [9000, 9000]
    monkeypatch.setenv("ZOO_MAX_INPUT_SIDE", "lots")
    with pytest.raises(ValueError, match="ZOO_MAX_INPUT_SIDE"):
        zoo.load(folder)


@pytest.mark.parametrize("value", [0, -32, 4096, 2.5, True])
def test_size_divisor_out_of_range_is_refused(tmp_path: Path, small_model, value) -> None:
    folder = write_bundle(tmp_path / "b", small_model, edit_meta=lambda m: m["spec"].__setitem__("size_divisor", value))
    with pytest.raises(SpecBoundsError, match="size_divisor") as err:
        zoo.load(folder)
    assert "1024" in str(err.value) and repr(value) in str(err.value)
    if isinstance(value, int) and not isinstance(value, bool):
        assert "ZOO_MAX_SIZE_DIVISOR" in str(err.value)
    else:
        assert "must be an integer" in str(err.value)


def test_too_many_heads_are_refused_before_building(tmp_path: Path, small_model) -> None:
    many = {f"h{i}": {"type": "classification", "num_classes": 3} for i in range(65)}
    folder = write_bundle(tmp_path / "b", small_model, edit_meta=lambda m: m["spec"].__setitem__("heads", many))
    with pytest.raises(SpecBoundsError) as err:
        zoo.load(folder)
    msg = str(err.value)
    assert "65" in msg and "64" in msg and "ZOO_MAX_HEADS" in msg and "heads" in msg


def test_head_dims_are_bounded(tmp_path: Path, small_model, monkeypatch) -> None:
    # default limit, checked without building anything
    spec = json.loads(json.dumps(SPEC))
    spec["heads"]["cls"]["num_classes"] = 2_000_000
    with pytest.raises(SpecBoundsError, match=r"heads\['cls'\]\.num_classes") as err:
        check_spec_bounds(spec, "x.json")
    assert "2000000" in str(err.value) and "1000000" in str(err.value) and "ZOO_MAX_HEAD_DIM" in str(err.value)
    spec["heads"]["cls"] = {"type": "embedding", "embedding_dim": 5_000_000}
    with pytest.raises(SpecBoundsError, match="embedding_dim"):
        check_spec_bounds(spec, "x.json")
    check_spec_bounds(spec, "x.json", {"max_head_dim": 5_000_000})

    # through load, with a lowered limit from the environment and from the keyword
    folder = write_bundle(tmp_path / "b", small_model)
    with pytest.raises(SpecBoundsError, match="limits="):
        zoo.load(folder, limits={"max_head_dim": 2})
    monkeypatch.setenv("ZOO_MAX_HEAD_DIM", "2")
    with pytest.raises(SpecBoundsError, match="ZOO_MAX_HEAD_DIM"):
        zoo.load(folder)
    with pytest.raises(TypeError, match="max_whatever"):
        zoo.load(folder, limits={"max_whatever": 3})


def test_checkpoint_spec_is_bounded(tmp_path: Path, small_model) -> None:
    spec = small_model.spec.to_dict()
    spec["input_size"] = [20000, 20000]
    ckpt = tmp_path / "big.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in small_model.state_dict().items()},
                "hyper_parameters": {"spec": spec}}, ckpt)
    with pytest.raises(SpecBoundsError, match="ZOO_MAX_INPUT_SIDE") as err:
        zoo.load(ckpt)
    assert str(ckpt) in str(err.value)
    assert zoo.load(ckpt, max_input_side=20000).spec.input_size == [20000, 20000]


# ---------------------------------------------------------------------------------------------- 2. model.json digest


def test_save_bundle_records_digest_of_model_json(tmp_path: Path, small_model) -> None:
    folder = write_bundle(tmp_path / "b", small_model)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        recorded = (f.metadata() or {}).get(META_DIGEST_KEY)
    meta = json.loads((folder / "model.json").read_text())
    assert recorded and recorded == meta_digest(meta)


def test_tampered_model_json_is_integrity_error(tmp_path: Path, small_model) -> None:
    folder = write_bundle(tmp_path / "b", small_model)
    rewrite_json(folder, lambda m: m["spec"]["class_names"].__setitem__("cls", ["evil", "b", "c"]))
    with pytest.raises(BundleIntegrityError) as err:
        zoo.load(folder)
    msg = str(err.value)
    assert str(folder / "model.json") in msg and "re-export" in msg
    with pytest.raises(BundleIntegrityError, match="model.json"):
        read_bundle(folder)
    # a trusted caller may still skip verification
    read_bundle(folder, verify=False)


def test_reformatted_model_json_still_loads(tmp_path: Path, small_model) -> None:
    folder = write_bundle(tmp_path / "b", small_model)
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(meta.items()))), indent=None))  # same content, other layout
    assert zoo.load(folder).bundle_meta["spec"] == meta["spec"]


def test_old_bundle_without_digest_loads(tmp_path: Path, small_model) -> None:
    folder = write_bundle(tmp_path / "b", small_model)
    wpath = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_model.state_dict().items()}, str(wpath), metadata={"format": "pt"})
    rewrite_json(folder, lambda m: m["weights"].update(sha256=sha256_file(wpath), bytes=wpath.stat().st_size))
    assert isinstance(zoo.load(folder), torch.nn.Module)


# ---------------------------------------------------------------------------------------- 3. pickled checkpoints


def _assert_clear_refusal(exc: BaseException, path: Path) -> None:
    msg = str(exc)
    text = full_text(exc)
    assert str(path) in msg
    assert "safety" in msg and "bundle" in msg and "state dict" in msg
    assert "weights_only=False" not in text and "set to `False`" not in text, text


def test_checkpoint_with_custom_class_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "custom.ckpt"
    torch.save({"x": CustomThing()}, path)
    with pytest.raises(CheckpointLoadError) as err:
        read_lightning_checkpoint(path)
    _assert_clear_refusal(err.value, path)
    assert "CustomThing" in str(err.value)
    with pytest.raises(CheckpointLoadError) as err:
        zoo.load(path)
    _assert_clear_refusal(err.value, path)


def test_raw_pickle_payload_never_runs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "payload.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f, protocol=2)
    for reader in (read_lightning_checkpoint, zoo.load):
        with pytest.raises(CheckpointLoadError) as err:
            reader(path)
        _assert_clear_refusal(err.value, path)
    assert PAYLOAD_MARK not in capfd.readouterr().out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"definitely not a checkpoint", b"junk", pickle.dumps({"a": 1}, protocol=4), b""])
def test_unreadable_checkpoint_is_clear(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointLoadError) as err:
        read_lightning_checkpoint(path)
    assert str(path) in str(err.value)
    assert "weights_only=False" not in full_text(err.value) and "set to `False`" not in full_text(err.value)


def test_train_resume_from_pickled_checkpoint_is_clear(tmp_path: Path) -> None:
    from tests.conftest import FAST, SMALL_SHAPES, compose
    from zoo.training import train

    path = tmp_path / "resume.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"x": CustomThing()}}, path)
    cfg = compose("train", ["experiment=shapes_cls", *FAST, *SMALL_SHAPES, f"ckpt_path={path}"],
                  output_dir=tmp_path / "run")
    with pytest.raises(CheckpointLoadError) as err:
        train(cfg)
    _assert_clear_refusal(err.value, path)


# ------------------------------------------------------------------------------------------------ 4. NaN/inf weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_refused(tmp_path: Path, small_model, bad: float) -> None:
    def poison(sd):
        name = next(k for k in sd if k.endswith("running_var"))
        sd[name][0] = bad
        sd["heads.cls.fc.weight" if "heads.cls.fc.weight" in sd else next(k for k in sd if k.startswith("heads."))
           ].view(-1)[1] = bad

    folder = write_bundle(tmp_path / "b", small_model, edit_state=poison)
    with pytest.raises(BundleError) as err:
        zoo.load(folder)
    msg = str(err.value)
    assert "model.safetensors" in msg and "running_var" in msg and "allow_nonfinite=True" in msg
    assert isinstance(zoo.load(folder, allow_nonfinite=True), torch.nn.Module)


def test_finite_weights_with_integer_buffers_load(tmp_path: Path, small_model) -> None:
    folder = write_bundle(tmp_path / "b", small_model)
    sd, _ = read_bundle(folder)
    assert any(not t.is_floating_point() for t in sd.values())  # num_batches_tracked
    assert isinstance(zoo.load(folder), torch.nn.Module)
