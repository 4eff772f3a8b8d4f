"""Heads (cls, mean, cnn, single-logit BCE), freezing, re-heading, evaluate == predict, class weights, early stop."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from distsent.config import load_config
from distsent.data import load_labeled_splits
from distsent.modeling import build_model, build_tokenizer, load_classifier, tiny_bert_config
from tests.conftest import TINY, max_weight_difference, read_summary, run_cli, write_labeled_csv

HEADS = {
    "cls": ["model.head=cls"],
    "mean": ["model.head=mean"],
    "cnn": ["model.head=cnn"],
    "single_logit": ["model.single_logit=true"],
    "mean_single_logit": ["model.head=mean", "model.single_logit=true"],
}


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory) -> Path:
    """A labelled CSV of validation texts (101 rows), as a user would bring."""
    cfg = load_config(None, TINY)
    splits = load_labeled_splits(cfg.data)
    names = map(splits.label_names.__getitem__, splits.labels["validation"])
    rows = zip(splits.texts["validation"], names, strict=True)
    return write_labeled_csv(tmp_path_factory.mktemp("heldout") / "heldout.csv", rows, header=("review", "sentiment"))


@pytest.mark.parametrize("name", list(HEADS))
def test_head_trains_exports_reloads_and_predicts(tmp_path, heldout_file, name):
    out = tmp_path / name
    run_cli("train", *TINY, *HEADS[name], "train.max_steps=12", f"output_dir={out}")
    export = out / "final"
    model = load_classifier(export).eval()
    assert (model.config.num_labels == 1) == ("single_logit" in name)
    # The export predicts exactly what the trained model scored on validation.
    report = json.loads(
        run_cli(
            "evaluate",
            "--model",
            str(export),
            "--data",
            str(heldout_file),
            "--text-column",
            "review",
            "--label-column",
            "sentiment",
        ).stdout
    )
    in_training = read_summary(out)["eval"]
    assert report["num_examples"] == 101
    assert report["accuracy"] == pytest.approx(in_training["accuracy"], abs=1e-9)
    assert report["loss"] == pytest.approx(in_training["loss"], abs=1e-4)
    # evaluate's accuracy equals what predict says on the same rows.
    predicted = tmp_path / "predicted.jsonl"
    run_cli(
        "predict",
        "--model",
        str(export),
        "--file",
        str(heldout_file),
        "--text-column",
        "review",
        "--output",
        str(predicted),
    )
    rows = [json.loads(line) for line in predicted.read_text().splitlines()]
    gold = [r["sentiment"] for r in csv.DictReader(heldout_file.open())]
    assert len(rows) == 101
    assert sum(r["label"] == g for r, g in zip(rows, gold, strict=True)) / 101 == pytest.approx(report["accuracy"])
    # --all-scores: every label's probability, summing to 1, the top one being label and score.
    (scored,) = [json.loads(run_cli("predict", "--model", str(export), "--all-scores", "a fine film").stdout)]
    assert set(scored["scores"]) == {"negative", "positive"}
    assert sum(scored["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert scored["scores"][scored["label"]] == scored["score"] == max(scored["scores"].values())
    misclassified = [json.loads(line) for line in Path(report["misclassified_file"]).read_text().splitlines()]
    assert len(misclassified) == round((1 - report["accuracy"]) * 101)
    for row in misclassified:
        assert row["gold"] != row["predicted"] and 0.5 <= row["confidence"] <= 1.0 and row["text"]
    if name == "cls":
        AutoModelForSequenceClassification.from_pretrained(export)  # plain transformers loads the cls head
        check_cli_errors_name_flags(export, heldout_file, tmp_path)
    # The model card shows the way this export loads.
    card = (export / "README.md").read_text()
    assert next(line for line in card.splitlines() if line.startswith("# ")) == f"# {out.name}/final"
    transformers_head = name in ("cls", "single_logit")
    assert ("pipeline(" in card) == transformers_head
    assert ("from distsent.predict import Predictor" in card) == (not transformers_head)
    # The Hub's widget would serve a mean/cnn export with transformers' random head.
    assert ("library_name: transformers" in card) == transformers_head


def check_cli_errors_name_flags(export: Path, heldout_file: Path, tmp_path: Path) -> None:
    """evaluate refuses a label the model does not know, naming the row and the flag that
    skips it; with the flag the row is counted and left out. predict names --text-column."""
    with_neutral = tmp_path / "with_neutral.csv"
    with_neutral.write_text(heldout_file.read_text() + "a plain film,neutral\n")
    last_line = len(with_neutral.read_text().splitlines())
    columns = ("--text-column", "review", "--label-column", "sentiment")
    evaluate = ("evaluate", "--model", str(export), "--data", str(with_neutral), *columns)
    refused = run_cli(*evaluate, check=False)
    assert refused.returncode == 2, refused.stderr
    assert f"{with_neutral}:{last_line}: unknown label: 'neutral'" in refused.stderr
    assert "pass --bad-rows skip to drop such rows" in refused.stderr
    report = json.loads(run_cli(*evaluate, "--bad-rows", "skip").stdout)
    assert report["skipped_rows"] == 1 and report["num_examples"] == 101
    no_column = run_cli("predict", "--model", str(export), "--file", str(with_neutral), check=False)
    assert no_column.returncode == 2
    assert "no column 'text' (--text-column)" in no_column.stderr
    # Results never replace the file they come from.
    original = with_neutral.read_bytes()
    for command in (
        ("predict", "--model", str(export), "--file", str(with_neutral), "--output", str(with_neutral)),
        (*evaluate, "--bad-rows", "skip", "--misclassified", str(with_neutral)),
    ):
        refused = run_cli(*command, check=False)
        assert refused.returncode == 2 and "would replace it" in refused.stderr, refused.stderr
    assert with_neutral.read_bytes() == original
    # predict has no --bad-rows: a malformed row points at how the file is read instead.
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('text\na fine film\n"a film","with, a spare field"\n')
    refused = run_cli("predict", "--model", str(export), "--file", str(ragged), check=False)
    assert refused.returncode == 2 and f"{ragged}:3: malformed row" in refused.stderr, refused.stderr
    assert "--bad-rows" not in refused.stderr and "--header/--no-header" in refused.stderr
    # Unusable predict inputs: one line naming the file and line, exit 2, no traceback.
    (tmp_path / "latin1.txt").write_bytes(b"fine\nna\xefve\n")
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "null.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    for file, fragment in (
        ("latin1.txt", "latin1.txt:2: not UTF-8 text"),
        ("blank.txt", "blank.txt: no texts"),
        ("null.jsonl", "null.jsonl:2: None in the text column"),
    ):
        refused = run_cli("predict", "--model", str(export), "--file", str(tmp_path / file), check=False)
        assert refused.returncode == 2 and fragment in refused.stderr and "Traceback" not in refused.stderr
    refused = run_cli("predict", "--model", str(export), "--batch-size", "0", "a film", check=False)
    assert refused.returncode == 2 and "must be at least 1" in refused.stderr
    # report plots the run's own best metric by default and refuses one the run never logged.
    refused = run_cli("report", str(export.parent), "--metric", "bogus", check=False)
    assert refused.returncode == 2 and "--metric bogus" in refused.stderr and "f1_macro" in refused.stderr
    assert run_cli("report", str(export.parent)).stdout.strip().endswith(".png")


def test_predict_refuses_models_it_cannot_read_in_one_line(tmp_path):
    """A one-output model from elsewhere names one class, not two; a mean export without
    its head file has no head. Both are one-line errors, not tracebacks."""
    cfg = load_config(None, ["model.name=tiny-bert"])
    tokenizer = build_tokenizer(cfg.model)
    foreign = tmp_path / "regression"
    config = tiny_bert_config(len(tokenizer))
    config.num_labels = 1
    BertForSequenceClassification(config).save_pretrained(foreign)
    tokenizer.save_pretrained(foreign)
    refused = run_cli("predict", "--model", str(foreign), "a fine film", check=False)
    assert refused.returncode == 2 and "one output named ['LABEL_0']" in refused.stderr, refused.stderr
    # Independent sigmoid scores per label: a softmax over them would be no confidence.
    multi_label = tmp_path / "multi_label"
    config = tiny_bert_config(len(tokenizer))
    config.num_labels, config.problem_type = 3, "multi_label_classification"
    BertForSequenceClassification(config).save_pretrained(multi_label)
    tokenizer.save_pretrained(multi_label)
    refused = run_cli("predict", "--model", str(multi_label), "a fine film", check=False)
    assert refused.returncode == 2 and "a multi-label classifier" in refused.stderr, refused.stderr
    headless = tmp_path / "mean"
    mean = load_config(None, ["model.name=tiny-bert", "model.head=mean"])
    build_model(mean.model, ["negative", "positive"], len(tokenizer)).save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    (headless / "distsent_head.safetensors").unlink()
    refused = run_cli("predict", "--model", str(headless), "a fine film", check=False)
    assert refused.returncode == 2 and "distsent_head.safetensors is missing" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    # A damaged export: one line naming it, not a traceback, and never a random head.
    damaged = tmp_path / "damaged"
    build_model(cfg.model, ["negative", "positive"], len(tokenizer)).save_pretrained(damaged)
    tokenizer.save_pretrained(damaged)
    weights = load_file(str(damaged / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, str(damaged / "model.safetensors"))
    refused = run_cli("predict", "--model", str(damaged), "a fine film", check=False)
    assert refused.returncode == 2 and "the weights have no classifier (classifier." in refused.stderr, refused.stderr
    (damaged / "model.safetensors").write_bytes(b"\x08\x00\x00")
    refused = run_cli("predict", "--model", str(damaged), "a fine film", check=False)
    assert refused.returncode == 2 and f"--model {damaged}: cannot load it" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    # Without its tokenizer files transformers makes a tokenizer of special tokens only, and
    # every word is [UNK]: refused, where it once predicted and trained on nothing.
    untokenized = tmp_path / "untokenized"
    build_model(cfg.model, ["negative", "positive"], len(tokenizer)).save_pretrained(untokenized)
    for command in (["predict", "--model", str(untokenized), "a fine film"], ["train", f"model.name={untokenized}"]):
        refused = run_cli(*command, check=False)
        assert refused.returncode == 2 and "its tokenizer knows only its 5 special tokens" in refused.stderr, (
            refused.stderr
        )


@pytest.mark.parametrize("name", list(HEADS))
def test_a_texts_logits_do_not_depend_on_its_batch(name):
    """Alone or padded beside a longer text: the same logits (the CNN head once read the
    padding's hidden states and flipped labels with the batch size)."""
    cfg = load_config(None, ["model.name=tiny-bert", *HEADS[name]])
    tokenizer = build_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model, ["negative", "positive"], len(tokenizer)).eval()
    short, long = "a fine film", "a long and winding film that never seems to end, and then it does not end"
    with torch.no_grad():
        alone = model(**tokenizer([short], return_tensors="pt")).logits
        batched = model(**tokenizer([short, long], padding=True, return_tensors="pt")).logits
    assert torch.allclose(alone[0], batched[0], atol=1e-5), (alone[0], batched[0])


