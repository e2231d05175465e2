"""Distillation of a rule into another architecture (meta_train.distill)."""

import json

import pytest
import torch

from lopt.optim.rule import RuleConfig, UpdateRule, load_rule, save_rule
from lopt.tasks.families import MLPFamily
from meta_train.distill import collect_snapshots, distil, main, relative_update_error
from meta_train.trainer import transplant

LEAN = {"edge_mlp": False, "edge_head_hidden": 0}


def _teacher() -> UpdateRule:
    torch.manual_seed(0)
    rule = UpdateRule(RuleConfig(node_dim=8, head_hidden=8))
    with torch.no_grad():  # a teacher whose learned paths matter
        for p in rule.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return rule


def _snapshots(teacher, count=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    family = MLPFamily(widths=(8, 16), max_depth=1, batch_sizes=(16,))
    configs = [family.sample(gen) for _ in range(count)]
    return collect_snapshots(teacher, configs, [12] * count, per_task=4, progress=False)


def test_snapshots_hold_the_teachers_updates():
    teacher = _teacher()
    snaps = _snapshots(teacher)
    assert len(snaps) >= 4
    for snap in snaps:
        assert snap.target.shape == snap.params.shape and snap.target.abs().sum() > 0
        error = relative_update_error(teacher, snap).item()
        assert error == pytest.approx(0, abs=1e-10)


def test_distillation_lowers_the_held_out_error_of_a_lean_student():
    teacher = _teacher()
    train, val = _snapshots(teacher, seed=0), _snapshots(teacher, seed=1)
    student = transplant(teacher, RuleConfig(node_dim=8, head_hidden=8, **LEAN))
    start = sum(relative_update_error(student, s).item() for s in val) / len(val)
    assert start > 1e-3  # the lean student does not match by construction
    student, log = distil(
        student, train, val, iterations=100, lr=1e-2, val_every=20,
        progress=False,
    )  # fmt: skip
    assert log[0]["val_error"] == pytest.approx(start)
    end = sum(relative_update_error(student, s).item() for s in val) / len(val)
    assert end == pytest.approx(min(row["val_error"] for row in log))
    assert end < 0.8 * start


def test_cli_saves_a_loadable_student_with_provenance(tmp_path):
    teacher_dir = save_rule(_teacher(), tmp_path / "teacher")
    args = [
        "--teacher", str(teacher_dir), "--out", str(tmp_path / "out"),
        "--rule", json.dumps(LEAN), "--tasks", "2", "--val-tasks", "1",
        "--per-task", "3", "--horizon", "8,12", "--widths", "8", "--iterations", "4",
        "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    rule = load_rule(tmp_path / "out" / "best_rule")
    assert not rule.config.edge_mlp and rule.config.edge_hidden == 0
    meta = rule.metadata
    assert meta["command"].startswith("python -m meta_train.distill")
    assert meta["teacher_path"] == str(teacher_dir)
    assert meta["distillation"]["train_snapshots"] > 0


def test_cli_rejects_bad_rule_overrides(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--rule", "[1, 2]"])
    assert "--rule must be a JSON object" in capsys.readouterr().err


def test_student_driven_snapshots_are_labelled_by_the_teacher():
    teacher = _teacher()
    student = transplant(teacher, RuleConfig(node_dim=8, head_hidden=8, **LEAN))
    gen = torch.Generator().manual_seed(0)
    family = MLPFamily(widths=(8,), max_depth=1, batch_sizes=(16,))
    config = family.sample(gen)
    own = collect_snapshots(teacher, [config], [12], per_task=4, progress=False)
    driven = collect_snapshots(
        teacher, [config], [12], per_task=4, progress=False, driver=student
    )
    assert len(own) == len(driven)
    # the first snapshot is the same state; later ones follow the student
    assert torch.equal(own[0].params, driven[0].params)
    assert not torch.equal(own[-1].params, driven[-1].params)
    for snap in driven:  # targets are the teacher's, not the driver's
        assert relative_update_error(teacher, snap).item() == pytest.approx(
            0, abs=1e-10
        )
        assert relative_update_error(student, snap).item() > 1e-6


def test_cli_dagger_rounds_start_from_a_saved_student(tmp_path):
    teacher_dir = save_rule(_teacher(), tmp_path / "teacher")
    common = [
        "--teacher", str(teacher_dir), "--rule", json.dumps(LEAN), "--tasks", "1",
        "--val-tasks", "1", "--per-task", "3", "--horizon", "8,12", "--widths", "8",
        "--iterations", "3", "--no-progress",
    ]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    first = str(tmp_path / "a" / "best_rule")
    assert (
        main(
            [*common, "--out", str(tmp_path / "b"), "--student", first, "--rounds", "2"]
        )
        == 0
    )
    log = json.loads((tmp_path / "b" / "log.json").read_text())
    assert {row["round"] for row in log} == {0, 1}
    assert (
        load_rule(tmp_path / "b" / "best_rule").metadata["distillation"]["rounds"] == 2
    )
    with pytest.raises(SystemExit):  # a student of another architecture
        main([*common, "--out", str(tmp_path / "c"), "--student", str(teacher_dir)])
