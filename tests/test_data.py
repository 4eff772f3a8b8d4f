"""Data sources, label filters, cleaning, splits, truncation and every bad-data case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pytest

from distsent.config import ConfigError, load_config
from distsent.data import (
    DataError,
    encode_texts,
    label_key,
    load_labeled_splits,
    physical_lines,
    stratified_split,
    tokenize,
    tokenized_fingerprint,
)
from distsent.modeling import build_tokenizer
from tests.conftest import REPO, TINY, run_cli

SMILE = REPO / "tests" / "data" / "smile" / "smile-annotations-final.csv"
SMILE_ARGS = [
    "data.dataset=files",
    f"data.train_file={SMILE}",
    "data.has_header=false",
    "data.column_names=[id, text, category]",
    "data.label_column=category",
    "data.drop_multi_label=true",
    "data.drop_labels=[nocode]",
]


def data_cfg(*overrides: str):
    return load_config(None, list(overrides)).data


def test_smile_filters_leave_six_classes_all_in_train_and_validation():
    assert SMILE.is_file(), f"{SMILE} is missing: the repository keeps a copy of the SMILE data there"
    splits = load_labeled_splits(data_cfg(*SMILE_ARGS, "data.bad_rows=skip"))
    assert splits.label_names == ["angry", "disgust", "happy", "not-relevant", "sad", "surprise"]
    for split in ("train", "validation"):
        assert set(splits.labels[split]) == set(range(6)), split
    notes = " ".join(splits.notes)
    assert "dropped 32 multi-label" in notes and "dropped 1554 listed label" in notes
    assert "skipped 1 row(s): malformed row" in notes


def test_the_held_out_split_does_not_depend_on_the_order_of_data_labels():
    """Training on from an export with its labels listed in another order must validate on
    the same texts, not on texts the first run trained on."""
    listed = load_labeled_splits(data_cfg(*SMILE_ARGS, "data.bad_rows=skip"))
    reordered = load_labeled_splits(
        data_cfg(*SMILE_ARGS, "data.bad_rows=skip", "data.labels=[surprise, sad, not-relevant, happy, disgust, angry]")
    )
    assert reordered.label_names[0] == "surprise"
    assert reordered.texts["validation"] == listed.texts["validation"]


def test_integer_labels_split_as_they_always_did(tmp_path):
    """Twelve integer classes (10 sorts before 2 as text): the split by natural label order
    is the split by class id that runs made before, so their checkpoints still resume."""
    path = tmp_path / "twelve.csv"
    path.write_text("text,label\n" + "".join(f"text {i},{i % 12}\n" for i in range(600)))
    splits = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}"))
    assert splits.label_names == [str(i) for i in range(12)]
    ids = [i % 12 for i in range(600)]
    _, held = stratified_split(ids, 0.1, seed=42)
    assert splits.texts["validation"] == [f"text {i}" for i in held]


def test_a_test_file_with_no_usable_row_is_refused(tmp_path):
    train = write(tmp_path / "train.csv", GOOD)
    test = write(tmp_path / "test.csv", "text,label\nodd one,neutral\n")
    files = ["data.dataset=files", f"data.train_file={train}", f"data.test_file={test}", "data.bad_rows=skip"]
    with pytest.raises(DataError, match=r"test.csv: no test rows left after filtering"):
        load_labeled_splits(data_cfg(*files))


def test_no_validation_data_says_why(tmp_path):
    """Each of the three ways to end up without validation rows, and a held-out test split with
    nothing to hold out, gets its own remedy."""
    singles = write(tmp_path / "singles.csv", "text,label\na,x\nb,y\nc,z\n")
    with pytest.raises(DataError, match=r"validation_fraction=0.5 held out nothing, as every class has one"):
        load_labeled_splits(
            data_cfg("data.dataset=files", f"data.train_file={singles}", "data.validation_fraction=0.5")
        )
    # Validation takes each class's spare row; the test split then has none to take.
    pairs = write(tmp_path / "pairs.csv", "text,label\na,x\nb,x\nc,y\nd,y\n")
    with pytest.raises(DataError, match=r"test_fraction=0.25 held out nothing, as no class had a training row"):
        load_labeled_splits(
            data_cfg(
                "data.dataset=files",
                f"data.train_file={pairs}",
                "data.validation_fraction=0.5",
                "data.test_fraction=0.25",
            )
        )
    with pytest.raises(DataError, match=r"set data.validation_fraction > 0"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={singles}", "data.validation_fraction=0"))
    train = write(tmp_path / "train.csv", GOOD)
    validation = write(tmp_path / "val.csv", "text,label\nodd one,neutral\n")
    files = ["data.dataset=files", f"data.train_file={train}", f"data.validation_file={validation}"]
    with pytest.raises(DataError, match=r"val.csv: no validation rows left after filtering") as error:
        load_labeled_splits(data_cfg(*files, "data.bad_rows=skip"))
    assert str(error.value).count("skipped 1 row(s): unknown label") == 1, "once, with what skipped it"


def test_a_headerless_file_read_with_a_header_gets_a_hint(tmp_path):
    headerless = write(tmp_path / "rows.csv", "a fine film,positive\na dull film,negative\n")
    with pytest.raises(DataError) as error:
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={headerless}"))
    assert "no column 'text' (data.text_column); columns are ['a fine film', 'positive']" in str(error.value)
    assert str(error.value).endswith(
        "if its first row is data, not names: set data.has_header=false and data.column_names"
    )


def test_smile_broken_first_record_is_refused_by_default():
    with pytest.raises(DataError, match=r"smile-annotations-final.csv:1: malformed row: expected 3 fields"):
        load_labeled_splits(data_cfg(*SMILE_ARGS))


def test_rare_class_reaches_every_split():
    labels = [0] * 500 + [1] * 300 + [2] * 3
    keep, held = stratified_split(labels, 0.1, seed=1)
    assert {labels[i] for i in held} == {0, 1, 2} and {labels[i] for i in keep} == {0, 1, 2}
    assert len(set(keep) | set(held)) == len(labels)


@pytest.mark.parametrize(
    "labels, fraction",
    [
        ([0] * 20 + [1] * 20 + [2] * 3 + [3], 0.1),  # a class of one row, which used to end stratification
        ([0] * 20 + [1] * 20 + [2] * 2 + [3] * 2, 0.05),  # fewer rows to hold out than classes
    ],
)
def test_stratification_survives_a_single_row_class_and_a_small_fraction(labels, fraction):
    keep, held = stratified_split(labels, fraction, seed=42)
    assert sorted([*keep, *held]) == list(range(len(labels)))
    classes_of_two_or_more = {label for label in labels if labels.count(label) >= 2}
    assert {labels[i] for i in held} == classes_of_two_or_more
    assert {labels[i] for i in keep} == set(labels)  # the single row trains


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_every_file_format_with_string_or_int_labels(tmp_path, suffix):
    rows = [{"review": f"text number {i}", "stars": i % 2} for i in range(40)]
    path = tmp_path / f"data.{suffix}"
    if suffix in ("csv", "tsv"):
        sep = "," if suffix == "csv" else "\t"
        path.write_text("review" + sep + "stars\n" + "".join(f"{r['review']}{sep}{r['stars']}\n" for r in rows))
    elif suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    splits = load_labeled_splits(
        data_cfg(
            "data.dataset=files",
            f"data.train_file={path}",
            "data.text_column=review",
            "data.label_column=stars",
            "data.labels=[bad, good]",
        )
    )
    assert splits.label_names == ["bad", "good"]
    assert sum(splits.sizes().values()) == 40


def test_cleaning_and_duplicates_are_counted(tmp_path):
    path = tmp_path / "imdb.csv"
    path.write_text(
        'text,label\n"Great<br /><br />film http://x.y/z",1\n"Great<br /><br />film http://x.y/z",1\n'
        + "".join(f"t{i},{i % 2}\n" for i in range(30))
    )
    cfg = data_cfg(
        "data.dataset=files",
        f"data.train_file={path}",
        "data.strip_html=true",
        "data.strip_urls=true",
        "data.lowercase=true",
        "data.deduplicate=true",
        "data.validation_fraction=0.2",
    )
    splits = load_labeled_splits(cfg)
    texts = splits.texts["train"] + splits.texts["validation"]
    assert "great film" in texts and len(texts) == 31
    assert any("dropped 1 duplicate text" in note for note in splits.notes)


def test_validation_texts_seen_in_training_are_counted_or_dropped(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(30)))
    validation = tmp_path / "validation.csv"
    validation.write_text("text,label\nreview 3,1\nreview 4,0\nunseen one,1\nunseen two,0\n")
    files = ["data.dataset=files", f"data.train_file={train}", f"data.validation_file={validation}"]

    kept = load_labeled_splits(data_cfg(*files))
    assert len(kept.texts["train"]) == 30
    assert any(note.startswith("validation: 2 of 4 texts are also training texts") for note in kept.notes), kept.notes

    dropped = load_labeled_splits(data_cfg(*files, "data.deduplicate=true"))
    assert len(dropped.texts["train"]) == 28 and not {"review 3", "review 4"} & set(dropped.texts["train"])
    assert dropped.texts["validation"] == ["review 3", "review 4", "unseen one", "unseen two"]
    assert "train: dropped 2 row(s) whose text is also a validation or test text" in dropped.notes


def test_head_tail_truncation_keeps_both_ends():
    tokenizer = build_tokenizer(load_config(None, ["model.name=tiny-bert"]).model)
    text = "start " + "middle " * 300 + "verdict"
    ids = encode_texts([text], tokenizer, max_length=32, truncation="head_tail", head_tokens=10)[0]
    words = tokenizer.decode(ids, skip_special_tokens=True).split()
    assert len(ids) == 32 and words[0] == "start" and words[-1] == "verdict"
    head_only = encode_texts([text], tokenizer, max_length=32)[0]
    assert tokenizer.decode(head_only, skip_special_tokens=True).split()[-1] == "middle"


class CountingTokenizer:
    """A tokenizer that counts how often it is asked to encode."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenised_splits_are_cached_by_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    cfg = load_config(None, ["model.name=tiny-bert"])
    tokenizer = CountingTokenizer(build_tokenizer(cfg.model))
    texts, labels = (
        [f"review number {i} was fine and long enough to be cut" for i in range(50)],
        [i % 2 for i in range(50)],
    )
    first = tokenize(texts, labels, tokenizer, cfg.data)
    assert tokenizer.calls > 0
    calls = tokenizer.calls
    again = tokenize(texts, labels, tokenizer, cfg.data)
    assert tokenizer.calls == calls, "the second tokenisation should have loaded the cache"
    assert again["input_ids"] == first["input_ids"] and again["label"] == labels
    assert again.cache_files[0]["filename"].startswith(str(tmp_path / "distsent-tokenized"))
    # Anything that changes the ids or labels changes the fingerprint.
    base = tokenized_fingerprint(texts, labels, tokenizer, cfg.data)
    shorter = load_config(None, ["model.name=tiny-bert", "data.max_length=8"]).data
    assert tokenized_fingerprint(texts, labels, tokenizer, shorter) != base
    assert tokenized_fingerprint(texts[:-1] + ["changed"], labels, tokenizer, cfg.data) != base
    assert tokenized_fingerprint(texts, labels[::-1], tokenizer, cfg.data) != base
    short = tokenize(texts, labels, tokenizer, shorter)
    assert tokenizer.calls > calls and max(short["length"]) == 8
    # Turned off, nothing is written.
    off = load_config(None, ["model.name=tiny-bert", "data.cache_tokenized=false", "data.max_length=9"]).data
    tokenize(texts, labels, tokenizer, off)
    assert len(list((tmp_path / "distsent-tokenized").glob("*.arrow"))) == 2
    # A cache file cut short (a crash before it reached the disk) is tokenised again, not a
    # failure of every later run naming no file.
    expected = list(first["input_ids"])  # read before the file under it is cut
    cached = tmp_path / "distsent-tokenized" / f"{base}.arrow"
    for size in (100, 600):  # fails to load; loads as empty rows
        cached.write_bytes(cached.read_bytes()[:size])
        assert list(tokenize(texts, labels, tokenizer, cfg.data)["input_ids"]) == expected


