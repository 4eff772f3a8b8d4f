"""The last layer computed for the first token only gives the full model's logits and
gradients, for every architecture and attention kernel it is applied to; other models are
left alone, and parameter names (so checkpoints and exports) do not change."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from distsent.config import ModelConfig
from distsent.cpu_training import use_cpu_dropout
from distsent.first_token import _first_query_rows, use_first_token_last_layer
from distsent.modeling import PooledClassifier, build_model

TINY = {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_classifier(model_type: str, attn_implementation: str = "sdpa", dropout: float = 0.0):
    if model_type == "distilbert":  # its config names the same sizes differently
        config = AutoConfig.for_model(
            model_type, vocab_size=1000, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3
        )
    else:
        config = AutoConfig.for_model(model_type, **TINY, intermediate_size=64, num_labels=3)
    for attribute in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if hasattr(config, attribute):
            setattr(config, attribute, dropout)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 1000, (4, 11), generator=generator)
    input_ids[:, 0] = 2  # a [CLS]-like first token
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 6:] = 0
    attention_mask[2, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "camembert", "electra"])
def test_logits_and_gradients_match_the_full_layer(model_type, attn_implementation):
    full = tiny_classifier(model_type, attn_implementation).eval()
    shortcut = copy.deepcopy(full)
    assert use_first_token_last_layer(shortcut)
    batch = padded_batch()
    expected, logits = full(**batch).logits, shortcut(**batch).logits
    assert torch.allclose(logits, expected, atol=1e-6), (logits - expected).abs().max()
    expected.square().sum().backward()
    logits.square().sum().backward()
    for (name, reference), (_, parameter) in zip(full.named_parameters(), shortcut.named_parameters(), strict=True):
        if reference.grad is None:
            assert parameter.grad is None, name
        else:
            assert torch.allclose(parameter.grad, reference.grad, atol=1e-6), name
    assert full.state_dict().keys() == shortcut.state_dict().keys()


def test_bf16_autocast_logits_are_identical():
    full = build_model(ModelConfig(name="tiny-bert"), ["neg", "pos"], vocab_size=1000).eval()
    shortcut = copy.deepcopy(full)
    assert use_first_token_last_layer(shortcut)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(shortcut(**padded_batch()).logits, full(**padded_batch()).logits)


def test_training_with_cpu_dropout_ignores_padding_and_reaches_every_weight():
    model = tiny_classifier("bert", dropout=0.1)
    assert use_first_token_last_layer(model)
    use_cpu_dropout(model)  # distsent's CPU training attention, with dropout: the 4-D mask is cut
    model.train()
    batch = padded_batch()
    other_padding = batch["input_ids"].clone()
    other_padding[batch["attention_mask"] == 0] = 7
    runs = []
    for input_ids in (batch["input_ids"], other_padding):
        torch.manual_seed(3)  # the same dropout masks for both
        runs.append(model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits)
    assert torch.allclose(runs[0], runs[1], atol=1e-6)
    runs[0].sum().backward()
    last = model.bert.encoder.layer[-1]
    for linear in (last.attention.self.query, last.attention.self.key, last.intermediate.dense, last.output.dense):
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_masks_it_cannot_cut_fall_back_to_the_full_layer():
    # flex attention's BlockMask: the layer runs in full and its first position is returned.
    full = tiny_classifier("bert", "flex_attention").eval()
    shortcut = copy.deepcopy(full)
    assert use_first_token_last_layer(shortcut)
    with torch.no_grad():  # flex attention has no CPU backward
        expected = full(**padded_batch()).logits
        assert torch.allclose(shortcut(**padded_batch()).logits, expected, atol=1e-6)
    assert _first_query_rows(object()) is False


def test_other_heads_and_architectures_are_left_alone():
    for model in (
        build_model(ModelConfig(name="tiny-bert", head="mean"), ["neg", "pos"], vocab_size=1000),
        build_model(ModelConfig(name="tiny-bert", head="cnn"), ["neg", "pos"], vocab_size=1000),
        tiny_classifier("distilbert"),
    ):
        assert not use_first_token_last_layer(model)
        layers = (
            model.encoder.encoder.layer if isinstance(model, PooledClassifier) else model.distilbert.transformer.layer
        )
        assert "forward" not in vars(layers[-1])
