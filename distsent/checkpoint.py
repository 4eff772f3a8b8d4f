"""Exports: Hugging Face-format folders (safetensors + config + tokenizer) written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

from distsent.config import Config, save_config
from distsent.files import STAGING_INFIX, fsync_path, staging_sibling, write_whole
from distsent.modelcard import write_model_card
from distsent.modeling import label_names_of

EXPORT_CONFIG_NAME = "distsent_config.yaml"
EXPORT_METRICS_NAME = "metrics.json"
RUN_CONFIG_NAME = "config.yaml"
SUMMARY_FILE = "summary.json"
EXPORT_DIRS = ("best", "final")

log = logging.getLogger(__name__)


def sync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folder, to the disk.

    A killed process loses nothing the kernel has cached, but a machine that dies (a
    reclaimed spot node, a kernel panic) can lose it, and the disk may keep a later
    rename or marker without the data before it: a folder that looks whole with empty
    files, after the older checkpoints it replaced were pruned."""
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        fsync_path(path)
    fsync_path(folder)


def _umask() -> int:
    # Linux shows the umask without touching it. Elsewhere reading it means setting it, and a
    # file another thread creates in that moment gets the placeholder's permissions.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_to_umask(folder: Path) -> None:
    """Give every file under `folder` the permissions the user's umask gives new files.

    transformers writes model.safetensors with mode 0600, beside 0644 for the rest of an
    export, so on a shared cluster the user's group could read the config but not the weights."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def replace_directory(staging: Path, target: Path) -> None:
    """Move a completed `staging` folder to `target`, keeping the old one until the new is in
    place; the data reaches the disk before the rename that publishes it."""
    open_to_umask(staging)
    sync_tree(staging)
    retired = None
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(retired)
    staging.rename(target)
    fsync_path(target.parent)
    if retired is not None:
        shutil.rmtree(retired)


def tidy_interrupted_exports(output_dir: Path, names: tuple[str, ...] = EXPORT_DIRS) -> list[str]:
    """Undo what a killed export left behind; returns what was done. A staging folder has no
    marker to show it is whole, so it goes; a retired export comes back if nothing replaced it."""
    done = []
    for name in names:
        target = Path(output_dir) / name
        for staging in sorted(Path(output_dir).glob(f".{name}{STAGING_INFIX}*")):
            shutil.rmtree(staging, ignore_errors=True)
            done.append(f"removed {staging}, left by an interrupted export")
        for retired in sorted(Path(output_dir).glob(f".{name}.old-*")):
            if target.exists():
                shutil.rmtree(retired, ignore_errors=True)
                done.append(f"removed {retired}, left by an interrupted export")
            else:
                retired.rename(target)
                done.append(f"restored {target}, which an interrupted export had moved aside")
    return done


def record_fp32(export: Path) -> None:
    """Make an export's config.json say float32, as its weights are. transformers writes the
    dtype of the model in memory, which DeepSpeed's bf16/fp16 modes cast to half precision,
    and from_pretrained loads weights in the dtype the config names."""
    config_file = export / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    if config.get("dtype", "float32") != "float32":
        config["dtype"] = "float32"
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_model(accelerator, model, tokenizer, cfg: Config, metrics: dict, target: Path, training: dict) -> None:
    """Write `target` as a folder transformers loads: model.safetensors, config.json, tokenizer,
    plus the resolved distsent config, the metrics and a model card (`training`: see
    `write_model_card`). Collective: call on every rank."""
    # Every rank takes part: under ZeRO-3 this gathers the partitioned parameters.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        # fp32 on disk whatever the training precision, so any consumer loads it as-is; and
        # without the `_orig_mod.` that torch.compile wrappers (train.compile) put in names.
        state_dict = {
            name.replace("_orig_mod.", ""): tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in state_dict.items()
        }
        staging = staging_sibling(target)
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            record_fp32(staging)
            tokenizer.save_pretrained(staging)
            save_config(cfg, staging / EXPORT_CONFIG_NAME)
            title = f"{target.parent.name}/{target.name}"
            write_model_card(staging, title, cfg, label_names_of(unwrapped.config), metrics, training)
            (staging / EXPORT_METRICS_NAME).write_text(json.dumps(metrics, indent=2))
        except Exception:
            # A full disk, say: the half-written copy would hold the space until the next run.
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replace_directory(staging, target)
    # No rank moves on (or exits) before the export is complete on disk.
    accelerator.wait_for_everyone()
    del state_dict
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Resumable full-state checkpoints

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "training_state.json"
COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_FORMAT = "distsent-checkpoint-v1"
STEP_PREFIX = "step-"
PARTIAL_PREFIX = ".partial-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix(STEP_PREFIX))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose writing finished (they hold the marker), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if path.name.startswith(STEP_PREFIX)
        and path.name[len(STEP_PREFIX) :].isdigit()
        and (path / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=_step_of)


def tidy_interrupted_writes(output_dir: Path) -> list[str]:
    """Finish or undo what a killed checkpoint write left behind; returns what was done.

    A write goes to `.partial-step-N`, gets its marker, and replaces `step-N` (which
    `replace_directory` first renames to `.step-N.old-*`). A kill can leave any of these."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = []

    def settle(path: Path, target: Path) -> None:
        # A marked folder whose final rename was missed is a whole checkpoint: keep it.
        if (path / COMPLETE_MARKER).is_file() and not target.exists():
            path.rename(target)
            done.append(f"completed {target}, whose write was interrupted after it finished")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by an interrupted checkpoint write")

    # Partial folders first: they are newer than a retired folder of the same step.
    for path in sorted(root.glob(f"{PARTIAL_PREFIX}{STEP_PREFIX}*")):
        settle(path, root / path.name.removeprefix(PARTIAL_PREFIX))
    for path in sorted(root.glob(f".{STEP_PREFIX}*.old-*")):
        settle(path, root / path.name[1:].split(".old-")[0])
    for path in sorted(root.glob(f"{STEP_PREFIX}*")):
        if not (path / COMPLETE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by an interrupted checkpoint write")
    return done


def save_checkpoint(
    accelerator, output_dir: Path, step: int, payload: dict, keep_last: int, protected_steps: set[int]
) -> Path:
    """Write model, optimizer, grad scaler and every rank's RNG state (accelerate's
    `save_state`, safetensors for weights) plus `payload` as JSON. Collective.

    Atomic: everything goes into a hidden `.partial-step-N` folder, the marker is written
    last, and only then is the folder renamed to `step-N`. A kill at any moment leaves
    the previous checkpoints untouched, and what it interrupted is settled by
    `tidy_interrupted_writes` at the next start."""
    root = checkpoint_root(output_dir)
    target = root / f"{STEP_PREFIX}{step:08d}"
    staging = root / f"{PARTIAL_PREFIX}{STEP_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    # Every node flushes what its ranks wrote before the main process marks the folder whole;
    # only once all have written: files still being written can be renamed under the walk.
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        sync_tree(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, **payload}, indent=2))
        (staging / COMPLETE_MARKER).write_text(f"{step}\n")
        # A step saved again (a validation redone after preemption) replaces its old folder
        # only once the new one is whole.
        replace_directory(staging, target)
        _prune(output_dir, keep_last, protected_steps | {step})
    accelerator.wait_for_everyone()
    return target


