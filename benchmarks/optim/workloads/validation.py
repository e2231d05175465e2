"""Validation jobs for choosing NG's settings outside the workloads benchmark.

Constants of the shipped rule (its step-size controller, a schedule, a base
direction) are chosen here, on jobs like the benchmark's but not the
benchmark's: other text (Python's own source instead of the pydoc topics),
other sizes, another tabular problem. The benchmark then reports what was
chosen, untouched by its own numbers.

    python -m benchmarks.optim.workloads.validation [--variants ng,ng_floor0,...]
        [--jobs val_gpt,...] [--seeds 1] [--threads 1]

Variants are the shipped rule with one or more changes (see :data:`VARIANTS`),
applied to whatever rule ships when they run (the cache keys on its checksum: a
variant's rows before and after a change of the shipped rule are different runs)
and AdamW with warmup + cosine at each grid learning rate, the reference.
Every finished run is cached in ``benchmarks/results/workloads/validation``;
a rerun reports from the cache.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks.common.cli import RESULTS_DIR
from benchmarks.common.provenance import run_metadata
from benchmarks.common.report import write_text
from benchmarks.optim.optimizers import load_ng_rule
from benchmarks.optim.workloads.gpt import GPT, GPTConfig
from benchmarks.optim.workloads.lstm import CharLSTM, LSTMConfig
from benchmarks.optim.workloads.recipes import Recipe, Trainer
from benchmarks.optim.workloads.runner import RunCache, train_run
from benchmarks.optim.workloads.spec import (
    Job,
    Workload,
    hidden_matrices,
)
from benchmarks.optim.workloads.tabular import dropout_mlp, rows_job
from benchmarks.optim.workloads.text import language_model_job
from lopt.optim.optimizer import cooldown_factor
from lopt.optim.orthogonal import orthogonalize
from lopt.optim.rule import blend_with_untrained

__all__ = ["JOBS", "VARIANTS", "Variant", "main"]


# ------------------------------------------------------------------ jobs
VAL_GPT = GPTConfig(layers=2, width=128, heads=4, context=64, batch=16, val_windows=256)
VAL_LSTM = LSTMConfig(embed=48, hidden=160, context=64, batch=16, val_windows=256)


def _gpt(seed: int, quick: bool) -> Job:
    return language_model_job(
        lambda vocab: GPT(vocab, VAL_GPT),
        VAL_GPT,
        seed,
        lambda model: hidden_matrices(model, exclude=[model.token, model.head]),
        source="stdlib",
    )


def _lstm(seed: int, quick: bool) -> Job:
    return language_model_job(
        lambda vocab: CharLSTM(vocab, VAL_LSTM), VAL_LSTM, seed, source="stdlib"
    )


@functools.lru_cache(maxsize=1)
def _mlp_data():
    from sklearn.datasets import make_classification

    train, held_out = 1500, 3000
    x, y = make_classification(
        train + held_out,
        30,
        n_informative=10,
        n_redundant=6,
        n_clusters_per_class=3,
        flip_y=0.15,
        random_state=7,
    )
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    x = (x - x[:train].mean(0)) / x[:train].std(0)
    return x[:train], y[:train], x[train:], y[train:]


def _mlp(seed: int, quick: bool) -> Job:
    data = _mlp_data()
    torch.manual_seed(seed)
    model = dropout_mlp(data[0].shape[1], 384, 2, 0.2)
    gen = torch.Generator().manual_seed(20_000 + seed)
    return rows_job(model, data, 128, gen, exclude=[model[0], model[-1]])


@functools.lru_cache(maxsize=1)
def _finetune_data():
    from sklearn.datasets import make_classification

    x, y = make_classification(
        6000, 20, n_informative=12, n_redundant=4, n_classes=8,
        n_clusters_per_class=1, class_sep=1.2, random_state=11,
    )  # fmt: skip
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    x = (x - x.mean(0)) / x.std(0)
    first = y < 4
    old_x, old_y = x[first], y[first]
    new_x, new_y = x[~first], y[~first] - 4
    # 15 training rows per new class, the rest of the new classes held out.
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(new_y), generator=gen)
    new_x, new_y = new_x[order], new_y[order]
    picked = torch.cat([torch.nonzero(new_y == c)[:15, 0] for c in range(4)])
    rest = torch.ones(len(new_y), dtype=torch.bool)
    rest[picked] = False
    return old_x, old_y, new_x[picked], new_y[picked], new_x[rest], new_y[rest]


def _finetune_body() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 256), nn.LayerNorm(256), nn.GELU(),
        nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU(),
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _pretrained() -> dict[str, torch.Tensor]:
    """The body trained on the first four classes (AdamW 1e-3, 600 steps,
    fixed seed): computed once per process."""
    old_x, old_y, *_ = _finetune_data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        body, head = _finetune_body(), nn.Linear(256, 4)
        model = nn.Sequential(body, head)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(123)
        for _ in range(600):
            idx = torch.randint(0, len(old_x), (128,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(old_x[idx]), old_y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in body.state_dict().items()}


def _finetune(seed: int, quick: bool) -> Job:
    _, _, *data = _finetune_data()
    body = _finetune_body()
    body.load_state_dict(_pretrained())
    torch.manual_seed(seed)
    model = nn.Sequential(body, nn.Linear(256, 4))
    gen = torch.Generator().manual_seed(30_000 + seed)
    return rows_job(model, tuple(data), 20, gen, [body[0], model[-1]], noise=0.1)


#: The validation jobs (none of them is a benchmark workload).
JOBS = {
    "val_gpt": Workload(
        "val_gpt", "GPT 2x128, char-level LM on stdlib source", "val_loss", False,
        1000, 100, 100, 0.1, _gpt, 1.0,
    ),
    "val_lstm": Workload(
        "val_lstm", "LSTM 2x160, char-level LM on stdlib source", "val_loss", False,
        1000, 100, 100, 0.01, _lstm, 1.0,
    ),
    "val_mlp": Workload(
        "val_mlp", "MLP 30-384-384-2, dropout, noisy labels", "accuracy", True,
        1000, 100, 100, 1e-2, _mlp,
    ),
    "val_finetune": Workload(
        "val_finetune", "pretrained MLP adapted to 4 new classes from 60 rows",
        "accuracy", True, 300, 60, 50, 1e-2, _finetune,
    ),
}  # fmt: skip


# -------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """NG with changes, or AdamW + warmup + cosine at ``lr``.

    Attributes:
        name: the label in tables (and the cache).
        log_min: the step-size controller's floor (``None``: the rule's own).
        cooldown: NG's lr decays linearly to zero over the last 20% of the
            run (:func:`lopt.optim.optimizer.cooldown_factor`).
        ortho: NG's update of each hidden matrix replaced by its
            orthogonalisation with the same Frobenius norm.
        untrained: the rule's config with fresh weights (the ablation).
        lr: AdamW's learning rate (``None`` for NG variants).
    """

    name: str
    log_min: float | None = None
    cooldown: bool = False
    ortho: bool = False
    untrained: bool = False
    lr: float | None = None
    # NGOptimizer's own total_steps and orthogonal (its guess of the hidden
    # matrices) instead of this module's wrappers.
    native: bool = False
    # Where NG's neural graph comes from (``Trainer``'s ``structure``): the
    # decay / no-decay groups' order, ``model=``, or the parameters' names.
    structure: str = "groups"
    # The controller's dead zone below 0 (StepSizeConfig.hold; None: the
    # rule's own), and the learned output shrunk towards the untrained rule
    # (lopt.optim.rule.blend_with_untrained; None: the rule as it is).
    hold: float | None = None
    alpha: float | None = None

    @property
    def label(self) -> str:
        return self.name


VARIANTS = {
    v.name: v
    for v in (
        # The rule as shipped before this study: the controller's floor at -2.
        Variant("ng", log_min=-2.0),
        Variant("ng_floor0", log_min=0.0),
        Variant("ng_cool", log_min=-2.0, cooldown=True),
        Variant("ng_floor0_cool", log_min=0.0, cooldown=True),
        Variant("ng_floor0_ortho", log_min=0.0, ortho=True),
        Variant("ng_floor0_ortho_cool", log_min=0.0, ortho=True, cooldown=True),
        Variant("ng_untrained_floor0_cool", log_min=0.0, cooldown=True, untrained=True),
        # After the 5000-step suite run: a floor below 0 with orthogonalisation.
        Variant("ng_floor-1_ortho_cool", log_min=-1.0, ortho=True, cooldown=True),
        Variant("ng_floor-2_ortho_cool", log_min=-2.0, ortho=True, cooldown=True),
        Variant("ngopt_floor0", log_min=0.0, native=True),
        # The shipped rule as it is (whatever it is when run: every variant
        # starts from the shipped rule, and the cache keys on its checksum).
        Variant("ngopt", native=True),
        Variant("ngopt_untrained_floor0", log_min=0.0, native=True, untrained=True),
        # The graph from the model (issue 30) or from names, instead of the
        # decay / no-decay groups' order.
        Variant("ngopt_model", log_min=0.0, native=True, structure="model"),
        Variant("ngopt_named", log_min=0.0, native=True, structure="named"),
        # After the 5000-step suite run (floor 0 lets a deep MLP's loss climb):
        # the floor back at -2, with a dead zone that noise does not cross.
        Variant("ngopt_hold0.5", log_min=-2.0, hold=0.5, native=True),
        Variant("ngopt_hold0.8", log_min=-2.0, hold=0.8, native=True),
        # The learned output scaled towards the untrained rule's.
        Variant("ngopt_alpha0.5", log_min=0.0, alpha=0.5, native=True),
        Variant("ngopt_alpha0.25", log_min=0.0, alpha=0.25, native=True),
        # Both: alpha 0.5 (chosen above) with the floor at -2, held or not.
        Variant("ngopt_a0.5_floor-2", log_min=-2.0, alpha=0.5, native=True),
        Variant("ngopt_a0.5_hold0.5", log_min=-2.0, hold=0.5, alpha=0.5, native=True),
        Variant("ngopt_a0.5_hold0.8", log_min=-2.0, hold=0.8, alpha=0.5, native=True),
        Variant("ngopt_a0.5_hold0.95", log_min=-2.0, hold=0.95, alpha=0.5, native=True),
        Variant("adamw@0.001", lr=1e-3),
        Variant("adamw@0.003", lr=3e-3),
        Variant("adamw@0.01", lr=1e-2),
    )
}


class _VariantTrainer(Trainer):
    def __init__(self, variant: Variant, job: Job, workload: Workload, total: int):
        if variant.lr is not None:
            super().__init__(Recipe("adamw", variant.lr), job, workload, total)
            self.matrices = []
            return
        rule = copy.deepcopy(load_ng_rule())
        if variant.log_min is not None:
            rule.step_size = replace(rule.step_size, log_min=variant.log_min)
        if variant.hold is not None:
            rule.step_size = replace(rule.step_size, hold=variant.hold)
        if variant.alpha is not None:
            rule = blend_with_untrained(rule, variant.alpha)
        name = "ng_untrained" if variant.untrained else "ng"
        super().__init__(
            Recipe(name), job, workload, total, rule=rule, structure=variant.structure
        )
        opt = self.optimizers[0]
        # Non-native variants: this module's wrappers, the optimizer's own off.
        opt.orthogonal = variant.native
        opt.total_steps = total if variant.native else None
        if variant.cooldown:  # NGOptimizer's cooldown, as an LR scheduler
            self.schedulers.append(
                torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda t: cooldown_factor(t, total)
                )
            )
        self.matrices = list(job.matrices) if variant.ortho else []

    def step(self) -> None:
        before = [p.detach().clone() for p in self.matrices]
        super().step()
        with torch.no_grad():
            for p, old in zip(self.matrices, before):
                p.copy_(old + orthogonalize(p - old))


class _Cache(RunCache):
    """The run cache keyed by the variant's name (which fixes every setting
    it changes) and the rule's weights, not by the shipped rule's controller
    settings: variants set the controller themselves."""

    def key(self, workload, recipe, seed, quick):
        key = super().key(workload, recipe, seed, quick)
        key.pop("ng_setup", None)
        if "rule" in key:
            key["rule"] = key["rule"].split(":")[0]
        return key


def _run(workload, variant, seed, cache):
    record = cache.get(workload, variant, seed, False)
    if record is None:
        record = train_run(
            workload,
            variant,
            seed,
            False,
            lambda v, job, w, total: _VariantTrainer(v, job, w, total),
        )
        cache.put(workload, variant, seed, False, record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.optim.workloads.validation",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    variants, jobs = args.variants.split(","), args.jobs.split(",")
    for given, known, what in ((variants, VARIANTS, "variant"), (jobs, JOBS, "job")):
        unknown = [g for g in given if g not in known]
        if unknown:
            parser.error(
                f"Invalid {what}: {', '.join(unknown)} (known: {', '.join(known)})"
            )
    torch.set_num_threads(args.threads)
    out = RESULTS_DIR / "workloads" / "validation"
    cache = _Cache(out / "cache")
    start = time.perf_counter()
    plan = [(j, v, s) for j in jobs for v in variants for s in range(args.seeds)]
    results: dict[tuple[str, str], list[float]] = {}
    for j, v, s in tqdm(plan, desc="validation runs", disable=args.no_progress):
        workload = JOBS[j]
        record = _run(workload, VARIANTS[v], s, cache)
        value = (
            math.nan
            if record.diverged_at is not None
            else record.final(workload.metric)
        )
        results.setdefault((j, v), []).append(value)
    meta = run_metadata()
    command = "python -m benchmarks.optim.workloads.validation " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        "# NG variants on the validation jobs",
        "",
        f"`{command}` (commit {meta['git_commit']}; {args.threads} thread(s); "
        f"{time.perf_counter() - start:.0f} s, {cache.hits} runs from the cache). "
        "Final held-out metric, mean over seeds (↓ val_loss, ↑ accuracy).",
        "",
        "| variant | " + " | ".join(f"{j} ({JOBS[j].metric})" for j in jobs) + " |",
        "| :--- |" + " ---: |" * len(jobs),
    ]
    for v in variants:
        cells = [f"{sum(results[j, v]) / len(results[j, v]):.4f}" for j in jobs]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_text(out / "validation.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
