"""distsent vs the Hugging Face Trainer: same model, data and hyper-parameters, one run, one machine.

    python bench/compare_trainer.py                                   # MiniLM-L6, embedded Rotten Tomatoes, 2 epochs
    python bench/compare_trainer.py --dataset imdb --max-train-samples 2000   # IMDB, max_length 256, a subset
    python bench/compare_trainer.py --model tiny-bert --epochs 0.25 --max-train-samples 256   # seconds, for tests
    python bench/compare_trainer.py --rounds 2    # every contender twice, the second round in reverse order

Contenders (`--contenders`, comma-separated):
  distsent              `python -m distsent train ...` as a subprocess; numbers from its summary.json
  trainer_defaults      transformers.Trainer at its defaults: fp32, random batches padded by DataCollatorWithPadding
  trainer_bf16          the same with bf16=True (the Trainer's own bf16 autocast)
  trainer_bf16_grouped  bf16 plus train_sampling_strategy="group_by_length" (transformers 5's group_by_length)
  trainer_grouped       fp32 with group_by_length: the Trainer's fastest setting on CPUs whose bf16 matmuls
                        are slower than fp32 ones (distsent's train.mixed_precision=auto picks fp32 there)
  trainer_bf16_grouped_tcmalloc   the same with tcmalloc preloaded, the allocator distsent runs on by default
                        (distsent/allocator.py): shows how much of distsent's lead is the allocator

Every contender trains in its own subprocess (so its peak RSS, read with os.wait4, is its own), on the
identical train/validation texts (distsent's loader and seeded stratified validation split, tokenised by
distsent's tokenize), from the identical initial weights (distsent's build_model after set_seed), with
the identical optimizer-step count, warmup, learning rate, weight decay, clipping, batch size and seed.
Validation accuracy is computed the same way for all: the trained fp32 weights, argmax of the logits on
the same validation set. The Trainer's "best" is its fastest setting (TrainingArguments, so not the
tcmalloc run) whose accuracy is within 0.01 of its defaults. distsent picks its allocator as it does for
any user (DISTSENT_ALLOCATOR=system in the environment benchmarks it on glibc's malloc).

The machine's speed drifts during a run (the matmul peak measured before and after the contenders
can differ by 15%), and each contender runs at its own time. With `--rounds 2` every contender runs
twice, once in each order, and its record combines both runs (rates over all their work together,
mean accuracy; each run's figures under "rounds"), so the drift favours none of them.

Output: one JSON line per record on stdout (and in --output): `gemm_peak` (machine, matmul peaks, command),
one line per contender, `ratio distsent/...` lines, one `mfu` line per contender with the formula, and a
final `summary`. Human-readable notes go to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONTENDERS = (
    "distsent",
    "trainer_defaults",
    "trainer_bf16",
    "trainer_bf16_grouped",
    "trainer_grouped",
    "trainer_bf16_grouped_tcmalloc",
)
TRAINER_SETTINGS = {
    "trainer_defaults": {"bf16": False, "train_sampling_strategy": "random"},
    "trainer_bf16": {"bf16": True, "train_sampling_strategy": "random"},
    "trainer_bf16_grouped": {"bf16": True, "train_sampling_strategy": "group_by_length"},
    "trainer_grouped": {"bf16": False, "train_sampling_strategy": "group_by_length"},
    "trainer_bf16_grouped_tcmalloc": {"bf16": True, "train_sampling_strategy": "group_by_length"},
}
# Run with tcmalloc preloaded, as distsent runs by default: how much of distsent's lead is the
# allocator. Reported beside the others, but not a candidate for the Trainer's "best", which is
# its best TrainingArguments.
ON_TCMALLOC = {"trainer_bf16_grouped_tcmalloc"}
DEFAULT_MAX_LENGTH = {"rotten_tomatoes": 128, "imdb": 256}
# "Best" Trainer setting: the fastest whose accuracy is within this of the Trainer's defaults.
ACCURACY_TOLERANCE = 0.01
# MFU is judged against the higher of the two matmul peaks: on a CPU whose bf16 matmuls are
# slower than fp32 ones, the bf16 peak is not the machine's limit.
TARGETS = {"vs_trainer_best": 1.6, "vs_trainer_defaults": 3.0, "mfu": 0.50}
EVAL_BATCH_SIZE = 128
# What --distsent-set may change: how distsent computes, never what it computes (the
# hyper-parameters and data every contender shares come from the workload options).
SPEED_KNOBS = (
    "train.compile",
    "train.unpad",
    "train.unpad_min_padding",
    "train.length_grouping",
    "train.mixed_precision",
    "train.cpu_keep_freed_memory",
    "model.attn_implementation",
    "model.last_layer_cls_only",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/compare_trainer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DEFAULT_MAX_LENGTH), default="rotten_tomatoes")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="distsent model.name (tiny-bert for smoke runs)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-train-samples", type=int, help="seeded subset of the training split")
    parser.add_argument("--max-eval-samples", type=int, help="seeded subset of the validation split")
    parser.add_argument("--max-length", type=int, help="tokens per text (default 128; 256 for imdb)")
    parser.add_argument("--batch-size", type=int, help="micro-batch size (default: distsent's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: distsent's)")
    parser.add_argument("--warmup-ratio", type=float, help="warm-up fraction (default: distsent's)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: distsent's)")
    parser.add_argument("--seed", type=int, help="training seed (default: distsent's)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads per contender")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument(
        "--distsent-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"extra distsent override of a speed knob ({', '.join(SPEED_KNOBS)}); repeatable",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the contenders this many times, every other round in reverse order, and combine each "
        "contender's runs: the machine's speed drifts, and this gives every contender the same mean position",
    )
    parser.add_argument("--output", help="also write the JSON lines to this file")
    parser.add_argument("--workdir", help="keep run folders and logs here (default: a temporary folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_length is None:
        args.max_length = DEFAULT_MAX_LENGTH[args.dataset]
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        parser.error(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    for item in args.distsent_set:
        if item.split("=", 1)[0].strip() not in SPEED_KNOBS:
            parser.error(
                f"--distsent-set {item}: only speed knobs ({', '.join(SPEED_KNOBS)}); the workload "
                "(data, hyper-parameters) is set for every contender by the other options"
            )
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    args.contender_names = names
    return args


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """The distsent overrides that define the workload; the Trainer contenders read the same config."""
    overrides = [
        f"model.name={args.model}",
        f"data.dataset=embedded:{args.dataset}",
        f"data.max_length={args.max_length}",
        f"train.epochs={args.epochs}",
        f"train.threads={args.threads}",
    ]
    optional = {
        "data.max_train_samples": args.max_train_samples,
        "data.max_eval_samples": args.max_eval_samples,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "train.warmup_ratio": args.warmup_ratio,
        "train.weight_decay": args.weight_decay,
        "train.seed": args.seed,
    }
    overrides += [f"{key}={value}" for key, value in optional.items() if value is not None]
    return overrides


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["WANDB_MODE"] = "disabled"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_measured(
    command: list[str], log_path: Path, threads: int, extra_env: dict[str, str] | None = None
) -> tuple[int, float, float]:
    """Run `command`; return (exit code, wall seconds, peak RSS in MiB of that process).

    os.wait4 reports the rusage of exactly this child, so each contender's peak is its own."""
    start = time.perf_counter()
    env = {**child_env(threads), **(extra_env or {})}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    # Linux reports ru_maxrss in KiB.
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Shared pieces: workload, accuracy, FLOPs, GEMM peak
# ---------------------------------------------------------------------------------------------


