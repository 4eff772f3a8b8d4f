"""`log.profile_steps`: a real training run profiles its own steps and writes what it found."""

from __future__ import annotations

import json
import re

from tests.conftest import TINY, run_cli


def test_a_run_profiles_its_steps_after_the_warm_up_and_writes_a_table_and_a_trace(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", *TINY, "train.max_steps=14", "log.profile_steps=3", f"output_dir={out}")
    first_line, *tables = (out / "profile_rank0.txt").read_text().splitlines()
    # 10 steps of warm-up, one of the profiler's own, then the 3 profiled.
    pattern = r"3 optimizer step\(s\), global steps 12-14: median [0-9.]+ ms per step on the host \(mean [0-9.]+\)"
    assert re.fullmatch(pattern, first_line), first_line
    assert f"{first_line}; written to {out / 'profile_rank0'}.txt and .json" in result.stderr
    table = "\n".join(tables)
    assert "ProfilerStep" in table and "aten::mm" in table and "AdamW.step" in table
    trace = json.loads((out / "profile_rank0.json").read_text())
    steps = {event["name"] for event in trace["traceEvents"] if event.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#11", "ProfilerStep#12", "ProfilerStep#13"}, steps
    # A fresh run in the folder moves the profile aside with the rest of the earlier run.
    run_cli("train", *TINY, "train.max_steps=2", f"output_dir={out}")
    assert not (out / "profile_rank0.txt").exists() and not (out / "profile_rank0.json").exists()
    assert sorted(path.suffix for path in out.glob("profile_rank0.before-*")) == [".json", ".txt"]


def test_a_run_shorter_than_its_profile_writes_none_and_trains_as_usual(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", *TINY, "train.max_steps=6", "log.profile_steps=3", f"output_dir={out}")
    assert (out / "final" / "model.safetensors").exists()
    assert not list(out.glob("profile_rank*"))
    assert "log.profile_steps=3: nothing profiled: this segment ended before global step 12" in result.stderr


def test_a_negative_profile_is_a_config_error(tmp_path):
    result = run_cli("train", *TINY, "log.profile_steps=-1", f"output_dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2 and "log.profile_steps=-1" in result.stderr
