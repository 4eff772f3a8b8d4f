"""Exports: Hugging Face-format folders (safetensors + config + tokenizer) written atomically."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

from distsent.config import Config, save_config

EXPORT_CONFIG_NAME = "distsent_config.yaml"
EXPORT_METRICS_NAME = "metrics.json"


def replace_directory(staging: Path, target: Path) -> None:
    """Move a completed `staging` folder to `target`, keeping the old one until the new is in place."""
    retired = None
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(retired)
    staging.rename(target)
    if retired is not None:
        shutil.rmtree(retired)


def staging_dir(target: Path) -> Path:
    """A hidden sibling folder to write into before `replace_directory`."""
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")


def export_model(accelerator, model, tokenizer, cfg: Config, metrics: dict, target: Path) -> None:
    """Write `target` as a folder transformers loads: model.safetensors, config.json, tokenizer,
    plus the resolved distsent config and the metrics. Collective: call on every rank."""
    # Every rank takes part: under ZeRO-3 this gathers the partitioned parameters.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        # fp32 on disk whatever the training precision, so any consumer loads it as-is.
        state_dict = {
            name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()
        }
        staging = staging_dir(target)
        staging.parent.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        save_config(cfg, staging / EXPORT_CONFIG_NAME)
        (staging / EXPORT_METRICS_NAME).write_text(json.dumps(metrics, indent=2))
        replace_directory(staging, target)
    # No rank moves on (or exits) before the export is complete on disk.
    accelerator.wait_for_everyone()
    del state_dict
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
