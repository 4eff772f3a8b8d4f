"""`log.profile_steps`: torch.profiler over a few optimizer steps of a real training run.

A benchmark's step is never quite the training loop's: the data loader, accelerate's wrappers,
the schedule, the logging and the host-device syncs between steps are where a GPU's time
goes missing. So the profile is taken inside `distsent train`, on every process, after
PROFILE_WARMUP_STEPS steps (kernel selection, the allocator's first blocks, compilation).

Each process writes, next to metrics.jsonl:
- `profile_rank{N}.txt`: operators by self time on the host, and on the GPU where there is one,
  with a first line that says how busy the GPU was over the profiled steps;
- `profile_rank{N}.json`: a Chrome trace (chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

# Steps run before the profile starts: the first ones pay once-only costs.
PROFILE_WARMUP_STEPS = 10
# Rows of the operator tables.
TABLE_ROWS = 40


class StepProfiler:
    """Profiles optimizer steps PROFILE_WARMUP_STEPS+1 .. PROFILE_WARMUP_STEPS+`steps` of this
    process; `step()` after each optimizer step, `close()` at the end (or on the way out)."""

    def __init__(self, steps: int, output_dir: Path, rank: int, device: torch.device) -> None:
        self.steps = steps
        self.prefix = Path(output_dir) / f"profile_rank{rank}"
        self.on_gpu = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=PROFILE_WARMUP_STEPS, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=False,
        )
        self.written = False
        self.profiler.start()

    def step(self) -> None:
        self.profiler.step()

    def close(self) -> None:
        """Stop profiling; a run shorter than the profile writes what it has."""
        self.profiler.stop()

    def _write(self, profiler) -> None:
        if self.written:
            return
        self.written = True
        averages = profiler.key_averages()
        lines = [self._busy_line(profiler, averages)]
        lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS))
        if self.on_gpu:
            lines.append(averages.table(sort_by="self_device_time_total", row_limit=TABLE_ROWS))
        self.prefix.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        profiler.export_chrome_trace(str(self.prefix.with_suffix(".json")))

    def _busy_line(self, profiler, averages) -> str:
        """How much of the profiled steps' wall time the GPU spent in kernels and copies (their
        times summed: on one stream they do not overlap)."""
        events = profiler.events()
        profiled = f"{self.steps} optimizer step(s) after {PROFILE_WARMUP_STEPS + 1}"
        if not events:
            return f"{profiled}: no events"
        start = min(event.time_range.start for event in events)
        end = max(event.time_range.end for event in events)
        wall_ms = (end - start) / 1000
        if not self.on_gpu:
            return f"{profiled}: {wall_ms / self.steps:.2f} ms per step on the host"
        # Kernels and copies only, as torch's own "Self CUDA time total": an operator's row
        # repeats the time of the kernels it launched, and a user annotation's (ProfilerStep#N
        # on the GPU's timeline) spans them.
        device_us = sum(
            average.self_device_time_total
            for average in averages
            if average.device_type == torch.autograd.DeviceType.CUDA and not average.is_user_annotation
        )
        return (
            f"{profiled}: {wall_ms / self.steps:.2f} ms per step, the GPU busy "
            f"{device_us / 1000 / self.steps:.2f} ms of it ({device_us / 1000 / wall_ms:.0%})"
        )
