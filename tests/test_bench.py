"""Smoke test of the benchmark script: every contender runs and reports well-formed numbers."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distsent.config import ModelConfig
from distsent.first_token import use_first_token_last_layer
from distsent.modeling import build_model, build_tokenizer
from tests.conftest import cli_env, run_captured

pytestmark = pytest.mark.slow


def test_compare_trainer_reports_every_contender(tmp_path):
    output = tmp_path / "bench.jsonl"
    command = [
        sys.executable,
        "bench/compare_trainer.py",
        "--model",
        "tiny-bert",
        "--epochs",
        "0.25",
        "--max-train-samples",
        "256",
        "--max-eval-samples",
        "64",
        "--output",
        str(output),
    ]
    result = run_captured(command, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert (
        lines[0]["name"] == "gemm_peak" and lines[0]["bf16_flops"] > 0 and "compare_trainer.py" in lines[0]["command"]
    )
    reports = {"mfu", "summary"}
    contenders = {
        line["name"]: line for line in lines[1:] if not line["name"].startswith("ratio") and line["name"] not in reports
    }
    assert set(contenders) == {
        "distsent",
        "trainer_defaults",
        "trainer_bf16",
        "trainer_bf16_grouped",
        "trainer_grouped",
        "trainer_bf16_grouped_tcmalloc",
    }
    # Each ran on the allocator its name says: distsent on tcmalloc by default, the Trainer not.
    assert contenders["distsent"]["allocator"] == contenders["trainer_bf16_grouped_tcmalloc"]["allocator"] == "tcmalloc"
    assert contenders["trainer_bf16_grouped"]["allocator"] == "system"
    for line in contenders.values():
        for key in ("tokens_per_second", "examples_per_second", "train_seconds", "peak_rss_mib", "mfu_vs_bf16_peak"):
            assert line[key] > 0, (line["name"], key)
        assert 0 <= line["accuracy"] <= 1
    ratios = {line["name"] for line in lines if line["name"].startswith("ratio")}
    assert ratios == {f"ratio distsent/{name}" for name in [*contenders, "trainer_best"] if name != "distsent"}
    (summary,) = [line for line in lines if line["name"] == "summary"]
    # The Trainer's best is its best TrainingArguments: the tcmalloc run is reported, not picked.
    assert summary["trainer_best"] in set(contenders) - {"distsent", "trainer_bf16_grouped_tcmalloc"}
    assert set(summary["targets_met"]) == {
        "mfu",
        "vs_trainer_best",
        "vs_trainer_defaults",
    }
    mfu_lines = [line for line in lines if line["name"] == "mfu"]
    assert {line["contender"] for line in mfu_lines} == set(contenders)
    assert all("FLOPs/token = 6 x N + 12 x L x H x S" in line["formula"] for line in mfu_lines)
    for name, line in contenders.items():
        # MFU is model FLOP/s over the measured bf16 peak, from the reported token rate.
        expected = line["tokens_per_second"] * line["flops_per_token"] / lines[0]["bf16_flops"]
        assert line["mfu_vs_bf16_peak"] == pytest.approx(expected, rel=1e-6), name
        # The target is judged against the higher peak, which is the machine's limit.
        higher = max(lines[0]["bf16_flops"], lines[0]["fp32_flops"])
        assert line["mfu_vs_best_peak"] == pytest.approx(expected * lines[0]["bf16_flops"] / higher, rel=1e-6), name
        # Only distsent's last layer computes [CLS] alone, so only its executed FLOPs are fewer.
        fewer = line["executed_flops_per_token"] < line["flops_per_token"]
        assert fewer == (name == "distsent") == line.get("last_layer_cls_only", False), name


def test_compare_trainer_lets_distsent_change_speed_knobs_only():
    refused = run_captured([sys.executable, "bench/compare_trainer.py", "--distsent-set", "train.lr=0.01"], timeout=120)
    assert refused.returncode == 2
    assert "--distsent-set train.lr=0.01: only speed knobs" in refused.stderr


def test_compare_trainer_refuses_ratios_between_unequal_work(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    from compare_trainer import check_equal_work

    workload = {"optimizer_steps": 4, "batch_size": 32}
    check_equal_work({"distsent": {"optimizer_steps": 4, "train_examples": 128}}, workload)
    with pytest.raises(SystemExit, match="distsent took 2 optimizer steps over 64 examples, the workload is 4"):
        check_equal_work({"distsent": {"optimizer_steps": 2, "train_examples": 64}}, workload)


def test_rounds_alternate_the_order_and_combine_rates_over_all_the_work(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    from compare_trainer import combine_rounds, round_orders

    assert round_orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    fast = {"tokens_per_second": 300.0, "examples_per_second": 30.0, "train_seconds": 10.0}
    slow = {"tokens_per_second": 100.0, "examples_per_second": 10.0, "train_seconds": 30.0}
    runs = [
        {**fast, "accuracy": 0.8, "peak_rss_mib": 900.0, "process_wall_seconds": 12.0, "optimizer_steps": 7},
        {**slow, "accuracy": 0.9, "peak_rss_mib": 1000.0, "process_wall_seconds": 32.0, "optimizer_steps": 7},
    ]
    combined = combine_rounds(runs)
    # 6,000 tokens in 40 s: the rate over all the work, not the mean of the two rates (200).
    assert combined["tokens_per_second"] == pytest.approx(150.0)
    assert combined["examples_per_second"] == pytest.approx(15.0)
    assert combined["train_seconds"] == 20.0 and combined["process_wall_seconds"] == 22.0
    assert combined["accuracy"] == pytest.approx(0.85) and combined["peak_rss_mib"] == 1000.0
    assert combined["optimizer_steps"] == 7
    assert [run["tokens_per_second"] for run in combined["rounds"]] == [300.0, 100.0]
    assert combine_rounds(runs[:1]) is runs[0]


def test_compare_trainer_runs_two_rounds_in_opposite_orders(tmp_path):
    output, workdir = tmp_path / "bench.jsonl", tmp_path / "work"
    command = [
        *[sys.executable, "bench/compare_trainer.py", "--model", "tiny-bert", "--epochs", "0.25"],
        *["--max-train-samples", "128", "--max-eval-samples", "32", "--contenders", "distsent,trainer_defaults"],
        *["--rounds", "2", "--output", str(output), "--workdir", str(workdir)],
    ]
    result = run_captured(command, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    finished = [line.split("]")[0][1:] for line in result.stderr.splitlines() if "real tokens/s, accuracy" in line]
    assert finished == ["distsent", "trainer_defaults", "trainer_defaults", "distsent"]
    records = {line["name"]: line for line in map(json.loads, output.read_text().splitlines())}
    for name in ("distsent", "trainer_defaults"):
        rounds = records[name]["rounds"]
        assert len(rounds) == 2 and all(run["tokens_per_second"] > 0 for run in rounds)
        seconds = sum(run["train_seconds"] for run in rounds)
        tokens = sum(run["tokens_per_second"] * run["train_seconds"] for run in rounds)
        assert records[name]["tokens_per_second"] == pytest.approx(tokens / seconds)
    # Each round's distsent run trained into its own folder.
    assert (workdir / "distsent" / "summary.json").is_file()
    assert (workdir / "round2" / "distsent" / "summary.json").is_file()
    assert records["summary"]["rounds"] == 2


def test_the_trainer_best_target_is_undecided_when_a_trainer_setting_did_not_run(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    from compare_trainer import ON_TCMALLOC, TRAINER_SETTINGS, missing_trainer_settings

    every = dict.fromkeys(["distsent", *TRAINER_SETTINGS], {})
    assert missing_trainer_settings(every) == []
    assert missing_trainer_settings({**every, **dict.fromkeys(ON_TCMALLOC, {})}) == []
    without_grouped = {name: r for name, r in every.items() if name != "trainer_grouped"}
    assert missing_trainer_settings(without_grouped) == ["trainer_grouped"]


def test_executed_flops_are_what_a_flop_counter_sees_skipped(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    from compare_trainer import model_flops, parameter_breakdown

    # Eager attention: plain matrix products, which the counter sees (CPU SDPA kernels it does not).
    config = ModelConfig(name="tiny-bert", attn_implementation="eager")
    full = build_model(config, ["neg", "pos"], vocab_size=1000).eval()
    shortcut = copy.deepcopy(full)
    assert use_first_token_last_layer(shortcut)
    batch, length = 4, 16
    input_ids = torch.randint(5, 1000, (batch, length))

    def counted(model) -> int:
        with FlopCounterMode(display=False) as counter:
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.sum().backward()
        return counter.get_total_flops()

    skipped_per_token = (counted(full) - counted(shortcut)) / (batch * length)
    flops = model_flops(parameter_breakdown(full), full.config, 1.0, length, {"bf16": 1.0, "fp32": 1.0}, True)
    assert skipped_per_token > 0
    assert flops["flops_per_token"] - flops["executed_flops_per_token"] == pytest.approx(skipped_per_token, rel=1e-9)


def test_gpu_throughput_script_runs_on_cpu_and_reports_mfu(tmp_path):
    """The bert-base GPU benchmark, shrunk to a tiny BERT on CPU: the real train path, real numbers."""
    output = tmp_path / "gpu.jsonl"
    command = [sys.executable, "bench/gpu_throughput.py", "--model-size", "tiny", "--seq-lengths", "32,64"]
    command += ["--batch-size", "4", "--steps", "6", "--log-every", "2", "--precision", "no"]
    command += ["--workdir", str(tmp_path / "work"), "--output", str(output)]
    result = run_captured(command, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    peak, *runs = [json.loads(line) for line in output.read_text().splitlines()]
    assert peak["name"] == "gemm_peak" and peak["device"] == "cpu" and peak["bf16_flops"] > 0
    assert [run["seq_len"] for run in runs] == [32, 64]
    for run in runs:
        assert run["windows"] == 2 and run["tokens_per_second"] > 0 and run["peak_memory_mib"] > 0
        # Every text fills the sequence: tokens per example is the sequence length.
        assert run["tokens_per_second"] / run["examples_per_second"] == pytest.approx(run["seq_len"])
        expected = run["tokens_per_second"] * run["flops_per_token"] / peak["bf16_flops"]
        assert run["mfu_vs_bf16_peak"] == pytest.approx(expected, rel=1e-6)
        assert run["executed_flops_per_token"] < run["flops_per_token"]  # bert's cls head: [CLS]-only last layer


def test_attention_benchmark_times_both_and_reports_per_length():
    command = [sys.executable, "bench/attention.py", "--lengths", "8", "16", "--batch", "4", "--rounds", "1"]
    result = run_captured(command, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    records = [json.loads(line) for line in lines[:-1]]
    assert [record["length"] for record in records] == [8, 16]
    for record in records:
        assert record["distsent_ms"] > 0 and record["sdpa_math_ms"] > 0
        assert record["speedup"] == pytest.approx(record["sdpa_math_ms"] / record["distsent_ms"], rel=0.01)
    assert lines[-1].startswith("command:") and "attention.py" in lines[-1]


def test_step_profile_splits_a_step_and_rates_its_matrix_products():
    command = [sys.executable, "bench/step_profile.py", "--threads", "1,2", "--steps", "2", "--warmup", "1"]
    command += ["--batch", "4", "--length", "16", "--top", "40", "model.name=tiny-bert"]
    result = run_captured(command, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    *records, last = result.stdout.splitlines()
    records = [json.loads(line) for line in records]
    steps = [r for r in records if "phases_ms" in r]
    assert [r["threads"] for r in steps] == [1, 2]
    for r in steps:
        assert set(r["phases_ms"]) == {"forward", "backward", "grad_norm", "optimizer_step", "zero_grad"}
        assert r["step_ms"] == pytest.approx(sum(r["phases_ms"].values()), abs=0.02)
        assert r["tokens_per_second"] == pytest.approx(4 * 16 / r["step_ms"] * 1000, rel=0.01)
    operators = {r["operator"]: r for r in records if "operator" in r}
    peak = records[-1]["peak_gflops"]
    assert records[-1]["precision"] in ("bf16", "fp32")
    mm = operators["aten::mm"]
    assert set(mm["ms_per_step"]) == {"1", "2"} and mm["gflops"] > 0
    assert mm["fraction_of_peak"] == pytest.approx(mm["gflops"] / peak, abs=0.002)
    assert "gflops" not in operators["aten::_fused_adamw_"]
    assert last.startswith("command:") and "step_profile.py" in last


def test_step_ab_alternates_two_settings_and_reports_block_ratios():
    command = [sys.executable, "bench/step_ab.py", "--a", "model.last_layer_cls_only=false", "--blocks", "3"]
    command += ["--steps", "1", "--warmup", "1", "--batch", "4", "--length", "16", "--threads", "1"]
    result = run_captured([*command, "model.name=tiny-bert"], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    record_line, last = result.stdout.splitlines()
    record = json.loads(record_line)
    assert record["a"] == ["model.last_layer_cls_only=false"] and record["b"] == []
    assert record["common"] == ["model.name=tiny-bert"] and record["blocks"] == 3
    assert record["ms_per_step"]["a"] > 0 and record["ms_per_step"]["b"] > 0
    ratio = record["ratio_b_over_a"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert last.startswith("command:") and "step_ab.py" in last
    refused = run_captured([*command, "model.name=tiny-bert", "model.no_such_key=1"], timeout=300)
    assert refused.returncode == 2 and "no_such_key" in refused.stderr


def test_step_profile_refuses_a_precision_distsent_would_refuse():
    command = [sys.executable, "bench/step_profile.py", "model.name=tiny-bert", "train.mixed_precision=fp16"]
    result = run_captured(command, timeout=120)
    assert result.returncode == 2
    assert "config error: train.mixed_precision=fp16 needs a CUDA GPU" in result.stderr


def write_bench_output(path, seed, accuracies, workload_epochs=2.0):
    """A compare_trainer.py output with the records summarize_seeds.py reads."""
    records = [{"name": "gemm_peak", "workload": {"seed": seed, "epochs": workload_epochs, "model": "m"}}]
    for name, accuracy in accuracies.items():
        speed = 100.0 * (3 if name == "distsent" else 1)
        mfu = {"mfu_vs_bf16_peak": 0.5, "mfu_vs_best_peak": 0.4}
        records.append({"name": name, "accuracy": accuracy, "tokens_per_second": speed, **mfu})
    records.append({"name": "mfu", "contender": "distsent", "formula": "..."})
    records.append({"name": "summary", "trainer_best": "trainer_defaults", "targets_met": {"mfu": seed > 1}})
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def run_summarize(*paths):
    command = [sys.executable, "bench/summarize_seeds.py", *map(str, paths)]
    return run_captured(command, timeout=60)


def test_summarize_seeds_pairs_accuracy_by_seed(tmp_path):
    runs = [
        write_bench_output(tmp_path / "a.jsonl", 1, {"distsent": 0.80, "trainer_defaults": 0.82}),
        write_bench_output(tmp_path / "b.jsonl", 2, {"distsent": 0.86, "trainer_defaults": 0.83}),
        write_bench_output(tmp_path / "c.jsonl", 3, {"distsent": 0.84, "trainer_defaults": 0.84}),
    ]
    result = run_summarize(*runs)
    assert result.returncode == 0, result.stderr
    *lines, command = result.stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert command.startswith("command:") and "summarize_seeds.py" in command
    assert [r["seed"] for r in records if r["name"] == "seed"] == [1, 2, 3]
    assert {r["distsent_mfu_vs_best_peak"] for r in records if r["name"] == "seed"} == {0.4}
    (paired,) = [r for r in records if r["name"] == "accuracy distsent-trainer_defaults"]
    assert paired["differences"] == pytest.approx([-0.02, 0.03, 0.0])
    assert paired["mean"] == pytest.approx(0.01 / 3)
    # Standard error of the paired differences: sample standard deviation / sqrt(3).
    assert paired["standard_error"] == pytest.approx(0.025166 / 3**0.5, rel=1e-4)
    assert paired["seeds_not_lower"] == 2
    assert paired["tokens_per_second_ratio"] == {"mean": 3.0, "min": 3.0, "max": 3.0}
    (targets,) = [r for r in records if r["name"] == "targets"]
    assert targets == {"name": "targets", "seeds": 3, "met_in_seeds": {"mfu": 2}}


def test_summarize_seeds_refuses_runs_it_cannot_pair(tmp_path):
    first = write_bench_output(tmp_path / "a.jsonl", 1, {"distsent": 0.8, "trainer_defaults": 0.8})
    other_workload = write_bench_output(tmp_path / "b.jsonl", 2, {"distsent": 0.8}, workload_epochs=1.0)
    result = run_summarize(first, other_workload)
    assert result.returncode == 2 and "differ in more than the seed" in result.stderr
    result = run_summarize(first, first)
    assert result.returncode == 2 and "a seed appears twice" in result.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text(first.read_text() + "{not json\n")
    result = run_summarize(broken)
    assert result.returncode == 2 and f"{broken}:6: not a compare_trainer.py record" in result.stderr
    # A record without a field the summary needs is named, not a traceback.
    (tmp_path / "c.jsonl").write_text(first.read_text().replace('"workload"', '"load"'))
    result = run_summarize(tmp_path / "c.jsonl")
    assert result.returncode == 2 and "a record lacks 'workload'" in result.stderr


def test_gpu_suite_tags_records_and_reports_failures(tmp_path):
    """bench/gpu_suite.sh: records tagged by configuration; a failing configuration does not stop
    the next one, and the exit status says that one failed."""
    tokenizer = tmp_path / "tokenizer"
    build_tokenizer(ModelConfig()).save_pretrained(tokenizer)  # --tokenizer takes any folder
    tiny = ["--model-size", "tiny", "--seq-lengths", "32", "--batch-size", "4", "--steps", "4", "--log-every", "2"]
    tiny += ["--precision", "no", "--tokenizer", str(tokenizer)]
    env = {**cli_env(), "PYTHON": sys.executable}

    good = tmp_path / "good"
    result = run_captured(["bash", "bench/gpu_suite.sh", str(good), "eager_b32", "--", *tiny], env=env, timeout=600)
    assert result.returncode == 0, (good / "suite.log").read_text()[-4000:]
    records = [json.loads(line) for line in (good / "results.jsonl").read_text().splitlines()]
    assert [(r["suite"], r["name"]) for r in records] == [("eager_b32", "gemm_peak"), ("eager_b32", "bert-tiny seq 32")]
    # Arguments after `--` come last, so they override the configuration's batch size.
    assert records[1]["micro_batch_size"] == 4

    bad = tmp_path / "bad"
    command = ["bash", "bench/gpu_suite.sh", str(bad), "eager_b32", "compile_b32_s128", "--", *tiny]
    result = run_captured([*command, "--set", "train.lr=-1"], env=env, timeout=600)
    assert result.returncode == 1
    log = (bad / "suite.log").read_text()
    assert "!! eager_b32 failed" in log and "!! compile_b32_s128 failed" in log
    assert "train.lr" in log  # distsent's own error reaches the log

    result = run_captured(["bash", "bench/gpu_suite.sh", str(tmp_path / "x"), "no_such_config"], env=env, timeout=60)
    assert result.returncode == 2 and "unknown configuration: no_such_config" in result.stderr