def write(path: Path, content: bytes | str) -> Path:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


GOOD = "text,label\n" + "".join(f"fine text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))


@pytest.mark.parametrize(
    "name, content, validation, fragment",
    [
        ("missing_column.csv", "review,label\na,pos\n", None, "no column 'text'"),
        ("empty.csv", "", None, "file is empty"),
        (
            "unknown_label.csv",
            GOOD,
            "text,label\nok,pos\nodd,neutral\n",
            "unknown_label_val.csv:3: unknown label: 'neutral'",
        ),
        ("bad_row.csv", GOOD + "one,two,three\n", None, "bad_row.csv:42: malformed row: expected 2 fields"),
        ("bad_bytes.csv", GOOD.encode() + b"caf\xe9 text,pos\n", None, "bad_bytes.csv:42: undecodable"),
        ("bad.jsonl", '{"text": "a", "label": "pos"}\n{"text": \n', None, "bad.jsonl:2: malformed row: not valid JSON"),
    ],
)
def test_bad_data_names_the_problem_and_keeps_earlier_exports(
    tmp_path, tiny_export, name, content, validation, fragment
):
    path = write(tmp_path / name, content)
    args = [
        "train",
        *TINY,
        "train.max_steps=2",
        "data.dataset=files",
        f"data.train_file={path}",
        f"output_dir={tiny_export.parent}",
    ]
    if validation is not None:
        args.append(f"data.validation_file={write(tmp_path / name.replace('.csv', '_val.csv'), validation)}")
    before = (tiny_export / "model.safetensors").read_bytes()
    config_before = (tiny_export.parent / "config.yaml").read_bytes()
    result = run_cli(*args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr
    assert (tiny_export / "model.safetensors").read_bytes() == before
    assert (tiny_export.parent / "config.yaml").read_bytes() == config_before, "the refused run's config replaced it"


def test_an_unbalanced_quote_is_named_even_in_skip_mode(tmp_path):
    """A stray quote swallows every line up to the next one: skipping that "one row" once
    dropped 990 of 999 rows. And a field longer than the csv module's 128 KiB default (a
    long review, or a quote that never closes) once raised a traceback naming no file."""
    stray = GOOD.replace("fine text 10,neg\n", '"fine text 10,neg\n')
    path = write(tmp_path / "stray.csv", stray)
    # Closed further down, with the wrong field count or with text after the closing quote.
    closed = write(tmp_path / "closed.csv", stray.replace("fine text 20,neg", 'fine text 20",neg,x'))
    broken = write(tmp_path / "broken.csv", stray.replace("fine text 20,neg", 'fine" text 20,neg'))
    # A last column opened and left open: it runs to the end of the file with the right field count.
    last = write(tmp_path / "last.tsv", GOOD.replace(",", "\t").replace("\tneg\n", '\t"neg\n', 1))
    cases = [
        (path, r"stray.csv:12: a quoted field opened on this row runs to the end of the file; is a quote unbalanced"),
        (closed, r"closed.csv:12: a quoted field runs on to line 22 and the row has 3 fields, not 2; is a quote"),
        (broken, r"broken.csv:12: a quoted field runs on to line 22 and then breaks off .*; is a quote unbalanced"),
        (last, r"last.tsv:2: a quoted field opened on this row runs to the end of the file"),
    ]
    for mode in ("error", "skip"):
        for source, message in cases:
            with pytest.raises(DataError, match=message):
                load_labeled_splits(
                    data_cfg("data.dataset=files", f"data.train_file={source}", f"data.bad_rows={mode}")
                )
    long_review = write(tmp_path / "long.csv", GOOD + f"{'very ' * 40_000}long,pos\n")
    splits = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={long_review}"))
    assert sum(splits.sizes().values()) == 41


def test_a_column_named_twice_is_refused(tmp_path):
    twice = write(tmp_path / "twice.csv", "text,text,label\n" + "".join(f"a{i},b{i},pos\n" for i in range(10)))
    with pytest.raises(DataError, match=r"twice.csv: 2 columns are named 'text' \(data.text_column\)"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={twice}"))


def test_labels_that_are_no_class_are_refused(tmp_path):
    """A JSON NaN or list label once became a class of its own ("nan", "['negative']"), and
    one class trained a model that cannot be wrong (accuracy 1.0)."""
    rows = [{"text": f"fine text {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    nan_label = write(
        tmp_path / "nan.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + '{"text": "odd", "label": NaN}\n'
    )
    with pytest.raises(DataError, match=r"nan.jsonl:21: empty label"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={nan_label}"))
    listed = write(
        tmp_path / "list.jsonl", "".join(json.dumps(r) + "\n" for r in [*rows, {"text": "x", "label": ["neg"]}])
    )
    with pytest.raises(DataError, match=r"list.jsonl:21: malformed row: the label \['neg'\] is not one value"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={listed}"))
    number = write(
        tmp_path / "number.jsonl", "".join(json.dumps(r) + "\n" for r in [*rows, {"text": 5, "label": "neg"}])
    )
    with pytest.raises(DataError, match=r"number.jsonl:21: non-text value in the text column: 5"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={number}"))
    one_class = write(tmp_path / "one.csv", "text,label\n" + "".join(f"text {i},pos\n" for i in range(20)))
    with pytest.raises(DataError, match=r"one.csv: the training data has 1 class\(es\) \['pos'\]"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={one_class}"))
    # Listing two names does not make one class's rows two classes.
    with pytest.raises(
        DataError, match=r"one.csv: the training rows hold 1 of the classes \['neg', 'pos'\] \(\['pos'\]\)"
    ):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={one_class}", "data.labels=[neg, pos]"))
    # A listed class without training rows trains, with a note that the model cannot learn it.
    three = load_labeled_splits(
        data_cfg(
            "data.dataset=files", f"data.train_file={nan_label}", "data.labels=[neg, pos, mixed]", "data.bad_rows=skip"
        )
    )
    assert "no training rows of class(es) ['mixed']: the model cannot learn them" in three.notes


def test_bad_rows_skip_mode_counts_them(tmp_path):
    path = write(tmp_path / "mixed.csv", GOOD.encode() + b"caf\xe9,pos\nx,y,z\n")
    splits = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}", "data.bad_rows=skip"))
    assert sum(splits.sizes().values()) == 40
    assert any("skipped 1 row(s): malformed row" in n for n in splits.notes)
    assert any("skipped 1 row(s): undecodable" in n for n in splits.notes)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "run"
    run_cli("train", *TINY, "train.max_steps=4", f"output_dir={out}")
    return out / "final"


def test_labels_are_stripped_and_dropped_by_name(tmp_path):
    # `"text", positive` as a spreadsheet writes it: the label is `positive`.
    spaced = write(
        tmp_path / "spaced.csv", "text,label\n" + "".join(f"text {i}, {('neg', 'pos')[i % 2]}\n" for i in range(40))
    )
    cfg = load_config(None, ["data.dataset=files", f"data.train_file={spaced}"])
    assert load_labeled_splits(cfg.data).label_names == ["neg", "pos"]
    # Integer labels indexing data.labels are dropped by their name.
    numbered = write(tmp_path / "numbered.csv", "text,label\n" + "".join(f"text {i},{i % 3}\n" for i in range(60)))
    named = ["data.dataset=files", f"data.train_file={numbered}", "data.labels=[negative, neutral, positive]"]
    splits = load_labeled_splits(load_config(None, [*named, "data.drop_labels=[neutral]"]).data)
    assert sum(len(texts) for texts in splits.texts.values()) == 40
    assert "dropped 20 listed label row(s)" in " ".join(splits.notes)
    # The dropped label is no class of the model; 2 still means positive.
    assert splits.label_names == ["negative", "positive"]
    texts = {
        text: label
        for split in splits.texts
        for text, label in zip(splits.texts[split], splits.labels[split], strict=True)
    }
    assert texts["text 2"] == texts["text 5"] == 1 and texts["text 3"] == 0
    by_integer = load_labeled_splits(load_config(None, [*named, "data.drop_labels=[1]"]).data)
    assert by_integer.label_names == ["negative", "positive"]
    with pytest.raises(ConfigError, match=r"data.drop_labels: \['nuetral'\] match no row's label"):
        load_labeled_splits(load_config(None, [*named, "data.drop_labels=[nuetral]"]).data)


def test_evaluate_reads_a_file_as_the_model_was_trained_on(tmp_path):
    """A headerless SMILE-format file evaluates with no column flags: the export says how."""
    run = tmp_path / "smile"
    run_cli("train", *TINY, *SMILE_ARGS, "data.bad_rows=skip", "train.max_steps=3", f"output_dir={run}")
    report = json.loads(
        run_cli(
            "evaluate",
            "--model",
            str(run / "final"),
            "--data",
            str(SMILE),
            "--bad-rows",
            "skip",
            "--misclassified",
            str(tmp_path / "wrong.jsonl"),
        ).stdout
    )
    # Every row is scored, skipped (malformed) or dropped by the training filters (multi-label,
    # `nocode`), each counted by reason as training counted them.
    lines = sum(1 for _ in csv.reader(SMILE.open(newline="", encoding="utf-8-sig")))
    assert report["num_examples"] > 1000
    assert report["num_examples"] + report["skipped_rows"] + report["dropped_rows"] == lines
    assert report["skipped_rows"] == 1 and report["dropped_rows"] == 32 + 1554
    notes = " ".join(report["notes"])
    assert "dropped 32 multi-label" in notes and "dropped 1554 listed label" in notes and "malformed row" in notes
    assert set(report["per_class"]) == {"angry", "disgust", "happy", "not-relevant", "sad", "surprise"}
    assert "note" not in report
    # Without --bad-rows, the training run's data.bad_rows=skip holds.
    defaults = ["evaluate", "--model", str(run / "final"), "--data", str(SMILE)]
    assert json.loads(run_cli(*defaults, "--misclassified", str(tmp_path / "w2.jsonl")).stdout)["skipped_rows"] == 1
    # Numbers against a model that learnt names: read as positions, and the report says so.
    numbered = tmp_path / "numbered.csv"
    numbered.write_text("1,what a lovely day,2\n2,this is awful,0\n")
    evaluate_numbered = ["evaluate", "--model", str(run / "final"), "--data", str(numbered)]
    report = json.loads(run_cli(*evaluate_numbered).stdout)
    assert report["num_examples"] == 2
    assert report["note"] == (
        "integer labels were read as positions in the model's labels: "
        "0=angry, 1=disgust, 2=happy, 3=not-relevant, 4=sad, 5=surprise"
    )


def test_text_after_a_closing_quote_is_a_bad_row_not_quietly_joined(tmp_path):
    # The lenient csv reader turned `"Great" movie` into `Great movie`.
    path = write(tmp_path / "quoted.tsv", GOOD.replace(",", "\t") + '"Great" movie\tpos\n')
    with pytest.raises(
        DataError, match=r"quoted.tsv:42: malformed row: .*\(a quoted field must end at its closing quote\)"
    ):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}"))
    splits = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}", "data.bad_rows=skip"))
    assert sum(splits.sizes().values()) == 40
    assert not any("Great" in text for split in splits.texts.values() for text in split)
    # A quote inside a field is text, as before.
    inner = write(tmp_path / "inner.tsv", GOOD.replace(",", "\t") + 'said "hi" there\tpos\n')
    splits = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={inner}"))
    assert any(text == 'said "hi" there' for split in splits.texts.values() for text in split)


def test_integer_labels_are_positions_only_in_listed_names(tmp_path):
    """Validation labels 0/1/2 against training labels 1/2/3, or against names the training
    data gave (in an order of distsent's making), were mapped by position without a word."""
    numbered = write(tmp_path / "r123.csv", "text,label\n" + "".join(f"text {i},{i % 3 + 1}\n" for i in range(60)))
    named = write(tmp_path / "abc.csv", "text,label\n" + "".join(f"text {i},{'abc'[i % 3]}\n" for i in range(60)))
    from_zero = write(tmp_path / "v0.csv", "text,label\nx,0\ny,1\nz,2\n")
    for train in (numbered, named):
        files = ["data.dataset=files", f"data.train_file={train}", f"data.validation_file={from_zero}"]
        with pytest.raises(DataError, match=r"v0.csv:2: unknown label: '0' is not one of the training labels"):
            load_labeled_splits(data_cfg(*files))
    listed = ["data.dataset=files", f"data.train_file={named}", f"data.validation_file={from_zero}"]
    splits = load_labeled_splits(data_cfg(*listed, "data.labels=[a, b, c]"))
    assert splits.labels["validation"] == [0, 1, 2]
    assert label_key("0", ["1", "2", "3"]) == "0" and label_key(0, ["negative", "positive"]) == "negative"
    assert label_key("²", ["negative", "positive"]) == "²"  # a digit to str.isdigit, not to int()


def test_physical_lines_end_where_the_csv_reader_ends_them():
    assert physical_lines("a\rb\r\nc\nd\u2028e\x0cf") == ["a", "b", "c", "d\u2028e\x0cf"]


def test_a_malformed_header_is_named_as_the_header(tmp_path):
    path = write(tmp_path / "head.csv", '"te"xt,label\n' + GOOD.split("\n", 1)[1])
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=r"head.csv:1: the header row is malformed"):
            load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}", f"data.bad_rows={mode}"))


def test_json_lines_are_lines_at_newlines_only(tmp_path):
    # U+2028 is a line break to str.splitlines, not to JSON: distsent's own predictions hold it raw.
    rows = [{"text": f"text {i}\u2028second line", "label": "ab"[i % 2]} for i in range(20)]
    path = write(tmp_path / "sep.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    splits = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}"))
    texts = [text for split in splits.texts.values() for text in split]
    assert len(texts) == 20 and all(text.endswith("\u2028second line") for text in texts)


def test_a_file_emptied_by_its_bad_rows_says_what_they_were(tmp_path):
    latin = write(tmp_path / "latin.csv", b"text,label\n" + b"".join(b"caf\xe9 %d,pos\n" % i for i in range(5)))
    with pytest.raises(DataError) as error:
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={latin}", "data.bad_rows=skip"))
    assert (
        "latin.csv: no training rows left after filtering (skipped 5 row(s): undecodable bytes in the text column (the first: "
        in str(error.value)
    )
    assert "latin.csv:2: undecodable" in str(error.value)
    # Rows of labels data.labels does not list are skipped as they are turned into class ids.
    other = write(tmp_path / "other.csv", GOOD)
    with pytest.raises(DataError) as error:
        load_labeled_splits(
            data_cfg("data.dataset=files", f"data.train_file={other}", "data.labels=[good, bad]", "data.bad_rows=skip")
        )
    assert "other.csv: no training rows left after filtering (skipped 40 row(s): unknown label" in str(error.value)


def test_a_json_array_names_a_bad_record_by_its_line_and_place(tmp_path):
    rows = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(40)]
    rows[2] = {"text": "  ", "label": "a"}
    # Pretty-printed: each record spans 4 lines after the "[" line, the third starts on line 10.
    pretty = write(tmp_path / "pretty.json", json.dumps(rows, indent=2).replace("\n", "\r\n"))
    with pytest.raises(DataError, match=r"pretty.json:10, record 3: empty text"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={pretty}"))
    one_line = write(tmp_path / "one_line.json", json.dumps(rows))
    with pytest.raises(DataError, match=r"one_line.json:1, record 3: empty text"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={one_line}"))
    splits = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={one_line}", "data.bad_rows=skip"))
    assert sum(splits.sizes().values()) == 39
    # An object that wraps the records is neither an array nor JSON lines, and is named so.
    wrapped = write(tmp_path / "wrapped.json", json.dumps({"data": rows}, indent=2))
    with pytest.raises(DataError, match=r"wrapped.json: one JSON object over several lines; a .json file holds"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={wrapped}", "data.bad_rows=skip"))


def test_a_json_record_without_the_label_is_a_bad_row_even_the_first(tmp_path):
    rows = [{"text": "unlabelled"}] + [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(40)]
    path = write(tmp_path / "first.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"first.jsonl:1: malformed row: no label"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}"))
    splits = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}", "data.bad_rows=skip"))
    assert sum(splits.sizes().values()) == 40
    # A column no record has is a wrong setting, named as such.
    with pytest.raises(DataError, match=r"first.jsonl: no column 'category' \(data.label_column\)"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}", "data.label_column=category"))


def test_a_header_read_as_data_is_refused(tmp_path):
    path = write(
        tmp_path / "named.csv", "id,text,category\n" + "".join(f"{i},text {i},{'ab'[i % 2]}\n" for i in range(40))
    )
    headerless = ["data.has_header=false", "data.column_names=[id, text, category]", "data.label_column=category"]
    with pytest.raises(DataError, match=r"named.csv:1: the first row is the column names .* set data.has_header=true"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}", *headerless))


def test_whole_float_labels_are_integers_and_utf16_is_named(tmp_path):
    # pandas writes an integer column with a gap as floats: 1 and 1.0 are one class.
    rows = [{"text": f"text {i}", "label": (i % 2) * 1.0 if i % 3 else i % 2} for i in range(40)]
    path = write(tmp_path / "floats.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}")).label_names == ["0", "1"]
    listed = load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={path}", "data.labels=[neg, pos]"))
    assert listed.label_names == ["neg", "pos"]
    # A CSV holds them as text, "1.0" (pandas' to_csv), unless that text is a listed name.
    table = write(tmp_path / "floats.csv", "text,label\n" + "".join(f"text {i},{i % 2}.0\n" for i in range(40)))
    assert load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={table}")).label_names == ["0", "1"]
    named = data_cfg("data.dataset=files", f"data.train_file={table}", "data.labels=[neg, pos]")
    assert load_labeled_splits(named).labels["train"].count(1) == 20 - round(20 * named.validation_fraction)
    as_names = data_cfg("data.dataset=files", f"data.train_file={table}", "data.labels=['0.0', '1.0']")
    assert load_labeled_splits(as_names).label_names == ["0.0", "1.0"]
    utf16 = write(tmp_path / "excel.tsv", GOOD.replace(",", "\t").encode("utf-16"))
    with pytest.raises(DataError, match=r"excel.tsv: UTF-16 text .*; save it as UTF-8"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={utf16}"))
    unmarked = write(tmp_path / "unmarked.tsv", GOOD.replace(",", "\t").encode("utf-16-le"))
    with pytest.raises(DataError, match=r"unmarked.tsv: UTF-16 text \(a zero byte in every other place\)"):
        load_labeled_splits(data_cfg("data.dataset=files", f"data.train_file={unmarked}"))
