"""Holding aside the word-embedding rows no training text reads trains exactly as the whole
matrix does (to rounding), under fused AdamW with weight decay, and state_dict(), exports and
loading see the whole matrix under nn.Embedding's key (resumes: tests/test_resume.py)."""

import copy

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from distsent.clipping import clipping_divisor, gradient_norm, gradients_divided_in_step
from distsent.config import TrainConfig
from distsent.optim import build_optimizer
from distsent.training_rows import (
    TrainingRowsEmbedding,
    decay_held_aside_rows,
    token_ids_in,
    train_only_training_rows,
)
from tests.test_first_token import tiny_classifier

WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


def training_batches(steps: int = 6) -> list[dict[str, torch.Tensor]]:
    """Batches drawing tokens from 100 of the 1,000 ids, padded with id 0 (BERT's pad)."""
    generator = torch.Generator().manual_seed(3)
    seen = torch.randperm(1000, generator=generator)[:100]
    batches = []
    for _ in range(steps):
        input_ids = seen[torch.randint(0, 100, (4, 9), generator=generator)]
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 6:] = 0
        input_ids[1, 6:] = 0
        labels = torch.randint(0, 3, (4,), generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def train(model, batches, train_cfg: TrainConfig, held_aside: bool) -> None:
    optimizer = build_optimizer(train_cfg, model, fused=True)
    if held_aside:
        decay_held_aside_rows(model, optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        # As distsent clips on CPU: the norm first, the division inside the fused step.
        with gradients_divided_in_step(optimizer, clipping_divisor(gradient_norm(model.parameters()), 1.0)):
            optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def test_held_aside_rows_train_as_the_whole_matrix_does():
    batches = training_batches()
    whole = tiny_classifier("bert")
    held = copy.deepcopy(whole)
    seen = torch.unique(torch.cat([batch["input_ids"].flatten() for batch in batches]))
    assert train_only_training_rows(held, seen).held_aside_rows == 1000 - seen.numel()
    # A large decay and rate, so that decay of the held-aside rows is far from nothing.
    train_cfg = TrainConfig(lr=0.05, weight_decay=0.5)
    train(whole, batches, train_cfg, held_aside=False)
    train(held, batches, train_cfg, held_aside=True)

    expected, got = whole.state_dict(), held.state_dict()
    assert list(got) == list(expected)  # same keys, same order: exports are unchanged
    unseen = torch.ones(1000, dtype=torch.bool)
    unseen[seen] = False
    # The unseen rows moved (decay), and exactly as the whole matrix's AdamW moved them.
    initial = tiny_classifier("bert").state_dict()[WORD_EMBEDDINGS]
    assert not torch.allclose(expected[WORD_EMBEDDINGS][unseen], initial[unseen])
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_whole_matrix_round_trips_through_save_and_load(tmp_path):
    model = tiny_classifier("bert")
    original = model.state_dict()[WORD_EMBEDDINGS].clone()
    embedding = train_only_training_rows(model, torch.arange(10, 60))
    assert embedding is model.get_input_embeddings()
    assert isinstance(embedding, TrainingRowsEmbedding)
    torch.testing.assert_close(embedding.whole_weight(), original, rtol=0, atol=0)
    embedding._untrained.mul_(0.5)  # as if decayed
    halved = original.clone()
    halved[:10] *= 0.5
    halved[60:] *= 0.5
    halved[0] = original[0]  # the pad row is trained: padded batches read it
    torch.testing.assert_close(model.state_dict()[WORD_EMBEDDINGS], halved, rtol=0, atol=0)

    model.save_pretrained(tmp_path, safe_serialization=True)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(exported.state_dict()[WORD_EMBEDDINGS], halved, rtol=0, atol=0)

    # Loading the whole matrix back (a resume) restores it, decay folded in.
    fresh = tiny_classifier("bert")
    train_only_training_rows(fresh, torch.arange(10, 60))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.state_dict()[WORD_EMBEDDINGS], halved, rtol=0, atol=0)


def test_texts_with_unseen_tokens_read_their_rows():
    model = tiny_classifier("bert").eval()
    held = copy.deepcopy(model)
    train_only_training_rows(held, torch.arange(10, 60))
    input_ids = torch.tensor([[2, 15, 700, 999, 30]])  # 700 and 999 were held aside
    with torch.no_grad():
        torch.testing.assert_close(held(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_token_ids_in_a_tokenised_dataset():
    dataset = datasets.Dataset.from_dict({"input_ids": [[2, 5, 9, 3], [2, 9, 9, 7, 3]], "label": [0, 1]})
    assert token_ids_in(dataset).tolist() == [2, 3, 5, 7, 9]


def test_frozen_embeddings_are_left_alone():
    model = tiny_classifier("bert")
    model.get_input_embeddings().weight.requires_grad_(False)
    assert train_only_training_rows(model, torch.arange(10, 60)) is None
    assert type(model.get_input_embeddings()) is torch.nn.Embedding


def test_a_distsent_heads_encoder_is_changed_too():
    from distsent.config import ModelConfig
    from distsent.modeling import build_model

    model = build_model(ModelConfig(name="tiny-bert", head="mean", dropout=0.0), ["a", "b"], 1000)
    before = model.state_dict()
    embedding = train_only_training_rows(model, torch.arange(10, 60))
    assert embedding is not None and embedding.held_aside_rows > 0
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_a_matrix_of_another_size_is_refused_by_name():
    model = tiny_classifier("bert")
    train_only_training_rows(model, torch.arange(10, 60))
    state = model.state_dict()
    state[WORD_EMBEDDINGS] = torch.zeros(999, 32)
    with pytest.raises(RuntimeError, match="size mismatch for bert.embeddings.word_embeddings.weight"):
        model.load_state_dict(state)
