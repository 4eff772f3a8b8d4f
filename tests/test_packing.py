"""Packed (unpadded) batches give the padded model's logits and gradients (the `cls` head with its
[CLS]-only last layer, and the `mean` head), with or without filler up to a bucketed length;
texts in one packed row never see each other, and the collator packs only the batches where
packing pays."""

import copy
import itertools

import pytest
import torch
from transformers import AutoConfig, AutoModel

from distsent import packing
from distsent.batching import PackingCollator, PadCollator, bucketed_length, packs
from distsent.cpu_training import use_cpu_dropout
from distsent.first_token import use_first_token_last_layer
from distsent.modeling import PooledClassifier
from distsent.packing import (
    model_inputs,
    packed_position_offset,
    reads_packed_batches,
    use_packed_attention,
    use_packing,
)
from tests.test_first_token import TINY, tiny_classifier

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


def pack(model, batch: list[dict], bucket_lengths: bool = False) -> dict:
    collate = PackingCollator(
        model.config.pad_token_id, packed_position_offset(model), min_padding=0.0, bucket_lengths=bucket_lengths
    )
    packed = collate(batch)
    assert "cu_seq_lens" in packed
    return packed


def assert_packed_matches_padded(padded_model, packed_model, bucket_lengths: bool = False) -> None:
    """The same texts, padded through one model and packed through its packing copy: logits
    and every parameter's gradient within 1e-6."""
    batch = examples()
    expected = padded_model(**model_inputs(PadCollator(padded_model.config.pad_token_id)(batch))).logits
    packed = pack(packed_model, batch, bucket_lengths)
    # LENGTHS total 29 tokens: bucketed, the row is 32, three of them filler.
    assert packed["input_ids"].size(1) == (32 if bucket_lengths else sum(LENGTHS))
    logits = packed_model(**model_inputs(packed)).logits
    assert logits.shape == expected.shape == (len(LENGTHS), 3)
    assert torch.allclose(logits, expected, atol=1e-6), (logits - expected).abs().max()
    expected.square().sum().backward()
    logits.square().sum().backward()
    for (name, reference), (_, parameter) in zip(
        padded_model.named_parameters(), packed_model.named_parameters(), strict=True
    ):
        if reference.grad is not None:
            assert torch.allclose(parameter.grad, reference.grad, atol=1e-6), name


@pytest.mark.parametrize("bucket_lengths", [False, True], ids=["exact", "bucketed"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager", "cpu_training"])
@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "camembert", "electra"])
def test_packed_logits_and_gradients_match_padded(model_type, kernel, bucket_lengths):
    padded_model = tiny_classifier(model_type, "sdpa" if kernel == "cpu_training" else kernel).eval()
    packed_model = packed_copy(padded_model, cpu_attention=kernel == "cpu_training")
    assert_packed_matches_padded(padded_model, packed_model, bucket_lengths)


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
    assert not packs([10, 10, 9], min_padding=0.1)  # 1 of 30 positions would be padding
    assert packs([10, 10, 6], min_padding=0.1)  # 4 of 30
    assert not packs([10, 10, 10], min_padding=0.0)
    assert packs([10, 10, 10], min_padding=None)
    collate = PackingCollator(pad_token_id=0, position_offset=2, min_padding=0.1)
    assert "attention_mask" in collate(examples([10, 10, 9]))
    batch = collate(examples([3, 5, 2]))
    assert batch["input_ids"].shape == (1, 10)
    assert batch["position_ids"].tolist() == [[2, 3, 4, 2, 3, 4, 5, 6, 2, 3]]
    assert batch["cu_seq_lens"].dtype == torch.int32  # what FlashAttention's varlen kernels take
    assert batch["cu_seq_lens"].tolist() == [0, 3, 8, 10]
    assert batch["max_length"] == 5
    assert batch["labels"].tolist() == [0, 1, 2]
    assert packing.real_tokens(batch) == 10


def test_bucketed_lengths_add_at_most_15_tokens_or_a_sixteenth_and_take_few_values():
    for tokens in range(1, 20_000):
        bucketed = bucketed_length(tokens)
        assert bucketed % 16 == 0 and tokens <= bucketed < tokens + max(16, tokens / 16), tokens
    # 16 lengths per doubling: the packed rows of a long run take a few dozen shapes.
    assert len({bucketed_length(n) for n in range(513, 1025)}) == 16
    assert len({bucketed_length(n) for n in range(100, 5000)}) <= 16 * 6


