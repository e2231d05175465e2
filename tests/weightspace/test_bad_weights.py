"""Networks with NaN or infinite weights are caught where they enter: named in
a ValueError, or skipped and reported with on_bad="skip"; nothing the caller
passed is modified."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from lopt.weightspace import NeuralGraphDataset, WeightSpaceData, save_network
from lopt.weightspace.graph.screening import nonfinite_report
from lopt.weightspace.zoos import build_zoo
from lopt.weightspace.zoos.store import load_zoo, read_chunk, write_chunk


def _nets(n: int = 6) -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(n)
    ]


def _poison(net: nn.Module, value: float, where: str = "2.weight") -> None:
    with torch.no_grad():
        dict(net.named_parameters())[where].view(-1)[0] = value


def test_report_counts_nan_and_inf_per_tensor():
    state = {"a": torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])}
    state["b"], state["n"] = torch.ones(2), torch.tensor([3])  # ints are skipped
    assert nonfinite_report(state) == "a (1 NaN, 2 inf)"
    assert nonfinite_report({"b": torch.ones(2)}) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_from_modules_names_the_bad_network(value):
    nets = _nets()
    _poison(nets[3], value)
    with pytest.raises(ValueError, match=r"Invalid weights: network 3 .*2\.weight"):
        WeightSpaceData.from_modules(nets, [0.1 * i for i in range(6)])


def test_dataset_names_the_bad_network_and_counts_the_others():
    nets = _nets()
    _poison(nets[1], float("nan"), "0.bias")
    _poison(nets[4], float("inf"))
    with pytest.raises(ValueError, match=r"item 1 .*0\.bias \(1 NaN\).*1 more"):
        NeuralGraphDataset(nets)


def test_skip_leaves_out_the_bad_networks_and_their_rows_and_reports_them():
    nets = _nets()
    _poison(nets[1], float("nan"))
    _poison(nets[4], float("-inf"), "0.weight")
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    labels = torch.arange(6.0)
    extras = {"image": torch.arange(6.0)[:, None].expand(6, 3)}
    with pytest.warns(UserWarning, match=r"skipped 2 of 6 .*network 1.*network 4"):
        data = WeightSpaceData.from_modules(nets, labels, extras=extras, on_bad="skip")
    assert len(data) == 4
    assert [s.index for s in data.skipped] == [1, 4]
    assert [s.name for s in data.skipped] == ["network 1", "network 4"]
    assert "2.weight (1 NaN)" in data.skipped[0].reason
    assert data.y.tolist() == [0.0, 2.0, 3.0, 5.0]
    assert data.extras["image"][:, 0].tolist() == [0.0, 2.0, 3.0, 5.0]
    assert data.modules == [nets[i] for i in (0, 2, 3, 5)]
    assert all(torch.isfinite(g.edge_attr).all() for g in data.graphs)
    # Nothing the caller holds changed (NaN compared as NaN).
    for net, saved in zip(nets, before):
        for k, v in net.state_dict().items():
            assert torch.equal(v.nan_to_num(7.0), saved[k].nan_to_num(7.0))


def test_skip_with_every_network_bad_still_fails():
    nets = _nets(2)
    for net in nets:
        _poison(net, float("nan"))
    with pytest.raises(ValueError, match="every one of the 2 networks"):
        NeuralGraphDataset(nets, on_bad="skip")


def test_state_dicts_given_separately_are_screened():
    nets = _nets(3)
    states = [n.state_dict() for n in nets]
    states[2] = {k: v.clone() for k, v in states[2].items()}
    states[2]["0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="network 2"):
        WeightSpaceData.from_modules(nets, state_dicts=states)


def test_invalid_policy():
    with pytest.raises(ValueError, match="Invalid on_bad: 'drop'"):
        NeuralGraphDataset(_nets(2), on_bad="drop")
    with pytest.raises(ValueError, match="Invalid on_bad"):
        load_zoo("nowhere", on_bad="ignore")


def test_directory_names_the_file(tmp_path):
    arch = {"layers": [["Linear", {"in_features": 2, "out_features": 1}]]}
    for name, value in (("good", 1.0), ("broken", float("inf"))):
        save_network(
            tmp_path,
            name,
            {"0.weight": torch.full((1, 2), value), "0.bias": torch.zeros(1)},
            arch,
            y=0.5,
        )
    with pytest.raises(ValueError, match="broken has non-finite values"):
        NeuralGraphDataset.from_directory(tmp_path)
    with pytest.warns(UserWarning, match="broken"):
        dataset = NeuralGraphDataset.from_directory(tmp_path, on_bad="skip")
    assert len(dataset) == 1 and dataset.skipped[0].name == "broken"


@pytest.fixture(scope="module")
def nan_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    config = {"num_items": 2, "views": 1, "steps": 5, "nets_per_chunk": 2}
    path = build_zoo("digits_inr", root / "clean", progress=False, config=config)
    bad = root / "bad"
    shutil.copytree(path, bad)
    chunk = read_chunk(bad, 1)
    net = chunk.nets[0]
    key = next(iter(chunk.params[net["spec"]]))
    chunk.params[net["spec"]][key][net["row"]].view(-1)[0] = float("nan")
    write_chunk(bad, 1, chunk)  # with a matching checksum: only the NaN is wrong
    return path, bad, key


def test_zoo_loading_names_the_bad_network_or_skips_it(nan_zoo):
    clean, bad, key = nan_zoo
    full = load_zoo(clean)
    assert full.skipped == []
    with pytest.raises(ValueError, match=rf"Invalid weights: net 2 of zoo .*{key}"):
        load_zoo(bad)
    with pytest.warns(UserWarning, match="load_zoo skipped 1 of 4"):
        zoo = load_zoo(bad, on_bad="skip")
    assert len(zoo) == len(full) - 1 and [s.index for s in zoo.skipped] == [2]
    assert [n["index"] for n in zoo.nets] == list(range(len(zoo)))
    assert zoo.labels.tolist() == [full.labels[i] for i in (0, 1, 3)]
    assert torch.equal(zoo.extras["target"], full.extras["target"][[0, 1, 3]])
    assert torch.equal(zoo.state_dict(2)[key], full.state_dict(3)[key])
