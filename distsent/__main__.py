"""Command line: `distsent train|predict ...`. Parses, sets up logging, dispatches."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

# Only the light modules at import time: `train` may re-execute itself before torch is loaded.
from distsent import __version__
from distsent.allocator import use_tcmalloc
from distsent.config import ConfigError, settings_reference
from distsent.early_signals import catch_early_signals
from distsent.worker_exit import exit_without_teardown, process_group_is_up, report_fatal_signals

EXIT_USAGE = 2
CONFIG_SUFFIXES = (".yaml", ".yml")
OVERRIDE_START = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*=")
STDIN = "-"  # predict --file -: texts from standard input, one per line
COLUMN_NAMES_HELP = "names of a headerless CSV/TSV file's columns, comma-separated (implies --no-header)"
FILE_HEADER_HELP = (
    "whether a CSV/TSV file starts with a header row (default: as the model's training data; "
    "headerless files take its data.column_names)"
)


def _split_config(items: list[str]) -> tuple[str | None, list[str]]:
    """A config file is optional: the first positional is one unless it starts like an
    override (`section.key=`; `runs/lr=3e-5/config.yaml` does not). The rest must be overrides."""
    config = None
    if items and not OVERRIDE_START.match(items[0]):
        config, items = items[0], items[1:]
    for previous, item in zip([None, *items], items, strict=False):
        if "=" in item:
            continue
        if item.endswith(CONFIG_SUFFIXES):
            raise ConfigError(f"{item}: a config file comes first, before the overrides, and there is one")
        if previous and previous.count("[") > previous.count("]"):
            # `model.freeze=[embeddings., encoder.layer.0.]` unquoted: the shell split the list.
            raise ConfigError(
                f"{item!r} is the rest of the list in {previous!r}, split by the shell at a space: "
                f"quote the override ('{previous} {item}')"
            )
    return config, list(items)


def _train(args: argparse.Namespace) -> int:
    from distsent.config import load_config

    cfg = load_config(*_split_config(args.items))
    from distsent.preemption import Preempted
    from distsent.train import train

    try:
        train(cfg)
    except Preempted as stop:
        logging.getLogger("distsent").warning("%s; exiting with %d so the job can be requeued", stop, stop.exit_code)
        return stop.exit_code
    return 0


def _predict(args: argparse.Namespace) -> int:
    from distsent.predict import Predictor, write_predictions

    if not args.texts and not args.file:
        raise ConfigError(
            "predict: give texts, or --file with one text per line (or a CSV/TSV/JSONL and --text-column)"
        )
    if args.id_column and (args.texts or not args.file):
        raise ConfigError(
            "predict: --id-column names a column of --file; give the texts in that file, not as arguments"
        )
    if args.file and _is_lines(Path(args.file)):
        shown = _shown_input(Path(args.file))
        column_flags = {
            "--id-column": args.id_column,
            "--column-names": args.column_names,
            "--text-column": args.text_column,
        }
        given = [f"{flag} {value}" for flag, value in column_flags.items() if value is not None]
        if args.header is not None:
            given.append("--header" if args.header else "--no-header")
        if given:
            raise ConfigError(f"{', '.join(given)}: {shown} is one text per line, without columns")
    named_file = Path(args.file) if args.file and args.file != STDIN else None
    if named_file:
        _require_file(named_file, "--file")
    if args.output:
        _check_output(Path(args.output), f"--output {args.output}", named_file, "--file")
    predictor = Predictor(args.model)
    texts, ids = list(args.texts), None
    if args.file:
        settings = _file_settings(predictor.data, Path(args.file), args, "--file")
        file_texts, ids = _read_texts(Path(args.file), settings, args.id_column)
        texts += file_texts
    rows = predictor.predict(texts, batch_size=args.batch_size, all_scores=args.all_scores)
    if ids is not None:
        rows = [{"id": row_id, **row} for row_id, row in zip(ids, rows, strict=True)]
    if args.output:
        score_labels = predictor.label_names if args.all_scores else []
        write_predictions(rows, Path(args.output), score_labels, with_ids=ids is not None)
        print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0


def _file_settings(export_data, path: Path, args: argparse.Namespace, file_flag: str):
    """How to read a user's file: as the export's training data was read (its columns, header
    or headerless column names) where the flags do not say otherwise."""
    from distsent.data import TABLE_SUFFIXES

    if args.column_names and (args.header or path.suffix.lower() not in TABLE_SUFFIXES):
        raise ConfigError(
            f"--column-names names the columns of a CSV/TSV file without a header row; {path} "
            + ("has one (--header)" if args.header else "is not a CSV/TSV file")
        )
    column_names = _column_names(args.column_names) if args.column_names else export_data.column_names
    # Names given for the columns say the file has none of its own.
    header = args.header if args.header is not None else (export_data.has_header and not args.column_names)
    if not header and not column_names and path.suffix.lower() in TABLE_SUFFIXES:
        raise ConfigError(
            f"{file_flag} {path}: without a header row its columns need names, and the model was trained on "
            "a file with a header; give them with --column-names (e.g. --column-names id,text,label)"
        )
    return dataclasses.replace(
        export_data,
        dataset="files",
        train_file=str(path),
        validation_file=None,
        test_file=None,
        text_column=args.text_column or export_data.text_column,
        label_column=getattr(args, "label_column", None) or export_data.label_column,
        has_header=header,
        column_names=column_names,
    )


def _column_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"--column-names {text}: give distinct, non-empty names separated by commas")
    return names


def _is_lines(path: Path) -> bool:
    """Whether predict reads `path` as one text per line: a .txt file, or standard input."""
    return path.suffix.lower() == ".txt" or str(path) == STDIN


def _shown_input(path: Path) -> str:
    """How messages name predict's input."""
    return "standard input" if str(path) == STDIN else str(path)