def load_workload(overrides: list[str]):
    """(cfg, splits, tokenizer, train_set, eval_set) exactly as distsent's train() builds them."""
    from distsent.config import load_config
    from distsent.data import load_labeled_splits, tokenize
    from distsent.modeling import build_tokenizer

    cfg = load_config(None, overrides)
    tokenizer = build_tokenizer(cfg.model)
    splits = load_labeled_splits(cfg.data)
    train_set = tokenize(splits.texts["train"], splits.labels["train"], tokenizer, cfg.data)
    eval_set = tokenize(splits.texts["validation"], splits.labels["validation"], tokenizer, cfg.data)
    return cfg, splits, tokenizer, train_set, eval_set


def step_counts(cfg, num_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps) as distsent computes them for one process."""
    from distsent.optim import total_optimizer_steps

    steps_per_epoch = num_train // (cfg.train.batch_size * cfg.train.grad_accum_steps)
    return steps_per_epoch, total_optimizer_steps(cfg.train, steps_per_epoch)


def validation_accuracy(model, eval_set, pad_token_id: int) -> float:
    """The one accuracy for every contender: fp32 weights, no autocast, argmax of the logits."""
    import torch

    from distsent.batching import PadCollator

    collate = PadCollator(pad_token_id)
    lengths = eval_set["length"]
    order = sorted(range(len(eval_set)), key=lambda i: -lengths[i])
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(order), EVAL_BATCH_SIZE):
            batch = collate([eval_set[i] for i in order[start : start + EVAL_BATCH_SIZE]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return correct / len(eval_set)


def parameter_breakdown(model) -> dict[str, int]:
    """Parameters by role. Per-token matmul work uses the encoder layers only: embeddings are
    look-ups, and the pooler and classifier run once per sequence, not once per token."""
    counts = {"total": 0, "embedding": 0, "per_sequence_head": 0}
    for name, parameter in model.named_parameters():
        counts["total"] += parameter.numel()
        if "embeddings." in name:
            counts["embedding"] += parameter.numel()
        elif "pooler." in name or "classifier" in name:
            counts["per_sequence_head"] += parameter.numel()
    counts["non_embedding_per_token"] = counts["total"] - counts["embedding"] - counts["per_sequence_head"]
    return counts


def model_flops(
    params: dict, config, tokens_per_second: float, seq_len: float, peaks: dict, last_layer_cls_only: bool = False
) -> dict:
    """Training FLOPs per real token = 6 N + 12 L H S (forward + backward; attention scores and
    values), model FLOP/s = real tokens/s x that, and MFU against the measured GEMM peaks.

    MFU counts the model's FLOPs whatever the run executes. A run whose last layer computes
    [CLS] only (distsent's model.last_layer_cls_only) skips, for all positions but the first,
    that layer's query, attention output and feed-forward products (2 H^2 + 2 H I weights) and
    its attention; the executed FLOPs and their fraction of the peak are reported beside it."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    dense = 6 * params["non_embedding_per_token"]
    attention = 12 * layers * hidden * seq_len
    per_token = dense + attention
    flops_per_second = tokens_per_second * per_token
    mfu_bf16 = flops_per_second / peaks["bf16"]
    best_peak = max(peaks.values())
    higher = max(peaks, key=peaks.get)
    formula = (
        f"FLOPs/token = 6 x N + 12 x L x H x S = 6 x {params['non_embedding_per_token']:,} + "
        f"12 x {layers} x {hidden} x {seq_len:.2f} = {dense:,.0f} + {attention:,.0f} = {per_token:,.0f}; "
        f"model FLOP/s = {tokens_per_second:,.1f} real tokens/s x {per_token:,.0f} = {flops_per_second / 1e9:,.2f} GFLOP/s; "
        f"MFU = {flops_per_second / 1e9:,.2f} / {peaks['bf16'] / 1e9:,.1f} GFLOP/s bf16 peak = {mfu_bf16:.1%} "
        f"({flops_per_second / peaks['fp32']:.1%} of the {peaks['fp32'] / 1e9:,.1f} GFLOP/s fp32 peak; "
        f"{flops_per_second / best_peak:.1%} of the higher, the {higher} peak)"
    )
    executed = per_token
    executed_fraction = flops_per_second / best_peak
    if last_layer_cls_only:
        skipped_weights = 2 * hidden * hidden + 2 * hidden * config.intermediate_size
        # Each position but the first: 1 - 1/S of them, in a sequence of S positions.
        skipped = (6 * skipped_weights + 12 * hidden * seq_len) * (1 - 1 / seq_len)
        executed = per_token - skipped
        executed_fraction = tokens_per_second * executed / best_peak
        formula += (
            f"; executed (last layer for [CLS] only): {per_token:,.0f} - (6 x {skipped_weights:,} + 12 x {hidden} x "
            f"{seq_len:.2f}) x (1 - 1/{seq_len:.2f}) = {executed:,.0f} FLOPs/token, "
            f"{executed_fraction:.1%} of the higher peak"
        )
    return {
        "flops_per_token": per_token,
        "model_gflops_per_second": flops_per_second / 1e9,
        "mfu_vs_bf16_peak": mfu_bf16,
        "mfu_vs_fp32_peak": flops_per_second / peaks["fp32"],
        "mfu_vs_best_peak": flops_per_second / best_peak,
        "executed_flops_per_token": executed,
        "executed_fraction_of_best_peak": executed_fraction,
        "formula": formula,
    }


# How the peaks are measured: one large square product on a GPU; on a CPU two sizes, since
# the fastest blocking differs between CPUs.
CUDA_PEAK_SIZE, CUDA_PEAK_REPEATS = 8192, 10
CPU_PEAK_SIZES, CPU_PEAK_REPEATS = (2048, 4096), 3


def device_gemm_peak(threads: int) -> dict[str, float]:
    """The matmul peaks of the device the contenders train on: the GPU where there is one."""
    import torch

    return cuda_gemm_peak() if torch.cuda.is_available() else gemm_peak(threads)


def device_gemm_peak_method() -> str:
    """What `device_gemm_peak` measures here, for the report."""
    import torch

    if torch.cuda.is_available():
        return f"best of {CUDA_PEAK_REPEATS} square bf16/fp32 matmuls at n={CUDA_PEAK_SIZE} on the GPU"
    sizes = " and ".join(f"n={size}" for size in CPU_PEAK_SIZES)
    return f"best of {CPU_PEAK_REPEATS} square matmuls at {sizes} through torch"


def cuda_gemm_peak(size: int = CUDA_PEAK_SIZE, repeats: int = CUDA_PEAK_REPEATS) -> dict[str, float]:
    """Best-of square matmul throughput on the GPU, bf16 and fp32, in FLOP/s (synchronised:
    CUDA kernels run asynchronously, so the clock stops only when the product is done)."""
    import torch

    peaks = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, dtype=dtype, device="cuda")
        b = torch.randn(size, size, dtype=dtype, device="cuda")
        best = 0.0
        for _ in range(repeats + 1):  # the first is a warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            torch.cuda.synchronize()
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
        peaks[label] = best
    return peaks