def test_collator_fills_packed_rows_up_to_the_bucketed_length_with_filler_of_no_text():
    collate = PackingCollator(pad_token_id=1, position_offset=2, min_padding=None, bucket_lengths=True)
    batch = collate(examples([3, 5, 2]))
    assert batch["input_ids"].shape == (1, 16)
    assert batch["input_ids"][0, 10:].tolist() == [1] * 6
    assert batch["position_ids"].tolist() == [[2, 3, 4, 2, 3, 4, 5, 6, 2, 3] + [2] * 6]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 8, 10]  # the texts end where the filler starts
    assert packing.real_tokens(batch) == 10
    # Packing is chosen by the positions actually run: 15 padded against 16 packed here, and
    # 40 padded against 48 (36 tokens bucketed) below.
    assert "attention_mask" in PackingCollator(1, 2, min_padding=0.0, bucket_lengths=True)(examples([3, 5, 2]))
    assert bucketed_length(36) == 48
    assert not packs([10, 10, 10, 6], 0.0, packed_positions=48)
    assert bucketed_length(64) == 64  # 80 padded against 64 packed: 20% saved
    assert packs([20, 20, 20, 4], 0.1, packed_positions=64)
    assert not packs([20, 20, 20, 4], 0.25, packed_positions=64)


def test_filler_is_bucketed_on_cpu_for_wrapped_kernels_only():
    assert use_packing(tiny_classifier("bert"), 0, None, on_cpu=True).bucket_lengths
    assert not use_packing(tiny_classifier("bert"), 0, None, on_cpu=False).bucket_lengths
    flash = tiny_classifier("bert")
    flash.config._attn_implementation = "flash_attention_2"
    # FlashAttention's varlen kernels would leave the filler's outputs unwritten.
    assert not use_packing(flash, 0, None, on_cpu=True).bucket_lengths


def test_position_ids_start_where_each_architecture_counts_from():
    assert packed_position_offset(tiny_classifier("bert")) == 0
    assert packed_position_offset(tiny_classifier("electra")) == 0
    roberta = tiny_classifier("roberta")
    assert packed_position_offset(roberta) == roberta.config.pad_token_id + 1


def test_packing_threshold_is_set_only_for_wrapped_kernels():
    assert use_packing(tiny_classifier("bert"), 0, None).min_padding == packing.WRAPPED_MIN_PADDING
    assert use_packing(tiny_classifier("bert"), 0, 0.3).min_padding == 0.3
    flash = tiny_classifier("bert")
    flash.config._attn_implementation = "flash_attention_2"
    assert use_packing(flash, 0, None).min_padding is None


def test_attention_dropout_draws_the_same_masks_packed_as_padded():
    # Training mode through distsent's CPU attention with dropout: the padded block has the
    # padded batch's shape, so the same seed draws the same masks. Hidden dropout is off: its
    # masks have the packed row's shape, not the padded batch's.
    model = tiny_classifier("bert")
    model.config.attention_probs_dropout_prob = 0.2
    for layer in model.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.2
    padded_model = copy.deepcopy(model)
    assert use_first_token_last_layer(padded_model)
    use_cpu_dropout(padded_model)
    packed_model = packed_copy(model, cpu_attention=True)
    batch = examples()
    logits = []
    for network, inputs in ((padded_model, PadCollator(0)(batch)), (packed_model, pack(packed_model, batch))):
        torch.manual_seed(11)
        logits.append(network.train()(**model_inputs(inputs)).logits)
    evaluated = packed_model.eval()(**model_inputs(pack(packed_model, batch))).logits
    assert not torch.allclose(logits[1], evaluated)  # dropout did act
    assert torch.allclose(logits[1], logits[0], atol=1e-6), (logits[1] - logits[0]).abs().max()


def varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract in plain torch: [tokens, heads, head size] in and out,
    texts cut by the int32 cumulative lengths."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and not causal
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    queries, keys = list(itertools.pairwise(cu_q)), list(itertools.pairwise(cu_k))
    assert max(end - start for start, end in queries) == max_seqlen_q
    assert max(end - start for start, end in keys) == max_seqlen_k
    outputs = []
    for (q0, q1), (k0, k1) in zip(queries, keys, strict=True):
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], k[k0:k1]) * softmax_scale
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[k0:k1]))
    return torch.cat(outputs)


def test_flash_attention_gets_packed_inputs_unwrapped(monkeypatch):
    # flash-attn needs a GPU; transformers' own flash_attention_2 path runs here with a plain
    # torch varlen kernel in its place, so the arguments distsent hands it are checked.
    from transformers import modeling_flash_attention_utils as flash_utils

    kernels = (None, varlen_reference, None, None, None)
    processing = (flash_utils._lazy_define_process_function(varlen_reference), dict)
    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", lambda *args, **kwargs: (kernels, processing))
    padded_model = tiny_classifier("bert").eval()
    flash = copy.deepcopy(padded_model)
    flash.config._attn_implementation = "flash_attention_2"
    assert use_first_token_last_layer(flash)
    collate = use_packing(flash, 0, min_padding=None)
    assert flash.config._attn_implementation == "flash_attention_2"  # not wrapped
    batch = examples([5, 5, 5, 5])
    packed = collate(batch)  # packed even without padding: FlashAttention needs no mask then
    assert "cu_seq_lens" in packed
    expected = padded_model(**model_inputs(PadCollator(0)(batch))).logits
    logits = flash(**model_inputs(packed)).logits
    assert torch.allclose(logits, expected, atol=1e-6), (logits - expected).abs().max()
    batch = examples()
    expected = padded_model(**model_inputs(PadCollator(0)(batch))).logits
    logits = flash(**model_inputs(collate(batch))).logits
    assert torch.allclose(logits, expected, atol=1e-6), (logits - expected).abs().max()


