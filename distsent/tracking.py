"""Run logging on the main process: console banner and progress bar, metrics.jsonl, summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("distsent")

METRICS_FILE = "metrics.jsonl"
# Nested per-class tables and matrices go to metrics.jsonl but not to the console line.
CONSOLE_SKIP = ("per_class", "confusion_matrix")


class RunLogger:
    """Everything a person reads during a run. Only the main process writes or prints."""

    def __init__(self, output_dir: Path, is_main_process: bool, total_steps: int, initial_step: int = 0) -> None:
        self.enabled = is_main_process
        self.metrics_path = output_dir / METRICS_FILE
        self.progress = None
        if self.enabled:
            self.progress = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def banner(self, facts: dict[str, object]) -> None:
        if not self.enabled:
            return
        width = max(len(key) for key in facts)
        lines = [f"  {key:<{width}}  {value}" for key, value in facts.items()]
        self._print("distsent run\n" + "\n".join(lines))

    def _record(self, event: dict) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps({"time": time.time(), **event}) + "\n")

    def _print(self, text: str) -> None:
        # tqdm.write keeps the progress bar intact below the printed line.
        (self.progress.write if self.progress is not None else print)(text)

    def advance(self, steps: int = 1, **postfix: float) -> None:
        if self.progress is not None:
            self.progress.update(steps)
            if postfix:
                self.progress.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log_train(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record({"event": "train", "step": step, **values})
        self._print(f"step {step:>6}  " + "  ".join(f"{k} {_fmt(v)}" for k, v in values.items()))

    def log_eval(self, step: int, epoch: float, metrics: dict, split: str = "validation") -> None:
        if not self.enabled:
            return
        self._record({"event": "eval", "split": split, "step": step, "epoch": epoch, **metrics})
        flat = {k: v for k, v in metrics.items() if k not in CONSOLE_SKIP}
        self._print(
            f"{split} @ step {step} (epoch {epoch:.2f})  " + "  ".join(f"{k} {_fmt(v)}" for k, v in flat.items())
        )

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.close()
        rows = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        rows.update({f"eval.{k}": v for k, v in summary.get("eval", {}).items() if k not in CONSOLE_SKIP})
        width = max(len(key) for key in rows)
        print("summary\n" + "\n".join(f"  {key:<{width}}  {_fmt(value)}" for key, value in rows.items()), flush=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)
