"""The workloads benchmark: NGOptimizer untuned against the recipes users run
(tuned AdamW + warmup + cosine, Muon + AdamW, Schedule-Free AdamW, Prodigy)
and against its own untrained ablation, on real training jobs, by held-out
metric and wall-clock.

    python -m benchmarks.workloads [--quick] [--workloads gpt,resnet,...]
        [--recipes ng,adamw,...] [--seeds 1] [--cache DIR] [--out DIR]

Every finished run is cached (``--cache``): a full run's in
``benchmarks/results/workloads/cache`` (committed, so the benchmark can span
sittings and machines of the same kind, and a rerun only reports), a quick
run's in ``benchmarks/results/quick/workloads_cache`` (not committed). Results:
``workloads.{json,md,png}`` in ``benchmarks/results/workloads``
(``benchmarks/results/quick/workloads`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
from tqdm.auto import tqdm

from benchmarks.common.cli import RESULTS_DIR, print_saved
from benchmarks.common.provenance import run_metadata
from benchmarks.common.report import write_outputs
from benchmarks.optim.workloads import WORKLOAD_NAMES, get_workloads
from benchmarks.optim.workloads.recipes import (
    RECIPES,
    STRUCTURES,
    NotApplicable,
    Recipe,
    Trainer,
    lr_grid,
)
from benchmarks.optim.workloads.report import markdown, plot, summarise
from benchmarks.optim.workloads.runner import RunCache, train_run

__all__ = ["main", "run_all"]


def run_all(workloads, recipes, seeds, quick, cache, progress=True, structure="groups"):
    """Every (workload, recipe, lr, seed) run, from the cache where done;
    runs whose recipe does not apply to the workload are skipped.
    ``structure``: where NG's graph comes from (``Trainer``'s)."""
    make = functools.partial(Trainer, structure=structure)
    plan = [
        (w, Recipe(r, lr), seed)
        for w in workloads
        for r in recipes
        for lr in lr_grid(r, quick)
        for seed in range(seeds)
    ]
    records = []
    bar = tqdm(plan, desc="workload runs", disable=not progress)
    for w, recipe, seed in bar:
        bar.set_postfix_str(f"{w.name} {recipe.label} seed {seed}")
        record = cache.get(w, recipe, seed, quick) if cache else None
        if record is None:
            try:
                record = train_run(w, recipe, seed, quick, make)
            except NotApplicable:
                continue
            if cache:
                cache.put(w, recipe, seed, quick, record)
        records.append(record)
    return records


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.workloads", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small jobs, few steps")
    parser.add_argument(
        "--workloads", help=f"comma-separated ({','.join(WORKLOAD_NAMES)})"
    )
    parser.add_argument("--recipes", help=f"comma-separated ({','.join(RECIPES)})")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--cache", help="run cache directory ('' for none; default: see above)"
    )
    parser.add_argument("--out", help="output directory")
    parser.add_argument(
        "--ng-graph",
        choices=STRUCTURES,
        default="groups",
        help="where NG's neural graph comes from: the param groups' order "
        "(default, as users write them), model= ('model'), names ('named') or "
        "the model's torch.fx trace ('traced'); cached apart",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",") if args.recipes else list(RECIPES)
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(
            f"Invalid recipe: {', '.join(unknown)} (known: {', '.join(RECIPES)})"
        )
    if args.seeds < 1:
        parser.error(f"Invalid --seeds: {args.seeds} (need >= 1)")
    try:
        workloads = get_workloads(args.workloads.split(",") if args.workloads else None)
    except ValueError as err:
        parser.error(str(err))
    return args, workloads, recipes


def main(argv: list[str] | None = None) -> int:
    args, workloads, recipes = _parse(argv)
    torch.set_num_threads(args.threads)
    if args.cache is None:
        where = ("quick", "workloads_cache") if args.quick else ("workloads", "cache")
        args.cache = str(RESULTS_DIR.joinpath(*where))
    cache = RunCache(args.cache, args.ng_graph) if args.cache else None
    start = time.perf_counter()
    records = run_all(
        workloads,
        recipes,
        args.seeds,
        args.quick,
        cache,
        not args.no_progress,
        args.ng_graph,
    )
    summary = summarise(records, workloads)
    meta = run_metadata()
    meta.update(
        command="python -m benchmarks.workloads "
        + " ".join(sys.argv[1:] if argv is None else argv),
        seconds=round(time.perf_counter() - start, 1),
        cache_hits=cache.hits if cache else 0,
        quick=args.quick,
        seeds=args.seeds,
    )
    header = (
        f"# Workloads: NG against the recipes users run\n\n"
        f"`{meta['command']}` ({'quick' if args.quick else 'full'}; {args.seeds} "
        f"seed(s); {args.threads} torch thread(s); commit {meta['git_commit']}; "
        f"{meta['seconds']} s, {meta['cache_hits']} runs from the cache). "
        "`*` = learning rate tuned per workload on the held-out metric (the lr "
        "after `@`); everything else untuned. **bold** = best final metric."
    )
    if args.quick:
        header += (
            "\n\n**Quick run: small jobs of 60-100 steps, early training only.** "
            "It checks that everything runs; optimizers are judged on the full run "
            "(`python -m benchmarks.workloads`), where the horizons are 500-1500 steps."
        )
    results = {
        "meta": meta,
        "runs": [r.__dict__ for r in records],
    }
    out = args.out or (
        RESULTS_DIR / "quick" / "workloads" if args.quick else RESULTS_DIR / "workloads"
    )
    text = markdown(summary, header)
    paths = write_outputs(
        out, "workloads", results, lambda _: text, lambda p: plot(summary, p)
    )
    print()
    print(text)
    print_saved(paths)
    return 0
