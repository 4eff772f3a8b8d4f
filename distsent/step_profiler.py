"""`log.profile_steps`: torch.profiler over a few optimizer steps of a real training run.

A benchmark's step is never quite the training loop's: the data loader, accelerate's wrappers,
the schedule, the logging and the host-device syncs between steps are where a GPU's time
goes missing. So the profile is taken inside `distsent train`, on every process, after
PROFILE_WARMUP_STEPS steps (kernel selection, the allocator's first blocks, compilation) and
one more, the profiler's own warm-up.

Each process writes, next to metrics.jsonl:
- `profile_rank{N}.txt`: operators by self time on the host, and on the GPU where there is one,
  with a first line that says how busy the GPU was over the profiled steps;
- `profile_rank{N}.json`: a Chrome trace (chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

log = logging.getLogger("distsent")

# Steps run before the profile starts: the first ones pay once-only costs. One more follows,
# the profiler's own warm-up, before the profiled steps.
PROFILE_WARMUP_STEPS = 10
# The files' names in the run folder: profile_rank{N}.txt and .json.
PROFILE_PREFIX = "profile_rank"
PROFILE_FILE = re.compile(rf"{PROFILE_PREFIX}\d+\.(txt|json)")
# Rows of the operator tables.
TABLE_ROWS = 40


class StepProfiler:
    """Profiles optimizer steps PROFILE_WARMUP_STEPS+2 .. PROFILE_WARMUP_STEPS+1+`steps` of
    this process's segment (counted from `first_step`, where a resumed run starts); `step()`
    after each optimizer step, `close()` at the end (or on the way out)."""

    def __init__(self, steps: int, output_dir: Path, rank: int, device: torch.device, first_step: int = 0) -> None:
        self.steps = steps
        self.stepped = 0
        self.first_profiled = first_step + PROFILE_WARMUP_STEPS + 2
        self.prefix = Path(output_dir) / f"{PROFILE_PREFIX}{rank}"
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
        self.stepped += 1
        self.profiler.step()

    def close(self) -> None:
        """Stop profiling. A segment that stops within the profiled steps (preempted, say)
        writes those; one that stops before them writes nothing and says so. A profile never
        costs the run: a failure to write it (a full disk) is a warning."""
        try:
            self.profiler.stop()
        except Exception as error:  # whatever it is, the run's own outcome comes first
            log.warning("the profile (log.profile_steps) was not written: %s", error)
            return
        if not self.written:
            log.warning(
                "log.profile_steps=%d: nothing profiled: this segment ended before global step %d, the "
                "profile's first (it follows %d steps of warm-up)",
                self.steps,
                self.first_profiled,
                PROFILE_WARMUP_STEPS + 1,
            )

    @property
    def profiled_steps(self) -> int:
        """The optimizer steps inside the profile so far."""
        return max(0, min(self.steps, self.stepped - PROFILE_WARMUP_STEPS - 1))

    def _write(self, profiler) -> None:
        steps = self.profiled_steps
        if self.written or not steps:
            return
        self.written = True
        averages = profiler.key_averages()
        lines = [self._summary_line(profiler, averages, steps)]
        lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS))
        if self.on_gpu:
            lines.append(averages.table(sort_by="self_device_time_total", row_limit=TABLE_ROWS))
        self.prefix.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        profiler.export_chrome_trace(str(self.prefix.with_suffix(".json")))
        log.info("%s; written to %s.txt and .json", lines[0], self.prefix)

    def _summary_line(self, profiler, averages, steps: int) -> str:
        """The profiled steps' time: the median step on the host, robust to the steps a
        validation or checkpoint fell in (those are counted in the step after them), and the
        GPU's busy time per step (kernels and copies, their times summed: on one stream they
        do not overlap)."""
        last = self.first_profiled + steps - 1
        what = f"{steps} optimizer step(s), global steps {self.first_profiled}-{last}"
        if steps < self.steps:
            what += f" (of {self.steps} asked for: the segment ended)"
        # The profiler's own step ranges, one per step; a last, partial one runs to the stop.
        ranges = sorted(
            (event for event in profiler.events() if event.name.startswith("ProfilerStep")),
            key=lambda event: event.time_range.start,
        )[:steps]
        if not ranges:
            return f"{what}: no events"
        step_ms = sorted((event.time_range.end - event.time_range.start) / 1000 for event in ranges)
        median_ms = step_ms[len(step_ms) // 2]
        wall_ms = sum(step_ms)
        line = f"{what}: median {median_ms:.2f} ms per step on the host (mean {wall_ms / len(step_ms):.2f})"
        if not self.on_gpu:
            return line
        # Kernels and copies only, as torch's own "Self CUDA time total": an operator's row
        # repeats the time of the kernels it launched, and a user annotation's (ProfilerStep#N
        # on the GPU's timeline) spans them.
        device_us = sum(
            average.self_device_time_total
            for average in averages
            if average.device_type == torch.autograd.DeviceType.CUDA and not average.is_user_annotation
        )
        return f"{line}, the GPU busy {device_us / 1000 / steps:.2f} ms per step ({device_us / 1000 / wall_ms:.0%})"
