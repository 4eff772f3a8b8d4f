"""train(cfg): one readable loop from data to exported model."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from distsent.allocator import ALLOCATOR_ENV, active_allocator
from distsent.batching import PackingCollator, TrainBatchPlan
from distsent.build_locks import describe_stale_lock, stale_build_locks
from distsent.checkpoint import (
    RUN_CONFIG_NAME,
    SUMMARY_FILE,
    agree_on_resume,
    archive_previous_run,
    carry_best_export,
    export_model,
    load_checkpoint,
    read_checkpoint_payload,
    resolve_resume,
    rollback_history,
    save_checkpoint,
    tidy_interrupted_exports,
    tidy_interrupted_writes,
)
from distsent.clipping import clip_and_step
from distsent.config import Config, ConfigError, TrainConfig, save_config
from distsent.cpu_training import keep_freed_memory, use_cpu_dropout
from distsent.data import load_labeled_splits, tokenize, tokenized_fingerprint
from distsent.distributed import (
    build_accelerator,
    checkpoint_layout,
    default_resume_mode,
    model_construction_context,
    node_leaders_first,
    read_launch_info,
    wait_for_device,
)
from distsent.evaluate import evaluate
from distsent.files import tidy_staged_files, write_whole
from distsent.first_token import use_first_token_last_layer
from distsent.metrics import LOWER_IS_BETTER, NonFiniteOutputs, is_improvement, selectable_metrics
from distsent.modeling import (
    build_model,
    build_tokenizer,
    classification_loss,
    parameter_counts,
    require_model_folder,
    weighted_loss_sum,
    weighted_mean_loss,
)
from distsent.optim import build_optimizer, build_schedule, loss_scale, scaler_skipped_step, total_optimizer_steps
from distsent.packing import is_packed, model_inputs, position_limit, real_tokens, training_collator
from distsent.plots import save_predictions, write_plots
from distsent.preemption import Preempted, PreemptionWatcher, record_preemption, segment_made_progress
from distsent.run_lock import lock_output_dir
from distsent.step_profiler import StepProfiler
from distsent.tracking import RunLogger, peak_memory_mib
from distsent.training_rows import decay_held_aside_rows, token_ids_in, train_only_training_rows

log = logging.getLogger("distsent")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    global_step: int = 0
    best_value: float | None = None
    best_step: int = 0
    best_test_metrics: dict | None = None
    """The test split's metrics for the model in best/, scored when it was selected ..."""
    best_test_digest: str | None = None
    """... on the test split of this digest (a resumed run may have been given another)."""
    last_metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_tokens: int = 0
    packed_micro_batches: int = 0
    """Of this process (the main one's in a checkpoint), over the whole run, as train_tokens."""
    # The logging window in progress, summed over all ranks, so a resumed run logs the same losses.
    window_loss_sum: float = 0.0
    window_micro_batches: int = 0
    window_tokens: int = 0
    window_train_seconds: float = 0.0
    last_train_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: str | None = None
    eval_pending: bool = False
    """A validation at `global_step` was interrupted by preemption and is redone on resume."""
    wandb_run_id: str | None = None


# Settings a resumed run may change: where and how often it reports, validates and
# checkpoints, and which kernels compute it. Every other setting decides which examples are
# seen, in what order, or what the optimizer does with them.
RESUMABLE_SETTINGS = (
    "output_dir",
    "train.resume",
    "train.eval_batch_size",
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.eval_every_epoch",
    "train.early_stopping_patience",
    "train.early_stopping_target",
    "train.threads",
    "train.cpu_keep_freed_memory",
    "train.compile",
    "train.unpad",
    "train.unpad_min_padding",
    "model.attn_implementation",
    # Compared as resolved instead (below): `auto` must not pick another precision on resume.
    "train.mixed_precision",
    # The training and validation sets are compared by content (below): their files may move.
    "data.train_file",
    "data.validation_file",
    "data.test_file",
    "data.cache_tokenized",
    "data.max_eval_samples",
)
RESUMABLE_SECTIONS = ("checkpoint.", "log.")