def gemm_peak(threads: int, sizes=CPU_PEAK_SIZES, repeats: int = CPU_PEAK_REPEATS) -> dict[str, float]:
    """Best-of dense square matmul throughput on the CPU through torch, bf16 and fp32, in FLOP/s."""
    import torch

    torch.set_num_threads(threads)
    peaks = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        best = 0.0
        for size in sizes:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b  # warm-up: kernel selection and page faults
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * size**3 / (time.perf_counter() - start))
        peaks[label] = best
    return peaks


def machine_description() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def batch_statistics(lengths: list[int], padded: list[int]) -> dict:
    """Real tokens, padded tokens and the mean padded length per batch from per-batch records."""
    real = sum(lengths)
    slots = sum(padded)
    return {
        "train_tokens": real,
        "padded_tokens": slots,
        "padding_fraction": 1 - real / slots if slots else 0.0,
    }


def distsent_batches(cfg, train_lengths: list[int], packed_row=None) -> tuple[list[int], list[int], list[int]]:
    """The micro-batches distsent trains on (its own TrainBatchPlan, one process):
    (real tokens, padded tokens, padded length) per micro-batch. `packed_row(lengths)` gives
    the length of the packed row distsent ran a batch as, filler included, or None where it
    padded the batch; a packed row's only padding is its filler (attention's block still has
    padding)."""
    from distsent.batching import TrainBatchPlan

    plan = TrainBatchPlan(
        train_lengths,
        micro_batch_size=cfg.train.batch_size,
        world_size=1,
        rank=0,
        grad_accum_steps=cfg.train.grad_accum_steps,
        seed=cfg.train.seed,
        length_grouping=cfg.train.length_grouping,
    )
    _, total = step_counts(cfg, len(train_lengths))
    real, padded, longest = [], [], []
    step, epoch = 0, 0
    while step < total:
        for index, batch in enumerate(plan.micro_batches(epoch)):
            sizes = [train_lengths[i] for i in batch]
            real.append(sum(sizes))
            longest.append(max(sizes))
            row = packed_row(sizes) if packed_row else None
            padded.append(max(sizes) * len(sizes) if row is None else row)
            if (index + 1) % cfg.train.grad_accum_steps == 0:
                step += 1
                if step >= total:
                    break
        epoch += 1
    return real, padded, longest


