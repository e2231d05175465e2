"""``python -m benchmarks.optim.fingerprint``: bit-identity of trajectories."""

from __future__ import annotations

import json

from benchmarks.optim import fingerprint

ARGS = ["--steps", "3", "--tasks", "wine_logreg"]


def test_same_code_gives_the_same_fingerprints(tmp_path, capsys):
    saved = tmp_path / "fp.json"
    assert fingerprint.main([*ARGS, "--out", str(saved)]) == 0
    runs = json.loads(saved.read_text())["runs"]
    assert sorted(runs) == [
        "base/wine_logreg",
        "default/wine_logreg",
        "full/wine_logreg",
    ]
    assert len(set(runs.values())) == 3
    assert fingerprint.main([*ARGS, "--compare", str(saved)]) == 0
    assert "3/3 runs bit-identical" in capsys.readouterr().out


def test_a_changed_trajectory_is_reported(tmp_path, capsys):
    saved = tmp_path / "fp.json"
    fingerprint.main([*ARGS, "--out", str(saved)])
    data = json.loads(saved.read_text())
    data["runs"]["full/wine_logreg"] = "0" * 64
    saved.write_text(json.dumps(data))
    assert fingerprint.main([*ARGS, "--compare", str(saved)]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "2/3 runs bit-identical" in out
