"""Training attention (dropout on) per layer: distsent's CPU function against torch's SDPA.

    python bench/attention.py [--lengths 28 128 256] [--batch 32] [--threads 2]

MiniLM-L6's attention shape (12 heads of 32), bf16 inputs as autocast's linears produce them,
a padding mask on a few rows, dropout 0.1, forward + backward. The peer is what the Trainer
runs: `scaled_dot_product_attention` with `dropout_p`, which on CPU takes its math path.
Both run in this process, alternating, best of several rounds each. Prints one JSON line per
length, then the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from distsent.cpu_training import cpu_training_attention, keep_freed_memory

HEADS, HEAD_SIZE, DROPOUT = 12, 32, 0.1


def inputs(batch: int, length: int):
    """Query, key and value as BERT hands them over: views of [batch, seq, hidden] bf16 leaves."""
    leaves = [torch.randn(batch, length, HEADS * HEAD_SIZE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
    mask[: batch // 8, :, :, length - length // 5 :] = False  # some rows padded
    grad = torch.randn(batch, length, HEADS, HEAD_SIZE, dtype=torch.bfloat16)
    return leaves, mask, grad


def distsent_step(leaves, mask, grad):
    query, key, value = (t.unflatten(-1, (HEADS, HEAD_SIZE)).transpose(1, 2) for t in leaves)
    output, _ = cpu_training_attention(None, query, key, value, mask, dropout=DROPOUT, scaling=HEAD_SIZE**-0.5)
    output.backward(grad)


def sdpa_step(leaves, mask, grad):
    query, key, value = (t.unflatten(-1, (HEADS, HEAD_SIZE)).transpose(1, 2) for t in leaves)
    output = F.scaled_dot_product_attention(query, key, value, mask, dropout_p=DROPOUT)
    output.transpose(1, 2).backward(grad)


def mean_milliseconds(step, args, seconds: float) -> float:
    """Mean time of `step` over as many calls as fit in about `seconds` (at least two): a
    budget in time, not calls, so that a busy machine makes the timing noisier, not endless."""
    for leaf in args[0]:
        leaf.grad = None
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        step(*args)
        for leaf in args[0]:
            leaf.grad = None
        calls += 1
    return (time.perf_counter() - start) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[28, 128, 256])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as distsent's CPU training runs; the SDPA peer gains from it too
    for length in args.lengths:
        tensors = inputs(args.batch, length)
        times = {"distsent": [], "sdpa": []}
        for step in (distsent_step, sdpa_step):  # warm-up: two calls each
            mean_milliseconds(step, tensors, seconds=0)
        for _ in range(args.rounds):
            times["distsent"].append(mean_milliseconds(distsent_step, tensors, seconds=1))
            times["sdpa"].append(mean_milliseconds(sdpa_step, tensors, seconds=1))
        best = {name: min(values) for name, values in times.items()}
        record = {
            "length": length,
            "batch": args.batch,
            "heads": HEADS,
            "distsent_ms": round(best["distsent"], 4),
            "sdpa_math_ms": round(best["sdpa"], 4),
            "speedup": round(best["sdpa"] / best["distsent"], 3),
        }
        print(json.dumps(record), flush=True)
    print("command:", shlex.join([os.path.relpath(sys.executable), *sys.argv]))


if __name__ == "__main__":
    main()