# ---------------------------------------------------------------------------------------------
# Workers (each in its own subprocess)
# ---------------------------------------------------------------------------------------------


def trainer_worker(args: argparse.Namespace) -> dict:
    """Train with transformers.Trainer in this process and return its measurements."""
    import torch
    from accelerate.utils import set_seed
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from distsent.allocator import active_allocator
    from distsent.modeling import build_model
    from distsent.optim import warmup_steps

    torch.set_num_threads(args.threads)
    settings = TRAINER_SETTINGS[args.worker]
    cfg, splits, tokenizer, train_set, eval_set = load_workload(shared_overrides(args))
    steps_per_epoch, total_steps = step_counts(cfg, len(train_set))
    # distsent seeds, then builds the model: the same classifier-head initialisation here.
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, splits.label_names, len(tokenizer))

    record = {"real": [], "padded": [], "longest": [], "examples": 0}

    def count_batch(module, inputs, kwargs):
        # Counted where the model consumes the batch: accelerate's loader fetches one batch
        # ahead, so counting in the collator would include a batch that is never trained on.
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:
            record["real"].append(int(mask.sum()))
            record["padded"].append(mask.numel())
            record["longest"].append(mask.shape[1])
            record["examples"] += mask.shape[0]

    hook = model.register_forward_pre_hook(count_batch, with_kwargs=True)

    clock = {}

    class TrainClock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *_, **__):
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=cfg.train.batch_size,
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
            learning_rate=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            adam_beta1=cfg.train.adam_beta1,
            adam_beta2=cfg.train.adam_beta2,
            adam_epsilon=cfg.train.adam_eps,
            max_grad_norm=cfg.train.max_grad_norm,
            # distsent's exact step count and warm-up (an int >= 1 is a step count in transformers 5).
            max_steps=total_steps,
            warmup_steps=warmup_steps(cfg.train, total_steps),
            lr_scheduler_type="linear",
            seed=cfg.train.seed,
            # distsent drops an epoch's incomplete last batch; so does the Trainer here, for equal steps.
            dataloader_drop_last=True,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=max(1, cfg.train.log_every_steps),
            report_to="none",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            **settings,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_set,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            callbacks=[TrainClock()],
        )
        output = trainer.train()
    hook.remove()
    seconds = clock["end"] - clock["start"]
    # Without accelerate's autocast wrapper, which a bf16 run leaves on the model's forward:
    # every contender is scored in fp32.
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    accuracy = validation_accuracy(trained, eval_set, tokenizer.pad_token_id)
    stats = batch_statistics(record["real"], record["padded"])
    return {
        "train_seconds": seconds,
        "trainer_train_runtime": output.metrics["train_runtime"],
        "tokens_per_second": stats["train_tokens"] / seconds,
        "examples_per_second": record["examples"] / seconds,
        "train_examples": record["examples"],
        "optimizer_steps": output.global_step,
        "mean_padded_length": sum(record["longest"]) / len(record["longest"]),
        **stats,
        "accuracy": accuracy,
        "allocator": active_allocator(),
        "settings": {**settings, "optim": str(training_args.optim), "dataloader_drop_last": True},
    }


