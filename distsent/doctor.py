"""`distsent doctor`: what this process sees, and whether a run can work here.

Run it under the same launcher as the real job (`accelerate launch ... -m distsent doctor`,
`srun ...`) to see the rank mapping each process gets."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import torch

from distsent.allocator import ALLOCATOR_ENV, allocator_choice, tcmalloc_to_preload
from distsent.build_locks import describe_stale_lock, extensions_root, stale_build_locks
from distsent.config import Config, ConfigError
from distsent.distributed import launcher_environment, read_launch_info


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# The values wandb's settings take for WANDB_MODE (wandb 0.31); wandb.init fails on any other.
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def diagnose(cfg: Config) -> tuple[list[tuple[str, str]], list[str]]:
    """(facts to print, problems that would stop a run)."""
    info = read_launch_info()
    env = launcher_environment()
    facts: list[tuple[str, str]] = []
    problems: list[str] = []

    facts.append(("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"))
    for package in ("transformers", "accelerate", "datasets", "deepspeed", "wandb"):
        facts.append((package, _version(package)))
    device_count = torch.cuda.device_count() if info.has_cuda else 0
    facts.append(("CUDA devices", str(device_count)))
    backends = [
        name
        for name, ok in (
            ("nccl", torch.distributed.is_nccl_available()),
            ("gloo", torch.distributed.is_gloo_available()),
        )
        if ok
    ]
    facts.append(("process-group backends", ", ".join(backends) or "none"))
    facts.append(("rank mapping", f"rank {info.rank} of {info.world_size}, local rank {info.local_rank}"))
    facts.append(("launcher variables", " ".join(f"{k}={v}" for k, v in env.items()) or "none (single process)"))

    if info.world_size > 1 and "MASTER_ADDR" not in env:
        problems.append(
            "WORLD_SIZE > 1 but MASTER_ADDR is not set: start through accelerate launch, torchrun or the sbatch scripts"
        )
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if info.has_cuda and local_world > device_count:
        problems.append(f"{local_world} processes on this node but only {device_count} GPU(s) visible")
    if not info.has_cuda and info.world_size > 1 and "gloo" not in backends:
        problems.append("multi-process on CPU needs the gloo backend, which this torch lacks")

    if info.use_deepspeed or _version("deepspeed") != "not installed":
        facts.append(("DeepSpeed ops", _deepspeed_ops(problems, required=info.use_deepspeed)))
        facts.append(("op build locks", _build_locks(problems, required=info.use_deepspeed)))

    try:
        library = tcmalloc_to_preload()
        facts.append(
            (
                "allocator",
                f"{ALLOCATOR_ENV}={allocator_choice()}: train runs on {library or 'the system allocator'}",
            )
        )
    except ConfigError as error:
        problems.append(str(error))

    wandb_mode = os.environ.get("WANDB_MODE")
    if wandb_mode and wandb_mode not in WANDB_MODES:
        problems.append(f"WANDB_MODE={wandb_mode}: wandb takes {', '.join(WANDB_MODES)}")
    wandb_mode = wandb_mode or "(not set: wandb's default, online)"
    key = "set" if os.environ.get("WANDB_API_KEY") else "not set (uses ~/.netrc if logged in)"
    facts.append(("W&B", f"log.wandb={str(cfg.log.wandb).lower()}, WANDB_MODE={wandb_mode}, API key {key}"))
    facts.append(("model", _model_source(cfg.model.name, cfg.model.revision, problems)))
    facts.append(("data", _data_source(cfg, problems)))

    output = Path(cfg.output_dir).resolve()
    existing = next(p for p in [output, *output.parents] if p.exists())
    free_gb = shutil.disk_usage(existing).free / 2**30
    facts.append(("output_dir", f"{output} ({free_gb:.1f} GiB free on its filesystem)"))
    if not os.access(existing, os.W_OK):
        problems.append(f"output_dir {output}: {existing} is not writable")
    if free_gb < 1:
        problems.append(f"output_dir {output}: only {free_gb:.2f} GiB free; checkpoints and exports need more")
    return facts, problems


def _model_source(name: str, revision: str | None, problems: list[str]) -> str:
    """Where model.name comes from, and a problem where it cannot come from there now."""
    from huggingface_hub import constants, try_to_load_from_cache

    from distsent.modeling import LOCAL_MODEL_NAMES, require_model_folder

    if name in LOCAL_MODEL_NAMES:
        return f"{name} (packaged, no Hub needed)"
    if Path(name).is_dir():
        try:
            require_model_folder(name)
        except ConfigError as error:
            problems.append(str(error))
        return f"{name} (local folder)"
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except ValueError:  # not a Hub id either: a mistyped path, say
        problems.append(f"model.name={name}: neither a local folder nor a Hub id")
        return f"{name} (not found)"
    if cached:
        return f"{name} (Hub id, cached)"
    if constants.HF_HUB_OFFLINE:
        # huggingface_hub reads TRANSFORMERS_OFFLINE as HF_HUB_OFFLINE too.
        problems.append(
            f"model.name={name}: a Hub id not in the local cache, and HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set"
        )
        return f"{name} (Hub id, not cached, and offline: cannot be downloaded)"
    return f"{name} (Hub id, not cached: downloaded at start)"


def _data_source(cfg: Config, problems: list[str]) -> str:
    """The data source; a problem for each local file that is not there (paths are relative to
    the working directory, as train reads them)."""
    if cfg.data.dataset != "files":
        return cfg.data.dataset
    files = {
        key: value
        for key, value in (
            ("data.train_file", cfg.data.train_file),
            ("data.validation_file", cfg.data.validation_file),
            ("data.test_file", cfg.data.test_file),
        )
        if value
    }
    for key, value in files.items():
        if not Path(value).is_file():
            problems.append(f"{key}={value}: file not found (from {Path.cwd()})")
    return ", ".join(f"{key}={value}" for key, value in files.items())


def _deepspeed_ops(problems: list[str], required: bool) -> str:
    try:
        import deepspeed  # noqa: F401
        from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
    except Exception as error:  # an import failure is itself the diagnosis
        if required:
            problems.append(f"the launch asks for DeepSpeed but it does not import: {error}")
        return f"unavailable ({error})"
    from deepspeed.accelerator import get_accelerator

    builders = {"cpu_adam": CPUAdamBuilder(), "fused_adam": FusedAdamBuilder()}
    ops = ", ".join(
        f"{name} {'ok' if builder.is_compatible(verbose=False) else 'no'}" for name, builder in builders.items()
    )
    return f"accelerator {get_accelerator().device_name()}; {ops}"


def _build_locks(problems: list[str], required: bool) -> str:
    stale = [describe_stale_lock(lock, age) for lock, age in stale_build_locks()]
    # Only a DeepSpeed launch builds ops; elsewhere a stale lock is worth knowing, not a stop.
    if required:
        problems.extend(stale)
    return "; ".join(stale) or f"none stale under {extensions_root()}"


def run_doctor(cfg: Config) -> int:
    facts, problems = diagnose(cfg)
    width = max(len(name) for name, _ in facts)
    print("distsent doctor")
    for name, value in facts:
        print(f"  {name:<{width}}  {value}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    print("ok: nothing here stops a run" if not problems else f"{len(problems)} problem(s) found")
    return 0 if not problems else 1