def _read_texts(path: Path, cfg, id_column: str | None) -> tuple[list[str], list | None]:
    """Texts from a .txt file (one per line) or the text column of a CSV/TSV/JSON/JSONL/Parquet
    file, and with `id_column` each row's value in that column, to carry into its prediction."""
    from distsent.data import (
        PREDICT_FLAGS,
        UNDECODABLE_TEXT,
        BadRows,
        DataError,
        clean_text,
        has_undecodable,
        physical_lines,
        read_file,
        refuse_utf16,
    )

    if _is_lines(path):
        # _predict has checked that a named file is there.
        shown = _shown_input(path)
        raw = sys.stdin.buffer.read() if str(path) == STDIN else path.read_bytes()
        refuse_utf16(raw, shown)
        try:
            lines = physical_lines(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as error:
            before = raw[: error.start]  # lines end as physical_lines ends them
            line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
            raise DataError(f"{shown}:{line}: not UTF-8 text") from error
        texts = [line for line in lines if line.strip()]
        if not texts:
            raise DataError(f"{shown}: no texts (one per line)")
        return texts, None
    # Unlabelled files are fine here: the reader's second column is the ids, or the text again.
    second_column = dataclasses.replace(cfg, label_column=id_column or cfg.text_column)
    flags = dataclasses.replace(PREDICT_FLAGS, label_column="--id-column")
    rows = read_file(str(path), second_column, BadRows("error", flags))
    for text, row_id, origin in zip(rows.texts, rows.labels, rows.origins, strict=True):
        if not isinstance(text, str):
            raise DataError(f"{origin}: {text!r} in the text column (--text-column {cfg.text_column}) is not text")
        if has_undecodable(text):
            raise DataError(f"{origin}: {UNDECODABLE_TEXT}")
        if not clean_text(text, cfg).strip():
            # A label and a score for nothing would read as a prediction; a .txt file's blank
            # lines are skipped, but a row here has a place (and maybe an id) in the output.
            emptied = " once the model's data.strip_html/strip_urls cleaning took it out" if text.strip() else ""
            raise DataError(f"{origin}: empty text{emptied} (training and evaluate do not score empty texts either)")
        if id_column and (row_id is None or str(row_id).strip() == ""):
            raise DataError(f"{origin}: no id in the id column (--id-column {id_column})")
    return rows.texts, rows.labels if id_column else None


def _evaluate(args: argparse.Namespace) -> int:
    from distsent.evaluate import evaluate_file
    from distsent.predict import Predictor

    data = Path(args.data)
    _require_file(data, "--data")
    if args.misclassified:
        misclassified = Path(args.misclassified)
        _check_output(misclassified, f"--misclassified {misclassified}", data, "--data")
    else:
        # Beside the data by default, which may be in a folder the user cannot write to.
        misclassified = data.with_name(f"{data.stem}.misclassified.jsonl")
        _check_output(misclassified, f"{misclassified} (misclassified rows; --misclassified puts them elsewhere)")
    if args.plots:
        if Path(args.plots).exists() and not Path(args.plots).is_dir():
            raise ConfigError(f"--plots {args.plots}: a file, not a folder to draw into")
        _check_writable_folder(Path(args.plots).absolute(), f"--plots {args.plots}")
    predictor = Predictor(args.model)
    settings = _file_settings(predictor.data, data, args, "--data")
    cfg = dataclasses.replace(settings, bad_rows=args.bad_rows or settings.bad_rows)
    report = evaluate_file(predictor, cfg, misclassified, Path(args.plots) if args.plots else None, args.batch_size)
    print(json.dumps(report, indent=2))
    return 0


def _require_file(path: Path, flag: str) -> None:
    """Before the model loads: a missing input should not cost the user that wait."""
    from distsent.data import DataError

    if not path.is_file():
        raise DataError(f"{flag} {path}: file not found" if not path.exists() else f"{flag} {path}: not a file")


def _check_output(output: Path, shown: str, source: Path | None = None, source_flag: str = "") -> None:
    """Before the model loads: a results file that cannot be written, or that would replace the
    file the results come from, is refused, not found out after the whole pass. `shown` names
    it in messages (`--output out.jsonl`)."""
    from distsent.files import staged_destination

    if output.is_dir():
        raise ConfigError(f"{shown}: a folder, not a file to write")
    destination = staged_destination(output)
    if destination is None:  # written into as it is (/dev/null, /dev/stdout)
        if not os.access(output, os.W_OK):
            raise ConfigError(f"{shown}: not writable")
    else:
        # Where the file is staged: beside the file a symlink names, not beside the link.
        _check_writable_folder(destination.parent, shown)
    if source is not None and output.exists() and source.exists() and output.resolve() == source.resolve():
        raise ConfigError(f"{shown} is the {source_flag} file; writing there would replace it")


def _check_writable_folder(folder: Path, shown: str) -> None:
    """`folder` is, or can be made, a folder this process writes into. Tried by writing, not
    by permission bits, which say nothing of a read-only mount to root, nor of ACLs."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"{shown}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(f"{shown}: cannot write into {existing} ({error.strerror}); give a path elsewhere") from None


def _doctor(args: argparse.Namespace) -> int:
    from distsent.config import load_config
    from distsent.doctor import run_doctor

    config_path, overrides = _split_config(args.items)
    return run_doctor(load_config(config_path, overrides))


def _report(args: argparse.Namespace) -> int:
    from distsent.plots import read_events, write_plots
    from distsent.tracking import METRICS_FILE

    run_dir = Path(args.run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {METRICS_FILE}); give a train run's output_dir")
    metric = args.metric or _run_best_metric(run_dir)
    logged = {
        key
        for event in read_events(run_dir)
        if event["event"] == "eval"
        for key, value in event.items()
        if isinstance(value, float) and key not in ("epoch", "time")  # when, not how well
    }
    if logged and metric not in logged:
        raise ConfigError(f"--metric {metric}: the run's validations logged {', '.join(sorted(logged))}")
    for path in write_plots(run_dir, metric):
        print(path)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_best_metric(run_dir: Path) -> str:
    """The metric the run picked its best model by, as training plotted it."""
    from distsent.checkpoint import RUN_CONFIG_NAME
    from distsent.config import Config, saved_section

    saved = run_dir / RUN_CONFIG_NAME
    return saved_section(saved, "train").best_metric if saved.is_file() else Config().train.best_metric


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distsent", description="Fine-tune BERT-style encoders for sentiment and emotion."
    )
    parser.add_argument("--version", action="version", version=f"distsent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="fine-tune a model",
        description="distsent train [CONFIG.yaml] [section.key=value ...]",
        epilog=settings_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "items", nargs="*", metavar="CONFIG_OR_OVERRIDE", help="optional YAML config, then dotted overrides"
    )
    train.set_defaults(handler=_train)

    predict = commands.add_parser("predict", help="classify texts with an exported model")
    predict.add_argument("--model", required=True, help="exported model folder (e.g. runs/x/best)")
    predict.add_argument("texts", nargs="*", help="texts to classify")
    predict.add_argument(
        "--file",
        help=f"texts to classify: .txt (one per line; {STDIN} reads them from standard input), CSV, TSV, JSON, "
        "JSONL or Parquet",
    )
    predict.add_argument("--text-column", help="text column of --file (default: the one the model was trained on)")
    predict.add_argument("--header", action=argparse.BooleanOptionalAction, help=FILE_HEADER_HELP)
    predict.add_argument("--column-names", help=COLUMN_NAMES_HELP)
    predict.add_argument("--id-column", help='column of --file to carry into each prediction as its "id"')
    predict.add_argument(
        "--output", help="write the predictions here instead of printing them: JSON lines, or a table for .csv/.tsv"
    )
    predict.add_argument("--all-scores", action="store_true", help='add "scores": every label\'s probability')
    predict.add_argument("--batch-size", type=_positive_int, default=64, help="texts per forward pass (default: 64)")
    predict.set_defaults(handler=_predict)

    evaluate = commands.add_parser("evaluate", help="metrics of an exported model on a labelled file")
    evaluate.add_argument("--model", required=True, help="exported model folder")
    evaluate.add_argument("--data", required=True, help="labelled CSV, TSV, JSON, JSONL or Parquet file")
    evaluate.add_argument("--text-column", help="default: the one the model was trained on")
    evaluate.add_argument("--label-column", help="default: the one the model was trained on")
    evaluate.add_argument("--header", action=argparse.BooleanOptionalAction, help=FILE_HEADER_HELP)
    evaluate.add_argument("--column-names", help=COLUMN_NAMES_HELP)
    evaluate.add_argument(
        "--bad-rows",
        choices=["error", "skip"],
        help="refuse or skip unusable rows: malformed ones, or a label the model does not know "
        "(default: the model's training data.bad_rows)",
    )
    evaluate.add_argument("--misclassified", help="where to write misclassified rows (default: beside --data)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64, help="texts per forward pass (default: 64)")
    evaluate.add_argument("--plots", metavar="DIR", help="draw the confusion matrix (and ROC curve, two classes) here")
    evaluate.set_defaults(handler=_evaluate)

    doctor = commands.add_parser("doctor", help="preflight: what this process sees and whether a run can work")
    doctor.add_argument("items", nargs="*", metavar="CONFIG_OR_OVERRIDE", help="the run's config and overrides")
    doctor.set_defaults(handler=_doctor)

    report = commands.add_parser("report", help="rebuild a run folder's PNG plots from its metrics.jsonl")
    report.add_argument("run_dir", help="run folder (output_dir of a training run)")
    report.add_argument(
        "--metric", help="validation metric for the learning-curve panel (default: the run's train.best_metric)"
    )
    report.set_defaults(handler=_report)
    return parser


def _configure_logging(rank: int) -> None:
    # Only rank 0 talks; the others report warnings and errors.
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "accelerate", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    _route_library_logs_through_root()


def _route_library_logs_through_root() -> None:
    """transformers, huggingface_hub and datasets each give their root logger a handler of its
    own. huggingface_hub's and datasets' also propagate, so every Hub retry warning was printed
    twice; transformers' printed in a format of its own. The root's handler prints them all."""
    # Imported first: each adds its handler when imported, and would add it after this.
    import datasets.utils.logging  # noqa: F401
    import huggingface_hub.utils.logging  # noqa: F401
    import transformers.utils.logging  # noqa: F401

    for library in ("transformers", "huggingface_hub", "datasets"):
        library_root = logging.getLogger(library)
        for handler in list(library_root.handlers):
            library_root.removeHandler(handler)
        library_root.propagate = True


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        # Progress bars (datasets' map, transformers' weight loading) are noise in a log file or
        # a batch job's output. Set before huggingface_hub is imported: it reads them then.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    if args.command == "train" and argv is None:
        # Only as the process's own command line: re-execution repeats sys.orig_argv.
        try:
            use_tcmalloc()
        except ConfigError as error:
            return _user_error("config", error)
    if args.command == "train" and argv is None:
        # After the re-execution above, which resets handlers; before the slow imports. Not
        # called in-process (tests, scripts): the caller's own handlers stay its own.
        catch_early_signals()
    from distsent.distributed import prepare_environment

    info = prepare_environment()
    _configure_logging(info.rank)
    if info.is_distributed:
        report_fatal_signals()
    try:
        code = _run_command(args)
    except Exception:
        if not _leaves_without_teardown(argv, info.is_distributed):
            raise
        # A crash leaves the same live group behind as a finished run.
        traceback.print_exc()
        code = 1
    if _leaves_without_teardown(argv, info.is_distributed):
        exit_without_teardown(code)
    return code


def _leaves_without_teardown(argv: list[str] | None, launched_distributed: bool) -> bool:
    """Whether this process, run from its own command line, ends with os._exit: teardown of
    gloo and DeepSpeed can abort or hang a worker whose work is done (worker_exit). A
    one-process DeepSpeed launch has a process group too, which train() leaves up."""
    return argv is None and (launched_distributed or process_group_is_up())


def _run_command(args: argparse.Namespace) -> int:
    """The command's exit code; errors a user can fix become a message and EXIT_USAGE."""
    from safetensors import SafetensorError

    from distsent.checkpoint import CheckpointError
    from distsent.data import DataError
    from distsent.metrics import NonFiniteOutputs

    try:
        code = args.handler(args)
        sys.stdout.flush()  # a reader that left is found here, not by Python's own flush at exit
        return code
    except NonFiniteOutputs as error:
        # Every rank scored the same gathered outputs and stops on them: one of them says so.
        if os.environ.get("RANK", "0") == "0":
            print(f"distsent: non-finite outputs: {error}", file=sys.stderr)
        return 1
    except ConfigError as error:
        return _user_error("config", error)
    except CheckpointError as error:
        return _user_error("checkpoint", error)
    except DataError as error:
        return _user_error("data", error)
    except BrokenPipeError:
        # The reader stopped early (`distsent predict ... | head`): nothing is left to say. The
        # rest of stdout goes nowhere, so Python's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as error:
        if error.errno not in DISK_ERRORS:
            raise
        # A full disk or a read-only folder is the machine's state, not a bug: one line.
        print(f"distsent: disk error: {error.strerror}: {error.filename or ''}", file=sys.stderr)
        return 1
    except SafetensorError as error:
        # safetensors reports a full disk as its own error, with the OS's words inside.
        if "os error" not in str(error):
            raise
        print(f"distsent: disk error: {error}", file=sys.stderr)
        return 1


# A shell's status for a writer its reader left (128 + SIGPIPE), as `yes | head` reports.
EXIT_BROKEN_PIPE = 141
# What a full disk, a quota, a file-size limit or a read-only folder raise.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)


def _user_error(kind: str, error: Exception) -> int:
    """One line on stderr instead of a traceback: the message names what to fix."""
    print(f"distsent: {kind} error: {error}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
