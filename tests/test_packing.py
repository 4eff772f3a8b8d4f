"""Packed (unpadded) batches give the padded model's logits and gradients, texts in one packed
row never see each other, and the collator packs only the batches where packing pays."""

import copy
import itertools

import pytest
import torch
from transformers import AttentionInterface

from distsent import packing
from distsent.batching import PackingCollator, PadCollator
from distsent.cpu_training import use_cpu_dropout
from distsent.first_token import use_first_token_last_layer
from distsent.packing import min_padding_to_pack, model_inputs, packed_position_offset, use_packed_attention
from tests.test_first_token import tiny_classifier

LENGTHS = [6, 11, 3, 9]


def examples(lengths=LENGTHS, seed: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": [2, *torch.randint(5, 1000, (n - 1,), generator=generator).tolist()], "label": i % 3}
        for i, n in enumerate(lengths)
    ]


def packed_copy(model, cpu_attention: bool = False):
    """`model` as distsent trains it packed: [CLS]-only last layer, CPU dropout if asked, packing."""
    packed = copy.deepcopy(model)
    assert use_first_token_last_layer(packed)
    if cpu_attention:
        use_cpu_dropout(packed)
    use_packed_attention(packed)
    return packed


def pack(model, batch: list[dict]) -> dict:
    collate = PackingCollator(model.config.pad_token_id, packed_position_offset(model), min_padding=0.0)
    packed = collate(batch)
    assert "cu_seq_lens" in packed
    return packed


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "cpu_training"])
@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "camembert", "electra"])
def test_packed_logits_and_gradients_match_padded(model_type, kernel):
    padded_model = tiny_classifier(model_type, "sdpa" if kernel == "cpu_training" else kernel).eval()
    packed_model = packed_copy(padded_model, cpu_attention=kernel == "cpu_training")
    batch = examples()
    expected = padded_model(**model_inputs(PadCollator(padded_model.config.pad_token_id)(batch))).logits
    logits = packed_model(**model_inputs(pack(packed_model, batch))).logits
    assert logits.shape == expected.shape == (len(LENGTHS), 3)
    assert torch.allclose(logits, expected, atol=1e-6), (logits - expected).abs().max()
    expected.square().sum().backward()
    logits.square().sum().backward()
    for (name, reference), (_, parameter) in zip(
        padded_model.named_parameters(), packed_model.named_parameters(), strict=True
    ):
        if reference.grad is not None:
            assert torch.allclose(parameter.grad, reference.grad, atol=1e-6), name


def test_padded_batches_still_work_after_packing_is_enabled():
    # Evaluation stays padded; the wrapped kernel must take those batches as before.
    model = tiny_classifier("roberta").eval()
    packed_model = packed_copy(model)
    batch = model_inputs(PadCollator(model.config.pad_token_id)(examples()))
    assert torch.equal(packed_model(**batch).logits, model(**batch).logits)


def test_texts_in_one_packed_row_do_not_see_each_other_in_training():
    # Training mode with dropout and distsent's CPU attention: changing the tokens of text 0
    # changes its logits only. Same lengths and seed, so every dropout mask is the same.
    model = packed_copy(tiny_classifier("bert", dropout=0.1), cpu_attention=True).train()
    first, second = examples(seed=3), examples(seed=3)
    second[0]["input_ids"] = [2, *reversed(second[0]["input_ids"][1:])]
    logits = []
    for batch in (first, second):
        torch.manual_seed(7)
        logits.append(model(**model_inputs(pack(model, batch))).logits)
    assert not torch.allclose(logits[0][0], logits[1][0])
    assert torch.equal(logits[0][1:], logits[1][1:])


def test_collator_packs_only_batches_with_more_padding_than_the_threshold():
    collate = PackingCollator(pad_token_id=0, position_offset=2, min_padding=0.1)
    assert not collate.packs([10, 10, 9])  # 1 of 30 positions would be padding
    assert not collate.packs([10, 10, 7])  # 3 of 30: at the threshold, not over it
    assert collate.packs([10, 10, 6])  # 4 of 30
    assert "attention_mask" in collate(examples([10, 10, 9]))
    batch = collate(examples([3, 5, 2]))
    assert batch["input_ids"].shape == (1, 10)
    assert batch["position_ids"].tolist() == [[2, 3, 4, 2, 3, 4, 5, 6, 2, 3]]
    assert batch["cu_seq_lens"].dtype == torch.int32  # what FlashAttention's varlen kernels take
    assert batch["cu_seq_lens"].tolist() == [0, 3, 8, 10]
    assert batch["max_length"] == 5
    assert batch["labels"].tolist() == [0, 1, 2]
    assert packing.real_tokens(batch) == 10


def test_position_ids_start_where_each_architecture_counts_from():
    assert packed_position_offset(tiny_classifier("bert")) == 0
    assert packed_position_offset(tiny_classifier("electra")) == 0
    roberta = tiny_classifier("roberta")
    assert packed_position_offset(roberta) == roberta.config.pad_token_id + 1


def test_packing_threshold_is_zero_only_for_kernels_that_read_packed_inputs_natively():
    assert min_padding_to_pack(tiny_classifier("bert"), None) == packing.WRAPPED_MIN_PADDING
    flash = tiny_classifier("bert")
    flash.config._attn_implementation = "flash_attention_2"
    assert min_padding_to_pack(flash, None) == 0.0
    assert min_padding_to_pack(flash, 0.3) == 0.3


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """FlashAttention's varlen contract in plain torch: [1, heads, tokens, head size] in,
    [1, query tokens, heads, head size] out, texts cut by cu_seq_lens_q / cu_seq_lens_k."""
    assert attention_mask is None and dropout == 0.0
    cu_q, cu_k = kwargs["cu_seq_lens_q"].tolist(), kwargs["cu_seq_lens_k"].tolist()
    queries, keys = list(itertools.pairwise(cu_q)), list(itertools.pairwise(cu_k))
    assert max(end - start for start, end in queries) == kwargs["max_length_q"]
    outputs = []
    for (q0, q1), (k0, k1) in zip(queries, keys, strict=True):
        scores = query[0, :, q0:q1] @ key[0, :, k0:k1].transpose(1, 2) * scaling
        outputs.append((scores.softmax(-1) @ value[0, :, k0:k1]).transpose(0, 1))
    return torch.cat(outputs).unsqueeze(0), None


def test_natively_packed_kernels_get_the_varlen_arguments_unwrapped(monkeypatch):
    # Stands in for flash_attention_2 (no GPU here): the [CLS]-only last layer must hand such a
    # kernel one query per text, with matching cumulative lengths.
    AttentionInterface.register("test_varlen", varlen_reference)
    monkeypatch.setattr(packing, "NATIVELY_PACKED", ("test_varlen",))
    padded_model = tiny_classifier("bert").eval()
    native = tiny_classifier("bert", attn_implementation="test_varlen").eval()
    native.load_state_dict(padded_model.state_dict())
    assert use_first_token_last_layer(native)
    use_packed_attention(native)
    assert native.config._attn_implementation == "test_varlen"  # not wrapped
    batch = examples()
    expected = padded_model(**model_inputs(PadCollator(0)(batch))).logits
    logits = native(**model_inputs(pack(native, batch))).logits
    assert torch.allclose(logits, expected, atol=1e-6), (logits - expected).abs().max()
