"""Paired A/B of one distsent CPU training step under two config settings, in one process.

    python bench/step_ab.py --a model.last_layer_cls_only=false --b model.last_layer_cls_only=true

Builds the step `bench/step_profile.py` times (same model, precision, dropout, optimizer, tcmalloc
re-exec) once per side, from the same initial weights, then alternates blocks of steps: A, B,
A, B, ... On a shared machine whose speed drifts by ±10% between runs, the per-block ratio B/A
of neighbouring blocks is steadier than two separate runs. Prints one JSON line with both
sides' mean milliseconds per step, the median and range of the block ratios, and the command
line. Overrides common to both sides go after the options (e.g. model.name=tiny-bert).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

from step_profile import TrainingStep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="side A's overrides")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="side B's overrides")
    parser.add_argument("--blocks", type=int, default=12, help="measured blocks per side")
    parser.add_argument("--steps", type=int, default=4, help="steps per block")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured steps per side first")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=28, help="tokens per text, [CLS] included")
    parser.add_argument("--min-length", type=int, default=None, help="shortest text; default: --length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="distsent config overrides for both sides")
    return parser.parse_args(argv)


def timed_block(step: TrainingStep, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step.run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distsent.allocator import active_allocator, use_tcmalloc

    if argv is None:
        use_tcmalloc()  # as `distsent train` does; re-executes this script
    import torch

    from distsent.config import ConfigError

    torch.set_num_threads(args.threads)
    sides = []
    try:
        for overrides in (args.a, args.b):
            torch.manual_seed(0)  # the same classifier-head weights on both sides
            sides.append(TrainingStep([*args.overrides, *overrides], args.batch, args.length, args.min_length))
    except ConfigError as error:
        print(f"step_ab.py: config error: {error}", file=sys.stderr)
        return 2
    for side in sides:
        for _ in range(args.warmup):
            side.run()
    times = {"a": [], "b": []}
    for _ in range(args.blocks):
        times["a"].append(timed_block(sides[0], args.steps))
        times["b"].append(timed_block(sides[1], args.steps))
    ratios = [b / a for a, b in zip(times["a"], times["b"], strict=True)]
    record = {
        "a": args.a,
        "b": args.b,
        "common": args.overrides,
        "ms_per_step": {side: round(1000 * sum(t) / (args.blocks * args.steps), 2) for side, t in times.items()},
        "ratio_b_over_a": {
            "median": round(statistics.median(ratios), 4),
            "min": round(min(ratios), 4),
            "max": round(max(ratios), 4),
        },
        "blocks": args.blocks,
        "steps_per_block": args.steps,
        "packed": {side: step.packed for side, step in zip("ab", sides, strict=True)},
        "batch": [args.batch, args.length],
        "min_length": args.min_length,
        "threads": args.threads,
        "allocator": active_allocator(),
    }
    print(json.dumps(record))
    print("command: " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
