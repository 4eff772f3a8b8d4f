"""train(cfg): one readable loop from data to exported model."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from distsent.batching import PadCollator, TrainBatchPlan
from distsent.checkpoint import export_model
from distsent.config import Config, save_config
from distsent.data import load_labeled_splits, tokenize
from distsent.distributed import build_accelerator, read_launch_info
from distsent.evaluate import evaluate
from distsent.metrics import is_improvement
from distsent.modeling import build_model, build_tokenizer, classification_loss, parameter_counts
from distsent.optim import build_optimizer
from distsent.tracking import RunLogger

log = logging.getLogger("distsent")


def train(cfg: Config) -> dict:
    """Fine-tune as configured; returns the summary also written to <output_dir>/summary.json."""
    info = read_launch_info()
    accelerator = build_accelerator(cfg, info)
    run_logger = None
    try:
        output_dir = Path(cfg.output_dir)
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, output_dir / "config.yaml")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        set_seed(cfg.train.seed)

        tokenizer = build_tokenizer(cfg.model)
        # Rank 0 reads and tokenises first so the others reuse its datasets cache.
        with accelerator.main_process_first():
            splits = load_labeled_splits(cfg.data)
            train_set = tokenize(splits.texts["train"], splits.labels["train"], tokenizer, cfg.data.max_length)
            eval_set = tokenize(splits.texts["validation"], splits.labels["validation"], tokenizer, cfg.data.max_length)
        label_names = splits.label_names

        world_size = accelerator.num_processes
        plan = TrainBatchPlan(
            train_set["length"],
            micro_batch_size=cfg.train.batch_size,
            world_size=world_size,
            rank=accelerator.process_index,
            grad_accum_steps=cfg.train.grad_accum_steps,
            seed=cfg.train.seed,
            length_grouping=cfg.train.length_grouping,
        )
        total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * plan.steps_per_epoch)

        model = build_model(cfg.model, label_names, len(tokenizer))
        trainable, frozen = parameter_counts(model)
        optimizer, scheduler = build_optimizer(cfg.train, model, total_steps, fused=accelerator.device.type == "cuda")
        # The scheduler is not prepared: accelerate would step it once per process.
        model, optimizer = accelerator.prepare(model, optimizer)
        collator = PadCollator(tokenizer.pad_token_id)

        run_logger = RunLogger(output_dir, accelerator.is_main_process, total_steps)
        run_logger.banner(
            {
                "model": f"{cfg.model.name} ({trainable:,} trainable, {frozen:,} frozen parameters)",
                "data": f"{cfg.data.dataset} {splits.sizes()} labels {label_names}",
                "notes": "; ".join(splits.notes) or "-",
                "distributed": f"{accelerator.distributed_type.value}, {world_size} process(es) on {accelerator.device.type}",
                "precision": accelerator.mixed_precision,
                "global batch": (
                    f"{plan.global_batch_size} = {cfg.train.batch_size} per process x {world_size} processes "
                    f"x {cfg.train.grad_accum_steps} accumulation"
                ),
                "schedule": f"{total_steps} optimizer steps ({plan.steps_per_epoch} per epoch), peak lr {cfg.train.lr}",
                "output": str(output_dir),
            }
        )

        def run_eval(step: int, epoch: float) -> dict:
            metrics, _ = evaluate(model, eval_set, accelerator, cfg.train.eval_batch_size, tokenizer.pad_token_id, label_names)
            run_logger.log_eval(step, epoch, metrics)
            return metrics

        global_step = 0
        best_value: float | None = None
        best_step = 0
        last_metrics: dict = {}
        train_seconds = 0.0
        # Running sums stay on the device; reading them (.item()) is a host-device sync.
        window_loss = torch.zeros((), device=accelerator.device)
        window_micro_batches = 0
        window_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
        total_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
        window_train_seconds = 0.0
        grad_norm = None
        epoch = 0
        model.train()
        while global_step < total_steps:
            loader = DataLoader(train_set, batch_sampler=list(plan.micro_batches(epoch)), collate_fn=collator)
            step_start = time.perf_counter()
            for batch in loader:
                batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
                with accelerator.accumulate(model):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = classification_loss(logits, batch["labels"])
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # Returns the norm before clipping; inf means "measure, don't clip".
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_loss += loss.detach()
                window_micro_batches += 1
                tokens = batch["attention_mask"].sum()
                window_tokens += tokens
                total_tokens += tokens
                if not accelerator.sync_gradients:
                    continue

                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                global_step += 1
                train_seconds += time.perf_counter() - step_start
                run_logger.advance(1)
                fractional_epoch = epoch + (global_step - epoch * plan.steps_per_epoch) / plan.steps_per_epoch

                if global_step % cfg.train.log_every_steps == 0 or global_step == total_steps:
                    # The logged loss is the mean over every rank's micro-batches, not rank 0's.
                    loss_mean = accelerator.reduce(window_loss, "sum").item() / (window_micro_batches * world_size)
                    tokens_sum = accelerator.reduce(window_tokens, "sum").item()
                    # Throughput counts training time only, not evaluation or export.
                    elapsed = train_seconds - window_train_seconds
                    values = {
                        "loss": loss_mean,
                        "lr": scheduler.get_last_lr()[0],
                        "epoch": round(fractional_epoch, 4),
                        "tokens_per_second": tokens_sum / elapsed,
                    }
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    run_logger.log_train(global_step, values)
                    run_logger.advance(0, loss=loss_mean, lr=values["lr"])
                    window_loss.zero_()
                    window_tokens.zero_()
                    window_micro_batches = 0
                    window_train_seconds = train_seconds

                epoch_done = global_step % plan.steps_per_epoch == 0
                should_eval = (
                    (cfg.train.eval_every_steps and global_step % cfg.train.eval_every_steps == 0)
                    or (cfg.train.eval_every_epoch and epoch_done)
                    or global_step == total_steps
                )
                if should_eval:
                    last_metrics = run_eval(global_step, fractional_epoch)
                    value = last_metrics[cfg.train.best_metric]
                    if is_improvement(cfg.train.best_metric, value, best_value):
                        best_value, best_step = value, global_step
                        export_model(accelerator, model, tokenizer, cfg, {"step": global_step, **last_metrics}, output_dir / "best")
                if global_step >= total_steps:
                    break
                step_start = time.perf_counter()
            epoch += 1

        export_model(accelerator, model, tokenizer, cfg, {"step": global_step, **last_metrics}, output_dir / "final")
        total_tokens_all = accelerator.reduce(total_tokens, "sum").item()
        summary = {
            "global_step": global_step,
            "epochs_completed": round(global_step / plan.steps_per_epoch, 4),
            "world_size": world_size,
            "micro_batch_size": cfg.train.batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps,
            "global_batch_size": plan.global_batch_size,
            "mixed_precision": accelerator.mixed_precision,
            "distributed_type": accelerator.distributed_type.value,
            "train_seconds": round(train_seconds, 3),
            "train_tokens": int(total_tokens_all),
            "train_tokens_per_second": total_tokens_all / train_seconds,
            "train_examples_per_second": global_step * plan.global_batch_size / train_seconds,
            "best_metric": {"name": cfg.train.best_metric, "value": best_value, "step": best_step},
            "eval": last_metrics,
        }
        if accelerator.is_main_process:
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        run_logger.finish(summary)
        return summary
    finally:
        accelerator.end_training()