def test_freezing_by_name_pattern():
    cfg = load_config(None, ["model.name=tiny-bert", "model.freeze=[embeddings., encoder.layer.0.]"])
    model = build_model(cfg.model, ["a", "b"], len(build_tokenizer(cfg.model)))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("embeddings." in n for n in frozen) and any("encoder.layer.0." in n for n in frozen)
    assert not any("encoder.layer.1." in n or "classifier" in n for n in frozen)
    with pytest.raises(ValueError, match=r"model.freeze=\['bert.', 'classifier.'\] freezes every parameter"):
        build_model(
            load_config(None, ["model.name=tiny-bert", "model.freeze=[bert., classifier.]"]).model, ["a", "b"], 30522
        )
    with pytest.raises(ValueError, match="match no parameter"):
        build_model(
            load_config(None, ["model.name=tiny-bert", "model.freeze=[nothing_like_this]"]).model, ["a", "b"], 30522
        )


def test_reheading_a_three_label_classifier(tmp_path, caplog):
    three = tmp_path / "three"
    cfg = load_config(None, ["model.name=tiny-bert"])
    model = build_model(cfg.model, ["negative", "neutral", "positive"], len(build_tokenizer(cfg.model)))
    model.save_pretrained(three)
    build_tokenizer(cfg.model).save_pretrained(three)
    out = tmp_path / "two"
    result = run_cli("train", *TINY, f"model.name={three}", "train.max_steps=4", f"output_dir={out}")
    assert "re-heading: the checkpoint is a 3-label classifier" in result.stderr + result.stdout
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    encoder_before = model.state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    assert torch.allclose(
        encoder_before, reloaded.state_dict()["bert.encoder.layer.0.attention.self.query.weight"], atol=0.05
    )