def run_worker(args: argparse.Namespace) -> int:
    result = trainer_worker(args)
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_distsent(args: argparse.Namespace, workdir: Path, train_lengths: list[int], eval_set, tokenizer) -> dict:
    from distsent.config import load_config
    from distsent.modeling import load_classifier

    output_dir = workdir / "distsent"
    overrides = [
        *shared_overrides(args),
        f"output_dir={output_dir}",
        # Reporting only: none of these change the training (evaluation leaves the RNG alone and
        # is not counted as training time); they shorten the run around it.
        "train.eval_every_epoch=false",
        "checkpoint.at_epoch_end=false",
        "log.plots=false",
        "log.progress_bar=false",
        *args.distsent_set,
    ]
    command = [sys.executable, "-m", "distsent", "train", *overrides]
    note(f"[distsent] {shlex.join(command[1:])}")
    code, wall, peak = run_measured(command, workdir / "distsent.log", args.threads)
    if code != 0:
        raise SystemExit(f"distsent exited {code}; see {workdir / 'distsent.log'}")
    summary = json.loads((output_dir / "summary.json").read_text())
    if summary["train_seconds"] > wall:
        raise SystemExit(
            f"distsent's summary says train_seconds={summary['train_seconds']} but the whole process ran {wall:.1f} s: "
            "its training clock is broken, its tokens/s cannot be trusted"
        )
    packed_row = None
    if summary["unpadded"]:
        from distsent.batching import PackingCollator

        # The run's own collator decides, as in training; its pad id and positions play no part.
        collator = PackingCollator(0, 0, summary["unpad_min_padding"], summary["unpad_bucketed_lengths"])
        packed_row = collator.packed_row_length
    # The config the run was given: --distsent-set may change its batching (train.length_grouping).
    own_cfg = load_config(None, overrides)
    real, padded, longest = distsent_batches(own_cfg, train_lengths, packed_row)
    stats = batch_statistics(real, padded)
    if stats["train_tokens"] != summary["train_tokens"]:
        raise SystemExit(
            f"reconstructed distsent batches hold {stats['train_tokens']} real tokens, its summary says "
            f"{summary['train_tokens']}: the benchmark's view of distsent's batching is out of date"
        )
    model = load_classifier(output_dir / "final")
    accuracy = validation_accuracy(model, eval_set, tokenizer.pad_token_id)
    return {
        "train_seconds": summary["train_seconds"],
        "tokens_per_second": summary["train_tokens_per_second"],
        "examples_per_second": summary["train_examples_per_second"],
        "train_examples": summary["global_step"] * summary["global_batch_size"],
        "optimizer_steps": summary["global_step"],
        "mean_padded_length": sum(longest) / len(longest),
        **stats,
        "accuracy": accuracy,
        "distsent_reported_accuracy": summary["eval"].get("accuracy"),
        "allocator": summary["allocator"],
        "last_layer_cls_only": summary["last_layer_cls_only"],
        "unpadded": summary["unpadded"],
        "process_wall_seconds": wall,
        "peak_rss_mib": peak,
        "settings": {"mixed_precision": summary["mixed_precision"], "extra": args.distsent_set},
    }


