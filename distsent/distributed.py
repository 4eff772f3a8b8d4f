"""Distributed setup: the only module that reads RANK, WORLD_SIZE and the launcher's variables.

One `Accelerator` covers single-process debug runs, DDP (NCCL on GPU, gloo on CPU) and
DeepSpeed ZeRO through accelerate. CPU-only machines run the same launch files users run
on GPUs: accelerate needs `cpu=True` to use gloo for DDP, and DeepSpeed needs its CPU
accelerator (`DS_ACCELERATOR=cpu`) plus an explicit gloo process group.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from distsent.config import Config, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher (accelerate, torchrun, Slurm) told this process."""

    world_size: int
    rank: int
    local_rank: int
    use_deepspeed: bool
    has_cuda: bool

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def read_launch_info() -> LaunchInfo:
    return LaunchInfo(
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        use_deepspeed=os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true",
        has_cuda=torch.cuda.is_available(),
    )


LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_MIXED_PRECISION",
    "DS_ACCELERATOR",
    "CUDA_VISIBLE_DEVICES",
    "SLURM_JOB_ID",
    "SLURM_NNODES",
    "SLURM_NODEID",
    "SLURM_PROCID",
    "SLURM_GPUS_ON_NODE",
    "SLURM_RESTART_COUNT",
)


def launcher_environment() -> dict[str, str]:
    """The launcher and scheduler variables that are set, for `distsent doctor` (not those
    distsent set itself)."""
    return {name: os.environ[name] for name in LAUNCHER_VARIABLES if name in os.environ and name not in SET_HERE}


def default_resume_mode() -> str:
    """`auto` inside a Slurm job (a requeued job must pick up where it stopped), else `none`."""
    return "auto" if os.environ.get("SLURM_JOB_ID") else "none"


# Variables prepare_environment set in this process: distsent's, not the launcher's.
SET_HERE: set[str] = set()


def prepare_environment() -> LaunchInfo:
    """Set process-wide variables that must exist before DeepSpeed or accelerate are imported."""
    info = read_launch_info()
    if not info.has_cuda:
        # DeepSpeed picks its accelerator once, at import; without this it looks for CUDA,
        # and warns "unable to detect" GPUs even in runs without DeepSpeed, which import it
        # only for accelerate's unwrapping of the model at export.
        if "DS_ACCELERATOR" not in os.environ:
            os.environ["DS_ACCELERATOR"] = "cpu"
            SET_HERE.add("DS_ACCELERATOR")
    # Tokenizers' own thread pool fights torch's for the same cores and warns after fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return info


def cpu_supports_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# `auto` takes bf16 on a CPU only where its bf16 matmuls beat fp32's by this much: support
# alone says little. bf16 ran 2.2x fp32 on a 2-core AMD EPYC VM, but 0.5x on a 2-core Intel
# Xeon VM whose hypervisor hides AMX (bench/RESULTS.md, "Which precision on CPU").
CPU_BF16_MIN_SPEEDUP = 1.25


@functools.cache
def cpu_bf16_speedup(size: int = 1024, rounds: int = 4) -> float:
    """How many times faster a square bf16 matmul runs than an fp32 one on this CPU.

    The two alternate, best of `rounds` each, so a neighbour's load slows both alike."""
    operands = {dtype: torch.full((size, size), 0.5, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, math.inf)
    for round_ in range(rounds + 1):
        for dtype, matrix in operands.items():
            start = time.perf_counter()
            matrix @ matrix
            if round_:  # round 0 warms up: kernel choice, page faults
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def resolve_mixed_precision(requested: str, info: LaunchInfo) -> str:
    """Turn `auto` into a concrete precision and refuse one the device cannot run."""
    if info.has_cuda:
        # Native bf16 only (Ampere on): pre-Ampere GPUs emulate it slowly, and fp16 is the choice there.
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            return "bf16" if bf16_ok else "fp16"
        if requested == "bf16" and not bf16_ok:
            raise ConfigError("train.mixed_precision=bf16 is not supported by this GPU; use fp16 or no")
        return requested
    if requested == "auto":
        if not cpu_supports_bf16():
            return "no"
        speedup = cpu_bf16_speedup()
        choice = "bf16" if speedup >= CPU_BF16_MIN_SPEEDUP else "no"
        log.info(
            "train.mixed_precision=auto: bf16 matmuls run %.2fx fp32's on this CPU, so %s",
            speedup,
            "bf16 autocast" if choice == "bf16" else "fp32 (no mixed precision)",
        )
        return choice
    if requested == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU (fp16 loss scaling is GPU-only); on CPU use bf16 or no"
        )
    if requested == "bf16" and not cpu_supports_bf16():
        raise ConfigError("train.mixed_precision=bf16: this CPU has no bf16 support; use no")
    return requested


