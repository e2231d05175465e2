"""MetaTrainConfig's override dicts are checked when the config is made."""

from __future__ import annotations

import pytest

from meta_train.config import PRESETS, MetaTrainConfig


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("rule", {"node_dimm": 8}),
        ("step_size", {"step_adapt_rate": 0.1}),  # old names belong in rule
        ("family", {"widthz": (8,)}),
        ("val_family", {"depth": 2}),
    ],
)
def test_unknown_override_keys_are_named(field, overrides):
    key = next(iter(overrides))
    with pytest.raises(ValueError, match=f"Invalid {field} overrides: \\['{key}'\\]"):
        MetaTrainConfig(**{field: overrides})


def test_known_overrides_and_presets_pass():
    config = MetaTrainConfig(
        rule={"degree_features": True, "step_adapt_rate": 0.05},
        step_size={"norm": 0.95},
        family={"widths": (8, 16)},
        val_family={"max_depth": 2},
    )
    # JSON turns tuples into lists; the trainer turns them back
    assert MetaTrainConfig.from_json(config.to_json()).to_json() == config.to_json()
    assert PRESETS  # built at import, through the same checks
