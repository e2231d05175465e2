"""``python -m meta_train --preset smoke|default --out DIR [--resume]``.

Data-parallel over N processes: ``torchrun --nproc_per_node=N -m meta_train ...``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from meta_train.config import PRESETS, MetaTrainConfig, preset
from meta_train.distributed import init_from_env
from meta_train.trainer import BEST_RULE, MetaTrainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meta_train", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--resume", action="store_true", help="continue from DIR/checkpoint.pt"
    )
    parser.add_argument(
        "--iterations", type=int, help="override the preset's iterations"
    )
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a MetaTrainConfig field, e.g. --set truncation=30 "
        "--set 'rule={\"num_layers\": 2}'",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "iterations": args.iterations,
            "seed": args.seed,
            "threads": args.threads,
        }.items()
        if v is not None
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in MetaTrainConfig.__dataclass_fields__:
            parser.error(
                f"invalid --set {item!r}: expected FIELD=JSON with FIELD in "
                f"{sorted(MetaTrainConfig.__dataclass_fields__)}"
            )
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"invalid --set {item!r}: {value!r} is not JSON")
        overrides[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    config = preset(args.preset, **overrides)
    command = "python -m meta_train " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    rank, _ = init_from_env()  # no-op outside torchrun
    trainer = MetaTrainer(config, args.out, command=command)
    if args.resume:
        trainer.load_checkpoint()
    trainer.train(progress=not args.no_progress)
    if rank != 0:
        return 0
    print(
        f"best rule (validation score {trainer.best_score:.4f}, Adam(1e-3) "
        f"{trainer.adam_score:.4f}): {trainer.out / BEST_RULE}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