def build_accelerator(cfg: Config, info: LaunchInfo):
    """The Accelerator for this process, with precision and accumulation from the run config."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

    precision = resolve_mixed_precision(cfg.train.mixed_precision, info)
    kwargs_handlers = []
    use_cpu = not info.has_cuda
    if info.use_deepspeed and not info.has_cuda:
        # accelerate would otherwise let DeepSpeed choose its CPU default (oneCCL), which is
        # rarely installed, and report world size 1; gloo is always there.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
        use_cpu = False
    # Left None, accelerate takes torch.compile settings from the launch config, if any.
    dynamo_plugin = None
    if cfg.train.compile:
        # Regional compilation compiles one encoder layer and reuses it for the others:
        # the same speed as compiling the whole model, in a fraction of the compile time.
        dynamo_plugin = TorchDynamoPlugin(backend="inductor", dynamic=True, use_regional_compilation=True)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        kwargs_handlers=kwargs_handlers,
        dynamo_plugin=dynamo_plugin,
    )
    variable = LAUNCH_FLAG_SETTINGS["gradient_accumulation_steps"][1]
    if not info.use_deepspeed and accelerator.gradient_accumulation_steps != cfg.train.grad_accum_steps:
        # accelerate prefers the environment's value to the one passed: the batch plan,
        # epochs and banner would then describe another run than the one trained.
        raise ConfigError(
            f"{variable}={os.environ.get(variable)} in the environment overrides "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}; unset it and set train.grad_accum_steps"
        )
    if cfg.train.mixed_precision == "auto" and not info.has_cuda and accelerator.num_processes > 1:
        # Each process timed bf16 itself; a split decision would train ranks in two precisions.
        bf16_ranks = accelerator.reduce(torch.tensor(int(precision == "bf16"), device=accelerator.device), "sum")
        if 0 < bf16_ranks.item() < accelerator.num_processes:
            raise ConfigError(
                f"train.mixed_precision=auto: {bf16_ranks.item()} of {accelerator.num_processes} processes found "
                "bf16 faster than fp32 on their CPU, the others not; set train.mixed_precision=bf16 or no"
            )
    # accelerate launch exports its --mixed_precision (default `no`); the precision passed
    # above wins over it, so a flag asking for another would be dropped without a word.
    # Checked once the processes agree on `auto`'s choice, so all of them refuse together.
    launched = os.environ.get(LAUNCH_PRECISION_VARIABLE, "no")
    if launched not in ("no", precision):
        remedy = (
            f"set train.mixed_precision={launched}"
            if launched in ("bf16", "fp16")
            else "distsent trains in bf16, fp16 or fp32 (no)"
        )
        raise ConfigError(
            f"accelerate launch --mixed_precision {launched} ({LAUNCH_PRECISION_VARIABLE}={launched}) asks for "
            f"{launched}, but train.mixed_precision={cfg.train.mixed_precision} means {precision} here and the run "
            f"config decides; drop the flag (or mixed_precision in the accelerate config); {remedy}"
        )
    if accelerator.num_processes != info.world_size:
        raise RuntimeError(
            f"the launcher started {info.world_size} processes but accelerate sees {accelerator.num_processes}; "
            "run `distsent doctor` under the same launcher to see why"
        )
    if accelerator.state.deepspeed_plugin is not None:
        reconcile_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, info.world_size, precision)
        if cfg.train.compile and zero_stage(accelerator) == 3:
            # Dynamo cannot trace through ZeRO-3's parameter gathering hooks: it recompiles
            # until its limit, then runs the layers eagerly, ~10x slower than not compiling.
            raise ConfigError(
                "train.compile=true does not work under DeepSpeed ZeRO-3 (torch.compile gives up on its "
                "partitioned parameters and runs slower than eager); set train.compile=false, or use ZeRO-2 or DDP"
            )
    return accelerator


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this run; None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def checkpoint_layout(accelerator) -> str:
    """How this run's checkpoints are laid out on disk: accelerate's own files (one process or
    DDP, which share them) or DeepSpeed's, partitioned by ZeRO stage. A checkpoint only loads
    under the layout that wrote it."""
    stage = zero_stage(accelerator)
    return "accelerate (one process or DDP)" if stage is None else f"DeepSpeed ZeRO-{stage}"


def wait_for_device(device: torch.device) -> None:
    """Block until the work queued on `device` is done. GPU kernels run asynchronously: a clock
    read without this stops when the work is queued, not when it is done."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


