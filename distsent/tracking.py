"""Run logging on the main process: console banner and progress bar, metrics.jsonl, W&B, summary.

Only the main process prints or writes; the losses it receives are already reduced over
all ranks by the training loop. W&B is optional (`log.wandb=true`) and resumes the same
run after a checkpoint resume, because the run id travels in the checkpoint. A W&B failure
(unreachable server, its background process killed by the same signal that preempts the
run) costs the W&B record, never the run: training, checkpoints and metrics.jsonl go on.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distsent.config import Config, first_line

log = logging.getLogger("distsent")

METRICS_FILE = "metrics.jsonl"
# Where W&B keeps its files for a run in output_dir (its `dir`), offline runs included.
WANDB_DIR = "wandb"
# The x-axis of every W&B chart: the optimizer step, logged as a value. W&B's own `step`
# only grows, and drops a record below it, such as a validation that a resume redoes at the
# step it was cut off at.
STEP_KEY = "global_step"
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
        run_facts: dict | None = None,
    ) -> None:
        self.enabled = is_main_process
        self.metrics_path = output_dir / METRICS_FILE
        self.progress = None
        self.wandb_run = None
        if not self.enabled:
            return
        if cfg.log.progress_bar and sys.stderr.isatty():
            self.progress = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        else:
            # A batch log (Slurm, nohup, CI) would get every redraw; exports' own bars too.
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        if cfg.log.wandb:
            self.wandb_run = _start_wandb(cfg, output_dir, wandb_run_id, run_facts or {})

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
        self._to_wandb(lambda run: run.log({STEP_KEY: step, **{f"train/{k}": v for k, v in values.items()}}))

    def log_eval(self, step: int, epoch: float, metrics: dict, split: str = "validation") -> None:
        if not self.enabled:
            return
        self._record({"event": "eval", "split": split, "step": step, "epoch": epoch, **metrics})
        flat = {k: v for k, v in metrics.items() if k not in CONSOLE_SKIP}
        self._print(
            f"{split} @ step {step} (epoch {epoch:.2f})  " + "  ".join(f"{k} {_fmt(v)}" for k, v in flat.items())
        )
        scalars = {f"{split}/{k}": v for k, v in flat.items() if isinstance(v, (int, float))}
        for name, scores in metrics.get("per_class", {}).items():
            if scores["f1"] is not None:
                scalars[f"{split}/f1_{name}"] = scores["f1"]
        self._to_wandb(lambda run: run.log({STEP_KEY: step, **scalars}))

    def log_images(self, paths: list[Path]) -> None:
        """Attach the run's PNG plots to W&B (they are in the run folder either way)."""
        if self.wandb_run is not None and paths:
            import wandb

            self._to_wandb(lambda run: run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in paths}))

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
        numbers = {k: v for k, v in rows.items() if isinstance(v, (int, float))}
        best_fields = {
            "best_metric": best.get("value"),
            "best_metric_name": best.get("name"),
            "best_step": best.get("step"),
        }
        self._to_wandb(lambda run: run.summary.update({**numbers, **best_fields}))
        self._to_wandb(lambda run: run.finish())
        self.wandb_run = None

    def close(self, preempted: bool = False) -> None:
        """Release the progress bar and W&B after a failure or preemption (resumable run)."""
        if self.progress is not None:
            self.progress.close()
        if preempted:
            # Shown as preempted, not failed; the resumed run continues it.
            self._to_wandb(lambda run: run.mark_preempting())
        # A non-zero exit code marks the W&B run as interrupted, not finished.
        self._to_wandb(lambda run: run.finish(exit_code=1))
        self.wandb_run = None

    def _to_wandb(self, call) -> None:
        """Make one W&B call; the first failure turns W&B off for the rest of the run."""
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as error:  # any failure of a logging side channel, not of training
            _forget_frames(error)
            log.warning(
                "W&B stopped working (%s: %s); the run goes on without it, every record is in %s",
                type(error).__name__,
                first_line(error),
                self.metrics_path,
            )
            self.wandb_run = None
            _release_wandb()


def _start_wandb(cfg: Config, output_dir: Path, run_id: str | None, run_facts: dict):
    """The W&B run; offline when the server cannot be reached or refuses, so that an outage
    or a missing key costs the live dashboard, not the training job (Slurm would not requeue
    it). None when even an offline run cannot start."""
    try:
        import wandb
    except Exception as error:  # not installed, or broken: the run goes on without it
        log.warning("log.wandb=true but wandb cannot be imported (%s); the run goes on without it", first_line(error))
        return None

    # `config` is the resolved run config only: no environment, so no API key can reach
    # the run's files; the key stays wherever wandb keeps it (env or ~/.netrc). `run` holds
    # what the config leaves open: world size, global batch, the precision `auto` chose.
    settings = dict(
        project=cfg.log.project,
        entity=cfg.log.entity,
        name=cfg.log.run_name or output_dir.name,
        tags=cfg.log.tags or None,
        group=cfg.log.group,
        config={**cfg.to_dict(), "run": run_facts},
        dir=str(output_dir),  # W&B adds WANDB_DIR below it
        id=run_id,
        resume="allow" if run_id else None,
    )
    try:
        return _with_step_axis(wandb.init(**settings))
    except Exception as error:  # wandb raises its own errors, timeouts and usage errors here
        log.warning("W&B could not start (%s: %s); logging offline instead", type(error).__name__, first_line(error))
    try:
        run = _with_step_axis(wandb.init(**settings, mode="offline"))
    except Exception as error:
        log.warning(
            "W&B could not start offline either (%s: %s); the run goes on without it",
            type(error).__name__,
            first_line(error),
        )
        return None
    log.warning("W&B logs offline to %s; upload it later with `wandb sync %s`", run.dir, Path(run.dir).parent)
    return run


def _with_step_axis(run):
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    return run


def _release_wandb() -> None:
    """Drop wandb's connection to its background process now: left to wandb's exit hook,
    a dead process's connection ends the run with a traceback after exit code 75."""
    import wandb

    try:
        wandb.teardown(exit_code=1)
    except (Exception, SystemExit) as error:  # the connection is already broken
        _forget_frames(error)


def _forget_frames(error: BaseException) -> None:
    """wandb keeps the exception of a lost connection and raises that same object again
    from its own thread. Its traceback would hold our frames, and with them the model's
    tensors, until that thread drops it during interpreter shutdown, freeing tensors from a
    thread that may no longer run: the process then aborts instead of exiting 75."""
    error.__traceback__ = None


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)
