"""Throughput and MFU of distsent on a randomly initialised bert-base (for a lent H100/H200).

    python bench/gpu_throughput.py                                   # bert-base, seq 128 and 512, bf16
    python bench/gpu_throughput.py --launch-file launch/accelerate/zero2.yaml   # the same under ZeRO-2
    python bench/gpu_throughput.py --model-size tiny --seq-lengths 32 --steps 6 --log-every 2   # CPU smoke run

It writes one random bert-base (uncased WordPiece vocabulary, 110M parameters: weights over
64 MiB cannot travel to the GPU machines, so they are made there) and, for each sequence length,
a CSV of random-word texts at least that many tokens long, then runs the real
`python -m distsent train` (or `accelerate launch --config_file FILE -m distsent train`) on
them with bf16. Every text fills the sequence, so every token is a real token. Throughput is
read from the run's metrics.jsonl, skipping the first logging windows (CUDA warm-up); peak
memory (peak allocated on GPU, peak RSS on CPU) from its summary.json. The bf16 and fp32
matmul peaks are measured in the same run, and MFU is model FLOP/s over the bf16 peak, with
compare_trainer.py's formula: 6 x non-embedding parameters + 12 x layers x hidden x S per token.
Prints one JSON line per record (`gemm_peak`, one per sequence length) and the formula.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from compare_trainer import cuda_gemm_peak, gemm_peak, machine_description, model_flops, parameter_breakdown

from distsent.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
MODEL_SIZES = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="base")
    parser.add_argument("--seq-lengths", default="128,512", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per sequence length")
    parser.add_argument(
        "--log-every", type=int, default=50, help="logging window in steps (windows of ~1 s on an H100 were too noisy)"
    )
    parser.add_argument("--skip-windows", type=int, default=1, help="first logging windows left out (warm-up)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument("--launch-file", help="run under `accelerate launch --config_file FILE --num_processes 1`")
    parser.add_argument(
        "--tokenizer",
        default=ModelConfig().name,
        help="tokenizer of the random model, as `model.name` takes it (default: the packaged MiniLM's "
        "uncased WordPiece one; a folder with a copy of its tokenizer files where the 90 MB package cannot go)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra distsent override")
    parser.add_argument("--workdir", help="keep models, data and runs here (default: a temporary folder)")
    parser.add_argument("--output", help="also write the JSON lines to this file")
    return parser.parse_args()


def write_random_model(folder: Path, size: str, tokenizer_name: str, seed: int = 0):
    """A randomly initialised BERT classifier with the tokenizer distsent loads for `tokenizer_name`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from distsent.modeling import build_tokenizer

    tokenizer = build_tokenizer(ModelConfig(name=tokenizer_name))
    config = BertConfig(vocab_size=len(tokenizer), num_labels=2, **MODEL_SIZES[size])
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def write_texts(path: Path, tokenizer, seq_len: int, count: int, seed: int = 0) -> None:
    """`count` texts of `seq_len` random whole words (each at least one token), random labels."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    rng = random.Random(seed)
    with path.open("w") as handle:
        handle.write("text,label\n")
        for _ in range(count):
            handle.write(" ".join(rng.choices(words, k=seq_len)) + f",{rng.randint(0, 1)}\n")


def run_distsent(args, model_dir: Path, data: Path, seq_len: int, out: Path) -> subprocess.CompletedProcess:
    overrides = [
        f"model.name={model_dir}",
        "data.dataset=files",
        f"data.train_file={data}",
        f"data.max_length={seq_len}",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.steps}",
        f"train.log_every_steps={args.log_every}",
        f"train.mixed_precision={args.precision}",
        "train.eval_every_epoch=false",
        "checkpoint.at_epoch_end=false",
        "log.plots=false",
        "log.progress_bar=false",
        f"output_dir={out}",
        *args.set,
    ]
    launcher = [sys.executable, "-m", "distsent"]
    if args.launch_file:
        launcher = [
            *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.launch_file),
            *("--num_processes", "1", "-m", "distsent"),
        ]
    command = [*launcher, "train", *overrides]
    print("[distsent]", shlex.join(command), file=sys.stderr, flush=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def steady_throughput(run_dir: Path, skip_windows: int) -> dict[str, float]:
    """Mean real tokens/s and examples/s over the logging windows after the warm-up."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [e for e in events if e["event"] == "train"][skip_windows:]
    if not windows:
        raise SystemExit(f"no logging window after the first {skip_windows} in {run_dir}: raise --steps")
    return {
        "tokens_per_second": sum(w["tokens_per_second"] for w in windows) / len(windows),
        "examples_per_second": sum(w["examples_per_second"] for w in windows) / len(windows),
        "windows": len(windows),
    }


def main() -> int:
    import torch

    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="distsent-gpu-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    machine = machine_description()
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    # On CPU, the same peak measurement as compare_trainer.py.
    peaks = cuda_gemm_peak() if device == "cuda" else gemm_peak(torch.get_num_threads())
    records = [
        {
            "name": "gemm_peak",
            "device": device,
            "bf16_flops": peaks["bf16"],
            "fp32_flops": peaks["fp32"],
            "machine": machine,
            "command": command,
        }
    ]
    print(json.dumps(records[0]), flush=True)

    model_dir = workdir / f"bert-{args.model_size}-random"
    model, tokenizer = write_random_model(model_dir, args.model_size, args.tokenizer)
    params = parameter_breakdown(model)
    for seq_len in (int(s) for s in args.seq_lengths.split(",")):
        data = workdir / f"texts-{seq_len}.csv"
        # Enough for every step inside one epoch after the 10% validation hold-out.
        write_texts(data, tokenizer, seq_len, count=int(args.batch_size * (args.steps + 2) / 0.9) + 1)
        run_dir = workdir / f"run-{seq_len}"
        result = run_distsent(args, model_dir, data, seq_len, run_dir)
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-6000:], file=sys.stderr)
            raise SystemExit(f"distsent exited {result.returncode} at seq {seq_len}")
        summary = json.loads((run_dir / "summary.json").read_text())
        speed = steady_throughput(run_dir, args.skip_windows)
        flops = model_flops(
            params, model.config, speed["tokens_per_second"], seq_len, peaks, summary["last_layer_cls_only"]
        )
        record = {
            "name": f"bert-{args.model_size} seq {seq_len}",
            "seq_len": seq_len,
            "micro_batch_size": args.batch_size,
            "precision": summary["mixed_precision"],
            "distributed_type": summary["distributed_type"],
            "launch_file": args.launch_file,
            **speed,
            "peak_memory_mib": summary["peak_memory_mib"],
            **flops,
        }
        records.append(record)
        print(json.dumps(record), flush=True)
        print(f"MFU [seq {seq_len}]: {flops['formula']}", file=sys.stderr)
    print(f"command: {command}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
