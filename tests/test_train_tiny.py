"""End to end on tiny-bert: train, export, reload through transformers, predict."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from tests.conftest import REPO, TINY, cli_env, read_summary, run_cli, with_nan_classifier

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    result = run_cli("train", *TINY, "train.max_steps=20", "train.eval_every_steps=10", f"output_dir={out}")
    (out.parent / "stdout.txt").write_text(result.stdout)
    (out.parent / "stderr.txt").write_text(result.stderr)
    return out


def test_summary_has_the_contract_keys(tiny_run: Path):
    summary = read_summary(tiny_run)
    assert summary["global_step"] == 20
    assert summary["world_size"] == 1
    assert summary["global_batch_size"] == 8
    assert summary["train_seconds"] > 0
    assert summary["train_tokens_per_second"] > 0
    # A Python process with torch and a model loaded holds well over 100 MiB resident.
    assert 100 < summary["peak_memory_mib"] < 20_000
    assert summary["eval"]["num_examples"] == 101
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert summary["best_metric"]["name"] == "accuracy"
    assert (tiny_run / "config.yaml").is_file()


def test_a_cpu_run_trains_only_the_embedding_rows_its_texts_hold(tiny_run: Path):
    # A few hundred texts hold a few thousand of the 30,522 WordPiece tokens (training_rows.py).
    held_aside = read_summary(tiny_run)["embedding_rows_only_decayed"]
    assert 20_000 < held_aside < 30_522
    stdout = (tiny_run.parent / "stdout.txt").read_text()
    assert f"embedding rows of {held_aside:,} tokens no training text holds only decayed" in stdout
    # The export holds the whole matrix, as nn.Embedding's.
    from safetensors import safe_open

    with safe_open(tiny_run / "final" / "model.safetensors", "pt") as export:
        assert export.get_slice("bert.embeddings.word_embeddings.weight").get_shape()[0] == 30_522


def test_a_cpu_run_without_deepspeed_prints_no_gpu_detection_warning(tiny_run: Path):
    # DeepSpeed is imported at export (accelerate checks for its engine) and, left to detect
    # an accelerator, warns that it found no GPU: noise on a CPU run that never asked for one.
    output = (tiny_run.parent / "stdout.txt").read_text() + (tiny_run.parent / "stderr.txt").read_text()
    assert "unable to detect" not in output, output[-2000:]


def test_saved_predictions_give_the_logged_roc_auc(tiny_run: Path):
    """The ROC plot is redrawn from validation_predictions.json: its AUC must be the logged one
    (probabilities once rounded to 6 digits made ties, and a different AUC)."""
    from sklearn.metrics import roc_auc_score

    saved = json.loads((tiny_run / "validation_predictions.json").read_text())
    positive = [row[1] for row in saved["probs"]]
    assert roc_auc_score(saved["labels"], positive) == pytest.approx(
        read_summary(tiny_run)["eval"]["roc_auc"], abs=1e-12
    )


def banner_value(stdout: str, key: str) -> str:
    line = next(line for line in stdout.splitlines() if line.strip().startswith(key + " "))
    return line.strip()[len(key) :].strip()


def test_cpu_training_runs_on_tcmalloc_by_default(tiny_run: Path, tcmalloc: str):
    assert read_summary(tiny_run)["allocator"] == "tcmalloc"
    assert banner_value((tiny_run.parent / "stdout.txt").read_text(), "allocator") == "tcmalloc (DISTSENT_ALLOCATOR)"


def test_system_allocator_keeps_freed_memory_unless_turned_off(tmp_path: Path):
    system = {"DISTSENT_ALLOCATOR": "system"}
    kept = run_cli("train", *TINY, "train.max_steps=2", f"output_dir={tmp_path / 'kept'}", env=system)
    assert banner_value(kept.stdout, "allocator") == (
        "system (DISTSENT_ALLOCATOR), freed memory kept for reuse (train.cpu_keep_freed_memory)"
    )
    assert read_summary(tmp_path / "kept")["allocator"] == "system"
    off = run_cli(
        "train",
        *TINY,
        "train.max_steps=2",
        "train.cpu_keep_freed_memory=false",
        f"output_dir={tmp_path / 'off'}",
        env=system,
    )
    assert banner_value(off.stdout, "allocator") == "system (DISTSENT_ALLOCATOR)"
    assert read_summary(tmp_path / "off")["global_step"] == 2


@pytest.mark.parametrize("which", ["best", "final"])
def test_export_loads_in_transformers(tiny_run: Path, which: str):
    export = tiny_run / which
    files = {p.name for p in export.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "distsent_config.yaml" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files), files
    # Readable by whoever may read the config beside it (transformers writes the weights 0600).
    modes = {path.name: path.stat().st_mode & 0o777 for path in export.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    model = AutoModelForSequenceClassification.from_pretrained(export)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    AutoTokenizer.from_pretrained(export)
    classify = pipeline("text-classification", model=str(export))
    assert classify("a fine film")[0]["label"] in {"negative", "positive"}
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["num_examples"] == 101


def test_final_export_holds_the_trained_weights(tiny_run: Path):
    # The tiny model is randomly initialised from the seed; training must have moved it.
    from distsent.config import load_config
    from distsent.modeling import build_model, build_tokenizer

    torch.manual_seed(42)
    cfg = load_config(None, ["model.name=tiny-bert"])
    initial = build_model(cfg.model, ["negative", "positive"], len(build_tokenizer(cfg.model))).state_dict()
    trained = load_file(tiny_run / "final" / "model.safetensors")
    moved = [name for name, tensor in trained.items() if not torch.equal(tensor, initial[name])]
    assert len(moved) > len(trained) // 2


def test_predict_prints_one_json_per_text(tiny_run: Path):
    result = run_cli("predict", "--model", str(tiny_run / "final"), "what a great film", "dull and long")
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["text"] for r in rows] == ["what a great film", "dull and long"]
    assert "Loading weights" not in result.stderr, "progress bars in output that is no terminal"
    for row in rows:
        assert row["label"] in {"negative", "positive"}
        assert 0.5 <= row["score"] <= 1.0
    # The printed label and score are the transformers model's own argmax and probability.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    with torch.no_grad():
        probs = model(**tokenizer("what a great film", return_tensors="pt")).logits.softmax(-1)[0]
    assert rows[0]["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    assert rows[0]["label"] == model.config.id2label[int(probs.argmax())]


def test_predict_reads_texts_from_standard_input_line_by_line(tiny_run: Path, tmp_path: Path):
    # U+2028 inside a text is no line break to the user's file, so none here either.
    texts = ["what a great film", "dull\u2028and long"]
    command = [sys.executable, "-m", "distsent", "predict", "--model", str(tiny_run / "final"), "--file", "-"]
    result = subprocess.run(
        command, input="\n".join(texts) + "\n", capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["text"] for line in result.stdout.strip().split("\n")] == texts
    # Refused before the model is loaded: the named model does not exist, and is not what is reported.
    absent_model = ["predict", "--model", str(tmp_path / "no_model"), "--file"]
    columns = subprocess.run(
        [sys.executable, "-m", "distsent", *absent_model, "-", "--id-column", "id"],
        input="a\n",
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
    )
    assert columns.returncode == 2 and "--id-column id: standard input is one text per line" in columns.stderr
    missing = run_cli(*absent_model, str(tmp_path / "absent.csv"), check=False)
    assert missing.returncode == 2 and f"--file {tmp_path / 'absent.csv'}: file not found" in missing.stderr
    # A text file saved as UTF-16 is named as such, as a CSV is, not "not UTF-8 text".
    utf16 = tmp_path / "texts.txt"
    utf16.write_bytes("\n".join(texts).encode("utf-16"))
    named = run_cli("predict", "--model", str(tiny_run / "final"), "--file", str(utf16), check=False)
    assert named.returncode == 2 and f"{utf16}: UTF-16 text" in named.stderr, named.stderr[-2000:]


def test_predict_into_a_reader_that_stops_early_exits_quietly(tiny_run: Path, tmp_path: Path):
    # `distsent predict --file texts.txt | head -1`: head leaves after one line. The output (over
    # 200 KB) is more than a pipe holds, so predict is still writing when the reader leaves.
    texts = write_lines(tmp_path / "many.txt", [f"review number {i} was fine" for i in range(3000)])
    command = [sys.executable, "-m", "distsent", "predict", "--model", str(tiny_run / "final"), "--file", str(texts)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO
    )
    first = json.loads(process.stdout.readline())
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 141, stderr[-3000:]  # as a shell reports `yes | head`
    assert first["text"] == "review number 0 was fine"
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-3000:]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_predictions_clean_texts_as_training_did(tiny_run: Path, tmp_path: Path):
    import shutil

    import yaml

    from distsent.predict import Predictor

    export = tmp_path / "export"
    shutil.copytree(tiny_run / "final", export)
    settings = yaml.safe_load((export / "distsent_config.yaml").read_text())
    texts = ["What a <br />GREAT film http://x.io/review", "what a great film"]
    plain = Predictor(export).predict_proba(texts)
    assert not torch.allclose(plain[0], plain[1])
    settings["data"].update(strip_html=True, strip_urls=True, lowercase=True)
    (export / "distsent_config.yaml").write_text(yaml.safe_dump(settings))
    cleaned = Predictor(export).predict_proba(texts)
    assert torch.allclose(cleaned[0], cleaned[1])


def test_predictor_reads_what_training_saved_and_nothing_more(tiny_run: Path, tmp_path: Path, caplog):
    import shutil

    import yaml

    from distsent.config import ConfigError
    from distsent.predict import Predictor

    export = tmp_path / "export"
    shutil.copytree(tiny_run / "final", export)
    # Training truncated at data.max_length, not at the base tokenizer's model_max_length.
    tokenizer_config = json.loads((export / "tokenizer_config.json").read_text())
    (export / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 16}))
    settings = yaml.safe_load((export / "distsent_config.yaml").read_text())
    assert Predictor(export).max_length == settings["data"]["max_length"] == 128
    # One string is one text, not one per character.
    assert [row["text"] for row in Predictor(export).predict("what a great film")] == ["what a great film"]
    # Only the data section matters to predictions: a key another distsent version wrote
    # there is ignored with a warning, and other sections are not read.
    settings["data"]["retired_setting"] = 1
    settings["train"]["renamed_setting"] = 2
    (export / "distsent_config.yaml").write_text(yaml.safe_dump(settings))
    with caplog.at_level("WARNING", logger="distsent"):
        Predictor(export)
    assert "ignoring data.retired_setting, unknown to distsent" in caplog.text
    (export / "distsent_config.yaml").write_text("")
    with pytest.raises(ConfigError, match="distsent_config.yaml: not a config distsent saved"):
        Predictor(export)


def test_predict_refuses_inputs_and_outputs_it_cannot_use_before_loading(tiny_run: Path, tmp_path: Path):
    model = ["predict", "--model", str(tmp_path / "no_model")]
    lines = tmp_path / "texts.txt"
    lines.write_text("what a great film\n")
    for flag in (["--text-column", "review"], ["--header"]):
        refused = run_cli(*model, "--file", str(lines), *flag, check=False)
        assert refused.returncode == 2 and f"{' '.join(flag)}: {lines} is one text per line" in refused.stderr, (
            refused.stderr
        )
    folder = tmp_path / "out"
    folder.mkdir()
    refused = run_cli(*model, "--output", str(folder), "a text", check=False)
    assert refused.returncode == 2 and f"--output {folder}: a folder, not a file" in refused.stderr, refused.stderr
    refused = run_cli(*model, "--output", str(lines / "p.jsonl"), "a text", check=False)
    assert refused.returncode == 2 and f"{lines} is a file, not a folder" in refused.stderr, refused.stderr
    # Bytes that are not UTF-8 in a table's text column: named at their line, as training does.
    table = tmp_path / "bad.csv"
    table.write_bytes(b'text,label\nfine film,x\n"caf\xe9 was great",x\n')
    bad = run_cli("predict", "--model", str(tiny_run / "final"), "--file", str(table), check=False)
    assert bad.returncode == 2 and f"{table}:3: undecodable bytes in the text column" in bad.stderr, bad.stderr
    # Output files are UTF-8 whatever the locale, written whole or not at all.
    output = tmp_path / "emoji.jsonl"
    locale_env = {**cli_env(), "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"}
    command = [sys.executable, "-m", "distsent", "predict", "--model", str(tiny_run / "final")]
    emoji = tmp_path / "emoji.txt"
    emoji.write_text("great film \U0001f600\n", encoding="utf-8")
    written = subprocess.run(
        [*command, "--file", str(emoji), "--output", str(output)],
        capture_output=True,
        text=True,
        env=locale_env,
        cwd=REPO,
        timeout=300,
    )
    assert written.returncode == 0, written.stderr[-2000:]
    assert json.loads(output.read_text(encoding="utf-8"))["text"] == "great film \U0001f600"
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_a_headerless_file_is_read_with_the_column_names_given(tiny_run: Path, tmp_path: Path):
    """The model trained on a file with a header: a headerless one needs its columns named."""
    headerless = tmp_path / "reviews.csv"
    headerless.write_text("7,what a great film\n8,dull and long\n")
    predict = ["predict", "--model", str(tiny_run / "final"), "--file", str(headerless)]
    unnamed = run_cli(*predict, "--no-header", check=False)
    assert unnamed.returncode == 2 and "Traceback" not in unnamed.stderr
    assert "give them with --column-names" in unnamed.stderr
    named = run_cli(*predict, "--column-names", "id,text")
    assert [json.loads(line)["text"] for line in named.stdout.splitlines()] == ["what a great film", "dull and long"]
    repeated = run_cli(*predict, "--column-names", "text,text", check=False)
    assert repeated.returncode == 2 and "--column-names text,text: give distinct" in repeated.stderr
    with_header = run_cli(*predict, "--column-names", "id,text", "--header", check=False)
    assert with_header.returncode == 2 and "has one (--header)" in with_header.stderr
    # A .csv output is a table, with a score column per label under --all-scores.
    table = tmp_path / "predictions.csv"
    run_cli(*predict, "--column-names", "id,text", "--all-scores", "--output", str(table))
    with table.open(newline="", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert list(written[0]) == ["text", "label", "score", "score_negative", "score_positive"]
    assert [row["text"] for row in written] == ["what a great film", "dull and long"]
    for row in written:
        assert float(row["score"]) == max(float(row["score_negative"]), float(row["score_positive"]))


def test_predictions_carry_the_id_column_given(tiny_run: Path, tmp_path: Path):
    """Each prediction keeps its row's id, so a user can join predictions back to the file."""
    records = [{"review_id": 17, "text": "what a great film"}, {"review_id": "b-2", "text": "dull and long"}]
    texts = tmp_path / "reviews.jsonl"
    texts.write_text("".join(json.dumps(record) + "\n" for record in records))
    predict = ["predict", "--model", str(tiny_run / "final"), "--file", str(texts), "--id-column", "review_id"]
    printed = [json.loads(line) for line in run_cli(*predict).stdout.splitlines()]
    assert [(row["id"], row["text"]) for row in printed] == [(17, "what a great film"), ("b-2", "dull and long")]
    table = tmp_path / "predictions.tsv"
    run_cli(*predict, "--output", str(table))
    with table.open(newline="", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle, delimiter="\t"))
    assert list(written[0]) == ["id", "text", "label", "score"]
    assert [(row["id"], row["label"]) for row in written] == [("17", printed[0]["label"]), ("b-2", printed[1]["label"])]
    # Every row needs its id; a missing or empty one stops at its line.
    texts.write_text(texts.read_text() + json.dumps({"text": "no id here"}) + "\n")
    missing = run_cli(*predict, check=False)
    assert missing.returncode == 2 and f"{texts}:3: malformed row: no review_id" in missing.stderr
    table_in = tmp_path / "reviews.csv"
    table_in.write_text("review_id,text\n1,what a great film\n,dull and long\n")
    empty = run_cli(*predict[:4], str(table_in), *predict[5:], check=False)
    assert empty.returncode == 2 and f"{table_in}:3: no id in the id column (--id-column review_id)" in empty.stderr
    # An empty text gets no label: it stops at its line, as in training and evaluate.
    table_in.write_text('review_id,text\n1,what a great film\n2,"  "\n')
    blank = run_cli(*predict[:4], str(table_in), *predict[5:], check=False)
    assert blank.returncode == 2 and f"{table_in}:3: empty text" in blank.stderr
    unknown = run_cli(*predict[:-1], "id", check=False)
    assert unknown.returncode == 2 and "no column 'id' (--id-column)" in unknown.stderr
    as_arguments = run_cli("predict", "--model", str(tiny_run / "final"), "--id-column", "id", "a text", check=False)
    assert as_arguments.returncode == 2 and "--id-column names a column of --file" in as_arguments.stderr


