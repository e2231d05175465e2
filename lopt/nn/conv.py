"""The one message-passing operator of the backbone."""

from __future__ import annotations

import torch
from torch import nn

from lopt.graph import EdgeDegree, edge_degree

__all__ = ["NGConv", "channel_linear", "mean_std_from_sums"]

_STD_EPS = 1e-5


def channel_linear(
    linear: nn.Linear, x: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply ``linear`` to channel-major ``x (F_in, n)``, giving ``(F_out, n)``
    (written into ``out`` when given)."""
    if linear.bias is None:
        return torch.matmul(linear.weight, x, out=out)
    return torch.addmm(linear.bias[:, None], linear.weight, x, out=out)


def mean_std_from_sums(
    sums: torch.Tensor, count: torch.Tensor, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``(|V|, d)`` each from per-node sums of values and of
    their squares ``(2d, |V|)`` over ``count`` edges (clamped to one)."""
    mean, mean_sq = (sums / count.clamp(min=1)).T.split(d, dim=1)
    std = torch.sqrt((mean_sq - mean * mean).clamp(min=0.0) + _STD_EPS)
    return mean, std


def _node_table(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` applied to node features ``(|V|, F)``, channel-major and
    contiguous ``(F_out, |V|)``: gathers over edges read it row by row."""
    return linear(x).T.contiguous()


def _spare(buffer: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The first ``rows`` rows of a dead ``(C, |E|)`` buffer to write a result
    into, or ``None`` (a fresh tensor) under autograd or when it is too small.
    Without autograd this halves the large allocations of a layer, and with
    them the page faults of fresh memory that dominate on a CPU."""
    if torch.is_grad_enabled() or len(buffer) < rows:
        return None
    return buffer[:rows]


class NGConv(nn.Module):
    r"""Message passing on neural graphs with FiLM-modulated messages and edge
    updates.

    For an edge :math:`(i \to j)` with embedding :math:`e_{ij}`:

    .. math::
        m_{ij} = \gamma(e_{ij}) \odot (A h_i + B h_j) + \beta(e_{ij})

    Nodes are projected before the gather, so the cost is
    :math:`O(|E| \cdot d_{msg})`. Each node aggregates messages separately over
    its fan-in (edges where it is ``dst``) and its fan-out (edges where it is
    ``src``), with mean and standard deviation (PNA-style), then

    .. math::
        h_j' = h_j + \mathrm{MLP}([h_j, \mathrm{mean}_{in}, \mathrm{std}_{in},
        \mathrm{mean}_{out}, \mathrm{std}_{out}])

        e_{ij}' = e_{ij} + W_2\, \sigma(W_e e_{ij} + W_s h_i' + W_t h_j')

    or, with ``edge_mlp=False``, the cheaper :math:`e_{ij}' = e_{ij} + W_s h_i'
    + W_t h_j'` (no per-edge matrix products or activation).

    Every operation is per node, per edge, or a symmetric aggregation, so the
    layer is equivariant to any relabelling of the nodes.

    A plain :class:`torch.nn.Module` rather than a PyTorch Geometric
    ``MessagePassing``: its gathers and fan-in/fan-out reductions are written
    out for channel-major tensors and cached degrees, so ``propagate`` would
    never run, and importing PyG (which pulls in ``torch._dynamo`` and
    generates code into the temp directory) would only slow ``import lopt``.
    The aggregation equals PyG's mean aggregation (tested).

    Edge tensors are **channel-major** ``(F_e, |E|)``: edges are as many as the
    weights of the network, and on a CPU long contiguous rows are several times
    faster to process than ``(|E|, F_e)``. Node tensors are node-major as
    usual (nodes are few).

    Args:
        node_dim (int): width of node embeddings.
        edge_dim (int): width of edge embeddings.
        msg_dim (int, optional): width of messages. (default: ``edge_dim``)
        edge_mlp (bool, optional): update edges through a per-edge MLP, or
            only add their two nodes' projections. (default: ``True``)

    Shapes:
        - **input:** node features :math:`(|V|, F_v)`, edge indices
          :math:`(2, |E|)`, edge features :math:`(F_e, |E|)`
        - **output:** node features :math:`(|V|, F_v)`, edge features
          :math:`(F_e, |E|)`
    """

    def __init__(
        self,
        node_dim: int,
        edge_dim: int,
        msg_dim: int | None = None,
        edge_mlp: bool = True,
    ):
        super().__init__()
        self.edge_mlp = edge_mlp
        self.node_dim_ = node_dim
        self.edge_dim = edge_dim
        self.msg_dim = msg_dim or edge_dim
        self.lin_src = nn.Linear(node_dim, self.msg_dim, bias=False)
        self.lin_dst = nn.Linear(node_dim, self.msg_dim, bias=False)
        self.film = nn.Linear(edge_dim, 2 * self.msg_dim)
        self.node_mlp = nn.Sequential(
            nn.Linear(node_dim + 4 * self.msg_dim, node_dim),
            nn.SiLU(),
            nn.Linear(node_dim, node_dim),
        )
        if edge_mlp:
            self.edge_lin = nn.Linear(edge_dim, edge_dim)
            self.edge_out = nn.Linear(edge_dim, edge_dim)
        self.edge_src = nn.Linear(node_dim, edge_dim, bias=False)
        self.edge_dst = nn.Linear(node_dim, edge_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        edge_lin = (self.edge_lin,) if self.edge_mlp else ()
        node_terms = (self.edge_src, self.edge_dst)
        for lin in (self.lin_src, self.lin_dst, *edge_lin, *node_terms):
            lin.reset_parameters()
        # FiLM starts as the identity modulation: gamma = 1, beta = 0.
        nn.init.zeros_(self.film.weight)
        with torch.no_grad():
            self.film.bias.zero_()
            self.film.bias[: self.msg_dim] = 1.0
        for layer in self.node_mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        # Residual branches start small so that a deep stack starts near identity.
        for lin in (self.node_mlp[-1], *((self.edge_out,) if self.edge_mlp else ())):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)
        # Without the edge MLP the node terms are the whole residual branch:
        # they start small too.
        if not self.edge_mlp:
            for lin in (self.edge_src, self.edge_dst):
                nn.init.normal_(lin.weight, std=0.01)

    def _mean_std(
        self,
        msg: torch.Tensor,
        msg_sq: torch.Tensor,
        index: torch.Tensor,
        count: torch.Tensor,
        num_nodes: int,
        sorted_index: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the messages ``(d, |E|)`` (and their squares) that
        share a node in ``index``, ``(|V|, d)`` each; ``count`` is the number
        of edges of each node. The same mean as PyTorch Geometric's ``"mean"``
        aggregation (sum divided by the count
        clamped to one), without counting the edges again every call. With a
        sorted ``index`` and no autograd, the same sums (in the same order) are
        segment sums (``segment_reduce`` has no double backward)."""
        if sorted_index and not torch.is_grad_enabled():
            lengths = count.expand(self.msg_dim, -1)
            parts = [
                torch.segment_reduce(m, "sum", lengths=lengths, axis=1)
                for m in (msg, msg_sq)
            ]
        else:
            zeros = msg.new_zeros(self.msg_dim, num_nodes)
            parts = [zeros.index_add(1, index, m) for m in (msg, msg_sq)]
        sums = torch.cat(parts)
        return mean_std_from_sums(sums, count, self.msg_dim)

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_attr: torch.Tensor,
        degree: EdgeDegree | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``degree``: the graph's :func:`edge_degree`, for callers that keep
        it (otherwise it is computed here)."""
        src, dst = edge_index[0], edge_index[1]
        num_nodes = x.shape[0]
        if degree is None:
            degree = edge_degree(edge_index, num_nodes)
        # Buffers are reused without autograd (see _spare); in-place adds only
        # touch fresh results whose backward does not need them (gathers,
        # matrix products), so autograd is unaffected.
        film = channel_linear(self.film, edge_attr)
        gamma, beta = film.split(self.msg_dim, dim=0)
        proj = _node_table(self.lin_src, x).index_select(1, src)
        gathered = _node_table(self.lin_dst, x).index_select(1, dst)
        proj += gathered
        msg = torch.addcmul(beta, gamma, proj, out=_spare(proj, self.msg_dim))
        msg_sq = torch.mul(msg, msg, out=_spare(gathered, self.msg_dim))
        in_mean, in_std = self._mean_std(
            msg, msg_sq, dst, degree.fan_in, num_nodes, degree.dst_sorted
        )
        out_mean, out_std = self._mean_std(msg, msg_sq, src, degree.fan_out, num_nodes)
        x = x + self.node_mlp(torch.cat([x, in_mean, in_std, out_mean, out_std], 1))
        if not self.edge_mlp:
            node_terms = _node_table(self.edge_src, x).index_select(1, src)
            node_terms += _node_table(self.edge_dst, x).index_select(1, dst)
            return x, edge_attr + node_terms
        hidden = channel_linear(
            self.edge_lin, edge_attr, out=_spare(film, self.edge_dim)
        )
        spare = _spare(msg_sq, self.edge_dim)
        hidden += torch.index_select(_node_table(self.edge_src, x), 1, src, out=spare)
        hidden += torch.index_select(_node_table(self.edge_dst, x), 1, dst, out=spare)
        # silu's backward needs its input: in place only without autograd.
        act = nn.functional.silu(hidden, inplace=not torch.is_grad_enabled())
        edge_attr = channel_linear(
            self.edge_out, act, out=_spare(msg, self.edge_dim)
        ).add_(edge_attr)
        return x, edge_attr

    def __repr__(self) -> str:
        extra = "" if self.edge_mlp else ", edge_mlp=False"
        return (
            f"{self.__class__.__name__}(node_dim={self.node_dim_}, "
            f"edge_dim={self.edge_dim}, msg_dim={self.msg_dim}{extra})"
        )
