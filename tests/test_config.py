import re
import typing
from pathlib import Path

import pytest

import distsent
from distsent.__main__ import _split_config
from distsent.config import Config, ConfigError, TrainConfig, load_config, parse_override
from distsent.metrics import selectable_metrics
from tests.conftest import REPO, TINY, run_cli, write_labeled_csv


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.name == "all-MiniLM-L6-v2"
    assert cfg.data.dataset == "embedded:rotten_tomatoes"
    assert cfg.train.global_batch_size(world_size=4) == cfg.train.batch_size * 4 * cfg.train.grad_accum_steps


def test_yaml_then_overrides_win(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  epochs: 2\nmodel:\n  freeze: [embeddings.]\n")
    cfg = load_config(path, ["train.lr=3e-5", "data.max_train_samples=100"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.train.epochs == 2.0
    assert cfg.model.freeze == ["embeddings."]
    assert cfg.data.max_train_samples == 100


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lerning_rate=1", "train.lerning_rate"),
        ("train.lr=-1", "train.lr"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio must be in [0.0, 1.0], got 1.5"),
        ("train.batch_size=8.5", "train.batch_size must be an integer"),
        ("train.mixed_precision=fp8", "train.mixed_precision must be one of"),
        ("model.head=pooler", "model.head"),
        ("nosection.key=1", "nosection"),
        ("train=3", "train is a section"),
        ("train.length_grouping=maybe", "train.length_grouping must be true or false"),
        # NaN fails no range check (each comparison is False): refused by name, not by torch.
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.max_grad_norm=.nan", "train.max_grad_norm must be a finite number"),
        ("train.epochs=.inf", "train.epochs must be a finite number, got inf"),
        ("train.class_weights=[1, .nan]", "train.class_weights[1] must be a finite number"),
        ("train.class_weights=foo", "train.class_weights must be 'balanced', a list of numbers or null, got 'foo'"),
        ("data.labels=[a, b, a]", "data.labels lists 'a' more than once"),
        # A percentage where a fraction is meant would never be reached: no early stop, silently.
        ("train.early_stopping_target=80", "train.early_stopping_target must be in [0.0, 1.0], got 80.0"),
        # Each rank seeds with seed + rank, and NumPy refuses seeds outside [0, 2**32).
        ("train.seed=-1", "train.seed must be in [0, 2147483647], got -1"),
        ("train.seed=2147483648", "train.seed must be in [0, 2147483647], got 2147483648"),
        ("data.labels=[positive]", "data.labels lists 1 label(s) ['positive']; a classifier needs at least 2"),
        # head_tokens' default suits max_length 512; at the default 128 the message gives a value.
        (
            "data.truncation=head_tail",
            "got 128; a quarter from the start, as 128 of 510 at max_length 512, is data.head_tokens=32",
        ),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert fragment in str(error.value)


def test_yaml_errors_name_the_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: train.lr must be a number"):
        load_config(path)
    # Broken YAML: one line with the file, line and column (PyYAML's own message spans seven).
    path.write_text("train:\n  lr: 1e-5\n   batch_size: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:\d+: not valid YAML \(") as error:
        load_config(path)
    assert "\n" not in str(error.value)
    path.write_text("train:\n  lr: 1e-5\n  batch_size: 8\n  lr: 2e-5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4:3: not valid YAML \(key 'lr' appears twice\)"):
        load_config(path)
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ConfigError, match=r"bad.yaml: not UTF-8 text"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"config file .* is a folder"):
        load_config(tmp_path)


def test_parse_override_types():
    assert parse_override("train.lr=3e-5") == (["train", "lr"], 3e-5)
    assert parse_override("train.max_steps=20") == (["train", "max_steps"], 20)
    assert parse_override("model.freeze=[a, b]") == (["model", "freeze"], ["a", "b"])
    assert parse_override("output_dir=runs/x.y") == (["output_dir"], "runs/x.y")
    # YAML's block syntax is never meant on a command line: `-` is a separator, not a list.
    assert parse_override("data.multi_label_separator=-") == (["data", "multi_label_separator"], "-")
    assert load_config(None, ["data.multi_label_separator=-"]).data.multi_label_separator == "-"
    # A number needs a digit: `+`, `.` and `-.` are strings (they once crashed the loader).
    for text in ("+", ".", "-."):
        assert parse_override(f"data.multi_label_separator={text}")[1] == text
    assert load_config(None, ["model.freeze=[.]"]).model.freeze == ["."]
    assert parse_override("train.lr=.5") == (["train", "lr"], 0.5)


@pytest.mark.parametrize(
    "override, guess",
    [("lr=1e-5", "train.lr"), ("model.nme=x", "model.name"), ("data.text_col=review", "data.text_column")],
)
def test_unknown_keys_suggest_the_likely_one(override: str, guess: str):
    with pytest.raises(ConfigError, match=rf"did you mean {re.escape(guess)}\?"):
        load_config(None, [override])


def test_train_help_lists_and_describes_every_key():
    help_text = run_cli("train", "--help").stdout
    listed = re.findall(r"^  ([a-z0-9_.]+)=(.*)$", help_text, flags=re.MULTILINE)
    expected = []
    for name, value in Config().to_dict().items():
        expected += [f"{name}.{key}" for key in value] if isinstance(value, dict) else [name]
    assert [key for key, _ in listed] == expected
    lines = help_text.splitlines()
    for key, _ in listed:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {key}="))
        assert lines[at + 1].startswith(" " * 6) and lines[at + 1].strip(), f"{key} has no description"
    assert "  train.lr=5e-05\n      Peak learning rate of AdamW." in help_text
    assert "  model.head=cls  (cls|mean|cnn)" in help_text
    assert "  checkpoint.signals=[SIGUSR1, SIGTERM]" in help_text


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("override", ["train.lerning_rate=1", "train.lr=-1"])
def test_cli_refuses_bad_config_before_work(override: str, tmp_path: Path):
    result = run_cli("train", override, f"output_dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0
    assert override.split("=")[0] in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a refused config"


def test_unknown_best_metric_is_refused_before_the_data_is_read(tmp_path: Path):
    # The training file does not exist: the metric must be refused first, not after a wait.
    missing = ["data.dataset=files", f"data.train_file={tmp_path / 'absent.csv'}"]
    result = run_cli(
        "train", *TINY, *missing, "train.best_metric=f1_macr", f"output_dir={tmp_path / 'run'}", check=False
    )
    assert result.returncode == 2
    assert "train.best_metric" in result.stderr and "f1_macr" in result.stderr and "f1_macro" in result.stderr
    assert "absent.csv" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a refused config"


def test_a_metric_the_task_does_not_report_is_refused_once_the_data_is_read(tmp_path: Path):
    emotions = tmp_path / "emotions.csv"
    write_labeled_csv(emotions, [(f"text {i}", ["joy", "anger", "fear"][i % 3]) for i in range(30)])
    result = run_cli(
        "train",
        *TINY,
        "data.dataset=files",
        f"data.train_file={emotions}",
        "train.best_metric=roc_auc",
        f"output_dir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode == 2
    assert "train.best_metric=roc_auc: this validation set reports" in result.stderr


def test_best_metric_choices_are_the_metrics_a_validation_can_report():
    choices = typing.get_args(typing.get_type_hints(TrainConfig)["best_metric"])
    assert set(choices) == set(selectable_metrics([0, 1], ["neg", "pos"]))


def test_selectable_metrics_follow_the_task():
    binary = selectable_metrics([0, 1, 1], ["neg", "pos"])
    assert {"loss", "accuracy", "f1", "f1_macro", "roc_auc"} <= set(binary)
    assert "roc_auc" not in selectable_metrics([1, 1], ["neg", "pos"])  # undefined on one class
    assert "f1" not in selectable_metrics([0, 1, 2], ["sad", "happy", "angry"])


@pytest.mark.parametrize(
    "command, fragment",
    [
        (["predict", "--model", "{tmp}/nowhere", "great film"], "not an exported model"),
        (["report", "{tmp}"], "not a run folder"),
        (["train", *TINY, "model.freeze=[nomatch.]", "output_dir={tmp}/run"], "model.freeze"),
        # tiny-bert has 512 positions; without the check, training failed at the first long text.
        (["train", *TINY, "data.max_length=1024", "output_dir={tmp}/run"], "positions for 512 tokens"),
        # Offline (as CI and this machine are), a Hub model or dataset cannot load.
        (["train", "model.name=no-such-org/no-such-model", "output_dir={tmp}/run"], "model.name=no-such-org"),
        (["train", *TINY, "data.dataset=hub:no-such-set", "output_dir={tmp}/run"], "data.dataset=hub:no-such-set"),
    ],
    ids=["predict", "report", "freeze", "max_length", "hub_model", "hub_dataset"],
)
def test_user_mistakes_get_one_line_and_exit_2(tmp_path: Path, command: list[str], fragment: str):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fail at once, not after retries
    result = run_cli(*(item.replace("{tmp}", str(tmp_path)) for item in command), check=False, env=offline)
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_text_settings_keep_the_text_as_written(tmp_path: Path):
    """YAML reads `1.10` as the number 1.1, `007` as 7 and `true` as a boolean: a Hub
    revision, a run name or a label written so must stay what was written."""
    cfg = load_config(
        None,
        ["model.revision=1.10", "log.run_name=007", "model.name=1e3", "data.labels=[true, false]", "train.seed=0777"],
    )
    assert (cfg.model.revision, cfg.log.run_name, cfg.model.name) == ("1.10", "007", "1e3")
    assert cfg.data.labels == ["true", "false"] and cfg.train.seed == 777  # YAML 1.2: decimal, not octal
    path = tmp_path / "text.yaml"
    path.write_text("train:\n  # lr: 1e-5\nmodel:\n  revision: 1.10\n  freeze: [true, 0777]\n")
    cfg = load_config(path)  # a section whose keys are all commented out is no error
    assert cfg.model.revision == "1.10" and cfg.model.freeze == ["true", "0777"]
    for override in ("train.batch_size=0x10", "train.seed=1:00", "train.seed=1:00.5", "train.seed=!!int 0x10"):
        with pytest.raises(ConfigError, match=r"must be an integer, got '"):  # YAML 1.1's hex and base 60
            load_config(None, [override])
    # One value of a list setting, a whole section as one override, a comma list with spaces.
    cfg = load_config(None, ["data.drop_labels=false", "model={revision: 1.10}", "data.labels=neg, pos"])
    assert (cfg.data.drop_labels, cfg.model.revision, cfg.data.labels) == (["false"], "1.10", ["neg", "pos"])
    assert load_config(None, ["train.max_steps=1_000"]).train.max_steps == 1000


def test_config_mistakes_get_a_message_that_says_how_to_fix_them(tmp_path: Path):
    cases = {
        "data.labels=[neg,pos": r"data.labels=\[neg,pos: not a valid list .* write it as data.labels=\[a, b\]",
        "train.max_steps=None": r"train.max_steps must be an integer, got 'None' \(null means none\)",
        "train.resume=AUTO": r"train.resume=AUTO: the modes are auto and none, in lower case",
        "data.dataset=embedded:foo": r"unknown embedded set 'foo'; choose one of embedded:rotten_tomatoes",
        "trian.lr=1e-5": r"unknown config key 'trian' \(did you mean train.lr\?",
        "checkpoints.every_steps=10": r"unknown config key 'checkpoints' \(did you mean checkpoint.every_steps\?",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    # One value is a one-item list; comma-separated numbers are numbers.
    cfg = load_config(None, ["data.drop_labels=1", "train.class_weights=1,2"])
    assert cfg.data.drop_labels == ["1"] and cfg.train.class_weights == [1.0, 2.0]
    # A file's mistakes name their line, range errors included.
    path = tmp_path / "lines.yaml"
    path.write_text("model:\n  name: tiny-bert\ntrain:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"lines.yaml:4: unknown config key 'train.lrr' \(did you mean train.lr\?"):
        load_config(path)
    path.write_text("model:\n  name: tiny-bert\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"lines.yaml:4: train.lr must be in \(0.0, 1.0\], got -1.0"):
        load_config(path)
    # Overridden on the command line, the range error is the override's, a whole section too.
    for override in ("train.lr=2", "train={lr: 2}"):
        with pytest.raises(ConfigError, match=r"^train.lr must be in"):
            load_config(path, [override])


def test_the_command_line_tells_config_files_from_overrides(tmp_path: Path):
    # A sweep's folder name holds "=": its config.yaml is still the config file.
    sweep = tmp_path / "lr=3e-5"
    sweep.mkdir()
    (sweep / "config.yaml").write_text("train:\n  lr: 2\n")
    result = run_cli("train", str(sweep / "config.yaml"), check=False)
    assert result.returncode == 2 and f"{sweep / 'config.yaml'}:2: train.lr must be in" in result.stderr
    assert _split_config(["output_dir=x.yaml", "train.lr=1"]) == (None, ["output_dir=x.yaml", "train.lr=1"])
    late = run_cli("train", "train.lr=1e-5", "second.yaml", check=False)
    assert late.returncode == 2 and "second.yaml: a config file comes first, before the overrides" in late.stderr
    # `model.freeze=[embeddings., encoder.layer.0.]` typed without quotes reaches us in two pieces.
    split = run_cli("train", "model.freeze=[embeddings.,", "encoder.layer.0.]", check=False)
    assert split.returncode == 2 and "split by the shell at a space: quote the override" in split.stderr
    # A resume folder that is not there is refused before anything is read, or written.
    new = tmp_path / "new_run"
    absent = run_cli("train", *TINY, f"output_dir={new}", f"train.resume={tmp_path / 'nope'}", check=False)
    assert absent.returncode == 2 and "no such checkpoint folder" in absent.stderr and not new.exists()
    version = run_cli("--version")
    assert version.stdout.strip() == f"distsent {distsent.__version__}"


def test_an_empty_multi_label_separator_is_refused():
    # "" is in every label: every row would have been dropped as multi-label.
    with pytest.raises(ConfigError, match="data.multi_label_separator must not be empty"):
        load_config(None, ["data.drop_multi_label=true", "data.multi_label_separator="])


@pytest.mark.parametrize("head, prefix", [("cls", "bert.encoder.layer.N."), ("mean", "encoder.encoder.layer.N.")])
def test_a_freeze_pattern_that_matches_nothing_shows_the_models_names(head: str, prefix: str):
    from distsent.modeling import build_model, build_tokenizer, freeze_parameters

    cfg = load_config(None, ["model.name=tiny-bert", f"model.head={head}"])
    model = build_model(cfg.model, ["negative", "positive"], len(build_tokenizer(cfg.model)))
    with pytest.raises(ConfigError, match=rf"patterns \['bert\.x'\] match no parameter name; .*{re.escape(prefix)}"):
        freeze_parameters(model, ["bert.x"])
