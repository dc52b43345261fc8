"""The shared argument checks (mmelkit._checks): what each accepts, what it returns, and that every
refusal names the argument."""

from __future__ import annotations

import ast
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from mmelkit import _checks
from mmelkit._checks import (
    choice,
    class_labels,
    did_you_mean,
    feature_matrix,
    finite,
    float_dtype,
    image_batch,
    map_batch,
    non_negative_int,
    non_negative_number,
    output_folder,
    positive_int,
    positive_number,
    probability,
    readable,
    refuse_active_dropout,
    same_device,
)


def test_checks_sit_below_every_layer() -> None:
    """_checks imports nothing from mmelkit: models, methods, metrics and bench all import it."""
    tree = ast.parse(Path(_checks.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.split(".")[0] == "mmelkit"]


def test_positive_int_is_still_importable_from_methods_base() -> None:
    from mmelkit.methods.base import positive_int as old

    assert old is positive_int


def test_no_internal_import_of_positive_int_from_methods_base() -> None:
    root = Path(_checks.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mmelkit.methods.base":
                if any(alias.name == "positive_int" for alias in node.names):
                    offenders.append(str(path.relative_to(root)))
    assert offenders == []


@pytest.mark.parametrize("value", [1, 7, np.int64(3), torch.tensor(2)])
def test_positive_int_accepts_integers(value: object) -> None:
    got = positive_int("steps", value)
    assert type(got) is int and got == int(value)  # type: ignore[call-overload]


@pytest.mark.parametrize("value", [0, -1, True, 1.0, 2.5, "3", None, torch.tensor(2.0), torch.tensor([2])])
def test_positive_int_refuses_the_rest(value: object) -> None:
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 1; got "):
        positive_int("steps", value)


def test_non_negative_int() -> None:
    assert non_negative_int("seed", 0) == 0 and non_negative_int("seed", np.uint8(5)) == 5
    for bad in (-1, False, 0.5, "0"):
        with pytest.raises(ValueError, match=r"seed must be a non-negative integer; got"):
            non_negative_int("seed", bad)
    with pytest.raises(ValueError, match=r"tolerance must be a non-negative integer \(pixels\); got -2"):
        non_negative_int("tolerance", -2, unit="pixels")


def test_positive_and_non_negative_numbers() -> None:
    assert positive_number("lr", 3) == 3.0 and isinstance(positive_number("lr", 3), float)
    assert positive_number("lr", np.float32(0.5)) == 0.5
    assert non_negative_number("weight", 0) == 0.0
    for bad in (0, -1.0, math.nan, math.inf, True, "1", None):
        with pytest.raises(ValueError, match=r"lr must be a positive finite number; got"):
            positive_number("lr", bad)
    for bad in (-1e-9, math.nan, -math.inf, math.inf, False):
        with pytest.raises(ValueError, match=r"weight must be a finite number >= 0; got"):
            non_negative_number("weight", bad)


def test_probability() -> None:
    assert probability("beta", 0) == 0.0 and probability("beta", 1) == 1.0 and probability("beta", 0.25) == 0.25
    for bad in (-0.01, 1.01, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]; got"):
            probability("beta", bad)


def test_class_labels() -> None:
    labels = class_labels([2, 0, 1], 3, 3)
    assert labels.dtype == torch.long and labels.tolist() == [2, 0, 1]
    assert class_labels(torch.tensor([1, 1], dtype=torch.int16), 2, 2, "cpu").dtype == torch.long
    with pytest.raises(ValueError, match=r"one integer per image \(3\); got shape \(2,\)"):
        class_labels([0, 1], 3, 3)
    with pytest.raises(TypeError, match="labels must be integers; got torch.float32"):
        class_labels(torch.zeros(3), 3, 3)
    with pytest.raises(ValueError, match=r"index the 3 class texts, \[0, 3\); got values from -1 to 2"):
        class_labels([-1, 2, 0], 3, 3)


def test_refuse_active_dropout() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0), torch.nn.Dropout(0.2))
    model.eval()
    refuse_active_dropout(model, "x")  # eval mode: dropout is off
    model[2].train()
    with pytest.raises(RuntimeError, match=r"the model is in training mode with dropout active \(2.p=0.2\): the map"):
        refuse_active_dropout(model, "the map would be random")
    model[2].p = 0.0
    model.train()
    refuse_active_dropout(model, "x")  # training mode without any dropout is fine


