"""Gradient-boosted trees as tensors: what StatNN (GBT) keeps of a fitted
scikit-learn model, so that it predicts in torch and saves as safetensors.

scikit-learn fits the trees (:class:`~sklearn.ensemble.
HistGradientBoostingRegressor` / ``...Classifier``); :meth:`TreeEnsemble.
load_sklearn` copies every tree's nodes (split feature, threshold, where
missing values go, children, leaf values) into padded ``(trees, nodes)``
buffers. Prediction walks all trees for all rows at once, one tree level per
step, so a fitted ensemble is plain tensors: it saves in a ``state_dict``
(no pickle) and loads into a fresh module.
"""

from __future__ import annotations

import torch
from torch import nn

from lopt.weightspace.models.features import adopt_buffer_shapes

__all__ = ["TreeEnsemble"]

#: Buffers of a fitted ensemble and their dtypes (empty until fitted).
_BUFFERS = {
    "feature": torch.long,  # (T, M) split feature of each node
    "threshold": torch.float64,  # (T, M) go left when x <= threshold
    "missing_left": torch.bool,  # (T, M) where a NaN feature goes
    "left": torch.long,  # (T, M) children (node indices)
    "right": torch.long,
    "leaf": torch.bool,  # (T, M) leaves (and padding) end the walk
    "value": torch.float64,  # (T, M) leaf values
    "tree_output": torch.long,  # (T,) the raw output column each tree adds to
    "baseline": torch.float64,  # (K,) the raw prediction before any tree
    "classes": torch.long,  # (C,) class labels; empty for regression
}


#: Buffer -> (field of scikit-learn's node records, value of padding nodes).
#: Padding nodes are leaves of value 0 that no walk reaches.
_NODE_FIELDS = {
    "feature": ("feature_idx", 0),
    "threshold": ("num_threshold", 0.0),
    "missing_left": ("missing_go_to_left", False),
    "left": ("left", 0),
    "right": ("right", 0),
    "leaf": ("is_leaf", True),
    "value": ("value", 0.0),
}


class TreeEnsemble(nn.Module):
    """A fitted gradient-boosted tree ensemble, as buffers.

    The raw prediction is ``baseline[k]`` plus the leaf value of every tree
    of output ``k`` (:meth:`raw`); :meth:`forward` maps it through the
    model's link: identity (regression), a sigmoid (two classes) or a
    softmax (more).

    Shapes:
        - **input:** features ``(N, F)``
        - **output:** ``(N,)`` for regression, class probabilities
          ``(N, C)`` (columns in the order of :attr:`classes`) otherwise
    """

    def __init__(self):
        super().__init__()
        for name, dtype in _BUFFERS.items():
            self.register_buffer(name, torch.zeros(0, dtype=dtype))

    @property
    def fitted(self) -> bool:
        return len(self.baseline) > 0

    @torch.no_grad()
    def load_sklearn(self, estimator) -> TreeEnsemble:
        """Copy the trees of a fitted ``HistGradientBoostingRegressor`` or
        ``HistGradientBoostingClassifier`` (squared error / log loss); returns
        ``self``.

        Raises:
            ValueError: another loss (its link is not implemented here) or
                categorical splits.
        """
        if estimator.loss not in ("squared_error", "log_loss"):
            raise ValueError(
                f"Invalid loss: {estimator.loss!r} (TreeEnsemble implements "
                "'squared_error' and 'log_loss')"
            )
        trees = [
            (k, tree.nodes)
            for iteration in estimator._predictors
            for k, tree in enumerate(iteration)
        ]
        if any(nodes["is_categorical"].any() for _, nodes in trees):
            raise ValueError("TreeEnsemble supports numerical splits only")
        width = max(len(nodes) for _, nodes in trees)
        for name, (field, fill) in _NODE_FIELDS.items():
            dtype = _BUFFERS[name]
            rows = torch.full((len(trees), width), fill, dtype=dtype)
            for t, (_, nodes) in enumerate(trees):
                column = torch.as_tensor(nodes[field].astype("float64"))
                rows[t, : len(nodes)] = column.to(dtype)
            setattr(self, name, rows)
        self.tree_output = torch.tensor([k for k, _ in trees], dtype=torch.long)
        self.baseline = torch.as_tensor(
            estimator._baseline_prediction, dtype=torch.float64
        ).reshape(-1)
        classes = getattr(estimator, "classes_", None)
        self.classes = (
            torch.zeros(0, dtype=torch.long)
            if classes is None
            else torch.as_tensor(classes).long()
        )
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fitted ensemble's sizes are known only from its state_dict.
        adopt_buffer_shapes(self, state_dict, prefix, tuple(_BUFFERS))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` raw predictions (before the link), in float64."""
        if not self.fitted:
            raise RuntimeError("TreeEnsemble: load_sklearn(...) a fitted model first")
        x = x.double()
        n, trees = x.shape[0], self.feature.shape[0]
        tree = torch.arange(trees, device=x.device).expand(n, trees)
        row = torch.arange(n, device=x.device)[:, None]
        node = torch.zeros(n, trees, dtype=torch.long, device=x.device)
        # One tree level per step, every row and tree at once.
        for _ in range(self.feature.shape[1]):
            done = self.leaf[tree, node]
            if bool(done.all()):
                break
            value = x[row, self.feature[tree, node]]
            go_left = torch.where(
                value.isnan(),
                self.missing_left[tree, node],
                value <= self.threshold[tree, node],
            )
            child = torch.where(go_left, self.left[tree, node], self.right[tree, node])
            node = torch.where(done, node, child)
        out = self.baseline.expand(n, -1).clone()
        return out.index_add_(1, self.tree_output, self.value[tree, node])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.raw(x)
        if not len(self.classes):
            return raw[:, 0]
        if raw.shape[1] == 1:
            p = torch.sigmoid(raw[:, 0])
            return torch.stack([1 - p, p], dim=1)
        return raw.softmax(dim=1)

    def extra_repr(self) -> str:
        if not self.fitted:
            return "unfitted"
        return f"trees={self.feature.shape[0]}, outputs={len(self.baseline)}"