def run_trainer(args: argparse.Namespace, name: str, workdir: Path, argv: list[str]) -> dict:
    result_path = workdir / f"{name}.json"
    # The worker gets the same workload options, without the driver's own output options.
    cleaned, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--output", "--workdir"):
            skip = True
            continue
        if item.startswith(("--output=", "--workdir=")):
            continue
        cleaned.append(item)
    command = [sys.executable, str(Path(__file__).resolve()), *cleaned, "--worker", name, "--result", str(result_path)]
    extra_env = {}
    if name in ON_TCMALLOC:
        from distsent.allocator import find_tcmalloc, preload_value

        library = find_tcmalloc()
        if library is None:
            raise SystemExit(f"{name} needs libtcmalloc (libtcmalloc-minimal4); leave it out of --contenders")
        extra_env["LD_PRELOAD"] = preload_value(library, os.environ.get("LD_PRELOAD"))
    note(f"[{name}] {TRAINER_SETTINGS[name]}{' with ' + extra_env['LD_PRELOAD'] if extra_env else ''}")
    code, wall, peak = run_measured(command, workdir / f"{name}.log", args.threads, extra_env)
    if code != 0:
        raise SystemExit(f"{name} exited {code}; see {workdir / f'{name}.log'}")
    result = json.loads(result_path.read_text())
    result.update(process_wall_seconds=wall, peak_rss_mib=peak)
    return result


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """The contenders' order in each round: as given, then reversed, and so on. Over an even
    number of rounds every contender's mean position is the same, so a steady drift in the
    machine's speed favours none of them."""
    return [list(names) if index % 2 == 0 else list(reversed(names)) for index in range(rounds)]