def test_did_you_mean_and_choice() -> None:
    known = ["grad_eclip", "mmel", "rollout"]
    assert did_you_mean("grad_eclp", known) == " did you mean 'grad_eclip'?"
    assert did_you_mean("GRAD_ECLIP", known) == " did you mean 'grad_eclip'?"  # case slips too
    assert did_you_mean("roll", known) == " did you mean 'rollout'?"  # an abbreviation
    assert did_you_mean("grad", known + ["grad_cam"]) == " did you mean 'grad_cam'?"  # difflib first
    assert did_you_mean("zzz", known) == "" and did_you_mean("r", known) == "" and did_you_mean(3, known) == ""
    assert choice("method", "mmel", known) == "mmel"
    with pytest.raises(ValueError, match=r"^unknown method 'mmell'; did you mean 'mmel'\? methods: grad_eclip, mmel"):
        choice("method", "mmell", known)
    with pytest.raises(ValueError, match=r"^unknown metric 'nope'; metrics and groups: a, b$"):
        choice("metric", "nope", {"a": 1, "b": 2}, listing="metrics and groups: a, b")
    with pytest.raises(ValueError, match=r"unknown kind \['x'\]"):
        choice("kind", ["x"], known)  # an unhashable value is an error, not a crash


def test_finite() -> None:
    ok = torch.ones(2, 3)
    assert finite("features", ok) is ok
    assert finite("features", torch.empty(0, 3)).shape == (0, 3)
    bad = torch.ones(4, 3)
    bad[2, 1] = math.nan
    bad[3, 0] = math.inf
    with pytest.raises(ValueError, match=r"features hold NaN or infinite values at rows \[2, 3\]"):
        finite("features", bad)
    with pytest.raises(ValueError, match=r"^scale hold NaN or infinite values$"):
        finite("scale", torch.tensor(math.nan))


def test_feature_matrix() -> None:
    ok = torch.randn(4, 3)
    assert feature_matrix("activations", ok) is ok
    with pytest.raises(TypeError, match=r"activations must be a torch.Tensor \(N, D\); got list"):
        feature_matrix("activations", [[1.0]])
    with pytest.raises(ValueError, match=r"activations must be 2-D \(N, D\); got shape \(4,\)"):
        feature_matrix("activations", torch.randn(4))
    with pytest.raises(ValueError, match=r"activations are empty: shape \(0, 3\)"):
        feature_matrix("activations", torch.randn(0, 3))
    with pytest.raises(TypeError, match=r"activations must be floating point; got torch.int64"):
        feature_matrix("activations", torch.ones(2, 2, dtype=torch.long))
    ok[1, 1] = math.inf
    with pytest.raises(ValueError, match=r"activations hold NaN or infinite values in 1 of 4 rows"):
        feature_matrix("activations", ok)


def test_map_batch() -> None:
    maps = torch.rand(2, 4, 4, dtype=torch.float64)
    got = map_batch(maps, 2)
    assert got.dtype == torch.float32 and torch.equal(got, maps.float())
    assert map_batch(torch.zeros(3, 2, 2, dtype=torch.uint8)).dtype == torch.float32  # counts are fine
    with pytest.raises(TypeError, match=r"maps must be a torch.Tensor \(N, h, w\); got ndarray"):
        map_batch(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"maps must have shape \(N, h, w\); got \(4, 4\)"):
        map_batch(torch.rand(4, 4))
    with pytest.raises(ValueError, match=r"got 2 maps for 3 images: pass one map per image"):
        map_batch(maps, 3)
    with pytest.raises(ValueError, match=r"maps are an empty batch \(N = 0\)"):
        map_batch(torch.rand(0, 4, 4), 0)
    with pytest.raises(ValueError, match=r"maps have an empty spatial size \(0, 4\)"):
        map_batch(torch.rand(2, 0, 4))
    with pytest.raises(TypeError, match=r"maps must hold real numbers; got torch.bool"):
        map_batch(torch.zeros(1, 2, 2, dtype=torch.bool))
    maps[1, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"maps \[1\] contain NaN or infinite values"):
        map_batch(maps)
    with pytest.raises(ValueError, match=r"^heat must have shape"):
        map_batch(torch.rand(2), name="heat")