def run_fingerprint(
    cfg: Config, world_size: int, precision: str, layout: str, train_digest: str, validation_digest: str
) -> dict:
    """What must match for a checkpoint to continue this run: every setting but those a
    resumed run may change, the process count, the precision in use, the checkpoint layout
    (`distributed.checkpoint_layout`), and digests of the tokenised training and validation
    sets (the best metric and early stopping compare validations across the resume)."""
    settings = flatten_settings(cfg.to_dict())
    fingerprint = {
        key: value
        for key, value in settings.items()
        if key not in RESUMABLE_SETTINGS and not key.startswith(RESUMABLE_SECTIONS)
    }
    return {
        **fingerprint,
        "world_size": world_size,
        "precision": precision,
        "checkpoint_layout": layout,
        "train_set": train_digest,
        "validation_set": validation_digest,
    }


def flatten_settings(nested: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-5}} as {"train.lr": 1e-5}."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def build_class_weights(setting, train_labels: list[int], label_names: list[str], device) -> torch.Tensor | None:
    """Per-class loss weights: None, `balanced` (n / (classes x count)) or the configured list."""
    if setting is None:
        return None
    if setting == "balanced":
        counts = torch.bincount(torch.as_tensor(train_labels), minlength=len(label_names)).float()
        weights = counts.sum() / (len(label_names) * counts.clamp(min=1))
    else:
        if len(setting) != len(label_names):
            raise ConfigError(
                f"train.class_weights has {len(setting)} values for {len(label_names)} labels {label_names}"
            )
        weights = torch.tensor(setting, dtype=torch.float32)
    log.info("class weights: %s", dict(zip(label_names, [round(w, 4) for w in weights.tolist()], strict=True)))
    return weights.to(device)


def early_stopping_reason(cfg: TrainConfig, state: TrainState) -> str | None:
    """Why training should stop now, or None."""
    target = cfg.early_stopping_target
    if target is not None and state.best_value is not None:
        reached = state.best_value <= target if cfg.best_metric in LOWER_IS_BETTER else state.best_value >= target
        if reached:
            return f"{cfg.best_metric} reached the target {target} ({state.best_value:.4f})"
    patience = cfg.early_stopping_patience
    if patience is not None and state.evals_without_improvement >= patience:
        return f"{cfg.best_metric} did not improve in {patience} validation(s)"
    return None


def divergence_advice(cfg: TrainConfig, mixed_precision: str) -> str:
    """What to change after a run's outputs went NaN or infinite."""
    advice = [f"lower train.lr (now {cfg.lr})"]
    if not cfg.max_grad_norm:
        advice.append("clip gradients (train.max_grad_norm=1.0)")
    if cfg.mixed_precision == "fp16":
        advice.append("train in bf16 (train.mixed_precision=bf16) where the hardware has it: fp16 can overflow")
    elif mixed_precision == "fp16":  # auto chose it: this GPU has no bf16
        advice.append("train in fp32 (train.mixed_precision=no): fp16 can overflow")
    return ", or ".join(advice)