def test_training_on_from_a_mean_export_keeps_its_head(tmp_path, caplog):
    export = tmp_path / "mean" / "final"
    run_cli("train", *TINY, "model.head=mean", "train.max_steps=3", f"output_dir={export.parent}")
    saved = load_file(str(export / "distsent_head.safetensors"))
    labels = ["negative", "positive"]
    same = load_config(None, [f"model.name={export}", "model.head=mean"])
    model = build_model(same.model, labels, len(build_tokenizer(same.model)))
    assert torch.equal(model.state_dict()["classifier.weight"], saved["classifier.weight"])
    assert "re-heading" not in caplog.text
    # Another head type cannot take the weights: a new head, said plainly.
    other = load_config(None, [f"model.name={export}", "model.head=cnn"])
    build_model(other.model, labels, len(build_tokenizer(other.model)))
    assert "re-heading: the checkpoint is a 2-label classifier ['negative', 'positive'] with a mean head" in caplog.text


@pytest.mark.parametrize("head", ["cls", "mean"])
def test_a_carried_over_head_follows_the_label_names(tmp_path, caplog, head):
    """Same labels in another order: the head carries over with its outputs reordered.
    Other labels of the same number: a fresh head, said plainly (it once kept the old rows,
    which inverted a classifier whose labels were listed the other way round)."""
    cfg = load_config(None, ["model.name=tiny-bert", f"model.head={head}"])
    tokenizer = build_tokenizer(cfg.model)
    torch.manual_seed(0)
    source = build_model(cfg.model, ["negative", "positive"], len(tokenizer)).eval()
    source.save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    texts = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")

    def logits_of(labels: list[str]) -> torch.Tensor:
        run = load_config(None, [f"model.name={tmp_path / 'source'}", f"model.head={head}"])
        with torch.no_grad():
            return build_model(run.model, labels, len(tokenizer)).eval()(**texts).logits

    with torch.no_grad():
        before = source(**texts).logits
    assert torch.allclose(logits_of(["negative", "positive"]), before, atol=1e-6)
    assert torch.allclose(logits_of(["positive", "negative"]), before.flip(-1), atol=1e-6)
    assert "re-heading" not in caplog.text
    renamed = logits_of(["happy", "nocode"])
    assert (
        f"with a {head} head of 2 output(s) and this run's labels are ['happy', 'nocode']; its head is discarded"
        in (caplog.text)
    )
    assert not torch.allclose(renamed, before, atol=1e-3)