@contextlib.contextmanager
def model_construction_context(accelerator):
    """Build models whole on every rank, even under ZeRO-3.

    With a ZeRO-3 config registered, transformers constructs models inside
    `deepspeed.zero.Init`, which draws the random initialisation per partition: a fresh
    head (or tiny-bert) would start from different weights than a single-process run with
    the same seed. BERT-style encoders fit in host memory many times over, so we hide the
    config while building and let prepare() partition the finished model."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def node_leaders_first(accelerator):
    """Rank 0 runs the block first, then each other node's first process, then the rest.

    For data preparation: rank 0 fills the datasets cache, the other nodes' leaders reuse it
    where the cache is shared or fill their own where it is node-local, and every other
    process then loads a finished cache. accelerate's `main_process_first` alone lets all
    processes of the other nodes tokenise at once into one node-local cache file."""
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        yield


# accelerate launch's --mixed_precision, exported to every process.
LAUNCH_PRECISION_VARIABLE = "ACCELERATE_MIXED_PRECISION"

# DeepSpeed settings that `accelerate launch` flags set through the environment:
# (flag, variable, the run config's key that decides instead).
LAUNCH_FLAG_SETTINGS = {
    "gradient_accumulation_steps": (
        "--gradient_accumulation_steps",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "train.grad_accum_steps",
    ),
    "gradient_clipping": ("--gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING", "train.max_grad_norm"),
}


def reconcile_deepspeed_config(ds_config: dict, cfg: Config, world_size: int, precision: str) -> None:
    """Fill DeepSpeed's "auto" values from the run config; refuse values that contradict it.

    The run config is the single source of truth for batch sizes, clipping and precision,
    so a DeepSpeed JSON either says "auto" or agrees with it. The schedule is the run
    config's too (a "scheduler" section would set the rate before distsent's does, each
    step), and so is the optimizer."""
    if "scheduler" in ds_config:
        raise ConfigError(
            'DeepSpeed config has a "scheduler" section, a second learning-rate schedule; remove it: '
            "distsent's linear warmup and decay come from train.lr, train.warmup_steps and train.warmup_ratio"
        )
    if "optimizer" in ds_config:
        # accelerate would stop at prepare() with advice about DummyOptim, code users cannot change.
        raise ConfigError(
            'DeepSpeed config has an "optimizer" section; remove it: distsent builds AdamW from train.lr, '
            "train.weight_decay and train.adam_* (under offload DeepSpeed runs it as its CPU Adam)"
        )
    expected = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.train.global_batch_size(world_size),
        "gradient_clipping": cfg.train.max_grad_norm,
    }
    for key, value in expected.items():
        _reconcile(ds_config, key, value)
    for section, enabled in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        ds_config.setdefault(section, {})
        _reconcile(ds_config[section], "enabled", enabled, where=f"{section}.enabled")
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") == 3:
        # Exports (best/, final/) gather ZeRO-3's partitioned weights into one file, which
        # DeepSpeed does only with this set; without it the first export fails mid-run.
        key = "stage3_gather_16bit_weights_on_model_save"
        if zero.setdefault(key, True) == "auto":
            zero[key] = True
        if zero[key] is not True:
            raise ConfigError(
                f"DeepSpeed config sets zero_optimization.{key}={zero[key]!r}; under ZeRO-3 distsent's exports "
                "gather the partitioned weights, which needs it true: set it true (or leave it out)"
            )


def _reconcile(section: dict, key: str, value, where: str | None = None) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        flag = LAUNCH_FLAG_SETTINGS.get(key)
        if flag and flag[1] in os.environ:
            # accelerate copies its launch flag into the DeepSpeed config, over the JSON's "auto".
            raise ConfigError(
                f"accelerate launch {flag[0]} ({flag[1]}={os.environ[flag[1]]}) sets DeepSpeed's {key}={current!r} "
                f"but the run config implies {value!r}; drop the flag and set {flag[2]} instead"
            )
        # accelerate writes 1 for an accumulation the JSON leaves out: "sets" would be untrue.
        source = (
            " (the JSON's, or accelerate's where the JSON leaves it out)"
            if key == "gradient_accumulation_steps"
            else ""
        )
        raise ConfigError(
            f"DeepSpeed config sets {where or key}={current!r}{source} but the run config implies {value!r}; "
            'set it to "auto" so the run config decides'
        )