def test_evaluate_draws_the_confusion_matrix_and_roc_of_a_file(tiny_run: Path, tmp_path: Path):
    heldout = tmp_path / "heldout.csv"
    heldout.write_text(
        "text,label\n" + "".join(f"review {i} was {'great' if i % 2 else 'dull'},{LABELS[i % 2]}\n" for i in range(20))
    )
    plots = tmp_path / "plots"
    report = json.loads(
        run_cli("evaluate", "--model", str(tiny_run / "final"), "--data", str(heldout), "--plots", str(plots)).stdout
    )
    assert report["plots"] == [str(plots / "confusion_matrix.png"), str(plots / "roc.png")]
    for drawn in report["plots"]:
        assert Path(drawn).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(map(sum, report["confusion_matrix"])) == 20
    # Misclassified rows as JSON lines beside the data by default, or as a table a .csv asks for.
    wrong = [json.loads(line) for line in Path(report["misclassified_file"]).read_text().splitlines()]
    assert wrong, "the check needs misclassified rows"
    table = tmp_path / "wrong.csv"
    run_cli("evaluate", "--model", str(tiny_run / "final"), "--data", str(heldout), "--misclassified", str(table))
    with table.open(newline="", encoding="utf-8") as handle:
        tabled = list(csv.DictReader(handle))
    assert [list(row.items()) for row in tabled] == [[(k, str(v)) for k, v in row.items()] for row in wrong]
    not_a_folder = run_cli(
        "evaluate", "--model", str(tiny_run / "final"), "--data", str(heldout), "--plots", str(heldout), check=False
    )
    assert not_a_folder.returncode == 2 and "a file, not a folder" in not_a_folder.stderr
    # One class has no ROC: the ROC an earlier call drew into the folder goes, not stays to mislead.
    one_class = tmp_path / "one_class.csv"
    one_class.write_text("text,label\nreview 1 was great,positive\nreview 2 was fine,positive\n")
    report = json.loads(
        run_cli("evaluate", "--model", str(tiny_run / "final"), "--data", str(one_class), "--plots", str(plots)).stdout
    )
    assert report["plots"] == [str(plots / "confusion_matrix.png")] and not (plots / "roc.png").exists()