def _prune(output_dir: Path, keep_last: int, protected_steps: set[int]) -> None:
    checkpoints = complete_checkpoints(output_dir)
    for path in checkpoints[:-keep_last]:
        if _step_of(path) not in protected_steps:
            shutil.rmtree(path)


def resolve_resume(mode: str, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: `none`, `auto` (newest complete, if any) or a path."""
    if mode == "none":
        return None
    if mode == "auto":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(mode)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={mode}: no such checkpoint folder")
    if not (path / COMPLETE_MARKER).is_file():
        if not (path / STATE_FILE).is_file():
            # An export, a run folder, checkpoints/ itself: point at what resume takes.
            raise CheckpointError(
                f"train.resume={mode}: not a distsent checkpoint (no {STATE_FILE}); give a folder "
                f"{CHECKPOINTS_DIR}/{STEP_PREFIX}NNNNNNNN of a run, or train.resume=auto"
            )
        raise CheckpointError(
            f"train.resume={mode}: incomplete checkpoint (no {COMPLETE_MARKER} marker); its write was interrupted"
        )
    return path


def agree_on_resume(accelerator, chosen: Path | None) -> Path | None:
    """Rank 0's choice of checkpoint, for every rank. Each rank lists checkpoints/ itself, and
    on a network filesystem another node's listing can lag (a checkpoint rank 0 just renamed
    into place, a directory cache): ranks loading different steps would hang or diverge."""
    if accelerator.num_processes == 1:
        return chosen
    from accelerate.utils import broadcast_object_list

    shared = broadcast_object_list([None if chosen is None else str(chosen)], from_process=0)[0]
    agreed = None if shared is None else Path(shared)
    if agreed is not None and not (agreed / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"rank {accelerator.process_index} cannot see checkpoint {agreed} that rank 0 resumes from: "
            "output_dir must be on a filesystem every node shares"
        )
    if agreed != chosen:
        log.info(
            "rank %d resumes from rank 0's choice %s (its own listing gave %s)",
            accelerator.process_index,
            agreed,
            chosen,
        )
    return agreed


# Fingerprint entries added after checkpoints were first written: a checkpoint without one
# predates it and is not compared on it (it resumed before, so it still does).
FINGERPRINT_KEYS_OLDER_CHECKPOINTS_LACK = {"checkpoint_layout"}
# Settings added since, with the value that does what distsent did before them: a checkpoint
# without one was written that way, and this run continues it with that value set.
OLDER_CHECKPOINTS_RAN_WITH = {"model.train_only_seen_embeddings": False}


# What changes a data digest of the fingerprint, said with it: two hashes alone name no setting.
DIGEST_CAUSES = {
    "train_set": " (the tokenised training texts or labels differ: the data, its cleaning or filtering, "
    "data.max_train_samples, data.validation_fraction, data.split_seed or the tokenizer)",
    "validation_set": " (the tokenised validation texts or labels differ: the validation file or split, "
    "data.validation_fraction, data.split_seed, data.max_eval_samples, cleaning or the tokenizer)",
}


def read_checkpoint_payload(path: Path, fingerprint: dict) -> dict:
    """Read and check a checkpoint's JSON payload before any tensor is loaded."""
    try:
        payload = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path}: unreadable {STATE_FILE} ({error}); not a distsent checkpoint or corrupt{_way_back(path)}"
        ) from error
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {payload.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    recorded = payload.get("fingerprint", {})
    saved = {**OLDER_CHECKPOINTS_RAN_WITH, **recorded}
    missing = sorted(set(fingerprint) - set(saved) - FINGERPRINT_KEYS_OLDER_CHECKPOINTS_LACK)
    if missing:
        raise CheckpointError(
            f"{path}: written by an older distsent whose checkpoints do not record {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}, so it cannot be checked to continue this run; "
            "use another output_dir or train.resume=none"
        )
    # Compared as they were saved: JSON has lists, not tuples.
    current = json.loads(json.dumps(fingerprint))
    differing = {key: (saved[key], value) for key, value in current.items() if key in saved and saved[key] != value}
    if differing:
        details = ", ".join(
            f"{key}: checkpoint {old!r}{'' if key in recorded else ' (written before the setting existed)'}, "
            f"this run {new!r}{DIGEST_CAUSES.get(key, '')}"
            for key, (old, new) in differing.items()
        )
        # Where only the launch or a setting older checkpoints predate differs, say what
        # continues it; otherwise it is another run.
        ways = []
        if "precision" in differing:  # `auto` decided otherwise on this machine
            ways.append(f"set train.mixed_precision={differing['precision'][0]}")
        if "world_size" in differing:
            ways.append(f"launch {differing['world_size'][0]} process(es)")
        if "checkpoint_layout" in differing:
            ways.append(f"launch it as it was launched ({differing['checkpoint_layout'][0]})")
        ways += [f"set {key}={json.dumps(differing[key][0])}" for key in OLDER_CHECKPOINTS_RAN_WITH if key in differing]
        continuable = set(differing) <= {"precision", "world_size", "checkpoint_layout", *OLDER_CHECKPOINTS_RAN_WITH}
        relaunch = f"{' and '.join(ways)} to continue it, or " if continuable else ""
        raise CheckpointError(
            f"{path}: written by a different run or launch ({details}); "
            f"{relaunch}use another output_dir or train.resume=none"
        )
    return payload


def verify_no_arbitrary_pickles(path: Path) -> None:
    """Refuse a checkpoint whose torch files hold anything but tensors and plain containers.

    accelerate loads its own files with weights_only=True; DeepSpeed's engine loads its
    files with full unpickling, so each is first opened here with the restricted loader.
    Memory-mapped: the check reads the pickled structure, not the tensors' bytes, so every
    rank can check every rank's optimizer partitions without holding them in memory."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    for file in sorted(path.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals([*TORCH_SAFE_GLOBALS, *_deepspeed_safe_globals()]):
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # UnpicklingError and friends; the message says what was refused
            raise CheckpointError(
                f"{file}: refused, it holds objects beyond tensors and plain data ({error})"
            ) from error


def verify_random_state(path: Path, process_index: int) -> None:
    """Refuse a checkpoint without a readable RNG state for this rank. accelerate skips one it
    cannot load with an INFO line, and the resumed run then draws other dropout masks and
    data than an uninterrupted one: a resume that is silently not exact."""
    from accelerate.utils import RNG_STATE_NAME
    from accelerate.utils.other import load

    state_file = path / f"{RNG_STATE_NAME}_{process_index}.pkl"
    try:
        load(state_file, map_location="cpu")
    except Exception as error:  # missing, truncated, not a pickle
        raise CheckpointError(
            f"{state_file}: this rank's random state cannot be read ({type(error).__name__}); "
            f"resuming without it would not be exact{_way_back(path)}"
        ) from error


def _deepspeed_safe_globals() -> list:
    """Plain-data classes DeepSpeed pickles into its checkpoints (enums and loss-scaler state)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def carry_best_export(checkpoint: Path, output_dir: Path, best_step: int) -> str | None:
    """For a run resumed into another folder: copy the best/ that the checkpoint's own run
    exported, where it still holds the checkpoint's best step; else say why there is none.
    Returns what was done, for the log, or None where there was nothing to do."""
    source = Path(checkpoint).parent.parent  # <run>/checkpoints/step-N
    target = output_dir / "best"
    if not best_step or source.resolve() == output_dir.resolve() or _export_step(target) == best_step:
        return None
    if _export_step(source / "best") != best_step:
        return (
            f"{target} is missing: best/ of step {best_step}, which this checkpoint records as its best, "
            f"is not in {source} any more; a best/ is exported here only when a later validation beats it"
        )
    staging = staging_sibling(target)
    shutil.copytree(source / "best", staging)
    replace_directory(staging, target)
    return f"resumed into a new folder: copied {source / 'best'} (step {best_step}) to {target}"


def _export_step(export: Path) -> int | None:
    """The step an export was taken at, from its metrics.json; None if unreadable."""
    try:
        return json.loads((export / "metrics.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rollback_history(output_dir: Path, step: int) -> int:
    """Drop metrics.jsonl events logged after `step` (they are about to be redone), so a
    resumed run's history reads like an uninterrupted one. Returns how many were dropped."""
    from distsent.tracking import METRICS_FILE

    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    events, torn_line = read_history(path)
    if torn_line is not None:
        log.warning("%s:%d: dropped an incomplete last line", path, torn_line)
    kept = [line for line, event in events if event.get("step", 0) <= step]
    write_whole(path, "".join(f"{line}\n" for line in kept))
    return len(events) + (torn_line is not None) - len(kept)


def read_history(path: Path) -> tuple[list[tuple[str, dict]], int | None]:
    """A metrics.jsonl's events, each with its line, and the number of its last line if a
    kill cut it off mid-write (left out). Any other unreadable line is an error naming it."""
    numbered = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    events = []
    for number, line in numbered:
        try:
            events.append((line, json.loads(line)))
        except json.JSONDecodeError as error:
            if number == numbered[-1][0]:
                return events, number
            raise CheckpointError(f"{path}:{number}: not a JSON object ({error}); fix or remove the line") from error
    return events, None


def archive_previous_run(output_dir: Path) -> list[Path]:
    """Move an earlier run's config, metrics.jsonl, checkpoints, exports, summary, predictions,
    plots, profiles and W&B files aside, so a fresh run starts its own history, neither its pruning nor a later
    `train.resume=auto` touches the old run's, its first validation does not replace the old
    `best/` (lost for good if the new run then fails), and no old plot sits beside the new ones."""
    from distsent.plots import PLOTS_DIR, PREDICTIONS_FILE
    from distsent.step_profiler import PROFILE_FILE, PROFILE_PREFIX
    from distsent.tracking import METRICS_FILE, WANDB_DIR

    names = (
        RUN_CONFIG_NAME,
        METRICS_FILE,
        SUMMARY_FILE,
        PREDICTIONS_FILE,
        PLOTS_DIR,
        WANDB_DIR,
        CHECKPOINTS_DIR,
        *EXPORT_DIRS,
    )
    present = [path for path in (Path(output_dir) / name for name in names) if path.exists()]
    # log.profile_steps' files, of any rank count; not those an earlier fresh run moved aside.
    present += sorted(path for path in Path(output_dir).glob(f"{PROFILE_PREFIX}*") if PROFILE_FILE.fullmatch(path.name))
    if not present:
        return []

    def archived(path: Path, stamp: int) -> Path:
        return path.with_name(f"{path.stem}.before-{stamp}{path.suffix}")

    # One stamp for the whole earlier run (when it last wrote), so its files group together.
    stamp = int(max(path.stat().st_mtime for path in present))
    while any(archived(path, stamp).exists() for path in present):  # two fresh runs within a second
        stamp += 1
    for path in present:
        path.rename(archived(path, stamp))
    return [archived(path, stamp) for path in present]


def load_checkpoint(accelerator, path: Path) -> None:
    """Restore model, optimizer, grad scaler and this rank's RNG state from `path`. Collective."""
    verify_no_arbitrary_pickles(path)
    verify_random_state(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except Exception as error:
        raise CheckpointError(
            f"{path}: could not be loaded ({type(error).__name__}: {error}){_way_back(path)}"
        ) from error


def _way_back(damaged: Path) -> str:
    """Where a damaged checkpoint's run can resume instead. Not chosen silently: which
    checkpoint to trust, and the steps to redo, are the user's call (every rank must also
    agree on it, and each sees only its own files)."""
    step = damaged.name.removeprefix(STEP_PREFIX)
    if not step.isdigit():  # a folder given by path, not one of a run's checkpoints
        return ""
    earlier = [path for path in complete_checkpoints(damaged.parent.parent) if _step_of(path) < int(step)]
    if not earlier:
        return ""
    return f"; train.resume={earlier[-1]} resumes from the checkpoint before it (the steps since are redone)"
