"""Run logging on the main process: console banner and progress bar, metrics.jsonl, W&B, summary.

Only the main process prints or writes; the losses it receives are already reduced over
all ranks by the training loop. W&B is optional (`log.wandb=true`) and resumes the same
run after a checkpoint resume, because the run id travels in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distsent.config import Config

log = logging.getLogger("distsent")

METRICS_FILE = "metrics.jsonl"
# Nested per-class tables and matrices go to metrics.jsonl but not to the console line.
CONSOLE_SKIP = ("per_class", "confusion_matrix")


def peak_memory_mib(device) -> float:
    """This process's peak: memory allocated on a CUDA device, else resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


class RunLogger:
    """Everything a person reads during a run. Only the main process writes or prints."""

    def __init__(
        self,
        cfg: Config,
        output_dir: Path,
        is_main_process: bool,
        total_steps: int,
        initial_step: int = 0,
        wandb_run_id: str | None = None,
    ) -> None:
        self.enabled = is_main_process
        self.metrics_path = output_dir / METRICS_FILE
        self.progress = None
        self.wandb_run = None
        if not self.enabled:
            return
        if cfg.log.progress_bar:
            self.progress = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.log.wandb:
            self.wandb_run = _start_wandb(cfg, output_dir, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run to continue after a resume (None without W&B)."""
        return self.wandb_run.id if self.wandb_run is not None else None

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
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

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
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_eval(self, step: int, epoch: float, metrics: dict, split: str = "validation") -> None:
        if not self.enabled:
            return
        self._record({"event": "eval", "split": split, "step": step, "epoch": epoch, **metrics})
        flat = {k: v for k, v in metrics.items() if k not in CONSOLE_SKIP}
        self._print(
            f"{split} @ step {step} (epoch {epoch:.2f})  " + "  ".join(f"{k} {_fmt(v)}" for k, v in flat.items())
        )
        if self.wandb_run is not None:
            scalars = {f"{split}/{k}": v for k, v in flat.items() if isinstance(v, (int, float))}
            for name, scores in metrics.get("per_class", {}).items():
                if scores["f1"] is not None:
                    scalars[f"{split}/f1_{name}"] = scores["f1"]
            self.wandb_run.log(scalars, step=step)

    def log_images(self, paths: list[Path]) -> None:
        """Attach the run's PNG plots to W&B (they are in the run folder either way)."""
        if self.wandb_run is not None and paths:
            import wandb

            self.wandb_run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in paths})

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.close()
        rows = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        rows.update({f"eval.{k}": v for k, v in summary.get("eval", {}).items() if k not in CONSOLE_SKIP})
        best = summary.get("best_metric", {})
        rows["best"] = f"{best.get('name')} {_fmt(best.get('value'))} at step {best.get('step')}"
        width = max(len(key) for key in rows)
        print("summary\n" + "\n".join(f"  {key:<{width}}  {_fmt(value)}" for key, value in rows.items()), flush=True)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(
                {**{k: v for k, v in rows.items() if isinstance(v, (int, float))}, "best_metric": best.get("value")}
            )
            self.wandb_run.finish()
            self.wandb_run = None

    def close(self) -> None:
        """Release the progress bar and W&B after a failure or preemption (resumable run)."""
        if self.progress is not None:
            self.progress.close()
        if self.wandb_run is not None:
            # A non-zero exit code marks the W&B run as interrupted, not finished.
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None


def _start_wandb(cfg: Config, output_dir: Path, run_id: str | None):
    import wandb

    # `config` is the resolved run config only: no environment, so no API key can reach
    # the run's files; the key stays wherever wandb keeps it (env or ~/.netrc).
    return wandb.init(
        project=cfg.log.project,
        entity=cfg.log.entity,
        name=cfg.log.run_name or output_dir.name,
        tags=cfg.log.tags or None,
        group=cfg.log.group,
        config=cfg.to_dict(),
        dir=str(output_dir),
        id=run_id,
        resume="allow" if run_id else None,
    )


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)