def combine_rounds(runs: list[dict]) -> dict:
    """One contender's runs as one result: its rates over all the runs' work together (total
    tokens over total training seconds), its mean accuracy and training time, its highest peak
    memory; each run's own figures under "rounds". The runs did identical work, so everything
    else (steps, tokens, padding) is the first run's."""
    if len(runs) == 1:
        return runs[0]
    seconds = sum(run["train_seconds"] for run in runs)
    combined = dict(runs[0])
    for rate in ("tokens_per_second", "examples_per_second"):
        combined[rate] = sum(run[rate] * run["train_seconds"] for run in runs) / seconds
    combined["train_seconds"] = seconds / len(runs)
    combined["process_wall_seconds"] = sum(run["process_wall_seconds"] for run in runs) / len(runs)
    combined["accuracy"] = sum(run["accuracy"] for run in runs) / len(runs)
    combined["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs)
    kept = ("tokens_per_second", "train_seconds", "accuracy", "peak_rss_mib")
    combined["rounds"] = [{key: run[key] for key in kept} for run in runs]
    return combined


def check_equal_work(results: dict, workload: dict) -> None:
    """Every contender took the workload's optimizer steps over the same number of examples:
    throughput ratios between unequal runs would mean nothing."""
    expected = (workload["optimizer_steps"], workload["optimizer_steps"] * workload["batch_size"])
    for name, result in results.items():
        done = (result["optimizer_steps"], result["train_examples"])
        if done != expected:
            raise SystemExit(
                f"{name} took {done[0]} optimizer steps over {done[1]} examples, the workload is "
                f"{expected[0]} steps over {expected[1]}: not the same work, so no ratios"
            )


def missing_trainer_settings(results: dict) -> list[str]:
    """The Trainer settings (TrainingArguments) that did not run: without them "the Trainer's
    best" is only the best of those that did."""
    return sorted(set(TRAINER_SETTINGS) - ON_TCMALLOC - set(results))


def pick_trainer_best(results: dict) -> tuple[str | None, str]:
    """The fastest Trainer setting whose accuracy is within ACCURACY_TOLERANCE of its defaults."""
    trainers = {name: r for name, r in results.items() if name.startswith("trainer_") and name not in ON_TCMALLOC}
    if not trainers:
        return None, "no Trainer contender ran"
    reference = trainers.get("trainer_defaults")
    eligible = {
        name: r
        for name, r in trainers.items()
        if reference is None or r["accuracy"] >= reference["accuracy"] - ACCURACY_TOLERANCE
    }
    best = max(eligible, key=lambda name: eligible[name]["tokens_per_second"])
    dropped = sorted(set(trainers) - set(eligible))
    why = f"fastest of {sorted(eligible)}"
    if reference is None:
        why += " (trainer_defaults did not run: no accuracy check)"
    else:
        why += f" within {ACCURACY_TOLERANCE} accuracy of trainer_defaults ({reference['accuracy']:.4f})"
    if dropped:
        why += "; excluded for accuracy: " + ", ".join(f"{n} ({trainers[n]['accuracy']:.4f})" for n in dropped)
    return best, why


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)

    import torch

    from distsent.modeling import build_model

    command = shlex.join([".venv/bin/python", "bench/compare_trainer.py", *argv])
    lines: list[dict] = []

    def emit(record: dict) -> None:
        lines.append(record)
        print(json.dumps(record), flush=True)

    machine = machine_description()
    peaks_before = device_gemm_peak(args.threads)
    note(f"GEMM peak before: bf16 {peaks_before['bf16'] / 1e9:.1f}, fp32 {peaks_before['fp32'] / 1e9:.1f} GFLOP/s")

    torch.set_num_threads(args.threads)
    cfg, splits, tokenizer, train_set, eval_set = load_workload(shared_overrides(args))
    train_lengths = list(train_set["length"])
    workload = {
        "dataset": args.dataset,
        "model": args.model,
        "train_examples": len(train_set),
        "validation_examples": len(eval_set),
        "epochs": args.epochs,
        "max_length": cfg.data.max_length,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "warmup_ratio": cfg.train.warmup_ratio,
        "weight_decay": cfg.train.weight_decay,
        "max_grad_norm": cfg.train.max_grad_norm,
        "seed": cfg.train.seed,
        "optimizer_steps": step_counts(cfg, len(train_set))[1],
        "threads": args.threads,
    }

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="distsent-bench-")) if own_workdir else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.contender_names}
    for round_index, order in enumerate(round_orders(args.contender_names, args.rounds)):
        # Round 1 writes where a one-round run always has; later rounds in their own folders.
        round_dir = workdir if round_index == 0 else workdir / f"round{round_index + 1}"
        round_dir.mkdir(exist_ok=True)
        for name in order:
            start = time.perf_counter()
            if name == "distsent":
                result = run_distsent(args, round_dir, train_lengths, eval_set, tokenizer)
            else:
                result = run_trainer(args, name, round_dir, argv)
            runs[name].append(result)
            note(
                f"[{name}] {result['tokens_per_second']:,.1f} real tokens/s, accuracy {result['accuracy']:.4f}, "
                f"{time.perf_counter() - start:.0f} s"
            )
    results = {name: combine_rounds(runs[name]) for name in args.contender_names}

    check_equal_work(results, workload)
    peaks_after = device_gemm_peak(args.threads)
    # The higher of two measurements is the closer to the machine's limit (other load only lowers it).
    peaks = {key: max(peaks_before[key], peaks_after[key]) for key in peaks_before}
    emit(
        {
            "name": "gemm_peak",
            "bf16_flops": peaks["bf16"],
            "fp32_flops": peaks["fp32"],
            "before": peaks_before,
            "after": peaks_after,
            "method": device_gemm_peak_method() + ", before and after the contenders",
            "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
            "workload": workload,
            "command": command,
        }
    )

    model = build_model(cfg.model, splits.label_names, len(tokenizer))
    params = parameter_breakdown(model)
    for name, result in results.items():
        flops = model_flops(
            params,
            model.config,
            result["tokens_per_second"],
            result["mean_padded_length"],
            peaks,
            result.get("last_layer_cls_only", False),
        )
        result.update({key: value for key, value in flops.items() if key != "formula"})
        result["formula"] = flops["formula"]
        emit({"name": name, **{k: v for k, v in result.items() if k != "formula"}})

    best, why = pick_trainer_best(results)
    ratios = {}
    if "distsent" in results:
        mine = results["distsent"]
        references = [n for n in results if n.startswith("trainer_")]
        labelled = [(n, n) for n in references] + ([("trainer_best", best)] if best else [])
        for label, other_name in labelled:
            other = results[other_name]
            ratio = {
                "name": f"ratio distsent/{label}",
                "versus": other_name,
                "tokens_per_second": mine["tokens_per_second"] / other["tokens_per_second"],
                "examples_per_second": mine["examples_per_second"] / other["examples_per_second"],
                "train_seconds": mine["train_seconds"] / other["train_seconds"],
                "peak_rss": mine["peak_rss_mib"] / other["peak_rss_mib"],
                "accuracy_difference": mine["accuracy"] - other["accuracy"],
            }
            if label == "trainer_best":
                ratio["why"] = why
            ratios[label] = ratio
            emit(ratio)

    for name, result in results.items():
        emit(
            {
                "name": "mfu",
                "contender": name,
                "mean_padded_length": result["mean_padded_length"],
                "formula": result["formula"],
            }
        )
        note(f"MFU [{name}]: {result['formula']}")
    note(
        f"params: {params['total']:,} total, {params['embedding']:,} embedding, "
        f"{params['per_sequence_head']:,} pooler+classifier (per sequence), N = {params['non_embedding_per_token']:,} "
        "per-token; S = mean padded length per batch (the attention each batch actually computes)"
    )

    summary = {
        "name": "summary",
        "command": command,
        "trainer_best": best,
        "trainer_best_why": why,
        "parameters": params,
        "rounds": args.rounds,
    }
    if "distsent" in results:
        checks = {"mfu": results["distsent"]["mfu_vs_best_peak"] >= TARGETS["mfu"]}
        for label, key in (("trainer_best", "vs_trainer_best"), ("trainer_defaults", "vs_trainer_defaults")):
            if label in ratios:
                checks[key] = (
                    ratios[label]["tokens_per_second"] >= TARGETS[key] and ratios[label]["accuracy_difference"] >= 0
                )
        missing = missing_trainer_settings(results)
        if missing and "vs_trainer_best" in checks:
            # Undecided, not met: the setting left out may be the Trainer's fastest.
            checks["vs_trainer_best"] = None
            summary["trainer_best_partial"] = f"not run: {', '.join(missing)}"
        summary["targets"] = TARGETS
        summary["targets_met"] = checks
    summary["workdir"] = None if own_workdir else str(workdir)
    emit(summary)
    note(f"command: {command}")

    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("".join(json.dumps(line) + "\n" for line in lines))
    if own_workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
