"""``python -m benchmarks.weightspace`` on a tiny zoo: table, JSON, plot and
the acceptance block; plus its report on a hand-made result."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks.weightspace import run as bench
from lopt.weightspace.zoos import build_zoo

TINY_CNN = {"runs": 12, "runs_per_chunk": 12, "checkpoints": [5, 40]}
TINY = replace(
    bench.QUICK,
    seeds=2,
    epochs=2,
    patience=None,
    max_train=None,
    node_dim=8,
    layers=1,
    ngt_dim=8,
    nfn_hidden=4,
    mlp_hidden=8,
    tree_iters=5,
)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoos")
    build_zoo("cnn_digits", root / "cnn_digits", progress=False, config=TINY_CNN)
    return root


def test_benchmark_runs_every_model_and_writes_its_outputs(zoo_dir, tmp_path):
    results = bench.run_benchmark(TINY, zoo_dir, tasks=["cnn_digits"], progress=False)
    entry = results["tasks"]["cnn_digits"]
    assert set(entry["models"]) == {
        "ng_gnn",
        "ng_gnn_stats",
        "ng_t",
        "nfn",
        "flat",
        "flat_aug",
        "statnn",
        "statnn_gbt",
        "statnn_q",
    }
    for model in entry["models"].values():
        assert len(model["runs"]) == 2
        # tau is nan when a model predicts one value for every test network.
        assert all(not (abs(r["test"]["tau"]) > 1) for r in model["runs"])
        assert model["train_s_mean"] > 0
        assert all(len(r["history"]) == r["epochs_run"] for r in model["runs"])
    claims = [c["claim"] for c in results["acceptance"]]
    assert "cnn_digits: NG-GNN tau >= StatNN + 0.015" in claims
    assert "cnn_digits: NG-GNN +stats tau >= StatNN + 0.015" in claims
    results["provenance"] = {"command": "python -m benchmarks.weightspace --test"}
    paths = bench.write_outputs(results, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["tasks"]["cnn_digits"]["models"]["ng_gnn"]["label"] == "NG-GNN"
    text = paths["markdown"].read_text()
    assert "| cnn_digits | StatNN (GBT) | tau ↑ |" in text
    assert "--test" in text
    assert paths["plot"].stat().st_size > 1000


def test_opt_in_models_run_only_when_named(zoo_dir):
    named = ["ng_gnn_qstats", "ng_gnn_qstats_ln", "statnn_q"]
    results = bench.run_benchmark(
        replace(TINY, seeds=1), zoo_dir, ["cnn_digits"], named, progress=False
    )
    assert set(results["tasks"]["cnn_digits"]["models"]) == set(named)
    claims = [c["claim"] for c in results["acceptance"]]
    assert "cnn_digits: NG-GNN +qstats tau >= StatNN + 0.015" in claims
    assert "cnn_digits: NG-GNN +qstats +LN edges tau >= StatNN + 0.015" in claims
    from types import SimpleNamespace

    train = SimpleNamespace(edge_features=9, output_neurons=10)
    made = bench.model_factories("cnn_wild", TINY, train)
    assert bench.OPT_IN <= set(made)
    config = made["ng_gnn_qstats_ln"]().config
    assert config.layer_normalised_edges and config.neuron_statistics
    assert config.statistics_scaling == "quantile"
    assert not made["ng_gnn_qstats_noact"]().config.activation_embedding
    ablated = made["ng_gnn_qstats_ln_noact"]().config
    assert not ablated.activation_embedding and ablated.layer_normalised_edges


def test_report_and_acceptance_on_a_hand_made_result():
    def model(label, mean):
        return {
            "label": label,
            "mean": mean,
            "std": 0.01,
            "train_s_mean": 1.0,
            "train_s_std": 0.1,
            "runs": [],
        }

    results = {
        "settings": {**bench.asdict(TINY)},
        "tasks": {
            "cnn_wild": {
                "title": "t",
                "kind": "regression",
                "metric": "tau",
                "higher_is_better": True,
                "sizes": {"train": 1, "val": 1, "test": 1},
                "models": {
                    "ng_gnn": model("NG-GNN", 0.80),
                    "ng_t": model("NG-T", 0.70),
                    "statnn": model("StatNN (MLP)", 0.60),
                    "statnn_gbt": model("StatNN (GBT)", 0.65),
                    "ng_gnn_noact": model("NG-GNN -act", 0.79),
                },
            }
        },
    }
    checks = {c["claim"]: c for c in bench.acceptance(results)}
    gnn = checks["cnn_wild: NG-GNN tau >= StatNN + 0.08 (unseen architectures)"]
    assert gnn["holds"] and gnn["margin"] == pytest.approx(0.15)  # vs the better StatNN
    ngt = checks["cnn_wild: NG-T tau >= StatNN + 0.08 (unseen architectures)"]
    assert not ngt["holds"]
    act = checks[
        "cnn_wild: removing the activation embedding costs >= 0.02 tau (NG-GNN)"
    ]
    assert not act["holds"] and act["margin"] == pytest.approx(0.01)
    results["acceptance"] = list(checks.values())
    text = bench.markdown_report(results)
    assert "| cnn_wild | NG-GNN | tau ↑ | 0.8 ± 0.01 |" in text
    assert "fails" in text and "holds" in text


def test_unknown_task_or_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="Invalid tasks"):
        bench.run_benchmark(TINY, tmp_path, tasks=["nope"], progress=False)
    with pytest.raises(ValueError, match=r"Invalid models: \['ng_gnnn'\]"):
        bench.run_benchmark(TINY, tmp_path, ["cnn_digits"], ["ng_gnnn"], False)
    args = ["--zoo-dir", str(tmp_path), "--out", str(tmp_path)]
    assert bench.main(["--models", "statnn,ng_gnnn", *args]) == 2
    assert "Invalid models: ['ng_gnnn']" in capsys.readouterr().err
    assert (
        bench.main(
            ["--tasks", "nope", "--zoo-dir", str(tmp_path), "--out", str(tmp_path)]
        )
        == 2
    )


def test_settings_reach_the_graph_models():
    from types import SimpleNamespace

    settings = replace(
        TINY, fourier=3, pooling="mean,max,output", node_dim=6, edge_dim=5, layers=3
    )
    for edge, fourier in ((1, 3), (9, 0)):  # RFF on scalar weights only
        train = SimpleNamespace(edge_features=edge, output_neurons=7)
        made = bench.model_factories("cnn_digits", settings, train)
        for key in ("ng_gnn", "ng_t"):
            model = made[key]()
            assert model.config.fourier_features == fourier
            assert model.readout.pooling == ("mean", "max", "output")
            assert model.readout.output_neurons == 7
        gnn = made["ng_gnn"]().backbone
        assert (gnn.node_dim, gnn.edge_dim, gnn.num_layers) == (6, 5, 3)


def test_bad_fourier_or_pooling_is_a_clear_error(tmp_path, capsys):
    for flags in (["--pooling", "mean,median"], ["--fourier", "-1"]):
        args = [*flags, "--zoo-dir", str(tmp_path), "--out", str(tmp_path)]
        assert bench.main(args) == 2
        assert "Invalid --fourier" in capsys.readouterr().err
    for flags, message in (
        (["--edge-dim", "0"], "Invalid --node-dim, --edge-dim or --layers"),
        (["--layers", "0"], "Invalid --node-dim, --edge-dim or --layers"),
        (["--lr", "0"], "Invalid --lr: 0.0"),
        (["--lr-patience", "0"], "Invalid --lr-patience: 0"),
        (["--patience", "0"], "Invalid --patience: 0"),
        (["--grad-clip", "0"], "Invalid --grad-clip: 0.0"),
        (["--max-eval", "-1"], "Invalid --max-eval: -1"),
    ):
        args = [*flags, "--zoo-dir", str(tmp_path), "--out", str(tmp_path)]
        assert bench.main(args) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, cap", [(None, 500), ("0", None), ("900", 900)])
def test_max_eval_flag_sets_the_evaluation_cap(monkeypatch, tmp_path, flag, cap):
    seen = {}

    def fake(settings, *args, **kwargs):
        seen["settings"] = settings
        raise SystemExit(0)

    monkeypatch.setattr(bench, "run_benchmark", fake)
    args = ["--zoo-dir", str(tmp_path), "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.main(args + ([] if flag is None else ["--max-eval", flag]))
    assert seen["settings"].max_eval == cap


def test_a_cached_zoo_built_off_preset_is_flagged(zoo_dir, tmp_path):
    import dataclasses
    import warnings

    from lopt.weightspace.zoos import preset_differences, zoo_config

    with pytest.warns(UserWarning, match=r"runs=12 \(preset 48\)"):
        bench.ensure_zoo("cnn_digits", zoo_dir, "quick", progress=False)
    # The same header with the preset's config passes silently.
    header = json.loads((zoo_dir / "cnn_digits" / "zoo.json").read_text())
    header["config"] = json.loads(
        json.dumps(dataclasses.asdict(zoo_config("cnn_digits", "quick")))
    )
    assert preset_differences(header, "cnn_digits", "quick") == {}
    (tmp_path / "cnn_digits").mkdir()
    (tmp_path / "cnn_digits" / "zoo.json").write_text(json.dumps(header))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench.ensure_zoo("cnn_digits", tmp_path, "quick", progress=False)