def test_a_model_with_non_finite_outputs_is_refused_not_scored(tiny_run: Path, tmp_path: Path):
    broken = with_nan_classifier(tiny_run / "final", tmp_path / "nan_model")
    heldout = tmp_path / "heldout.csv"
    heldout.write_text("text,label\nwhat a great film,positive\ndull and long,negative\n")
    for command in (["evaluate", "--data", str(heldout)], ["predict", "what a great film"]):
        refused = run_cli(command[0], "--model", str(broken), *command[1:], check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert f"--model {broken} scored" in refused.stderr and "NaN or infinite" in refused.stderr
    # Training from it: every output is NaN by the first validation, which stops the run with
    # advice instead of scoring NaN as the first class and exporting it as the best model.
    out = tmp_path / "diverged"
    stopped = run_cli(
        "train", f"model.name={broken}", "train.max_steps=2", "train.max_grad_norm=0", f"output_dir={out}", check=False
    )
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert "validation at step 2: the model scored" in stopped.stderr, stopped.stderr[-3000:]
    assert "Training diverged: lower train.lr (now 5e-05), or clip gradients" in stopped.stderr
    assert not (out / "best").exists() and not (out / "final").exists()


def test_tiny_bert_is_small(tiny_run: Path):
    size_mb = (tiny_run / "final" / "model.safetensors").stat().st_size / 2**20
    assert size_mb < 5


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path):
    # fp32 and no dropout, so compiled and eager runs differ only by kernel rounding.
    common = [*TINY, "model.dropout=0.0", "train.max_steps=6", "train.eval_every_epoch=false"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_cli("train", *common, f"output_dir={eager}")
    result = run_cli("train", *common, "train.compile=true", f"output_dir={compiled}")
    assert read_summary(compiled)["global_step"] == 6, result.stderr[-2000:]
    a, b = load_file(eager / "final" / "model.safetensors"), load_file(compiled / "final" / "model.safetensors")
    assert a.keys() == b.keys()  # no _orig_mod. prefixes from the compiled wrapper
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.parametrize("head", ["cls", "mean"])
def test_packed_training_matches_padded(tmp_path: Path, head: str):
    # fp32, no dropout, random (ungrouped) batches so most carry padding: packed and padded runs
    # then differ only by rounding, and count the same real tokens. On CPU packed rows carry
    # filler up to a bucketed length, which must change nothing either.
    common = [
        *TINY,
        f"model.head={head}",
        "model.dropout=0.0",
        "train.max_steps=6",
        "train.eval_every_epoch=false",
        "train.length_grouping=false",
        "train.unpad_min_padding=0.0",
    ]
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    run_cli("train", *common, "train.unpad=false", f"output_dir={padded}")
    result = run_cli("train", *common, f"output_dir={packed}")
    assert (
        banner_value(result.stdout, "batches")
        == "packed where that saves over 0.0% of the positions, else padded (train.unpad), packed rows filled up to "
        "bucketed lengths"
    )
    summaries = read_summary(padded), read_summary(packed)
    assert [s["unpadded"] for s in summaries] == [False, True]
    assert [s["unpad_bucketed_lengths"] for s in summaries] == [False, True]
    assert summaries[1]["packed_micro_batches"] > 0
    assert summaries[0]["train_tokens"] == summaries[1]["train_tokens"]
    a, b = load_file(padded / "final" / "model.safetensors"), load_file(packed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_an_fp16_step_skipped_inside_fused_adamw_is_seen():
    # GradScaler calls a fused AdamW's step() even on overflow (the kernel skips the update),
    # so "was step() called" cannot tell; the scale, lowered after each skip, can.
    from distsent.optim import loss_scale, scaler_skipped_step

    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    for gradient, skipped in ((float("inf"), True), (1.0, False)):
        before_weight = weight.detach().clone()
        optimizer.zero_grad()
        scaler.scale((weight * gradient).sum()).backward()
        scale_before = loss_scale(scaler)
        scaler.step(optimizer)
        scaler.update()
        assert torch.equal(weight.detach(), before_weight) == skipped
        assert scaler_skipped_step(scaler, scale_before) == skipped
    assert not scaler_skipped_step(None, loss_scale(None))
