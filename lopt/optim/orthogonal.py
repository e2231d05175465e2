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

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lopt.graph import NeuralGraph

__all__ = [
    "ORTHOGONAL_KEY",
    "OrthoPlan",
    "hidden_matrices",
    "newton_schulz",
    "ortho_plan",
    "orthogonalize_flat",
    "orthogonalize_deltas",
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


def _rescaled(u: torch.Tensor) -> torch.Tensor:
    """``orth(u) * |u|_F / |orth(u)|_F`` per matrix of ``(B, m, n)``; zero
    matrices stay zero."""
    ortho = newton_schulz(u)
    size = torch.linalg.matrix_norm(u, keepdim=True)
    return ortho * (
        size / torch.linalg.matrix_norm(ortho, keepdim=True).clamp_min(_TINY)
    )


def hidden_matrices(
    shapes: Sequence[torch.Size], marks: Sequence[bool | None] | None = None
) -> list[int]:
    """Indices (in parameter order) of the hidden matrices among tensors of
    ``shapes``: every (non-empty) 2-D tensor except the first and the last
    one, with
    ``marks[i]`` (``True``/``False``, from the param group's
    :data:`ORTHOGONAL_KEY`) overriding the guess for tensor ``i``."""
    matrices = [i for i, s in enumerate(shapes) if len(s) == 2 and min(s) > 0]
    guess = set(matrices[1:-1])
    out = []
    for i in matrices:
        mark = marks[i] if marks is not None else None
        if mark if mark is not None else i in guess:
            out.append(i)
    return out


class OrthoPlan(NamedTuple):
    """The hidden matrices of a graph, batched by shape.

    ``groups``: ``(shape, offsets, positions)`` per shape: the tensors'
    first scalars in the flat graph-order vector and their graph-order
    positions (for per-tensor step sizes)."""

    groups: tuple[tuple[tuple[int, int], tuple[int, ...], tuple[int, ...]], ...]
    indices: tuple[int, ...]  # parameter indices of the hidden matrices

    def __bool__(self) -> bool:
        return bool(self.indices)


def ortho_plan(graph: NeuralGraph, indices: Sequence[int]) -> OrthoPlan:
    """The :class:`OrthoPlan` of the parameters ``indices`` of ``graph``."""
    position = graph.tensor_position.tolist()
    numels = graph.numels
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + n)
    by_shape: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for i in indices:
        shape = tuple(graph.shapes[i])
        offsets, positions = by_shape.setdefault(shape, ([], []))
        offsets.append(starts[position[i]])
        positions.append(position[i])
    groups = tuple(
        (shape, tuple(offsets), tuple(positions))
        for shape, (offsets, positions) in by_shape.items()
    )
    return OrthoPlan(groups, tuple(indices))


def orthogonalize_flat(update: torch.Tensor, plan: OrthoPlan) -> torch.Tensor:
    """``update`` (``(P,)``, graph order) with each hidden matrix's block
    replaced by its rescaled orthogonalisation. Without autograd the blocks
    are overwritten in place; with it a new tensor is returned."""
    if not plan:
        return update
    inplace = not torch.is_grad_enabled()
    out = update if inplace else update.clone()
    for (m, n), offsets, _ in plan.groups:
        blocks = torch.stack([update[o : o + m * n].view(m, n) for o in offsets])
        new = _rescaled(blocks)
        for k, o in enumerate(offsets):
            out[o : o + m * n] = new[k].reshape(-1)
    return out


def orthogonalize_deltas(
    params: Sequence[torch.Tensor],
    before: Sequence[torch.Tensor],
    decay: Sequence[torch.Tensor | float],
) -> None:
    """After a step that updated the hidden matrices ``params`` in place
    from their values ``before``: the same result as orthogonalising the
    rule's update (:func:`orthogonalize_flat`), done on the step's change.
    This is the fused path's form, whose kernel writes parameters itself.

    ``decay[k]`` is the change weight decay made to matrix ``k`` (a tensor
    of its shape, or ``0.0``). The rest of the change is the rule's update
    times the step size, and orthogonalisation with the norm kept commutes
    with that positive factor."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, p in enumerate(params):
        by_shape.setdefault(tuple(p.shape), []).append(k)
    for ks in by_shape.values():
        old = torch.stack([before[k] for k in ks])
        dec = torch.stack(
            [
                torch.as_tensor(decay[k], dtype=old.dtype).expand_as(before[k])
                for k in ks
            ]
        )
        rule_part = torch.stack([params[k] for k in ks]) - old - dec
        new = old + dec + _rescaled(rule_part)
        for j, k in enumerate(ks):
            params[k].copy_(new[j])