def train(cfg: Config) -> dict:
    """Fine-tune as configured; returns the summary also written to <output_dir>/summary.json.

    Raises Preempted (exit code 75) after checkpointing when a preemption signal arrives.
    In a distributed process the process group stays up whether this returns or raises. A
    script that destroys it (torch.distributed.destroy_process_group()) does so after dropping
    any error this raised and gc.collect(), not in a `finally:` around the call, where the
    error still holds the DDP model (see the end of this function)."""
    if cfg.train.resume not in (None, "auto", "none"):
        # A checkpoint folder that is not one is said now, not after the data is read.
        resolve_resume(cfg.train.resume, Path(cfg.output_dir))
    info = read_launch_info()
    if info.use_deepspeed and info.local_rank == 0:
        # Said before DeepSpeed starts, since what follows may be a silent wait on the lock.
        for lock, age in stale_build_locks():
            log.warning(describe_stale_lock(lock, age))
    accelerator = build_accelerator(cfg, info)
    if cfg.train.early_stopping_patience and not (cfg.train.eval_every_epoch or cfg.train.eval_every_steps):
        if accelerator.is_main_process:
            log.warning(
                "train.early_stopping_patience=%d never fires: the run validates only after its last step "
                "(set train.eval_every_steps or train.eval_every_epoch=true)",
                cfg.train.early_stopping_patience,
            )
    watcher = PreemptionWatcher(cfg.checkpoint.signals)
    run_logger = None
    step_profiler = None
    preempted = False
    run_lock = None
    try:
        output_dir = Path(cfg.output_dir)
        if accelerator.is_main_process and output_dir.exists():
            # Held before anything is tidied: another live run's half-written checkpoint is
            # not the debris of a crash.
            run_lock = lock_output_dir(output_dir)
            tidied = tidy_interrupted_writes(output_dir) + tidy_interrupted_exports(output_dir)
            for what in tidied + tidy_staged_files(output_dir):
                log.warning(what)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        on_cpu = accelerator.device.type == "cpu"
        allocator = active_allocator()
        # tcmalloc keeps freed memory itself; glibc must be told to.
        kept_freed_memory = on_cpu and allocator == "system" and cfg.train.cpu_keep_freed_memory and keep_freed_memory()
        set_seed(cfg.train.seed)

        require_model_folder(cfg.model.name)
        tokenizer = build_tokenizer(cfg.model)
        # Read and tokenised by rank 0 first, then each other node's first process, then the
        # rest: every later process loads the cache (shared or node-local) its leader wrote.
        with node_leaders_first(accelerator):
            splits = load_labeled_splits(cfg.data)
            # Names the tokenised cache and, in the resume check, the training set.
            train_digest = tokenized_fingerprint(splits.texts["train"], splits.labels["train"], tokenizer, cfg.data)
            train_set = tokenize(splits.texts["train"], splits.labels["train"], tokenizer, cfg.data, train_digest)
            eval_digest = tokenized_fingerprint(
                splits.texts["validation"], splits.labels["validation"], tokenizer, cfg.data
            )
            eval_set = tokenize(
                splits.texts["validation"], splits.labels["validation"], tokenizer, cfg.data, eval_digest
            )
            test_set = test_digest = None
            if "test" in splits.texts:
                test_digest = tokenized_fingerprint(splits.texts["test"], splits.labels["test"], tokenizer, cfg.data)
                test_set = tokenize(splits.texts["test"], splits.labels["test"], tokenizer, cfg.data, test_digest)
        label_names = splits.label_names
        choices = selectable_metrics(splits.labels["validation"], label_names)
        if cfg.train.best_metric not in choices:
            # Said now, not at the first validation an epoch later.
            raise ConfigError(
                f"train.best_metric={cfg.train.best_metric}: this validation set reports {', '.join(choices)}"
            )

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
        steps_per_epoch = plan.steps_per_epoch
        total_steps = total_optimizer_steps(cfg.train, steps_per_epoch)

        with model_construction_context(accelerator):
            model = build_model(cfg.model, label_names, len(tokenizer))
        limit = position_limit(model)
        if limit is not None and cfg.data.max_length > limit:
            # Otherwise an index error some steps in, at the first text that long.
            raise ConfigError(
                f"data.max_length={cfg.data.max_length}: {cfg.model.name} has positions for {limit} tokens"
            )
        first_token_only = cfg.model.last_layer_cls_only and use_first_token_last_layer(model)
        if on_cpu and not cfg.train.compile:
            # Compiled graphs draw dropout masks with inductor's own generator, which is fast.
            use_cpu_dropout(model)
        # Not with DeepSpeed: its engine steps its own optimizer, and ZeRO-3 partitions weights.
        seen_rows_only = None
        if on_cpu and cfg.model.train_only_seen_embeddings and not info.use_deepspeed:
            # Padding and packed rows' filler are the tokenizer's pad token, in no text.
            pad = [] if tokenizer.pad_token_id is None else [tokenizer.pad_token_id]
            seen_rows_only = train_only_training_rows(
                model, torch.cat([token_ids_in(train_set), torch.tensor(pad, dtype=torch.long)])
            )
        # After the CPU attention is chosen: packing wraps whichever kernel it is.
        collator = training_collator(model, tokenizer.pad_token_id, cfg.train, first_token_only, on_cpu)
        packed = isinstance(collator, PackingCollator)
        trainable, frozen = parameter_counts(model)
        if seen_rows_only is not None:  # trainable still: AdamW decays them
            trainable += seen_rows_only.held_aside_rows * seen_rows_only.trained.size(1)
        # Fused AdamW exists for CPU and CUDA tensors; other devices take the foreach update.
        fused = accelerator.device.type in ("cpu", "cuda")
        optimizer = build_optimizer(cfg.train, model, fused=fused)
        model, optimizer = accelerator.prepare(model, optimizer)
        if seen_rows_only is not None:
            decay_held_aside_rows(model, optimizer.optimizer)
        # The scheduler is not prepared: accelerate would step it once per process.
        scheduler = build_schedule(cfg.train, optimizer, total_steps)
        # From here each rank draws its own dropout masks (seed + rank; a resume restores each
        # rank's state): with one seed everywhere, micro-batches of equal shape on different
        # ranks got identical masks. The weights above were built from the common seed.
        set_seed(cfg.train.seed, device_specific=True)
        class_weights = build_class_weights(
            cfg.train.class_weights, splits.labels["train"], label_names, accelerator.device
        )
        # With class weights each example's share of a step is its weight over its global batch's.
        weight_values = None if class_weights is None else class_weights.cpu().numpy()
        example_weights = None if weight_values is None else weight_values[np.asarray(splits.labels["train"])]
        micro_batches_per_step = cfg.train.micro_batches_per_step(world_size)

        state = TrainState()
        fingerprint = run_fingerprint(
            cfg, world_size, accelerator.mixed_precision, checkpoint_layout(accelerator), train_digest, eval_digest
        )
        if accelerator.is_main_process and run_lock is None:
            # A new folder is made, and held, only once the data and settings are accepted.
            run_lock = lock_output_dir(output_dir)
        resume_from = agree_on_resume(
            accelerator, resolve_resume(cfg.train.resume or default_resume_mode(), output_dir)
        )
        if resume_from is not None:
            payload = read_checkpoint_payload(resume_from, fingerprint)
            load_checkpoint(accelerator, resume_from)
            scheduler.load_state_dict(payload["scheduler"])
            state = TrainState(**payload["state"])
            if accelerator.is_main_process:
                rollback_history(output_dir, state.global_step)
        elif accelerator.is_main_process:
            archived = archive_previous_run(output_dir)
            if archived:
                log.warning(
                    "a fresh run in an existing folder: moved the earlier run's files in %s aside: %s",
                    output_dir,
                    ", ".join(path.name for path in archived),
                )
        # Where this segment starts, to tell a job script whether it got anywhere when stopped.
        segment_start = (state.global_step, state.eval_pending)
        if accelerator.is_main_process:
            # Only now that the data, the settings and any checkpoint are accepted: a refused
            # run leaves the folder as the earlier run left it.
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, output_dir / RUN_CONFIG_NAME)
            carried = resume_from and carry_best_export(resume_from, output_dir, state.best_step)
            if carried:
                log.warning(carried)

        # What the config leaves open, as this run resolved it: for W&B and the model cards.
        run_facts = {
            "world_size": world_size,
            "global_batch_size": plan.global_batch_size,
            "mixed_precision": accelerator.mixed_precision,
            "distributed_type": accelerator.distributed_type.value,
        }
        run_logger = RunLogger(
            cfg,
            output_dir,
            accelerator.is_main_process,
            total_steps,
            initial_step=state.global_step,
            wandb_run_id=state.wandb_run_id,
            run_facts=run_facts,
        )
        # Kept in every checkpoint, so a resumed run continues the same W&B run; a segment
        # without W&B (log.wandb=false, or W&B failed to start) passes the id on.
        state.wandb_run_id = run_logger.wandb_run_id or state.wandb_run_id
        run_logger.banner(
            {
                "model": (
                    f"{cfg.model.name} ({trainable:,} trainable, {frozen:,} frozen parameters)"
                    + (", last layer for [CLS] only (model.last_layer_cls_only)" if first_token_only else "")
                    + (
                        f", embedding rows of {seen_rows_only.held_aside_rows:,} tokens no training text holds"
                        " only decayed (model.train_only_seen_embeddings)"
                        if seen_rows_only is not None
                        else ""
                    )
                ),
                "data": f"{cfg.data.dataset} {splits.sizes()} labels {label_names}",
                "notes": "; ".join(splits.notes) or "-",
                "distributed": (
                    f"{accelerator.distributed_type.value}, {world_size} process(es) on {accelerator.device.type}"
                ),
                "precision": accelerator.mixed_precision,
                "batches": collator.describe() + (", grouped by length" if cfg.train.length_grouping else ""),
                "allocator": (
                    f"{allocator} ({ALLOCATOR_ENV})"
                    + (", freed memory kept for reuse (train.cpu_keep_freed_memory)" if kept_freed_memory else "")
                ),
                "global batch": plan.describe(),
                "schedule": f"{total_steps} optimizer steps ({steps_per_epoch} per epoch), peak lr {cfg.train.lr}",
                "resumed from": f"{resume_from} (step {state.global_step})" if resume_from else "-",
                "output": str(output_dir),
            }
        )

        # Running sums stay on the device; reading them (.item()) is a host-device sync.
        # Rank 0 carries the restored window (a sum over all ranks) so the next reduce is exact.
        carried = accelerator.is_main_process
        window_loss = torch.tensor(state.window_loss_sum if carried else 0.0, device=accelerator.device)
        window_tokens = torch.tensor(state.window_tokens if carried else 0, device=accelerator.device)

        def checkpoint() -> None:
            """Collective: every rank writes its part of one resumable checkpoint."""
            state.window_loss_sum = accelerator.reduce(window_loss, "sum").item()
            state.window_tokens = int(accelerator.reduce(window_tokens, "sum").item())
            payload = {
                "fingerprint": fingerprint,
                "state": dataclasses.asdict(state),
                "scheduler": scheduler.state_dict(),
            }
            save_checkpoint(
                accelerator, output_dir, state.global_step, payload, cfg.checkpoint.keep_last, {state.best_step}
            )

        def checkpoint_for_preemption(reason: str) -> None:
            checkpoint()
            if accelerator.is_main_process:
                progressed = segment_made_progress(segment_start, (state.global_step, state.eval_pending))
                record_preemption(reason, progressed)

        last_predictions = None

        def score(dataset, split: str) -> tuple[dict, object]:
            try:
                return evaluate(
                    model,
                    dataset,
                    accelerator,
                    cfg.train.eval_batch_size,
                    tokenizer.pad_token_id,
                    label_names,
                    should_stop=lambda: watcher.should_stop(accelerator),
                )
            except NonFiniteOutputs as error:
                # Every rank scored the same gathered outputs, so every rank stops here. The
                # test split is scored only after a finite validation: no sign of divergence.
                cause = (
                    f"Training diverged: {divergence_advice(cfg.train, accelerator.mixed_precision)}"
                    if split == "validation"
                    else "Validation was finite: look at what sets the test texts apart"
                )
                raise NonFiniteOutputs(
                    f"{split} at step {state.global_step}: {error}. {cause}. Earlier checkpoints and exports are kept"
                ) from None

        def as_trained() -> dict:
            """How the model of an export was trained, for its model card."""
            return {**run_facts, "epochs": round(state.global_step / steps_per_epoch, 4)}

        def validate_and_export_best() -> None:
            """Validate, and score the test split with each new best model (the one best/ holds,
            which the test score must describe; never used to select it). On preemption
            mid-way, checkpoint with the validation marked pending: nothing is recorded yet."""
            nonlocal last_predictions
            state.eval_pending = True
            try:
                metrics, last_predictions = score(eval_set, "validation")
                improved = is_improvement(cfg.train.best_metric, metrics[cfg.train.best_metric], state.best_value)
                test_metrics = score(test_set, "the test split")[0] if improved and test_set is not None else None
            except Preempted as stop:
                checkpoint_for_preemption(str(stop))
                raise
            state.eval_pending = False
            if state.last_train_loss:  # a memorised window can log a loss of exactly 0
                # Above 1 and growing while validation loss rises: the model is overfitting.
                # Measured as the training loss is: class-weighted where weights are set.
                val_loss = metrics["loss"]
                if weight_values is not None:
                    val_loss = weighted_mean_loss(last_predictions.losses, last_predictions.labels, weight_values)
                metrics["val_train_loss_ratio"] = val_loss / state.last_train_loss
            state.last_metrics = metrics
            run_logger.log_eval(state.global_step, state.global_step / steps_per_epoch, metrics)
            if improved:
                state.best_value, state.best_step = metrics[cfg.train.best_metric], state.global_step
                state.best_test_metrics, state.best_test_digest = test_metrics, test_digest
                state.evals_without_improvement = 0
                export_model(
                    accelerator,
                    model,
                    tokenizer,
                    cfg,
                    {"step": state.global_step, **metrics},
                    output_dir / "best",
                    as_trained(),
                )
            else:
                state.evals_without_improvement += 1
            if state.global_step < total_steps:  # the last validation stops nothing early
                state.stopped_early = early_stopping_reason(cfg.train, state)

        if state.eval_pending:
            validate_and_export_best()

        def log_training_window() -> None:
            """Log the steps since the last log (mean loss over every rank's micro-batches)."""
            # The logged loss is the mean over every rank's micro-batches, not rank 0's.
            loss_sum = accelerator.reduce(window_loss, "sum").item()
            tokens_sum = int(accelerator.reduce(window_tokens, "sum").item())
            # Throughput counts training time only, not evaluation or checkpointing.
            elapsed = state.train_seconds - state.window_train_seconds
            values = {
                "loss": loss_sum / (state.window_micro_batches * world_size),
                "epoch": round(state.global_step / steps_per_epoch, 4),
                "tokens_per_second": tokens_sum / elapsed,
                # Every rank's micro-batches are full: the sampler drops incomplete global batches.
                "examples_per_second": state.window_micro_batches * cfg.train.batch_size * world_size / elapsed,
            }
            # Both unknown for a window carried over a resume with no step taken since.
            if step_lr is not None:
                values["lr"] = step_lr
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            state.last_train_loss = values["loss"]
            run_logger.log_train(state.global_step, values)
            postfix = {"loss": values["loss"], "tok_s": values["tokens_per_second"]}
            if "lr" in values:
                postfix["lr"] = values["lr"]
            run_logger.advance(0, **postfix)
            state.train_tokens += tokens_sum
            window_loss.zero_()
            window_tokens.zero_()
            state.window_micro_batches = 0
            state.window_train_seconds = state.train_seconds

        grad_norm = step_lr = None
        if cfg.log.profile_steps:
            step_profiler = StepProfiler(
                cfg.log.profile_steps, output_dir, accelerator.process_index, accelerator.device, state.global_step
            )
        model.train()
        # fp16's loss scale after the last step. Read after each step, not before: a read waits
        # for the GPU, and before the step it would hold back queuing the optimizer.
        scale_before = loss_scale(accelerator.scaler)
        # A run resumed from the checkpoint of its early stop has nothing left to train.
        while state.global_step < total_steps and not state.stopped_early:
            epoch, step_in_epoch = divmod(state.global_step, steps_per_epoch)
            weight_totals = None if example_weights is None else plan.global_batch_sums(epoch, example_weights)
            loader = DataLoader(
                train_set,
                batch_sampler=list(plan.micro_batches(epoch, start_step=step_in_epoch)),
                collate_fn=collator,
                # Copied from pageable memory, a batch would wait for the GPU's queue to drain
                # (CUDA syncs the stream before such a copy); from pinned memory it is queued.
                pin_memory=accelerator.device.type == "cuda",
                # Its own generator: otherwise each new loader draws from the global RNG and a
                # resumed run's dropout masks would differ from an uninterrupted run's.
                generator=torch.Generator(),
            )
            step_start = time.perf_counter()
            for batch in loader:
                batch = {
                    key: value.to(accelerator.device, non_blocking=True) if torch.is_tensor(value) else value
                    for key, value in batch.items()
                }
                with accelerator.accumulate(model):
                    logits = model(**model_inputs(batch)).logits
                    if weight_totals is None:
                        loss = classification_loss(logits, batch["labels"])
                    else:
                        # accelerate and DDP average the micro-batches' losses: undo that mean.
                        share = micro_batches_per_step / weight_totals[state.global_step % steps_per_epoch]
                        loss = weighted_loss_sum(logits, batch["labels"], class_weights) * share
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # Returns the norm before clipping; inf means "measure, don't clip". Steps
                        # between syncs would be no-ops (accumulation): not taken.
                        grad_norm = clip_and_step(accelerator, model, optimizer, cfg.train.max_grad_norm or math.inf)
                    optimizer.zero_grad(set_to_none=True)
                window_loss += loss.detach()
                window_tokens += real_tokens(batch)
                state.packed_micro_batches += is_packed(batch)
                state.window_micro_batches += 1
                if not accelerator.sync_gradients:
                    continue

                skipped = accelerator.optimizer_step_was_skipped or scaler_skipped_step(
                    accelerator.scaler, scale_before
                )
                # The rate this step trained with, logged as such (read after the schedule
                # advances, it would be the next step's).
                step_lr = scheduler.get_last_lr()[0]
                if not skipped:  # a step skipped for fp16 overflow does not advance the schedule
                    scheduler.step()
                scale_before = loss_scale(accelerator.scaler)
                state.global_step += 1
                epoch_done = state.global_step % steps_per_epoch == 0
                should_log = state.global_step % cfg.train.log_every_steps == 0 or state.global_step == total_steps
                should_eval = (
                    (cfg.train.eval_every_steps and state.global_step % cfg.train.eval_every_steps == 0)
                    or (cfg.train.eval_every_epoch and epoch_done)
                    or state.global_step == total_steps
                )
                should_checkpoint = (
                    (cfg.checkpoint.every_steps and state.global_step % cfg.checkpoint.every_steps == 0)
                    or (cfg.checkpoint.at_epoch_end and epoch_done)
                ) and state.global_step < total_steps
                # Whether the clock stops after this step, for work that is not training. Then
                # it stops when a GPU has done the steps queued so far, not when they were
                # queued. Otherwise the next step is queued at once and the clock runs on:
                # waiting for the GPU at every step would keep the host from queuing ahead.
                # Several processes read the preemption flag from the device at every step.
                pauses = (
                    should_log
                    or should_eval
                    or should_checkpoint
                    or epoch_done
                    or watcher.requested
                    or accelerator.num_processes > 1
                )
                if pauses:
                    wait_for_device(accelerator.device)
                now = time.perf_counter()
                state.train_seconds += now - step_start
                if step_profiler is not None:
                    step_profiler.step()  # at the profile's end it writes it: not training time
                    now = time.perf_counter()
                step_start = now
                run_logger.advance(1)

                if should_log:
                    log_training_window()
                if should_eval:
                    validate_and_export_best()
                if state.stopped_early and state.window_micro_batches:
                    # An early stop falls between logging windows: its last steps are logged
                    # now, before a checkpoint of this step could carry them into a resume.
                    log_training_window()

                preempted = watcher.should_stop(accelerator)
                if preempted:
                    reason = f"stopped at step {state.global_step} on {watcher.received}; checkpoint written"
                    checkpoint_for_preemption(reason)
                    raise Preempted(reason)
                if should_checkpoint:
                    checkpoint()
                if state.global_step >= total_steps or epoch_done or state.stopped_early:
                    break
                if pauses:
                    # The next step's clock starts here: logging, evaluation and checkpointing
                    # are not training time.
                    step_start = time.perf_counter()
            if state.stopped_early:
                log.info("early stop at step %d: %s", state.global_step, state.stopped_early)

        if state.window_micro_batches:
            # Still open only where a resume redid the validation that stopped the run early.
            log_training_window()
        export_model(
            accelerator,
            model,
            tokenizer,
            cfg,
            {"step": state.global_step, **state.last_metrics},
            output_dir / "final",
            as_trained(),
        )
        summary = {
            "global_step": state.global_step,
            "epochs_completed": round(state.global_step / steps_per_epoch, 4),
            "world_size": world_size,
            "micro_batch_size": cfg.train.batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps,
            "global_batch_size": plan.global_batch_size,
            "mixed_precision": accelerator.mixed_precision,
            "distributed_type": accelerator.distributed_type.value,
            "allocator": allocator,
            "last_layer_cls_only": first_token_only,
            "embedding_rows_only_decayed": 0 if seen_rows_only is None else seen_rows_only.held_aside_rows,
            "unpadded": packed,
            "unpad_min_padding": collator.min_padding if packed else None,
            "unpad_bucketed_lengths": packed and collator.bucket_lengths,
            "packed_micro_batches": state.packed_micro_batches,
            "train_seconds": round(state.train_seconds, 3),
            "train_tokens": state.train_tokens,
            "train_tokens_per_second": state.train_tokens / state.train_seconds,
            "train_examples_per_second": state.global_step * plan.global_batch_size / state.train_seconds,
            # Rank 0's peak; a resumed run counts from its own start.
            "peak_memory_mib": round(peak_memory_mib(accelerator.device), 1),
            "best_metric": {"name": cfg.train.best_metric, "value": state.best_value, "step": state.best_step},
            "stopped_early": state.stopped_early,
            "eval": state.last_metrics,
        }
        if test_set is not None and state.best_test_metrics is not None and state.best_test_digest == test_digest:
            summary["test"] = {**state.best_test_metrics, "model_step": state.best_step}
            run_logger.log_eval(state.global_step, state.global_step / steps_per_epoch, summary["test"], split="test")
        elif test_set is not None:
            # best/ was chosen before this run was given its test split (a resume): only best/ can say.
            log.warning(
                "no test score: best/ (step %d) was chosen before this test split was given; "
                "score it with `distsent evaluate --model %s --data <the test file>`",
                state.best_step,
                output_dir / "best",
            )
        if accelerator.is_main_process:
            write_whole(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
            if last_predictions is not None:
                save_predictions(output_dir, last_predictions.labels, last_predictions.probs, label_names)
            if cfg.log.plots:
                run_logger.log_images(write_plots(output_dir, cfg.train.best_metric))
        run_logger.finish(summary)
        return summary
    except Preempted:
        preempted = True
        raise
    finally:
        if step_profiler is not None:
            step_profiler.close()
        if run_logger is not None:
            run_logger.close(preempted)
        watcher.restore()
        # No accelerator.end_training(): destroying the group while the DDP model lives (a
        # raised error holds it) leaves its Reducer to free gloo's group holding the GIL, a
        # deadlock with gloo's worker thread (worker_exit).
        if run_lock is not None:
            run_lock.close()
