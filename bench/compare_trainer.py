"""distsent vs the Hugging Face Trainer on the same model, data and hyper-parameters, in one run.

    python bench/compare_trainer.py                       # MiniLM on embedded Rotten Tomatoes
    python bench/compare_trainer.py --dataset imdb --max-length 256 --max-train-samples 4000

Each contender trains in its own subprocess (so peak memory is its own) on the identical
train/validation texts (distsent's seeded stratified split), then reports one JSON line:
real (non-padding) training tokens/s, examples/s, training seconds, peak RSS, validation
accuracy, and model FLOPs utilisation against the bf16 matmul peak measured in this run.
The ratios distsent / Trainer follow.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDERS = ("distsent", "trainer_defaults", "trainer_bf16", "trainer_bf16_grouped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["rotten_tomatoes", "imdb"], default="rotten_tomatoes")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="distsent model name (tiny-bert for smoke tests)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per contender (default: all cores)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--output", help="also write the JSON lines to this file")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def distsent_overrides(args: argparse.Namespace, output_dir: str) -> list[str]:
    overrides = [
        f"model.name={args.model}",
        f"data.dataset=embedded:{args.dataset}",
        f"data.max_length={args.max_length}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        "train.eval_every_epoch=false",
        "log.progress_bar=false",
        "log.plots=false",
        "checkpoint.at_epoch_end=false",
        f"output_dir={output_dir}",
    ]
    if args.max_train_samples:
        overrides.append(f"data.max_train_samples={args.max_train_samples}")
    if args.max_eval_samples:
        overrides.append(f"data.max_eval_samples={args.max_eval_samples}")
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    return overrides


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_flops_per_token(model, mean_sequence_length: float) -> tuple[float, str]:
    """6 x non-embedding parameters + 12 x layers x hidden x sequence length (attention)."""
    config = model.config
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings." in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    attention = 12 * config.num_hidden_layers * config.hidden_size * mean_sequence_length
    formula = (
        f"6 x {non_embedding:,} non-embedding params + 12 x {config.num_hidden_layers} layers x "
        f"{config.hidden_size} hidden x {mean_sequence_length:.1f} mean tokens = {6 * non_embedding + attention:,.0f} FLOPs/token"
    )
    return 6 * non_embedding + attention, formula


def run_distsent(args: argparse.Namespace) -> dict:
    from distsent.config import load_config
    from distsent.modeling import build_model, build_tokenizer
    from distsent.train import train

    with tempfile.TemporaryDirectory() as output_dir:
        cfg = load_config(None, distsent_overrides(args, output_dir))
        summary = train(cfg)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, ["negative", "positive"], len(tokenizer))
    examples = summary["global_step"] * summary["global_batch_size"]
    mean_length = summary["train_tokens"] / examples
    flops_per_token, formula = model_flops_per_token(model, mean_length)
    return {
        "tokens_per_second": summary["train_tokens_per_second"],
        "examples_per_second": summary["train_examples_per_second"],
        "train_seconds": summary["train_seconds"],
        "accuracy": summary["eval"]["accuracy"],
        "flops_per_token": flops_per_token,
        "flops_formula": formula,
    }


def run_trainer(args: argparse.Namespace, bf16: bool, group_by_length: bool) -> dict:
    import datasets
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from distsent.config import load_config
    from distsent.data import load_labeled_splits
    from distsent.modeling import build_model, build_tokenizer, resolve_model_source

    cfg = load_config(None, distsent_overrides(args, "unused"))
    splits = load_labeled_splits(cfg.data)
    tokenizer = build_tokenizer(cfg.model)

    def encode(split: str) -> datasets.Dataset:
        data = datasets.Dataset.from_dict({"text": splits.texts[split], "label": splits.labels[split]})
        return data.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
            batched=True,
            remove_columns=["text"],
        )

    train_set, eval_set = encode("train"), encode("validation")
    if args.model == "tiny-bert":
        model = build_model(cfg.model, splits.label_names, len(tokenizer))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_source(args.model), num_labels=2)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=128,
            learning_rate=args.lr,
            warmup_steps=cfg.train.warmup_ratio,  # a float below 1 is a ratio in transformers 5
            weight_decay=cfg.train.weight_decay,
            max_grad_norm=cfg.train.max_grad_norm,
            seed=cfg.train.seed,
            bf16=bf16,
            train_sampling_strategy="group_by_length" if group_by_length else "random",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=training_args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer)
        )
        result = trainer.train()
        predictions = trainer.predict(eval_set)
    seconds = result.metrics["train_runtime"]
    lengths = np.asarray([len(ids) for ids in train_set["input_ids"]])
    # The Trainer keeps the last partial batch: every example is trained on once per epoch.
    real_tokens = lengths.sum() * args.epochs
    flops_per_token, formula = model_flops_per_token(model, float(lengths.mean()))
    accuracy = float((predictions.predictions.argmax(-1) == np.asarray(splits.labels["validation"])).mean())
    return {
        "tokens_per_second": real_tokens / seconds,
        "examples_per_second": len(train_set) * args.epochs / seconds,
        "train_seconds": seconds,
        "accuracy": accuracy,
        "flops_per_token": flops_per_token,
        "flops_formula": formula,
    }


def run_one(args: argparse.Namespace) -> None:
    name = args.run_one
    start = time.perf_counter()
    if name == "distsent":
        result = run_distsent(args)
    else:
        result = run_trainer(args, bf16=name != "trainer_defaults", group_by_length=name == "trainer_bf16_grouped")
    result.update(name=name, wall_seconds=time.perf_counter() - start, peak_rss_mib=peak_rss_mib())
    print("RESULT " + json.dumps(result), flush=True)


def gemm_peak_flops(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-N dense matmul throughput through torch, in FLOP/s."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_one:
        run_one(args)
        return 0
    command = "python bench/compare_trainer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    peaks = {"bf16": gemm_peak_flops("bfloat16"), "fp32": gemm_peak_flops("float32")}
    lines = [{"name": "gemm_peak", "bf16_flops": peaks["bf16"], "fp32_flops": peaks["fp32"], "command": command}]
    print(json.dumps(lines[0]), flush=True)
    results = {}
    # The workload settings, as flags for each contender's subprocess.
    forwarded = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in vars(args).items()
        if value is not None and key not in ("output", "run_one", "contenders")
    ]
    for name in args.contenders.split(","):
        if name not in CONTENDERS:
            raise SystemExit(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
        process = subprocess.run(
            [sys.executable, __file__, *forwarded, "--run-one", name],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        line = next((row for row in process.stdout.splitlines() if row.startswith("RESULT ")), None)
        if process.returncode != 0 or line is None:
            raise SystemExit(f"{name} failed ({process.returncode}):\n{process.stderr[-4000:]}")
        result = json.loads(line.removeprefix("RESULT "))
        result["mfu_vs_bf16_peak"] = result["tokens_per_second"] * result["flops_per_token"] / peaks["bf16"]
        results[name] = result
        lines.append(result)
        print(json.dumps(result), flush=True)
    if "distsent" in results:
        mine = results["distsent"]
        for name, other in results.items():
            if name == "distsent":
                continue
            ratio = {
                "name": f"ratio distsent/{name}",
                "tokens_per_second": mine["tokens_per_second"] / other["tokens_per_second"],
                "accuracy_difference": mine["accuracy"] - other["accuracy"],
                "peak_rss_ratio": mine["peak_rss_mib"] / other["peak_rss_mib"],
            }
            lines.append(ratio)
            print(json.dumps(ratio), flush=True)
    print(
        f"MFU = tokens/s x FLOPs/token / bf16 GEMM peak; {results[next(iter(results))]['flops_formula']}"
        if results
        else ""
    )
    if args.output:
        Path(args.output).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
