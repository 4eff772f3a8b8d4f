"""Real multi-process runs on CPU (gloo, DeepSpeed's CPU accelerator) through `accelerate launch`.

N processes must compute what one process with the same global batch computes, count
every validation example exactly once, and export whole weights under every ZeRO stage."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distsent.config import ConfigError, load_config
from distsent.data import load_labeled_splits
from distsent.distributed import reconcile_deepspeed_config
from tests.conftest import (
    REPO,
    TINY,
    accelerate_launch_command,
    cli_env,
    kill_process_tree,
    launch,
    max_weight_difference,
    read_summary,
    run_captured,
    run_cli,
    with_nan_classifier,
)

pytestmark = pytest.mark.slow

# fp32, dropout off, 20 optimizer steps of a global batch of 16; 101 validation examples
# (not divisible by processes x batch) so de-duplication of padded shards is exercised.
EQUIVALENCE = [*TINY, "model.dropout=0.0", "train.max_steps=20"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    out = {name: root / name for name in ("single", "ddp", "zero2", "zero3")}
    run_cli("train", *EQUIVALENCE, "train.grad_accum_steps=2", f"output_dir={out['single']}")
    launch("ddp.yaml", 2, "train", *EQUIVALENCE, f"output_dir={out['ddp']}")
    launch("zero2.yaml", 2, "train", *EQUIVALENCE, f"output_dir={out['zero2']}")
    launch("zero3.yaml", 2, "train", *EQUIVALENCE, f"output_dir={out['zero3']}")
    return out


def test_world_size_and_batch_arithmetic(runs):
    assert read_summary(runs["single"])["world_size"] == 1
    for name in ("ddp", "zero2", "zero3"):
        summary = read_summary(runs[name])
        assert summary["world_size"] == 2, name
        assert summary["global_batch_size"] == 16 == read_summary(runs["single"])["global_batch_size"]
    assert read_summary(runs["zero2"])["distributed_type"] == "DEEPSPEED"
    assert read_summary(runs["ddp"])["distributed_type"] == "MULTI_CPU"


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_n_processes_equal_one_process(runs, name):
    assert max_weight_difference(runs["single"] / "final", runs[name] / "final") <= ATOL


def test_training_moved_the_weights(runs):
    # Guards the equivalence checks against comparing two untrained models.
    first = read_summary(runs["single"])
    assert first["global_step"] == 20
    import json

    losses = [
        json.loads(line)["loss"]
        for line in (runs["single"] / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert len(losses) == 4 and losses[0] != losses[-1]


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_validation_counts_every_example_once(runs, name):
    single, multi = read_summary(runs["single"])["eval"], read_summary(runs[name])["eval"]
    assert multi["num_examples"] == 101 == single["num_examples"]
    assert multi["accuracy"] == single["accuracy"]
    assert multi["confusion_matrix"] == single["confusion_matrix"]
    assert multi["loss"] == pytest.approx(single["loss"], abs=1e-5)


def test_train_loss_is_mean_over_ranks(runs):
    # Same global batch, same weights: the reported loss is the mean over all 16 examples,
    # so a rank-0-only loss (8 examples) would differ.
    import json

    def losses(run):
        return [
            json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line
        ]

    assert losses(runs["ddp"]) == pytest.approx(losses(runs["single"]), abs=1e-5)


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_export_loads_and_predicts_like_the_trained_model(runs, name):
    export = runs[name] / "final"
    with safe_open(export / "model.safetensors", "pt") as handle:
        assert all(handle.get_tensor(k).dtype in (torch.float32, torch.int64) for k in handle.keys())
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    cfg = load_config(None, EQUIVALENCE)
    splits = load_labeled_splits(cfg.data)
    texts, labels = splits.texts["validation"], torch.tensor(splits.labels["validation"])
    with torch.no_grad():
        logits = model(
            **tokenizer(texts, padding=True, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
        ).logits
    correct = int((logits.argmax(-1) == labels).sum())
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    in_memory = read_summary(runs[name])["eval"]
    assert correct == round(in_memory["accuracy"] * len(labels))
    # The loss depends on every weight; equal loss means the export is the trained model.
    assert loss == pytest.approx(in_memory["loss"], abs=1e-5)


@pytest.mark.parametrize("launch_file", ["ddp.yaml", "zero2.yaml"])
def test_bf16_runs_export_fp32(tmp_path, launch_file):
    # DeepSpeed's bf16 casts the model itself, and transformers recorded that dtype in
    # config.json: from_pretrained then loaded the fp32 weights as bf16.
    out = tmp_path / "bf16"
    launch(launch_file, 2, "train", *TINY, "train.max_steps=6", "train.mixed_precision=bf16", f"output_dir={out}")
    assert read_summary(out)["mixed_precision"] == "bf16"
    with safe_open(out / "final" / "model.safetensors", "pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
    assert torch.float32 in dtypes and torch.bfloat16 not in dtypes
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "float32"
    assert AutoModelForSequenceClassification.from_pretrained(out / "final").dtype == torch.float32


@pytest.mark.parametrize("head", ["mean", "cnn"])
def test_distsent_heads_under_ddp_equal_one_process(tmp_path, head):
    # These heads read no pooler; with one left in the encoder, DDP stopped at the second step
    # on its parameters, which got no gradient.
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    steps = [*EQUIVALENCE, f"model.head={head}", "train.max_steps=6"]
    run_cli("train", *steps, "train.grad_accum_steps=2", f"output_dir={single}")
    launch("ddp.yaml", 2, "train", *steps, f"output_dir={ddp}")
    assert read_summary(ddp)["global_step"] == 6
    assert max_weight_difference(single / "final", ddp / "final") <= ATOL


def test_zero1_runs(tmp_path):
    out = tmp_path / "zero1"
    launch("zero1.yaml", 2, "train", *TINY, "train.max_steps=6", f"output_dir={out}")
    assert read_summary(out)["world_size"] == 2


def test_conflicting_deepspeed_value_is_refused(tmp_path):
    config = tmp_path / "zero2_fixed.json"
    config.write_text(
        (REPO / "configs" / "deepspeed" / "zero2.json")
        .read_text()
        .replace('"train_micro_batch_size_per_gpu": "auto"', '"train_micro_batch_size_per_gpu": 4')
    )
    accelerate_yaml = tmp_path / "zero2.yaml"
    accelerate_yaml.write_text(
        (REPO / "launch" / "accelerate" / "zero2.yaml").read_text().replace("configs/deepspeed/zero2.json", str(config))
    )
    run = ["-m", "distsent", "train", *TINY, "train.max_steps=2", f"output_dir={tmp_path / 'out'}"]
    result = run_captured([*accelerate_launch_command(accelerate_yaml, 2), *run], timeout=600)
    assert result.returncode != 0
    assert "train_micro_batch_size_per_gpu=4" in result.stderr and '"auto"' in result.stderr
    # A schedule of DeepSpeed's own would set the rate before distsent's each step.
    ds_config = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    ds_config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 100}}
    config.write_text(json.dumps(ds_config))
    result = run_captured([*accelerate_launch_command(accelerate_yaml, 1), *run], timeout=600)
    assert result.returncode != 0
    assert 'DeepSpeed config has a "scheduler" section, a second learning-rate schedule' in result.stderr
    # An optimizer section is refused by name too (accelerate's own refusal, a traceback from
    # prepare(), advises a code change).
    del ds_config["scheduler"]
    ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    config.write_text(json.dumps(ds_config))
    result = run_captured([*accelerate_launch_command(accelerate_yaml, 1), *run], timeout=600)
    assert result.returncode != 0 and "DummyOptim" not in result.stderr
    assert 'DeepSpeed config has an "optimizer" section; remove it' in result.stderr


def test_accumulation_from_the_launcher_is_refused_naming_its_source(tmp_path):
    """accelerate takes gradient accumulation from its launch flag (DeepSpeed) or from the
    environment (always), over what distsent passes: the run would train another global
    batch than its plan, banner and epochs describe."""
    run = ["train", *TINY, "train.max_steps=2", f"output_dir={tmp_path / 'out'}"]
    flagged = launch("zero2.yaml", 1, *run, extra_launch=("--gradient_accumulation_steps", "2"), check=False)
    assert flagged.returncode != 0
    assert (
        "accelerate launch --gradient_accumulation_steps (ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2)" in flagged.stderr
    )
    assert "set train.grad_accum_steps instead" in flagged.stderr
    exported = run_cli(*run, env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}, check=False)
    assert exported.returncode == 2, exported.stderr[-3000:]
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2 in the environment overrides train.grad_accum_steps=1" in (
        exported.stderr
    )
    assert not (tmp_path / "out").exists()


def test_precision_from_the_launcher_is_refused_naming_its_source(tmp_path):
    """accelerate launch --mixed_precision would be overruled by the run config's precision
    without a word; the run config decides, so the flag is refused."""
    run = ["train", *TINY, "train.max_steps=2", f"output_dir={tmp_path / 'out'}"]
    flagged = launch("ddp.yaml", 1, *run, extra_launch=("--mixed_precision", "bf16"), check=False)
    assert flagged.returncode != 0
    assert "accelerate launch --mixed_precision bf16 (ACCELERATE_MIXED_PRECISION=bf16)" in flagged.stderr
    assert "set train.mixed_precision=bf16" in flagged.stderr
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_on_one_host_match_two_processes(runs, tmp_path):
    out = tmp_path / "nodes"
    port = str(_free_port())
    commands = [
        [
            *accelerate_launch_command(
                "ddp.yaml",
                2,
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
            ),
            "-m",
            "distsent",
            "train",
            *EQUIVALENCE,
            f"output_dir={out}",
        ]
        for rank in (0, 1)
    ]
    nodes = [
        subprocess.Popen(c, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:  # after a timeout, neither node's workers may outlive the test
            kill_process_tree(node)
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    assert read_summary(out)["world_size"] == 2
    assert max_weight_difference(runs["ddp"] / "final", out / "final") <= ATOL


def test_zero3_offload_runs(tmp_path):
    out = tmp_path / "offload"
    launch("zero3_offload.yaml", 2, "train", *TINY, "train.max_steps=4", f"output_dir={out}")
    assert read_summary(out)["distributed_type"] == "DEEPSPEED"
    AutoModelForSequenceClassification.from_pretrained(out / "final")


def torchrun_two_processes(*program: str) -> list[str]:
    """The command line of `torchrun --nproc_per_node 2 PROGRAM...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *program]


def test_torchrun_works_too(tmp_path):
    out = tmp_path / "torchrun"
    command = [
        *torchrun_two_processes("-m", "distsent"),
        "train",
        *TINY,
        "train.max_steps=4",
        f"output_dir={out}",
    ]
    result = run_captured(command, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_summary(out)["world_size"] == 2


# Run as a torchrun worker: each rank's bf16 timing is replaced by its rank's verdict, so two
# real processes reach `auto` with different answers, as two unlike CPUs would.
_SPLIT_PRECISION_WORKER = """
import os, sys
import distsent.distributed as distributed
from distsent.__main__ import main

distributed.cpu_supports_bf16 = lambda: True
distributed.cpu_bf16_speedup = lambda: 2.0 if os.environ["RANK"] == "0" else 1.0
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_that_disagree_on_auto_precision_stop_the_run(tmp_path):
    worker = tmp_path / "split_precision_worker.py"
    worker.write_text(_SPLIT_PRECISION_WORKER)
    out = tmp_path / "split"
    command = [
        *torchrun_two_processes(str(worker)),
        "train",
        *TINY,
        "train.mixed_precision=auto",
        "train.max_steps=2",
        f"output_dir={out}",
    ]
    env = {**cli_env(), "DISTSENT_ALLOCATOR": "system"}  # no re-exec: the worker script stays in charge
    result = run_captured(command, env=env, timeout=600)
    assert result.returncode != 0
    assert "1 of 2 processes found bf16 faster than fp32" in result.stderr, result.stderr[-4000:]
    assert not (out / "final").exists()


AGREE_ON_RESUME_SCRIPT = """
import sys
from pathlib import Path
from distsent.checkpoint import CheckpointError, agree_on_resume
from distsent.config import load_config
from distsent.distributed import build_accelerator, prepare_environment

# As `distsent train` builds it: gloo on a machine without GPUs.
accelerator = build_accelerator(load_config(None, ["train.mixed_precision=no"]), prepare_environment())
shared, unseen = Path(sys.argv[1]), Path(sys.argv[2])
rank = accelerator.process_index
# Rank 1's listing lags: it has not seen the newest checkpoint yet.
agreed = agree_on_resume(accelerator, shared if rank == 0 else None)
# One string per print: workers run unbuffered (python -u), so print's pieces are separate
# writes, and a CI run saw the two ranks' lines interleave mid-line.
print(f"rank {rank} agreed {agreed}", flush=True)
# A checkpoint the other ranks cannot see (here no rank can): not a shared filesystem.
try:
    agree_on_resume(accelerator, unseen if rank == 0 else None)
    print(f"rank {rank} accepted", flush=True)
except CheckpointError as error:
    print(f"rank {rank} refused: {error}", flush=True)
"""


def test_every_rank_resumes_from_rank_0s_checkpoint(tmp_path: Path):
    """Each rank lists checkpoints/ itself; on a network filesystem the listings can differ.
    Rank 0's choice is the one every rank loads, and a rank that cannot see it stops."""
    from distsent.checkpoint import COMPLETE_MARKER

    shared = tmp_path / "checkpoints" / "step-00000008"
    shared.mkdir(parents=True)
    (shared / COMPLETE_MARKER).touch()
    script = tmp_path / "agree.py"
    script.write_text(AGREE_ON_RESUME_SCRIPT)
    command = [
        *accelerate_launch_command("ddp.yaml", 2, "--main_process_port", str(_free_port())),
        str(script),
        str(shared),
        str(tmp_path / "unseen"),
    ]
    result = run_captured(command, timeout=300)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert f"rank 1 agreed {shared}" in result.stdout and f"rank 0 agreed {shared}" in result.stdout, output
    assert "rank 1 refused: rank 1 cannot see checkpoint" in result.stdout, output
    assert "output_dir must be on a filesystem every node shares" in result.stdout, output


def test_zero3_exports_gather_the_weights():
    """A ZeRO-3 JSON without stage3_gather_16bit_weights_on_model_save trained until its first
    export and then crashed; one that turns it off is refused before training."""
    cfg = load_config(None, TINY)
    ds_config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    del ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    reconcile_deepspeed_config(ds_config, cfg, world_size=2, precision="no")
    assert ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with pytest.raises(ConfigError, match=r"stage3_gather_16bit_weights_on_model_save=False; under ZeRO-3"):
        reconcile_deepspeed_config(ds_config, cfg, world_size=2, precision="no")


def test_compile_under_zero3_is_refused(tmp_path):
    args = ["train", *TINY, "train.max_steps=2", "train.compile=true", f"output_dir={tmp_path / 'out'}"]
    result = launch("zero3.yaml", 1, *args, check=False)
    # The worker exits 2; the launcher reports that with its own 1.
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert "train.compile=true does not work under DeepSpeed ZeRO-3" in result.stderr


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> list[str]:
    """`distsent train` arguments of a finished one-process run with checkpoints; runs that
    refuse to resume it leave its folder as it was."""
    run = tmp_path_factory.mktemp("one_process") / "run"
    args = ["train", *TINY, "train.max_steps=4", "checkpoint.every_steps=2", f"output_dir={run}"]
    run_cli(*args)
    return args


def test_a_checkpoint_resumes_only_under_the_launch_that_wrote_it(one_process_run):
    """A one-process (accelerate) checkpoint resumed under ZeRO-2 failed inside DeepSpeed's
    loader, with advice to try an earlier checkpoint that failed the same way."""
    args = one_process_run
    result = launch("zero2.yaml", 1, *args, "train.resume=auto", check=False)
    assert result.returncode != 0
    assert (
        "checkpoint_layout: checkpoint 'accelerate (one process or DDP)', this run 'DeepSpeed ZeRO-2'" in result.stderr
    ), result.stderr[-3000:]
    assert "launch it as it was launched (accelerate (one process or DDP)) to continue it" in result.stderr
    two = launch("ddp.yaml", 2, *args, "train.resume=auto", check=False)
    assert "world_size: checkpoint 1, this run 2" in two.stderr and "launch 1 process(es) to continue it" in two.stderr
    # Another setting too: another run, which no launch continues.
    other = launch("ddp.yaml", 2, *args, "train.resume=auto", "train.lr=1e-3", check=False)
    assert "train.lr: checkpoint" in other.stderr and "to continue it" not in other.stderr


# train() as a script calls it, under a 2-process launch: the run is refused after the model
# was prepared (DDP), and the caller's process group must outlive the error.
LIBRARY_CALLER_SCRIPT = """
import sys
import torch.distributed as dist
from distsent.checkpoint import CheckpointError
from distsent.config import load_config
from distsent.distributed import prepare_environment
from distsent.train import train

prepare_environment()
try:
    train(load_config(None, sys.argv[1:]))
except CheckpointError as error:
    print(f"rank {dist.get_rank()} refused: {error}", flush=True)
ranks = [None, None]
dist.all_gather_object(ranks, dist.get_rank())
print(f"rank {dist.get_rank()} gathered {ranks}", flush=True)
dist.destroy_process_group()
"""


def test_train_leaves_the_process_group_to_its_caller(tmp_path, one_process_run):
    """train() destroyed the process group on its way out while the DDP model lived on in the
    error's traceback; freeing the model then destroyed gloo's group holding the GIL, which
    deadlocked with gloo's worker thread: 1 in 6 refused 2-process launches never exited."""
    script = tmp_path / "caller.py"
    script.write_text(LIBRARY_CALLER_SCRIPT)
    command = [
        *accelerate_launch_command("ddp.yaml", 2, "--main_process_port", str(_free_port())),
        str(script),
        *one_process_run[1:],
        "train.resume=auto",
    ]
    result = run_captured(command, env=cli_env(), timeout=300)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, output
    for rank in (0, 1):
        # Refused by the checkpoint's record, read after prepare() wrapped the model in DDP.
        assert f"rank {rank} refused: " in result.stdout, output
        assert f"rank {rank} gathered [0, 1]" in result.stdout, output
    assert "world_size: checkpoint 1, this run 2" in result.stdout, output


# `distsent train` as a worker's own command line (main() reads sys.argv), with a bug planted
# after prepare(): the worker crashes with its process group up.
CRASHING_WORKER = """
import sys
import distsent.train
from distsent.__main__ import main


def planted_bug(*args, **kwargs):
    raise RuntimeError("planted bug after prepare")


distsent.train.agree_on_resume = planted_bug
sys.exit(main())
"""


def test_a_worker_that_crashes_with_its_group_up_prints_the_traceback_and_exits_1(tmp_path):
    """Such a worker leaves through os._exit like a finished one (worker_exit), not through
    interpreter teardown with a live gloo group; its traceback still reaches stderr."""
    worker = tmp_path / "crashing_worker.py"
    worker.write_text(CRASHING_WORKER)
    out = tmp_path / "out"
    command = [*torchrun_two_processes(str(worker)), "train", *TINY, "train.max_steps=2", f"output_dir={out}"]
    env = {**cli_env(), "DISTSENT_ALLOCATOR": "system"}  # no re-exec: the worker script stays in charge
    result = run_captured(command, env=env, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("RuntimeError: planted bug after prepare") >= 2, result.stderr[-4000:]
    assert "in planted_bug" in result.stderr and "exitcode  : 1" in result.stderr, result.stderr[-4000:]


def test_a_diverged_validation_is_reported_once_not_by_every_rank(runs, tmp_path):
    """Every rank scores the same gathered outputs and stops on them; one rank says why."""
    broken = with_nan_classifier(runs["single"] / "final", tmp_path / "nan_model")
    args = ["train", *TINY, f"model.name={broken}", "train.max_steps=2", f"output_dir={tmp_path / 'run'}"]
    stopped = launch("ddp.yaml", 2, *args, check=False)
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    # (The launcher's own traceback on a failed worker is torch's; none comes from distsent.)
    assert "distsent/train.py" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.count("validation at step 2: the model scored") == 1, stopped.stderr[-3000:]