def test_exports_declare_how_their_outputs_were_trained(tmp_path):
    """transformers' pipeline picks softmax or sigmoid by problem_type: a re-headed export
    must not keep its source's (a multi-label emotion model, a regression model)."""
    tokenizer = build_tokenizer(load_config(None, ["model.name=tiny-bert"]).model)
    source = tmp_path / "multi_label"
    build_model(load_config(None, ["model.name=tiny-bert"]).model, list("abcde"), len(tokenizer)).save_pretrained(
        source
    )
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    tokenizer.save_pretrained(source)
    for overrides, expected in (
        ([], "single_label_classification"),
        (["model.single_logit=true"], "multi_label_classification"),
    ):
        run = load_config(None, [f"model.name={source}", *overrides])
        assert build_model(run.model, ["negative", "positive"], len(tokenizer)).config.problem_type == expected


def test_optional_test_split_is_scored_by_the_model_in_best(tmp_path):
    """The test score describes the model a user takes away (best/), not the last step's."""
    out = tmp_path / "with_test"
    # At this rate validation accuracy peaks at step 2 of 10.
    settings = [*TINY, "data.max_eval_samples=50", "data.test_fraction=0.1", "train.lr=1e-3"]
    run_cli("train", *settings, "train.max_steps=10", "train.eval_every_steps=2", f"output_dir={out}")
    summary = read_summary(out)
    assert summary["test"]["num_examples"] == 853 and summary["eval"]["num_examples"] == 50
    best_step = summary["best_metric"]["step"]
    assert best_step < summary["global_step"] == 10, "the check needs a best model before the last step"
    assert summary["test"]["model_step"] == best_step
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["split"] for e in events if e["event"] == "eval"][-1] == "test"
    # The same numbers as best/ scores on the test split's texts.
    test_split = load_labeled_splits(load_config(None, settings).data)
    names = map(test_split.label_names.__getitem__, test_split.labels["test"])
    test_file = write_labeled_csv(tmp_path / "test.csv", zip(test_split.texts["test"], names, strict=True))
    report = json.loads(run_cli("evaluate", "--model", str(out / "best"), "--data", str(test_file)).stdout)
    assert report["num_examples"] == 853
    # Batched differently here: allow one example at a near-tie to fall the other way.
    assert report["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1.5 / 853)
    assert report["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-4)


@pytest.mark.parametrize("head", ["cls", "single_logit"])
def test_class_weighted_steps_do_not_depend_on_the_micro_batch_split(tmp_path, head):
    """A global batch of 16 as one micro-batch or as two of 8 accumulated: the same weighted
    mean, so the same weights. (A weighted mean per micro-batch differed by 40-70% here.)"""
    steps = [*TINY, *HEADS[head], "model.dropout=0.0", "train.class_weights=[1.0, 6.0]", "train.max_steps=6"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", *steps, "train.batch_size=16", f"output_dir={one}")
    run_cli("train", *steps, "train.batch_size=8", "train.grad_accum_steps=2", f"output_dir={two}")
    assert max_weight_difference(one / "final", two / "final") <= 1e-5
    ratios = [read_summary(run)["eval"]["val_train_loss_ratio"] for run in (one, two)]
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-4)


def test_class_weights_and_early_stopping_target(tmp_path):
    out = tmp_path / "weighted"
    args = [
        "train",
        *TINY,
        "train.class_weights=balanced",
        "train.max_steps=40",
        "train.eval_every_steps=4",
        "train.early_stopping_target=0.0",
        "checkpoint.every_steps=4",
        f"output_dir={out}",
    ]
    result = run_cli(*args)
    assert "class weights" in result.stderr
    summary = read_summary(out)
    assert summary["global_step"] == 4 and "reached the target" in summary["stopped_early"]
    assert (out / "final" / "model.safetensors").is_file()
    # Stopped before the first log (every 5 steps): its steps are logged all the same.
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [event for event in events if event["event"] == "train"]
    assert [event["step"] for event in logged] == [4] and logged[0]["loss"] > 0
    # Logged before the stop step's checkpoint: a resume from it does not log those steps again.
    run_cli(*args, f"train.resume={out / 'checkpoints' / 'step-00000004'}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [event["step"] for event in events if event["event"] == "train"] == [4]


def test_early_stopping_that_cannot_fire_is_said(tmp_path):
    """Without periodic validation the run validates once, after its last step: patience
    could never run out, and the user would believe early stopping guards the run."""
    result = run_cli(
        "train",
        *TINY,
        "train.max_steps=2",
        "train.eval_every_epoch=false",
        "train.early_stopping_patience=2",
        f"output_dir={tmp_path / 'never'}",
    )
    assert "train.early_stopping_patience=2 never fires" in result.stderr + result.stdout


def test_a_run_that_took_all_its_steps_did_not_stop_early(tmp_path):
    # The target is reached at the last validation, after the last step: nothing was cut short.
    out = tmp_path / "whole"
    result = run_cli(
        "train",
        *TINY,
        "train.max_steps=4",
        "train.eval_every_steps=4",
        "train.early_stopping_target=0.0",
        f"output_dir={out}",
    )
    summary = read_summary(out)
    assert summary["global_step"] == 4 and summary["stopped_early"] is None
    assert "early stop" not in result.stderr + result.stdout


def test_loading_says_what_is_new_in_a_line_not_transformers_table(tmp_path, caplog, capfd):
    """A fresh head is news in one line; encoder weights a checkpoint lacks (they start
    random) are a warning naming them; transformers' colour-coded load report is not printed."""
    cfg = load_config(None, ["model.name=tiny-bert"])
    tokenizer = build_tokenizer(cfg.model)
    encoder = build_model(cfg.model, ["negative", "positive"], len(tokenizer)).bert
    state = encoder.state_dict()
    del state["encoder.layer.0.output.dense.bias"]
    encoder.save_pretrained(tmp_path / "encoder", state_dict=state)
    tokenizer.save_pretrained(tmp_path / "encoder")
    caplog.set_level("INFO", logger="distsent.modeling")

    run = load_config(None, [f"model.name={tmp_path / 'encoder'}"])
    build_model(run.model, ["negative", "positive"], len(tokenizer))

    assert "a new classification head (not in the checkpoint: classifier.bias, classifier.weight)" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "1 encoder weight(s) are not in the checkpoint and start random: bert.encoder.layer.0.output.dense.bias" in m
        for m in warnings
    ), warnings
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.out + printed.err
