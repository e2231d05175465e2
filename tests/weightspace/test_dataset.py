"""Batching neural graphs of mixed architectures, and NeuralGraphDataset over
modules or a directory of safetensors + JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch_geometric.loader import DataLoader
from weightspace_nets import cnn, mlp, residual_cnn

from lopt.weightspace import (
    NeuralGraphDataset,
    NeuralGraphGNN,
    from_graph_outputs,
    save_network,
    sequential_from_config,
    to_graph,
)

TENSOR_KEYS = (
    "x",
    "edge_index",
    "edge_attr",
    "node_role",
    "node_type",
    "node_act",
    "node_layer",
    "node_pos",
    "edge_type",
    "edge_tensor",
    "param_node_pos",
    "param_edge_pos",
    "node_fx",
    "node_channel",
    "y",
)


def _zoo():
    return [
        mlp(widths=(3, 7, 2)),
        cnn(channels=(3, 4), kernel=3),
        residual_cnn(width=5, kernel=5),
        cnn(channels=(2, 6), kernel=2),
    ]


def _floating(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_dataloader_batches_mixed_architectures_as_a_disjoint_union():
    zoo = _zoo()
    dataset = NeuralGraphDataset(zoo, labels=[0.1, 0.2, 0.3, 0.4])
    assert dataset.kernel_size == (5, 5)  # the residual CNN's 5x5 kernels
    singles = [to_graph(m, kernel_size=(5, 5)) for m in zoo]
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch.num_graphs == 4
    assert (
        batch.ptr.tolist()
        == [0] + torch.tensor([g.num_nodes for g in singles]).cumsum(0).tolist()
    )
    assert batch.y.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # Edges of graph i point into graph i's nodes.
    graph_of_src = batch.batch[batch.edge_index[0]]
    assert torch.equal(graph_of_src, batch.batch[batch.edge_index[1]])
    for i, single in enumerate(singles):
        part = batch.get_example(i)
        for key in TENSOR_KEYS[:-1]:
            assert torch.equal(part[key], single[key]), (i, key)
        assert part.param_layout == single.param_layout
    # The parameter map works on the batch itself (positions were shifted).
    for model, state in zip(zoo, from_graph_outputs(batch)):
        expected = _floating(model.state_dict())
        assert list(state) == list(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_gnn_on_a_batch_equals_the_gnn_on_each_graph():
    dataset = NeuralGraphDataset(_zoo())
    gnn = NeuralGraphGNN(25, graph_out=2, node_dim=8, edge_dim=4).eval()
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    with torch.no_grad():
        together = gnn(batch)
        alone = [gnn(dataset[i]) for i in range(len(dataset))]
    assert together.graph.shape == (4, 2)
    torch.testing.assert_close(together.graph, torch.cat([a.graph for a in alone]))
    torch.testing.assert_close(together.node, torch.cat([a.node for a in alone]))
    torch.testing.assert_close(together.edge, torch.cat([a.edge for a in alone]))
    assert repr(gnn) == (
        "NeuralGraphGNN(edge_features=25, graph_out=2, node_dim=8, edge_dim=4, "
        "num_layers=3)"
    )
    with pytest.raises(ValueError, match="graphs have 25 edge features"):
        NeuralGraphGNN(9)(dataset[0])


def test_dataset_over_one_architecture_and_many_state_dicts():
    arch = mlp()
    states = [mlp(seed=s).state_dict() for s in range(3)]
    dataset = NeuralGraphDataset(
        [arch] * 3, labels=torch.tensor([1, 2, 3]), state_dicts=states
    )
    assert len(dataset) == 3
    assert repr(dataset) == "NeuralGraphDataset(3, kernel_size=())"
    for data, state in zip(dataset, states):
        assert torch.equal(from_graph_outputs(data)["0.weight"], state["0.weight"])
    assert dataset[2].y.tolist() == [3]


def test_bad_dataset_inputs_are_named():
    with pytest.raises(ValueError, match="got 2 labels for 3 networks"):
        NeuralGraphDataset([mlp()] * 3, labels=[0, 1])
    with pytest.raises(ValueError, match="got 1 state_dicts for 2 networks"):
        NeuralGraphDataset([mlp()] * 2, state_dicts=[mlp().state_dict()])
    bad = dict(mlp().state_dict())
    bad.pop("2.bias")
    with pytest.raises(ValueError, match=r"item 1: .*missing keys \['2.bias'\]"):
        NeuralGraphDataset([mlp()] * 2, state_dicts=[mlp().state_dict(), bad])
    with pytest.raises(ValueError, match="kernel_size"):
        NeuralGraphDataset([cnn()], kernel_size=(1, 1))
    with pytest.raises(ValueError, match="at least one"):
        NeuralGraphDataset([])


ARCH = {
    "layers": [
        ["Conv2d", {"in_channels": 1, "out_channels": 3, "kernel_size": [3, 3]}],
        ["ReLU", {}],
        ["AdaptiveAvgPool2d", {"output_size": 1}],
        ["Flatten", {}],
        ["Linear", {"in_features": 3, "out_features": 2}],
    ]
}


def test_directory_of_safetensors_and_json(tmp_path):
    models = []
    for i in range(3):
        torch.manual_seed(i)
        model = sequential_from_config(ARCH)
        save_network(tmp_path, f"net{i}", model.state_dict(), ARCH, y=float(i))
        models.append(model)
    dataset = NeuralGraphDataset.from_directory(tmp_path)
    assert len(dataset) == 3 and dataset.kernel_size == (3, 3)
    for data, model in zip(dataset, models):
        back = from_graph_outputs(data)
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert [d.y.item() for d in dataset] == [0.0, 1.0, 2.0]
    # Labels given explicitly win over the JSON ones.
    dataset = NeuralGraphDataset.from_directory(tmp_path, labels=[5, 6, 7])
    assert dataset[0].y.tolist() == [5]


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        NeuralGraphDataset.from_directory(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no"):
        NeuralGraphDataset.from_directory(tmp_path)
    model = sequential_from_config(ARCH)
    save_network(tmp_path, "a", model.state_dict(), ARCH, y=1.0)
    (tmp_path / "b.json").write_text(json.dumps({"architecture": ARCH}))
    with pytest.raises(FileNotFoundError, match="b.json has no weights file"):
        NeuralGraphDataset.from_directory(tmp_path)
    save_file({"0.weight": torch.zeros(3, 1, 5, 5)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"b: .*missing keys.*'0.bias'"):
        NeuralGraphDataset.from_directory(tmp_path, labels=[0, 1])
    save_network(tmp_path, "b", model.state_dict(), ARCH)
    with pytest.raises(ValueError, match=r"no 'y': \['b.json'\]"):
        NeuralGraphDataset.from_directory(tmp_path)
    with pytest.raises(ValueError, match="got 3 labels for 2 networks"):
        NeuralGraphDataset.from_directory(tmp_path, labels=[0, 1, 2])
    (tmp_path / "c.json").write_text(json.dumps({"arch": ARCH}))
    save_file({}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="c.json has no 'architecture'"):
        NeuralGraphDataset.from_directory(tmp_path, labels=[0, 1, 2])


def test_sequential_from_config_builds_only_known_layers():
    model = sequential_from_config(ARCH)
    assert isinstance(model[0], nn.Conv2d) and model[0].kernel_size == (3, 3)
    with pytest.raises(ValueError, match="Unknown layer 'Eval'"):
        sequential_from_config({"layers": [["Eval", {}]]})
    with pytest.raises(ValueError, match="must be a dict with 'layers'"):
        sequential_from_config([["Linear", {}]])


def test_transform_sees_a_copy():
    def scale(data):
        data.x *= 2
        return data

    dataset = NeuralGraphDataset([mlp()], transform=scale)
    first, second = dataset[0], dataset[0]
    torch.testing.assert_close(first.x, second.x)


def test_docs_example_runs_as_written():
    """The graphs-to-state_dicts example of docs/weightspace.md (marker
    "weightspace_graph"; tests/test_readme_examples.py checks that every
    marked snippet is run somewhere, and that this one is run here)."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "weightspace.md"
    text = doc.read_text(encoding="utf-8")
    (code,) = re.findall(
        r"<!-- tested: weightspace_graph -->\n```python\n(.*?)```", text, re.S
    )
    assert "from_graph_outputs" in code
    namespace: dict = {}
    exec(compile(code, "docs/weightspace.md:weightspace_graph", "exec"), namespace)
    assert namespace["dataset"].kernel_size == (5, 5)
    assert namespace["out"].graph.shape == (2, 1)
    deltas = namespace["deltas"]
    assert len(deltas) == 2 and deltas[1]["0.weight"].shape == (8, 1, 5, 5)
