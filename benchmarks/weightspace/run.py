"""Weight-space benchmark: NG-GNN, NG-T and the baselines on the locally
built zoos.

    python -m benchmarks.weightspace [--quick] [--seeds 3] [--zoo-dir DIR] [--out DIR]

Tasks (every model trains in one harness, :class:`lopt.weightspace.
WeightSpaceTrainer`, on the same splits and views, selected on the
validation split):

- ``inr_digits`` / ``inr_mnist1d``: classify the SIREN of a digit / an mnist1d
  signal (accuracy). Ablation: 64 learned probes (``+probes``).
- ``edit_digits``: edit a digit's SIREN into the SIREN of the dilated digit;
  MSE of the edited SIREN's outputs against the dilated image on the 8x8
  grid.
- ``cnn_digits``: predict a CNN's held-out accuracy from its weights
  (homogeneous zoo, Kendall's tau). Extra: NG-GNN with per-neuron weight
  statistics as node inputs (``+stats``).
- ``cnn_wild``: the same on the heterogeneous zoo, tested on architecture
  families never seen in training. Ablation: no activation embedding
  (``-act``, also of ``+stats``).

Zoos are built (or loaded when complete) under ``--zoo-dir`` (default
``runs/weightspace_zoos/{quick,full}``, gitignored). Results: JSON, Markdown
and a plot in ``benchmarks/results/weightspace`` (``.../quick`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import report
from benchmarks.common.cli import RESULTS_DIR, quick_parser, save_and_print
from benchmarks.common.provenance import run_metadata
from benchmarks.weightspace.report import (
    LABELS,
    acceptance,
    markdown_report,
    write_outputs,
)
from lopt.weightspace.presets import PRESETS

__all__ = [
    "Settings",
    "QUICK",
    "FULL",
    "TASKS",
    "run_benchmark",
    "markdown_report",
    "main",
]

REPO = Path(__file__).resolve().parents[2]


class BenchmarkInputError(ValueError):
    """A task, model key or zoo directory the benchmark cannot use."""


@dataclass(frozen=True)
class Settings:
    """What one benchmark run trains.

    Attributes:
        size: zoo size, ``"quick"`` or ``"full"``.
        seeds: training seeds per model.
        epochs: maximum epochs per fit.
        patience: early-stopping patience (epochs).
        batch_size: networks per step.
        lr: AdamW learning rate of every gradient-trained model.
        max_train: at most this many training networks per task (a fixed
            subset, the same for every model and seed); ``None``: all.
        max_eval: at most this many validation / test networks per task.
        node_dim, edge_dim, layers: NG-GNN widths and depth (full: the
            ``ng-gnn`` preset's, :mod:`lopt.weightspace.presets`).
        ngt_dim, ngt_layers: NG-T node width and depth (edge width: edge_dim;
            full: the ``ng-t`` preset's).
        nfn_hidden: NFN channels.
        mlp_hidden: width of the flat / StatNN / probe / image MLPs.
        probes: probes of the ``+probes`` ablation.
        fourier: random Fourier features per weight of NG-GNN and NG-T
            (:attr:`lopt.weightspace.WeightSpaceConfig.fourier_features`) on
            graphs of scalar weights (INRs), where without them NG-GNN's
            training loss did not fall below chance (ln 10). Conv kernels are
            left raw: their edge input would grow 33-fold.
        pooling: graph-level readout aggregations of NG-GNN and NG-T,
            comma-separated (see :data:`lopt.weightspace.models.readout.POOLINGS`).
        tree_iters: boosting iterations of StatNN (GBT).
        max_seconds: wall-time cap of one fit (after the epoch that passes
            it); ``None``: none.
        lr_patience: halve the learning rate of every gradient-trained model
            after this many epochs without a better validation metric
            (:class:`lopt.weightspace.WeightSpaceTrainer`); ``None``: constant.
        grad_clip: global gradient-norm clip of every gradient-trained model;
            ``None``: none.
    """

    size: str = "full"
    seeds: int = 3
    epochs: int = 60
    patience: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    max_train: int | None = None
    max_eval: int | None = 500
    node_dim: int = PRESETS["ng-gnn"].model_kwargs["node_dim"]
    edge_dim: int = PRESETS["ng-gnn"].model_kwargs["edge_dim"]
    layers: int = PRESETS["ng-gnn"].model_kwargs["num_layers"]
    ngt_dim: int = PRESETS["ng-t"].model_kwargs["node_dim"]
    ngt_layers: int = PRESETS["ng-t"].model_kwargs["num_layers"]
    nfn_hidden: int = 16
    mlp_hidden: int = 128
    probes: int = 64
    fourier: int = 16
    pooling: str = "mean"
    tree_iters: int = 200
    max_seconds: float | None = 300.0
    lr_patience: int | None = None
    grad_clip: float | None = None


QUICK = Settings(
    size="quick",
    epochs=8,
    patience=4,
    max_train=256,
    max_eval=128,
    node_dim=16,
    edge_dim=8,
    layers=2,
    ngt_dim=16,
    ngt_layers=1,
    nfn_hidden=8,
    mlp_hidden=64,
    tree_iters=50,
    max_seconds=6.0,
)
FULL = Settings()


@dataclass(frozen=True)
class TaskSpec:
    zoo: str
    kind: str  # classification | regression | editing
    metric: str  # accuracy | mse | tau
    higher: bool
    title: str


TASKS: dict[str, TaskSpec] = {
    "inr_digits": TaskSpec(
        "digits_inr", "classification", "accuracy", True, "INR classification, digits"
    ),
    "inr_mnist1d": TaskSpec(
        "mnist1d_inr", "classification", "accuracy", True, "INR classification, mnist1d"
    ),
    "edit_digits": TaskSpec(
        "digits_inr", "editing", "mse", False, "INR editing (dilation), digits"
    ),
    "cnn_digits": TaskSpec(
        "cnn_digits", "regression", "tau", True, "CNN accuracy, homogeneous zoo"
    ),
    "cnn_wild": TaskSpec(
        "cnn_wild",
        "regression",
        "tau",
        True,
        "CNN accuracy, heterogeneous zoo, unseen architectures",
    ),
}


# ---------------------------------------------------------------------- zoos
def ensure_zoo(name: str, zoo_dir: Path, size: str, progress: bool) -> Path:
    """``zoo_dir/name``: loaded as is when complete, else built (resumed)."""
    from lopt.weightspace.zoos import build_zoo
    from lopt.weightspace.zoos.store import read_header

    path = zoo_dir / name
    if (path / "zoo.json").exists():
        header = read_header(path)
        if header.get("status") == "complete":
            if header.get("name") != name or header.get("size") != size:
                raise BenchmarkInputError(
                    f"{path} holds {header.get('name')} ({header.get('size')}), "
                    f"not {name} ({size})"
                )
            _warn_if_not_preset(path, header, name, size)
            return path
    print(f"building zoo {name} ({size}) into {path}", flush=True)
    return build_zoo(
        name, path, size=size, progress=progress, threads=torch.get_num_threads()
    )


def _warn_if_not_preset(path: Path, header: dict, name: str, size: str) -> None:
    """Warn when a cached zoo was built with another config than the current
    preset (an older version's, or ``--set`` overrides): its results are not
    the preset's."""
    import warnings

    from lopt.weightspace.zoos import preset_differences

    differ = preset_differences(header, name, size)
    if differ:
        fields = ", ".join(f"{k}={a!r} (preset {b!r})" for k, (a, b) in differ.items())
        warnings.warn(
            f"zoo {path} was built with {fields}: not the current {name} "
            f"({size}) preset; delete it or pass another --zoo-dir to rebuild",
            stacklevel=2,
        )


def _cap(index: list[int], limit: int | None, seed: int = 0) -> list[int]:
    """A fixed random subset of at most ``limit`` (same for every model)."""
    if limit is None or len(index) <= limit:
        return index
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(index, size=limit, replace=False).tolist())


def task_data(zoo, task: str, settings: Settings):
    """``(train, val, test)`` :class:`WeightSpaceData` of ``task``."""
    from lopt.weightspace.training import WeightSpaceData
    from lopt.weightspace.zoos.inr import coordinates
    from lopt.weightspace.zoos.specs import build_module

    spec = TASKS[task]
    modules = {k: build_module(v) for k, v in zoo.specs.items()}
    labels = zoo.labels
    splits = {}
    kernel = None
    for split in ("train", "val", "test"):
        index = [
            i for i in zoo.split(split) if zoo.nets[i].get("target", "image") == "image"
        ]
        index = _cap(
            index, settings.max_train if split == "train" else settings.max_eval
        )
        kwargs = {}
        if spec.zoo.endswith("_inr"):
            images = zoo.extras["target"]
            kwargs["extras"] = {"image": images[index]}
            if spec.kind == "editing":
                pair = [zoo.nets[i]["pair"] for i in index]
                kwargs["target"] = images[pair].reshape(len(index), -1)
                kwargs["grid"] = coordinates(tuple(images.shape[1:]))
        data = WeightSpaceData.from_modules(
            [modules[zoo.nets[i]["spec"]] for i in index],
            None if spec.kind == "editing" else labels[index],
            state_dicts=[zoo.state_dict(i) for i in index],
            kernel_size=kernel,
            **kwargs,
        )
        kernel = data.kernel_size
        splits[split] = data
    return splits["train"], splits["val"], splits["test"]


def no_edit_mse(data) -> float:
    """MSE of the unedited networks' outputs on ``data.grid`` against
    ``data.target``: what an editor that changes nothing scores."""
    from torch.func import functional_call, vmap

    params = data.stacked_state(list(range(len(data))))
    module = data.modules[0]
    with torch.no_grad():
        out = vmap(lambda p: functional_call(module, p, (data.grid,)).reshape(-1))(
            params
        )
    return float(((out - data.target) ** 2).mean())


# -------------------------------------------------------------------- models
#: Models trained only when ``--models`` names them (experimental variants),
#: so that a default run keeps its cost.
OPT_IN = frozenset(
    {
        "ng_gnn_qstats",
        "ng_gnn_qstats_noact",
        "ng_gnn_qstats_ln",
        "ng_gnn_qstats_ln_noact",
    }
)

#: Neuron statistics scaled through their quantiles (``ng_gnn_qstats``).
QSTATS = {"neuron_statistics": True, "statistics_scaling": "quantile"}


def model_factories(task: str, settings: Settings, train) -> dict[str, Callable]:
    """``{model key: () -> predictor}`` run on ``task``. The NG models are
    the presets' (:mod:`lopt.weightspace.presets`) at the settings' widths,
    depths, readout and Fourier features."""
    from lopt.weightspace import baselines as B

    spec = TASKS[task]
    out = 10 if spec.kind == "classification" else 1
    edge = train.edge_features
    outputs = train.output_neurons
    s = settings
    hidden = {"hidden": s.mlp_hidden}

    fourier = {"fourier_features": s.fourier if edge == 1 else 0}
    base = replace(PRESETS["ng-gnn"].config, **fourier)
    pooling = s.pooling.split(",")

    def gnn(config=base):
        return lambda: PRESETS["ng-gnn"].build_model(
            edge,
            out,
            outputs,
            node_dim=s.node_dim,
            edge_dim=s.edge_dim,
            num_layers=s.layers,
            config=config,
            pooling=pooling,
        )

    def ngt():
        heads = 4 if s.ngt_dim % 4 == 0 else 1
        return lambda: PRESETS["ng-t"].build_model(
            edge,
            out,
            outputs,
            node_dim=s.ngt_dim,
            edge_dim=s.edge_dim,
            num_layers=s.ngt_layers,
            num_heads=heads,
            config=replace(PRESETS["ng-t"].config, **fourier),
            pooling=pooling,
        )

    models: dict[str, Callable] = {"ng_gnn": gnn(), "ng_t": ngt()}
    fixed = spec.zoo != "cnn_wild"
    if spec.kind == "classification":
        coord_dim = 2 if spec.zoo == "digits_inr" else 1
        models["ng_gnn_probes"] = gnn(
            replace(base, probes=s.probes, probe_shape=(coord_dim,))
        )
    if fixed:
        models["nfn"] = lambda: B.NFNPredictor(out, hidden=s.nfn_hidden, layers=2)
        models["flat"] = lambda: B.FlatWeightsMLP(out, **hidden)
        if spec.kind != "editing":
            models["flat_aug"] = lambda: B.FlatWeightsMLP(out, augment=True, **hidden)
    if spec.kind != "editing":
        models["statnn"] = lambda: B.StatNN(out, **hidden)
        models["statnn_gbt"] = lambda: B.StatNNTrees(out, max_iter=s.tree_iters)
        models["statnn_q"] = lambda: B.StatNN(out, scaling="quantile", **hidden)
    if spec.kind == "classification":
        coord_dim = 2 if spec.zoo == "digits_inr" else 1
        models["probe"] = lambda: B.ProbePredictor(out, s.probes, coord_dim, **hidden)
        models["image"] = lambda: B.ImagePredictor(out, **hidden)
    if spec.zoo in ("digits_inr", "mnist1d_inr"):
        # SIRENs: sin is odd, so each hidden neuron has a sign symmetry.
        models["ng_gnn_sign"] = gnn(replace(base, sign_canonical=True))
    if spec.zoo in ("cnn_digits", "cnn_wild"):
        variants = {
            # StatNN's per-layer weight statistics, per neuron, as node inputs.
            "ng_gnn_stats": replace(base, neuron_statistics=True),
            # The same, put on one scale through their quantiles (heavy tails).
            "ng_gnn_qstats": replace(base, **QSTATS),
            # ... with each layer's edges divided by their RMS (scale in the
            # stats): the best model, preset ng-gnn-best.
            "ng_gnn_qstats_ln": replace(PRESETS["ng-gnn-best"].config, **fourier),
        }
        models.update({key: gnn(config) for key, config in variants.items()})
        if spec.zoo == "cnn_wild":
            # The activation-embedding ablation of each NG-GNN variant.
            for key, config in {"ng_gnn": base, **variants}.items():
                models[f"{key}_noact"] = gnn(
                    replace(config, activation_embedding=False)
                )
    return models


# ----------------------------------------------------------------------- run
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def run_benchmark(
    settings: Settings,
    zoo_dir: Path,
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Train every model of every task over the seeds; the results dict."""
    from lopt.weightspace.training import WeightSpaceTrainer
    from lopt.weightspace.zoos.store import load_zoo

    t_start = time.perf_counter()
    tasks = list(tasks or TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise BenchmarkInputError(
            f"Invalid tasks: {unknown} (expected some of {list(TASKS)})"
        )
    unknown = sorted(set(models or ()) - set(LABELS))
    if unknown:
        raise BenchmarkInputError(
            f"Invalid models: {unknown} (expected some of {sorted(LABELS)})"
        )
    results: dict = {"settings": asdict(settings), "tasks": {}, "zoos": {}}
    zoos = {}
    for task in tasks:
        name = TASKS[task].zoo
        if name not in zoos:
            t0 = time.perf_counter()
            path = ensure_zoo(name, zoo_dir, settings.size, progress)
            zoos[name] = load_zoo(path)
            results["zoos"][name] = {
                "path": str(path),
                "networks": len(zoos[name]),
                "build_command": zoos[name].header.get("build_command"),
                "load_or_build_s": round(time.perf_counter() - t0, 2),
            }
    for task in tasks:
        spec = TASKS[task]
        t0 = time.perf_counter()
        train, val, test = task_data(zoos[spec.zoo], task, settings)
        factories = model_factories(task, settings, train)
        if models:
            factories = {k: v for k, v in factories.items() if k in models}
        else:
            factories = {k: v for k, v in factories.items() if k not in OPT_IN}
        entry = {
            "title": spec.title,
            "kind": spec.kind,
            "metric": spec.metric,
            "higher_is_better": spec.higher,
            "sizes": {"train": len(train), "val": len(val), "test": len(test)},
            "data_s": round(time.perf_counter() - t0, 2),
            "models": {},
        }
        if spec.kind == "editing":
            entry["no_edit_mse"] = no_edit_mse(test)
        print(
            f"{task}: {len(train)} train / {len(val)} val / {len(test)} test networks, "
            f"{len(factories)} models x {settings.seeds} seeds",
            flush=True,
        )
        for key, make in factories.items():
            runs = []
            for seed in range(settings.seeds):
                _seed_all(seed)
                trainer = WeightSpaceTrainer(
                    make(),
                    spec.kind,
                    lr=settings.lr,
                    epochs=settings.epochs,
                    batch_size=settings.batch_size,
                    patience=settings.patience,
                    max_seconds=settings.max_seconds,
                    lr_patience=settings.lr_patience,
                    grad_clip=settings.grad_clip,
                    seed=seed,
                    progress=progress,
                    desc=f"{task} {key} s{seed}",
                )
                fit = trainer.fit(train, val)
                metrics = trainer.evaluate(test)
                runs.append(
                    {
                        "seed": seed,
                        "test": metrics,
                        "val": fit.best_val,
                        "best_epoch": fit.best_epoch,
                        "epochs_run": len(fit.history),
                        "stopped": fit.stopped,
                        "train_s": round(fit.train_seconds, 2),
                        # Learning curve: (training loss, validation metric).
                        "history": [
                            [h["train_loss"], h.get("val", {}).get(spec.metric)]
                            for h in fit.history
                        ],
                    }
                )
            mean, std = _mean_std([r["test"][spec.metric] for r in runs])
            t_mean, t_std = _mean_std([r["train_s"] for r in runs])
            entry["models"][key] = {
                "label": LABELS[key],
                "mean": mean,
                "std": std,
                "train_s_mean": t_mean,
                "train_s_std": t_std,
                "runs": runs,
            }
            print(
                f"  {LABELS[key]:<24} {spec.metric} {report.format_mean_std(mean, std)}"
                f"  ({t_mean:.1f} s/fit)",
                flush=True,
            )
        results["tasks"][task] = entry
    results["acceptance"] = acceptance(results)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    return results


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = quick_parser(
        "python -m benchmarks.weightspace",
        __doc__,
        "quick zoos and short fits (about 5 min)",
    )
    parser.add_argument(
        "--seeds", type=int, help="training seeds per model (default 3)"
    )
    parser.add_argument(
        "--zoo-dir",
        type=Path,
        help="zoo directory (default runs/weightspace_zoos/SIZE)",
    )
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument("--tasks", help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--models", help="comma-separated model keys (default: all)")
    parser.add_argument(
        "--max-train", type=int, help="cap on training networks per task"
    )
    parser.add_argument(
        "--max-eval",
        type=int,
        help="cap on validation and test networks per task (default 500; 0: none)",
    )
    parser.add_argument("--epochs", type=int, help="maximum epochs per fit")
    parser.add_argument("--max-seconds", type=float, help="wall-time cap per fit")
    parser.add_argument(
        "--fourier",
        type=int,
        help="random Fourier features per scalar weight of NG-GNN/NG-T (default 16)",
    )
    parser.add_argument(
        "--pooling", help="NG readout aggregations, e.g. mean,std,max (default mean)"
    )
    parser.add_argument("--node-dim", type=int, help="NG-GNN node width (default 32)")
    parser.add_argument(
        "--edge-dim", type=int, help="NG-GNN / NG-T edge and message width (default 8)"
    )
    parser.add_argument("--layers", type=int, help="NG-GNN depth (default 3)")
    parser.add_argument(
        "--lr", type=float, help="AdamW learning rate of every model (default 1e-3)"
    )
    parser.add_argument(
        "--lr-patience",
        type=int,
        help="halve the learning rate after this many epochs without a better "
        "validation metric (default: constant rate)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        help="stop a fit after this many epochs without a better validation "
        "metric (default 10)",
    )
    parser.add_argument(
        "--grad-clip",
        type=float,
        help="clip every gradient-trained model's gradient norm to this "
        "(default: no clipping)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings a command line asks for (``--quick`` or full, then each
    flag given), before validation."""
    settings = QUICK if args.quick else FULL
    overrides = {
        "seeds": args.seeds,
        "max_train": args.max_train,
        "epochs": args.epochs,
        "max_seconds": args.max_seconds,
        "fourier": args.fourier,
        "pooling": args.pooling,
        "node_dim": args.node_dim,
        "edge_dim": args.edge_dim,
        "layers": args.layers,
        "lr": args.lr,
        "lr_patience": args.lr_patience,
        "patience": args.patience,
        "grad_clip": args.grad_clip,
    }
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    if args.max_eval is not None:
        if args.max_eval < 0:
            print(f"error: Invalid --max-eval: {args.max_eval}", file=sys.stderr)
            return 2
        settings = replace(settings, max_eval=args.max_eval or None)
    if settings.seeds < 1:
        print(f"error: Invalid seeds: {settings.seeds}", file=sys.stderr)
        return 2
    from lopt.weightspace.models.readout import POOLINGS

    if min(settings.node_dim, settings.edge_dim, settings.layers) < 1:
        print(
            "error: Invalid --node-dim, --edge-dim or --layers: each must be >= 1",
            file=sys.stderr,
        )
        return 2
    if not settings.lr > 0:
        print(f"error: Invalid --lr: {settings.lr}", file=sys.stderr)
        return 2
    if settings.lr_patience is not None and settings.lr_patience < 1:
        print(f"error: Invalid --lr-patience: {settings.lr_patience}", file=sys.stderr)
        return 2
    if settings.patience < 1:
        print(f"error: Invalid --patience: {settings.patience}", file=sys.stderr)
        return 2
    if settings.grad_clip is not None and not settings.grad_clip > 0:
        print(f"error: Invalid --grad-clip: {settings.grad_clip}", file=sys.stderr)
        return 2
    if settings.fourier < 0 or not set(settings.pooling.split(",")) <= set(POOLINGS):
        print(
            f"error: Invalid --fourier {settings.fourier} or --pooling "
            f"{settings.pooling!r} (aggregations from {', '.join(POOLINGS)})",
            file=sys.stderr,
        )
        return 2
    zoo_dir = args.zoo_dir or REPO / "runs" / "weightspace_zoos" / settings.size
    out = args.out or RESULTS_DIR / "weightspace" / ("quick" if args.quick else "")
    # Provenance before the run: the commit measured, not the one at the end.
    meta = {k: v for k, v in run_metadata().items() if not k.startswith("rule")}
    meta["command"] = "python -m benchmarks.weightspace " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    try:
        results = run_benchmark(
            settings,
            zoo_dir,
            tasks=args.tasks.split(",") if args.tasks else None,
            models=args.models.split(",") if args.models else None,
            progress=not args.no_progress,
        )
    except BenchmarkInputError as err:  # anything else keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    results["provenance"] = meta
    save_and_print(results, Path(out), write_outputs, markdown_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
