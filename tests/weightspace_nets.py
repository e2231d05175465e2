"""Small networks for the weight-space tests, each with the permutations of
its hidden neurons that leave its function unchanged, and the helpers that
match a permuted network's graph to the original's."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial scales, shifts and running
    statistics (fresh ones are 1, 0, 0, 1: a permutation would not show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                m.running_var.copy_(1 + torch.rand(n, generator=gen))
    return model.eval()


def mlp(widths=(3, 6, 5, 2), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh() if i % 2 == 0 else nn.ReLU())
    return nn.Sequential(*layers).eval()


def cnn(channels=(4, 5), kernel=3, seed=0) -> nn.Sequential:
    """For 6x6 inputs: two valid convs leave a (6 - 2 (k - 1))^2 map."""
    torch.manual_seed(seed)
    side = 6 - 2 * (kernel - 1)
    model = nn.Sequential(
        nn.Conv2d(2, channels[0], kernel),
        nn.ReLU(),
        nn.BatchNorm2d(channels[0]),
        nn.Conv2d(channels[0], channels[1], kernel),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(channels[1] * side * side, 3),
    )
    return randomise_norms(model, seed)


class ResidualCNN(nn.Module):
    """stem -> BN -> relu -> [conv -> BN -> relu -> conv -> BN] + skip -> relu
    -> global average pool -> linear."""

    def __init__(self, width: int = 4, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, kernel, padding=pad)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel, padding=pad)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        r = F.relu(self.bn1(self.conv1(h)))
        h = F.relu(self.bn2(self.conv2(r)) + h)
        return self.head(self.pool(h).flatten(1))


def residual_cnn(width=4, kernel=3, seed=0) -> ResidualCNN:
    torch.manual_seed(seed)
    return randomise_norms(ResidualCNN(width, kernel), seed)


def _take(t: torch.Tensor, dim0=None, dim1=None, block: int = 1) -> torch.Tensor:
    if dim0 is not None:
        t = t[dim0]
    if dim1 is not None:
        # A linear after a flatten: input feature c * block + s is channel c.
        cols = (dim1[:, None] * block + torch.arange(block)).reshape(-1)
        t = t[:, cols]
    return t


def permute_state(state: dict, spec: dict) -> dict:
    """``state`` with ``spec[key] = (out_perm, in_perm[, block])`` applied."""
    out = {}
    for key, value in state.items():
        if key in spec:
            out[key] = _take(value, *spec[key]).clone()
        else:
            out[key] = value.clone()
    return out


def _bn(prefix, p):
    return {
        f"{prefix}.{k}": (p, None)
        for k in ("weight", "bias", "running_mean", "running_var")
    }


def symmetric_cases():
    """name -> (model, permuted state_dict, example input, hidden node groups).

    The groups list, in the graph's node creation order, the size and the
    permutation of each group of neurons (``None``: not permuted), so that
    new node ``j`` of a group is old node ``perm[j]``."""
    cases = {}
    model = mlp()
    p1, p2 = perm(6, 1), perm(5, 2)
    spec = {
        "0.weight": (p1, None),
        "0.bias": (p1, None),
        "2.weight": (p2, p1),
        "2.bias": (p2, None),
        "4.weight": (None, p2),
    }
    groups = [(3, None), (6, p1), (5, p2), (2, None)]
    cases["mlp"] = (
        model,
        permute_state(model.state_dict(), spec),
        torch.randn(4, 3),
        groups,
    )

    model = cnn()
    p1, p2 = perm(4, 3), perm(5, 4)
    spec = {
        "0.weight": (p1, None),
        "0.bias": (p1, None),
        **_bn("2", p1),
        "3.weight": (p2, p1),
        "3.bias": (p2, None),
        "6.weight": (None, p2, 4),
    }
    groups = [(2, None), (4, p1), (4, p1), (5, p2), (3, None)]
    x = torch.randn(4, 2, 6, 6)
    cases["cnn"] = (model, permute_state(model.state_dict(), spec), x, groups)

    model = residual_cnn()
    p0, p1 = perm(4, 5), perm(4, 6)
    spec = {
        "stem.weight": (p0, None),
        "stem.bias": (p0, None),
        **_bn("bn0", p0),
        "conv1.weight": (p1, p0),
        "conv1.bias": (p1, None),
        **_bn("bn1", p1),
        "conv2.weight": (p0, p1),
        "conv2.bias": (p0, None),
        **_bn("bn2", p0),
        "head.weight": (None, p0),
    }
    groups = [
        (2, None),
        (4, p0),
        (4, p0),
        (4, p1),
        (4, p1),
        (4, p0),
        (4, p0),
        (3, None),
    ]
    x = torch.randn(4, 2, 5, 5)
    cases["residual_cnn"] = (model, permute_state(model.state_dict(), spec), x, groups)
    return cases


def old_of_new(groups) -> torch.Tensor:
    """For each node of the permuted network's graph, its node in the
    original's graph."""
    parts, start = [], 0
    for size, p in groups:
        parts.append(start + (torch.arange(size) if p is None else p))
        start += size
    return torch.cat(parts)


def permuted_graphs(name: str, cases=None):
    """``(model, permuted model, input, graph, permuted graph, old_of_new)``
    for case ``name`` of :func:`symmetric_cases`."""
    from lopt.weightspace import to_graph

    model, permuted_state, x, groups = (cases or symmetric_cases())[name]
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permuted_state)
    return model, permuted, x, to_graph(model), to_graph(permuted), old_of_new(groups)


def edge_match(old, new, old_of_new) -> torch.Tensor:
    """For each edge of ``new``, the edge of ``old`` between the same
    (relabelled) neurons with the same type; asserts the edge sets are equal."""
    new_of_old = torch.empty_like(old_of_new)
    new_of_old[old_of_new] = torch.arange(len(old_of_new))

    def keys(graph, relabel):
        src, dst = relabel[graph.edge_index]
        return list(zip(src.tolist(), dst.tolist(), graph.edge_type.tolist()))

    old_keys = {k: i for i, k in enumerate(keys(old, new_of_old))}
    new_keys = keys(new, torch.arange(new.num_nodes))
    assert len(old_keys) == old.num_edges, "duplicate edges: matching is ambiguous"
    assert sorted(old_keys) == sorted(new_keys), "edge sets differ"
    return torch.tensor([old_keys[k] for k in new_keys])


class Siren(nn.Module):
    """A SIREN INR: ``sin(w0 * linear(x))`` layers (``w0`` is in the forward,
    not in the weights), then a linear output."""

    def __init__(self, widths=(2, 8, 8, 1), w0: float = 30.0):
        super().__init__()
        self.w0 = w0
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-2], widths[1:-1])
        )
        self.out = nn.Linear(widths[-2], widths[-1])

    def forward(self, x):
        for layer in self.layers:
            x = torch.sin(self.w0 * layer(x))
        return self.out(x)


def siren(widths=(2, 8, 8, 1), seed=0) -> Siren:
    torch.manual_seed(seed)
    return Siren(widths).eval()