def tiny_pooled_classifier(model_type: str, head: str, attn_implementation: str = "sdpa") -> PooledClassifier:
    config = AutoConfig.for_model(model_type, **TINY, intermediate_size=64, hidden_dropout_prob=0.0)
    config.attention_probs_dropout_prob = 0.0
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return PooledClassifier(AutoModel.from_config(config), head, num_outputs=3, dropout=0.0)


@pytest.mark.parametrize("bucket_lengths", [False, True], ids=["exact", "bucketed"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager", "cpu_training"])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_mean_head_on_packed_batches_matches_padded(model_type, kernel, bucket_lengths):
    padded_model = tiny_pooled_classifier(model_type, "mean", "sdpa" if kernel == "cpu_training" else kernel).eval()
    packed_model = copy.deepcopy(padded_model)
    assert reads_packed_batches(packed_model, first_token_only=False)
    if kernel == "cpu_training":
        use_cpu_dropout(packed_model)
    use_packed_attention(packed_model)
    assert_packed_matches_padded(padded_model, packed_model, bucket_lengths)


def test_packed_batches_of_new_lengths_do_not_recompile_compiled_layers():
    # train.compile compiles each layer for dynamic shapes. A guard on a batch's shape (the
    # padded block's size, say) would recompile at every new length until dynamo gives up and
    # runs the layers uncompiled: tests of results cannot see that, a count of graphs can.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = packed_copy(tiny_classifier("bert")).eval()
    layers = model.bert.encoder.layer
    for index, layer in enumerate(layers):
        layers[index] = torch.compile(layer, backend="eager", dynamic=True)
    counters.clear()
    for step in range(10):
        batch = pack(model, examples([3 + step, 20, 30 + 2 * step, 10]), bucket_lengths=True)
        model(**model_inputs(batch))
    # The first shapes are specialised, then one dynamic graph each for the layer types.
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_mean_head_averages_each_text_of_a_packed_row_over_its_own_tokens():
    # With bf16 states the packed mean is summed in fp32 and rounded once, like the padded one.
    model = tiny_pooled_classifier("bert", "mean").eval()
    use_packed_attention(model)
    batch = examples()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = model(**model_inputs(PadCollator(model.config.pad_token_id)(batch))).logits
        packed = model(**model_inputs(pack(model, batch))).logits
    assert torch.allclose(packed.float(), padded.float(), atol=2e-2)


def test_cnn_head_plain_cls_head_and_unlisted_encoders_stay_padded():
    cnn = tiny_pooled_classifier("bert", "cnn")
    assert not reads_packed_batches(cnn, first_token_only=False)
    with pytest.raises(ValueError, match="cnn head cannot read packed batches"):
        cnn(**model_inputs(pack(cnn, examples())))
    assert not reads_packed_batches(tiny_classifier("distilbert"), first_token_only=False)
    # An encoder whose attention is its own (relative positions) might drop the lengths.
    assert not reads_packed_batches(tiny_pooled_classifier("deberta-v2", "mean", "eager"), first_token_only=False)


@pytest.mark.parametrize("head", ["cls", "mean", "cnn"])
def test_texts_of_one_length_go_without_a_mask_and_score_as_with_it(head):
    # The mask of texts of one length is all ones; left out, transformers need not look at it
    # (a wait for the GPU, at every forward). The logits are those with the mask.
    if head == "cls":
        model = packed_copy(tiny_classifier("bert")).eval()
    else:
        model = tiny_pooled_classifier("bert", head).eval()
    collate = PadCollator(model.config.pad_token_id)
    same_length = collate(examples([7, 7, 7]))
    inputs = model_inputs(same_length)
    assert not same_length["padded"] and inputs["attention_mask"] is None
    with_mask = {**inputs, "attention_mask": same_length["attention_mask"]}
    assert torch.allclose(model(**inputs).logits, model(**with_mask).logits, atol=1e-6)
    padded = collate(examples([7, 5, 7]))
    assert padded["padded"] and torch.equal(model_inputs(padded)["attention_mask"], padded["attention_mask"])
