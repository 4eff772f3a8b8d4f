"""Where one distsent CPU training step's time goes, and how each part scales with threads.

    python bench/step_profile.py [--threads 1,2] [--steps 20] [--batch 32] [--length 28] [--min-length N]
                                 [--vocabulary 12503] [KEY=VALUE ...]

The model and step `distsent train` runs on CPU (the packaged MiniLM unless overridden, its
last layer for [CLS] only, CPU dropout masks, the word-embedding rows of tokens outside the
training vocabulary held aside (texts are drawn from --vocabulary ids, 12,503 as in Rotten
Tomatoes' training split), the precision `train.mixed_precision=auto` picks
here (bf16 autocast where bf16 matmuls are faster than fp32 ones), gradient clipping, fused AdamW,
tcmalloc where installed, else glibc keeping freed memory) on synthetic batches of one length:
length grouping makes real batches nearly uniform (28 tokens on average for Rotten Tomatoes).
With --min-length, text lengths are drawn uniformly from [min-length, length], as in batches
that are not grouped, and the batch is packed where `distsent train` would pack it.
For each thread count it prints the milliseconds per step of forward, backward, the
gradient norm, optimizer step (with the clipping, as in training) and zero_grad; then one line per heavy operator with its self time
per step at each thread count, and for matrix products their FLOP/s against the matmul peak
of the step's precision measured in the same run; then the command line. Answers "what is left besides the
GEMMs, and does a second core help it".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

from compare_trainer import gemm_peak

PHASES = ("forward", "backward", "grad_norm", "optimizer_step", "zero_grad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per thread count")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=28, help="tokens per text, [CLS] included")
    parser.add_argument("--min-length", type=int, default=None, help="shortest text; default: --length")
    parser.add_argument(
        "--vocabulary", type=int, default=12503, help="distinct token ids the texts are drawn from (the training set's)"
    )
    parser.add_argument("--top", type=int, default=15, help="operators to list, by self time")
    parser.add_argument("overrides", nargs="*", help="distsent config overrides, e.g. model.name=tiny-bert")
    args = parser.parse_args(argv)
    if args.vocabulary < 3:
        parser.error("--vocabulary: at least 3 ids ([CLS], the pad token and one a text can hold)")
    return args


class TrainingStep:
    """One optimizer step of `distsent train` on CPU, timed phase by phase."""

    def __init__(
        self, overrides: list[str], batch: int, length: int, min_length: int | None = None, vocabulary: int = 12503
    ) -> None:
        import torch

        from distsent.allocator import active_allocator
        from distsent.config import load_config
        from distsent.cpu_training import keep_freed_memory, use_cpu_dropout
        from distsent.distributed import LaunchInfo, resolve_mixed_precision
        from distsent.first_token import use_first_token_last_layer
        from distsent.modeling import build_model, build_tokenizer, classification_loss
        from distsent.optim import build_optimizer
        from distsent.packing import is_packed, model_inputs, training_collator
        from distsent.training_rows import decay_held_aside_rows, train_only_training_rows

        self.cfg = load_config(None, overrides)
        if active_allocator() == "system" and self.cfg.train.cpu_keep_freed_memory:
            keep_freed_memory()  # as train() does without tcmalloc
        tokenizer = build_tokenizer(self.cfg.model)
        self.model = build_model(self.cfg.model, ["negative", "positive"], len(tokenizer))
        first_token_only = self.cfg.model.last_layer_cls_only and use_first_token_last_layer(self.model)
        use_cpu_dropout(self.model)
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        # The training set's vocabulary: [CLS], the pad token and the ids the texts are drawn from.
        special = [tokenizer.cls_token_id, tokenizer.pad_token_id]
        ordinary = 1000 + torch.randperm(len(tokenizer) - 1000, generator=generator)[: vocabulary - len(special)]
        seen_rows_only = None
        if self.cfg.model.train_only_seen_embeddings:
            seen_rows_only = train_only_training_rows(self.model, torch.cat([torch.tensor(special), ordinary]))
        collate = training_collator(self.model, tokenizer.pad_token_id, self.cfg.train, first_token_only, on_cpu=True)
        self.model.train()
        self.optimizer = build_optimizer(self.cfg.train, self.model, fused=True)
        if seen_rows_only is not None:
            decay_held_aside_rows(self.model, self.optimizer)
        self.loss_of = classification_loss
        self.model_inputs = model_inputs
        shortest = length if min_length is None else min_length
        lengths = torch.randint(shortest, length + 1, (batch,), generator=generator)
        examples = [
            {
                "input_ids": [
                    tokenizer.cls_token_id,
                    *ordinary[torch.randint(0, len(ordinary), (n - 1,), generator=generator)].tolist(),
                ],
                "label": int(torch.randint(0, 2, (), generator=generator)),
            }
            for n in lengths.tolist()
        ]
        self.batch = collate(examples)
        self.packed = is_packed(self.batch)
        self.real_tokens = int(lengths.sum())
        # The precision `distsent train` would pick on this CPU; it refuses fp16 there.
        cpu_only = LaunchInfo(world_size=1, rank=0, local_rank=0, use_deepspeed=False, has_cuda=False)
        precision = resolve_mixed_precision(self.cfg.train.mixed_precision, cpu_only)
        self.dtype = torch.bfloat16 if precision == "bf16" else None

    def fresh_batch(self) -> dict:
        """The batch, with a new cu_seq_lens tensor if packed, as every real step has: its
        attention layout is then built once per step, as in training, not once per run."""
        if not self.packed:
            return self.batch
        return {**self.batch, "cu_seq_lens": self.batch["cu_seq_lens"].clone()}

    def run(self) -> dict[str, float]:
        import torch

        from distsent.clipping import clipping_divisor, gradient_norm, gradients_divided_in_step

        marks = [time.perf_counter()]
        with torch.autocast("cpu", dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.model(**self.model_inputs(self.fresh_batch())).logits
        loss = self.loss_of(logits.float(), self.batch["labels"])
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        # As `distsent train` clips: the norm here, the clipping inside the fused AdamW's step.
        norm = gradient_norm(self.model.parameters())
        marks.append(time.perf_counter())
        with gradients_divided_in_step(
            self.optimizer, clipping_divisor(norm, self.cfg.train.max_grad_norm or math.inf)
        ):
            self.optimizer.step()
        marks.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        return {phase: 1000 * (end - start) for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True)}


def mean_phases(step: TrainingStep, steps: int) -> dict[str, float]:
    totals = dict.fromkeys(PHASES, 0.0)
    for _ in range(steps):
        for phase, ms in step.run().items():
            totals[phase] += ms / steps
    return totals


def operator_times(step: TrainingStep, steps: int) -> dict[str, dict]:
    """Self time and FLOPs per step of every operator, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
        for _ in range(steps):
            step.run()
    return {
        event.key: {
            "calls": event.count / steps,
            "ms": event.self_cpu_time_total / 1000 / steps,
            "flops": event.flops / steps,
        }
        for event in profiler.key_averages()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distsent.allocator import active_allocator, use_tcmalloc

    if argv is None:
        use_tcmalloc()  # as `distsent train` does; re-executes this script
    import torch

    from distsent.config import ConfigError

    thread_counts = [int(count) for count in args.threads.split(",")]
    try:
        step = TrainingStep(args.overrides, args.batch, args.length, args.min_length, args.vocabulary)
    except ConfigError as error:
        print(f"step_profile.py: config error: {error}", file=sys.stderr)
        return 2
    precision = "bf16" if step.dtype is not None else "fp32"
    peak = gemm_peak(max(thread_counts))[precision]
    operators = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for _ in range(args.warmup):
            step.run()
        phases = mean_phases(step, args.steps)
        step_ms = sum(phases.values())
        shown = {k: round(v, 2) for k, v in phases.items()}
        # The step as the sum of the phases printed: rounded separately, the five could be
        # 0.03 ms off it.
        record = {"threads": threads, "phases_ms": shown, "step_ms": round(sum(shown.values()), 2)}
        record["tokens_per_second"] = round(step.real_tokens / step_ms * 1000, 1)
        print(json.dumps(record), flush=True)
        operators[threads] = operator_times(step, args.steps)

    most = max(thread_counts)
    heaviest = sorted(operators[most], key=lambda name: -operators[most][name]["ms"])[: args.top]
    for name in heaviest:
        record = {"operator": name, "calls_per_step": operators[most][name]["calls"]}
        record["ms_per_step"] = {t: round(operators[t].get(name, {"ms": 0.0})["ms"], 2) for t in thread_counts}
        fewest = min(thread_counts)
        if most != fewest and operators[most][name]["ms"] > 0:
            fewest_ms = operators[fewest].get(name, {"ms": 0.0})["ms"]
            record[f"speedup_{fewest}_to_{most}_threads"] = round(fewest_ms / operators[most][name]["ms"], 2)
        if operators[most][name]["flops"]:
            flop_rate = operators[most][name]["flops"] / (operators[most][name]["ms"] / 1000)
            record.update(gflops=round(flop_rate / 1e9, 3), fraction_of_peak=round(flop_rate / peak, 4))
        print(json.dumps(record))
    record = {"precision": precision, "peak_gflops": round(peak / 1e9, 1), "threads": most}
    print(json.dumps({**record, "allocator": active_allocator()}))
    print("command: " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
