"""Orthogonalised updates for hidden weight matrices.

A rule's update ``U`` of a hidden weight matrix is replaced by the nearest
semi-orthogonal matrix to it, rescaled to ``U``'s Frobenius norm:

    U  ->  orth(U) * |U|_F / |orth(U)|_F

The rule (and its step-size controller) still decides how far each matrix
moves; orthogonalisation spreads that step evenly over the matrix's singular
directions instead of letting a few dominant ones take it all, which is what
makes Muon fast on transformers. On the validation jobs
(``python -m benchmarks.optim.workloads.validation``) it took a GPT on Python
source from 1.412 to 1.285 validation loss and cost an MLP on tabular data
about 1.5 points of accuracy; see ``docs/method.md``.

Which tensors are hidden matrices (:func:`hidden_matrices`): 2-D tensors
other than the first and the last 2-D tensor in parameter order (the input
layer or embedding, and the output head), unless a param group says
otherwise with its ``"orthogonal"`` key (``True`` / ``False`` for every
2-D tensor of the group). Conv kernels and 1-D parameters are never
orthogonalised.

``orth`` is a quintic Newton-Schulz iteration (five steps, batched over
matrices of one shape) on ``U / |U|_F``, with the coefficients Muon's
authors published; it pushes every singular value towards 1 without an SVD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from lopt.graph import NeuralGraph

__all__ = [
    "ORTHOGONAL_KEY",
    "OrthoGroup",
    "OrthoPlan",
    "hidden_matrices",
    "newton_schulz",
    "orthogonalize",
    "ortho_plan",
    "orthogonalize_flat",
    "orthogonalize_steps",
    "snapshot",
]

#: Param-group key that marks (``True``) or unmarks (``False``) the group's
#: 2-D tensors as hidden matrices.
ORTHOGONAL_KEY = "orthogonal"
#: Newton-Schulz steps and their quintic coefficients (Muon's).
NS_STEPS = 5
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: Floor of a matrix norm divided by: small enough that the iteration is
#: scale-free (the fused path relies on that), nonzero for zero updates.
_TINY = 1e-30


def newton_schulz(x: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately orthogonalise each matrix of ``x`` (``(B, m, n)``):
    the same singular vectors, singular values pushed to about 1 (0.7-1.2
    after five steps). Differentiable; ``x`` is not modified."""
    a, b, c = NS_COEFFICIENTS
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp_min(_TINY)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def orthogonalize(u: torch.Tensor) -> torch.Tensor:
    """``orth(u) * |u|_F / |orth(u)|_F`` per matrix of ``(..., m, n)``: the
    update spread evenly over its singular directions, at its own size;
    zero matrices stay zero."""
    ortho = newton_schulz(u)
    size = torch.linalg.matrix_norm(u, keepdim=True)
    return ortho * (
        size / torch.linalg.matrix_norm(ortho, keepdim=True).clamp_min(_TINY)
    )


def hidden_matrices(
    shapes: Sequence[torch.Size],
    marks: Sequence[bool | None] | None = None,
    order: Sequence[int] | None = None,
) -> list[int]:
    """Indices (parameter indices, listed in ``order``) of the hidden matrices
    among tensors of ``shapes``: every (non-empty) 2-D tensor except the
    first and the last one in ``order`` (the network's order: a graph's
    :attr:`~lopt.graph.NeuralGraph.tensor_order`; default: as given), with
    ``marks[i]`` (``True``/``False``, from the param group's
    :data:`ORTHOGONAL_KEY`) overriding the guess for tensor ``i``."""
    order = range(len(shapes)) if order is None else order
    matrices = [i for i in order if len(shapes[i]) == 2 and min(shapes[i]) > 0]
    guess = set(matrices[1:-1])
    out = []
    for i in matrices:
        mark = marks[i] if marks is not None else None
        if mark if mark is not None else i in guess:
            out.append(i)
    return out


class OrthoGroup(NamedTuple):
    """The hidden matrices of one shape ``(m, n)``, ``k`` of them."""

    shape: tuple[int, int]
    index: torch.Tensor  # (k, m * n) int64: their scalars in the flat graph order
    positions: torch.Tensor  # (k,) int64: their graph-order positions
    params: tuple[int, ...]  # their parameter indices


class OrthoPlan(NamedTuple):
    """The hidden matrices of a graph, batched by shape (one
    :class:`OrthoGroup` per shape: the step loops over shapes, never over
    matrices)."""

    groups: tuple[OrthoGroup, ...]
    indices: tuple[int, ...]  # parameter indices of the hidden matrices

    def __bool__(self) -> bool:
        return bool(self.indices)


def ortho_plan(graph: NeuralGraph, indices: Sequence[int]) -> OrthoPlan:
    """The :class:`OrthoPlan` of the parameters ``indices`` of ``graph``
    (index tensors on the graph's device)."""
    device = graph.tensor_id.device
    position = graph.tensor_position.tolist()
    starts = [0]
    for n in graph.numels:
        starts.append(starts[-1] + n)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        by_shape.setdefault(tuple(graph.shapes[i]), []).append(i)
    groups = []
    for (m, n), members in by_shape.items():
        first = torch.tensor([starts[position[i]] for i in members], device=device)
        index = first[:, None] + torch.arange(m * n, device=device)
        pos = torch.tensor([position[i] for i in members], device=device)
        groups.append(OrthoGroup((m, n), index, pos, tuple(members)))
    return OrthoPlan(tuple(groups), tuple(indices))


def orthogonalize_flat(update: torch.Tensor, plan: OrthoPlan) -> torch.Tensor:
    """``update`` (``(P,)``, graph order) with each hidden matrix's block
    replaced by its rescaled orthogonalisation. Without autograd the blocks
    are overwritten in place; with it a new tensor is returned."""
    for group in plan.groups:
        m, n = group.shape
        new = orthogonalize(update[group.index].view(-1, m, n)).flatten(1)
        if torch.is_grad_enabled():
            update = update.index_put((group.index,), new)
        else:
            update.index_put_((group.index,), new)
    return update


def snapshot(plan: OrthoPlan, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The hidden matrices among ``tensors`` (parameter order), stacked per
    :class:`OrthoGroup`: copies taken before a fused step."""
    return [torch.stack([tensors[i] for i in g.params]) for g in plan.groups]


def orthogonalize_steps(
    plan: OrthoPlan,
    tensors: Sequence[torch.Tensor],
    before: Sequence[torch.Tensor],
    decay: Callable[[OrthoGroup], torch.Tensor | float],
) -> None:
    """After a step that updated ``tensors`` (parameter order) in place from
    ``before`` (:func:`snapshot`): the same result as orthogonalising the
    rule's update (:func:`orthogonalize_flat`), done on the step's change.
    This is the fused path's form, whose kernel writes parameters itself.

    ``decay(group)`` is the weight decay's share of each matrix's change as a
    factor of its old value (``(k,)`` or a float). The rest of the change is
    the rule's update times the step size, and orthogonalisation with the
    norm kept commutes with that positive factor."""
    for group, old in zip(plan.groups, before):
        targets = [tensors[i] for i in group.params]
        factor = decay(group)
        if isinstance(factor, torch.Tensor):
            factor = factor.to(old.dtype).view(-1, 1, 1)
        dec = factor * old
        rule_part = torch.stack(targets) - old - dec
        new = old + dec + orthogonalize(rule_part)
        torch._foreach_copy_(targets, list(new.unbind(0)))