def test_image_batch() -> None:
    images = torch.rand(2, 3, 8, 8)
    assert image_batch(images) is images
    assert image_batch(torch.rand(1, 1, 8, 8), channels=None).shape == (1, 1, 8, 8)
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor \(N, C, H, W\); got list"):
        image_batch([images])
    with pytest.raises(ValueError, match=r"images must be a batch \(N, C, H, W\); got shape \(3, 8, 8\)"):
        image_batch(images[0])
    with pytest.raises(ValueError, match=r"images are an empty batch \(N = 0\)"):
        image_batch(images[:0])
    with pytest.raises(ValueError, match=r"images must have 3 channels; got shape \(2, 1, 8, 8\)"):
        image_batch(images[:, :1])
    with pytest.raises(ValueError, match=r"images have an empty spatial size \(0, 8\)"):
        image_batch(images[:, :, :0])
    with pytest.raises(TypeError, match=r"images must be floating point \(model input\); got torch.uint8"):
        image_batch(images.to(torch.uint8))
    images[1, 2, 3, 4] = -math.inf
    with pytest.raises(ValueError, match=r"images hold NaN or infinite values at rows \[1\]"):
        image_batch(images)


def test_same_device() -> None:
    cpu = torch.zeros(2)
    assert same_device(maps=cpu, images=cpu.clone()) == torch.device("cpu")
    assert same_device() == torch.device("cpu")
    meta = torch.zeros(2, device="meta")  # a second device every machine has
    with pytest.raises(ValueError, match=r"tensors must be on one device; got maps on cpu, images on meta"):
        same_device(maps=cpu, images=meta)


def test_meta_tensors_are_refused_by_the_tensor_checks() -> None:
    meta = torch.empty(2, 3, 8, 8, device="meta")
    with pytest.raises(ValueError, match=r"images are on the meta device: they have a shape but no values"):
        image_batch(meta)
    with pytest.raises(ValueError, match=r"maps are on the meta device"):
        map_batch(meta[:, 0])
    with pytest.raises(ValueError, match=r"activations are on the meta device"):
        feature_matrix("activations", meta[:, :, 0, 0])


def test_float_dtype() -> None:
    assert float_dtype("dtype", None) is None
    assert float_dtype("dtype", torch.bfloat16) is torch.bfloat16
    for bad in (torch.int8, torch.bool, "float32", torch.complex64):
        with pytest.raises(TypeError, match=r"dtype must be a floating-point dtype .*; got"):
            float_dtype("dtype", bad)


def test_readable(tmp_path: Path) -> None:
    file = tmp_path / "weights.pt"
    file.write_bytes(b"x")
    assert readable("checkpoint", file) == file
    assert readable("checkpoint", str(file)) == file
    assert readable("model folder", tmp_path, folder=True) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"checkpoint: .*missing\.pt does not exist"):
        readable("checkpoint", tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError, match=r"checkpoint: .* is a folder, not a file"):
        readable("checkpoint", tmp_path)
    with pytest.raises(NotADirectoryError, match=r"model folder: .*weights\.pt is a file, not a folder"):
        readable("model folder", file, folder=True)


def test_readable_without_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "weights.pt").write_bytes(b"x")
    locked.chmod(0)
    try:
        try:
            os.listdir(locked)
        except PermissionError:
            pass
        else:
            pytest.skip("permission bits do not stop reads here (root)")
        with pytest.raises(PermissionError, match=r"model folder: cannot read the folder .*locked: permission denied"):
            readable("model folder", locked, folder=True)
        with pytest.raises(PermissionError, match=r"checkpoint: cannot reach .*weights\.pt: permission denied"):
            readable("checkpoint", locked / "weights.pt")
    finally:
        locked.chmod(stat.S_IRWXU)


def test_output_folder(tmp_path: Path) -> None:
    assert output_folder("out_dir", tmp_path / "new") == tmp_path / "new"  # missing: created later
    assert output_folder("out_dir", tmp_path) == tmp_path
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"out_dir: .*notes\.txt is a file, not a folder to write into"):
        output_folder("out_dir", tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
