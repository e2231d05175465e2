"""Model zoos: specs, on-disk format, determinism, resume, fit and labels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lopt.weightspace.zoos import build_zoo, main, zoo_config
from lopt.weightspace.zoos.inr import coordinates, dilate
from lopt.weightspace.zoos.specs import (
    ACTIVATIONS,
    build_module,
    init_state_dict,
    normalize_spec,
)
from lopt.weightspace.zoos.store import load_zoo, read_header

#: A digits INR zoo of 16 SIRENs in 4 chunks: 4 images x 2 views x (image,
#: dilated), one image per chunk.
TINY_INR = {"num_items": 4, "views": 2, "steps": 300, "nets_per_chunk": 4}


def chunk_digests(path: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.glob("chunk_*"))
    }


@pytest.fixture(scope="module")
def inr_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "digits"
    return build_zoo("digits_inr", out, progress=False, config=TINY_INR)


# ---------------------------------------------------------------- specs


CNN = {"kind": "cnn", "channels": [4, 6], "kernels": [3, 5], "activation": "gelu"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "mlp"}, "Invalid architecture kind"),
        ("siren", "expected a dict"),
        ({**CNN, "activation": "swish"}, "Invalid activation"),
        ({"kind": "siren"}, "missing keys \\['widths'\\]"),
        ({"kind": "siren", "widths": [2, 8, 1], "depth": 3}, "unknown keys"),
        ({"kind": "siren", "widths": [2]}, "input and an output width"),
        ({"kind": "siren", "widths": [2, 0, 1]}, "list of ints"),
        ({"kind": "siren", "widths": [2, 8, 1], "w0": -1}, "w0"),
        ({**CNN, "kernels": [3, 4]}, "odd"),
        ({**CNN, "kernels": [3]}, "differ in length"),
        ({**CNN, "pool": "sum"}, "pool"),
        ({**CNN, "dim": 3}, "dim"),
        ({**CNN, "batchnorm": 1}, "true or false"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        build_module(spec)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"batchnorm": True, "residual": True, "strides": [1, 2], "pool": "max"},
        {"dim": 1, "residual": True, "channels": [4, 4]},
    ],
)
def test_cnn_specs_build_and_run(activation, options):
    spec = {**CNN, "activation": activation, **options}
    module = build_module(spec)
    shape = (3, 1, 8) if normalize_spec(spec)["dim"] == 1 else (3, 1, 8, 8)
    assert module(torch.randn(shape)).shape == (3, 10)
    assert isinstance(module.features[0].act, ACTIVATIONS[activation])


def test_residual_shortcuts_identity_or_1x1():
    spec = {**CNN, "channels": [4, 4, 6], "kernels": [3, 3, 3], "residual": True}
    keys = build_module(spec).state_dict()
    assert "features.1.shortcut.weight" not in keys  # identity: 4 -> 4
    assert keys["features.2.shortcut.weight"].shape == (6, 4, 1, 1)
    assert "features.0.shortcut.weight" not in keys  # the stem has no skip


def test_siren_spec_keys_and_seeded_init():
    spec = {"kind": "siren", "widths": [2, 8, 8, 1]}
    state = init_state_dict(spec, seed=3)
    assert list(state) == [f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    again = init_state_dict(spec, seed=3)
    assert torch.equal(torch.rand(1), before)  # global stream untouched
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["2.weight"], init_state_dict(spec, 4)["2.weight"])
    assert state["0.weight"].abs().max() <= 1 / 2  # SIREN first-layer bound


def test_dilate_and_coordinates():
    img = torch.zeros(1, 5, 5)
    img[0, 2, 2] = 1.0
    out = dilate(img)[0]
    assert out.sum() == 5 and out[1, 2] == out[2, 1] == 1 and out[1, 1] == 0
    grid = coordinates((2, 3))
    assert grid.shape == (6, 2) and grid[1].tolist() == [-1.0, 0.0]


def test_config_errors():
    with pytest.raises(ValueError, match="Invalid zoo name"):
        zoo_config("imagenet_inr")
    with pytest.raises(ValueError, match="Invalid zoo size"):
        zoo_config("digits_inr", "huge")
    with pytest.raises(ValueError, match="Invalid config fields"):
        zoo_config("digits_inr", views_per_image=3)


# ----------------------------------------------------- format and resume


def test_inr_zoo_loads_with_records_and_fit(inr_zoo):
    zoo = load_zoo(inr_zoo)
    header = read_header(inr_zoo)
    assert header["status"] == "complete" and header["num_chunks"] == 4
    assert len(zoo) == 16 and zoo.labels.dtype == torch.long
    assert zoo.extras["target"].shape == (16, 8, 8)
    assert header["summary"]["fit"]["psnr_db"]["min"] > 30
    coords = coordinates((8, 8))
    for i, net in enumerate(zoo.nets):
        target = zoo.extras["target"][i]
        # The fit is far below the image's variance ...
        assert net["mse"] < 1e-3 * target.var()
        # ... and the stored weights reproduce it in a module built from the spec.
        with torch.no_grad():
            image = zoo.module(i)(coords).reshape(8, 8)
        assert torch.allclose(
            (image - target).pow(2).mean(),
            torch.tensor(net["mse"]),
            rtol=1e-3,
            atol=1e-9,
        )
        pair = zoo.nets[net["pair"]]
        assert pair["pair"] == i and pair["init_seed"] == net["init_seed"]
        assert {pair["target"], net["target"]} == {"image", "dilated"}
        assert pair["item"] == net["item"]
        if net["target"] == "dilated":
            image = zoo.extras["target"][pair["index"]]
            assert torch.equal(target, dilate(image[None])[0])


def test_views_of_one_image_differ(inr_zoo):
    zoo = load_zoo(inr_zoo)
    first = [i for i, n in enumerate(zoo.nets) if n["target"] == "image"][:2]
    a, b = (zoo.state_dict(i) for i in first)
    assert zoo.nets[first[0]]["item"] == zoo.nets[first[1]]["item"]
    assert zoo.nets[first[0]]["view"] != zoo.nets[first[1]]["view"]
    assert (a["2.weight"] - b["2.weight"]).abs().mean() > 1e-2


def test_same_seed_same_bytes_other_seed_other_weights(inr_zoo, tmp_path):
    again = build_zoo("digits_inr", tmp_path / "a", progress=False, config=TINY_INR)
    assert chunk_digests(again) == chunk_digests(inr_zoo)
    other = build_zoo(
        "digits_inr", tmp_path / "b", seed=1, progress=False, config=TINY_INR
    )
    w0, w1 = load_zoo(inr_zoo).params, load_zoo(other).params
    assert not torch.equal(w0["siren"]["2.weight"], w1["siren"]["2.weight"])


def test_killed_build_resumes_to_the_same_bytes(inr_zoo, tmp_path):
    out = tmp_path / "zoo"
    build_zoo("digits_inr", out, progress=False, config=TINY_INR, max_chunks=2)
    assert read_header(out)["status"] == "building"
    with pytest.raises(ValueError, match="incomplete"):
        load_zoo(out)
    # What a kill in the middle of chunk 2 leaves: a temporary file, and
    # possibly the tensors without the JSON that completes the chunk.
    (out / ".chunk_00002.safetensors.tmp-123").write_bytes(b"partial")
    (out / "chunk_00002.safetensors").write_bytes(b"half-written")
    build_zoo("digits_inr", out, progress=False, config=TINY_INR)
    assert chunk_digests(out) == chunk_digests(inr_zoo)
    assert not list(out.glob(".*tmp*"))
    header = read_header(out)
    assert header["status"] == "complete"
    assert [s["chunks_built"] for s in header["build_sessions"]] == [2, 2]


def test_resume_refuses_a_different_zoo(inr_zoo):
    with pytest.raises(ValueError, match="holds a different zoo"):
        build_zoo("digits_inr", inr_zoo, seed=5, progress=False, config=TINY_INR)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupted_and_missing_chunks_raise(inr_zoo, tmp_path):
    bad = _copy(inr_zoo, tmp_path / "bad")
    data = bytearray((bad / "chunk_00001.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one weight's low byte
    (bad / "chunk_00001.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="chunk_00001.safetensors is corrupted"):
        load_zoo(bad)
    gone = _copy(inr_zoo, tmp_path / "gone")
    (gone / "chunk_00003.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing chunk 3"):
        load_zoo(gone)
    garbled = _copy(inr_zoo, tmp_path / "garbled")
    (garbled / "chunk_00000.json").write_text("{not json")
    with pytest.raises(ValueError, match="chunk_00000.json is corrupted"):
        load_zoo(garbled)
    with pytest.raises(FileNotFoundError, match="No zoo"):
        load_zoo(tmp_path)


def test_cli_build_and_info(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["build", "mnist1d_inr", "--out", str(out), "--quick", "--no-progress"]
    args += ["--set", "num_items=3", "--set", "views=1", "--set", "steps=5"]
    assert main(args) == 0
    header = json.loads((out / "zoo.json").read_text())
    assert header["config"]["num_items"] == 3 and header["num_nets"] == 3
    assert "--set num_items=3" in header["build_command"]
    assert "peak RSS" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "status: complete" in capsys.readouterr().out


# ------------------------------------------------------------ CNN zoos

TINY_CNN = {"runs": 8, "runs_per_chunk": 4, "checkpoints": [5, 40]}
TINY_WILD = {
    "architectures": 6,
    "runs_per_architecture": 2,
    "checkpoints": [20],
    "depths": [2, 3],
    "widths": [4, 6],
    "batchnorm": [True],  # cnn_digits covers nets without
}


@pytest.fixture(scope="module")
def cnn_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "cnn"
    return build_zoo("cnn_digits", out, progress=False, config=TINY_CNN)


@pytest.fixture(scope="module")
def wild_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "wild"
    return build_zoo("cnn_wild", out, progress=False, config=TINY_WILD)


def _accuracy(module: torch.nn.Module) -> float:
    from lopt.weightspace.zoos.cnn_training import digits_images

    _, _, x_test, y_test = digits_images()
    with torch.no_grad():
        return (module(x_test).argmax(1) == y_test).float().mean().item()


def test_cnn_zoo_records_and_label_spread(cnn_zoo):
    zoo = load_zoo(cnn_zoo)
    assert len(zoo) == 16 and zoo.labels.dtype == torch.float32
    assert {n["step"] for n in zoo.nets} == {5, 40}
    assert {n["hparams"]["optimizer"] for n in zoo.nets} == {"adam", "sgd"}
    # Some nets near chance, some far above it: the label ranks something.
    labels = zoo.labels
    assert labels.min() < 0.2 and labels.max() > 0.5
    summary = read_header(cnn_zoo)["summary"]
    assert sum(summary["test_accuracy_histogram"]["counts"]) == 16
    for run in {n["run"] for n in zoo.nets}:  # splits by run
        assert len({n["split"] for n in zoo.nets if n["run"] == run}) == 1


def test_cnn_modules_reproduce_stored_accuracy(cnn_zoo, wild_zoo):
    for path in (cnn_zoo, wild_zoo):
        zoo = load_zoo(path)
        best = int(zoo.labels.argmax())
        for i in (0, best):
            assert _accuracy(zoo.module(i)) == pytest.approx(
                zoo.labels[i].item(), abs=1e-6
            )
    # BatchNorm nets in eval mode use the running statistics training stored.
    zoo = load_zoo(wild_zoo)
    bn = [i for i, n in enumerate(zoo.nets) if zoo.specs[n["spec"]]["batchnorm"]]
    assert bn
    for i in bn[:2]:
        assert _accuracy(zoo.module(i)) == pytest.approx(zoo.labels[i].item(), abs=1e-6)
        stats = zoo.state_dict(i)["features.0.norm.running_var"]
        assert not torch.allclose(stats, torch.ones_like(stats))


def test_cnn_chunks_are_deterministic(cnn_zoo, tmp_path):
    part = build_zoo(
        "cnn_digits", tmp_path / "cnn", progress=False, config=TINY_CNN, max_chunks=1
    )
    assert chunk_digests(part).items() <= chunk_digests(cnn_zoo).items()
    assert len(chunk_digests(part)) == 2  # chunk 0: tensors and JSON


def test_wild_zoo_holds_out_whole_families(wild_zoo):
    zoo = load_zoo(wild_zoo)
    splits = read_header(wild_zoo)["splits"]
    assert splits["test_families"] and splits["test_specs"]
    test_specs = {n["spec"] for n in zoo.nets if n["split"] == "test"}
    seen_specs = {n["spec"] for n in zoo.nets if n["split"] != "test"}
    assert test_specs == set(splits["test_specs"]) and not test_specs & seen_specs
    test_families = {n["family"] for n in zoo.nets if n["split"] == "test"}
    seen_families = {n["family"] for n in zoo.nets if n["split"] != "test"}
    assert test_families == set(splits["test_families"])
    assert not test_families & seen_families
    assert len({json.dumps(s, sort_keys=True) for s in zoo.specs.values()}) == 6
    for spec_id in zoo.specs:  # every architecture loads strictly
        first = next(i for i, n in enumerate(zoo.nets) if n["spec"] == spec_id)
        assert 0.0 <= _accuracy(zoo.module(first)) <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["digits_inr", "mnist1d_inr", "cnn_digits", "cnn_wild"]
)
def test_quick_zoos_build_with_good_fits_and_spread_labels(name, tmp_path):
    header = read_header(build_zoo(name, tmp_path / name, progress=False, threads=1))
    assert header["status"] == "complete"
    summary = header["summary"]
    if name.endswith("_inr"):
        assert summary["fit"]["mse_over_target_variance"]["q90"] < 1e-2
        assert all(summary["split_counts"].values())
    else:
        accuracy = summary["test_accuracy"]
        assert accuracy["q10"] < 0.2 and accuracy["q90"] > 0.8
