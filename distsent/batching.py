"""Batching: which examples each process sees, in which order, and how they are padded or packed.

The training order is a pure function of (seed, epoch), computed identically on every
rank, so sharding needs no communication and a resumed run can skip straight to any
optimizer step. One optimizer step consumes one *global batch* of
`micro_batch_size x world_size x grad_accum_steps` examples; the global batch is cut
into micro-batches and micro-batch `a * world_size + rank` goes to `rank` at
accumulation step `a`. So N processes see exactly the examples one process with the
same global batch sees (incomplete global batches at the end of an epoch are dropped).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from distsent.config import ConfigError

# Length grouping sorts within windows of this many global batches: enough to make
# batches homogeneous in length, few enough that every epoch still mixes the data.
GROUPING_WINDOW_BATCHES = 64


class TrainBatchPlan:
    """The per-epoch, per-rank sequence of micro-batches (lists of example indices)."""

    def __init__(
        self,
        lengths: Sequence[int],
        micro_batch_size: int,
        world_size: int,
        rank: int,
        grad_accum_steps: int,
        seed: int,
        length_grouping: bool,
    ) -> None:
        self.lengths = np.asarray(lengths)
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.length_grouping = length_grouping
        self.global_batch_size = micro_batch_size * world_size * grad_accum_steps
        self.steps_per_epoch = len(self.lengths) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set ({len(self.lengths)} examples) is smaller than one global batch "
                f"({self.global_batch_size} = {micro_batch_size} per process x {world_size} processes "
                f"x {grad_accum_steps} accumulation): lower train.batch_size or train.grad_accum_steps, "
                "run fewer processes, or give more training data"
            )

    def describe(self) -> str:
        text = (
            f"{self.global_batch_size} = {self.micro_batch_size} per process x {self.world_size} "
            f"process{'es' if self.world_size > 1 else ''} "
            f"x {self.grad_accum_steps} accumulation"
        )
        left_out = len(self.lengths) - self.steps_per_epoch * self.global_batch_size
        if left_out:
            text += (
                f"; each epoch leaves out {left_out} of {len(self.lengths):,} examples"
                " (the incomplete last global batch), a different random set each epoch"
            )
        return text

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches of an epoch, identical on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        size = self.global_batch_size
        usable = self.steps_per_epoch * size
        # The examples left out are chosen here, at random; cut after length grouping, they
        # would always be the shortest texts of the last window.
        order = rng.permutation(len(self.lengths))[:usable]
        if not self.length_grouping:
            return [order[i : i + size] for i in range(0, usable, size)]
        window = size * GROUPING_WINDOW_BATCHES
        batches = []
        for start in range(0, usable, window):
            chunk = order[start : start + window]
            # Longest first inside each window; a stable sort keeps ties in random order.
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
        # Shuffle batch order so lengths (and any label-length correlation) are not a trend.
        return [batches[i] for i in rng.permutation(len(batches))]

    def global_batch_sums(self, epoch: int, values: np.ndarray) -> list[float]:
        """For each optimizer step of `epoch`: the sum of `values` (one per example) over its global batch."""
        return [float(values[batch].sum()) for batch in self.global_batches(epoch)]

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches for `epoch`, beginning at optimizer step `start_step`."""
        mb = self.micro_batch_size
        for global_batch in self.global_batches(epoch)[start_step:]:
            for accum_index in range(self.grad_accum_steps):
                piece = accum_index * self.world_size + self.rank
                yield global_batch[piece * mb : (piece + 1) * mb].tolist()


def eval_shard(num_examples: int, world_size: int, rank: int) -> list[int]:
    """This rank's evaluation indices, padded with -1 so every rank runs the same number
    of forward passes (ZeRO-3 gathers parameters collectively in each one)."""
    per_rank = -(-num_examples // world_size)
    indices = list(range(rank, num_examples, world_size))
    return indices + [-1] * (per_rank - len(indices))


class PadCollator:
    """Pads a list of tokenised examples to the longest in the batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            attention_mask[row, : len(ids)] = 1
        labels = torch.as_tensor([e["label"] for e in examples], dtype=torch.long)
        # Known here, on the host; asked of the mask on a GPU, it would wait for the GPU.
        padded = any(len(e["input_ids"]) < longest for e in examples)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "padded": padded}

    def describe(self) -> str:
        return "padded to the longest text"


def packs(lengths: Sequence[int], min_padding: float | None, packed_positions: int | None = None) -> bool:
    """Whether a batch of texts of these lengths is packed: where padding them would add more
    than `min_padding` of the padded positions to the packed row's (`packed_positions`, the
    texts' total unless filled up to a bucketed length); always where `min_padding` is None."""
    positions = max(lengths) * len(lengths)
    packed_positions = sum(lengths) if packed_positions is None else packed_positions
    return min_padding is None or positions - packed_positions > min_padding * positions


# The smallest step between bucketed lengths: AMX tiles and vector registers take rows in 16s.
BUCKET_STEP_MIN = 16


def bucketed_length(tokens: int) -> int:
    """`tokens` rounded up to a multiple of 16 up to 512, of 32 up to 1,024, of 64 up to 2,048,
    ...: 16 lengths per doubling from 256 on, and at most 15 tokens or 1/16 more, whichever is
    larger.

    On CPU, oneDNN builds a kernel for each new shape of a matrix product and keeps the last
    1,024 it built. Packed rows have a new length nearly every step: in the first 150 steps of
    a MiniLM-L6 run on 2 cores, building kernels took 2.0 s of 26 s. Bucketed, a run has a few
    dozen lengths, builds each one's kernels once (0.9 s, then almost none), and runs about 8%
    faster (bench/RESULTS.md, "Nineteenth session")."""
    step = max(BUCKET_STEP_MIN, 1 << max(tokens.bit_length() - 5, 0))
    return -(-tokens // step) * step


class PackingCollator:
    """Concatenates a batch's tokenised examples into one packed row (packing.py), or pads them
    where `packs` says no: with the wrapped attention kernels packing costs a few index copies
    per layer, which cost more than a little padding (bench/RESULTS.md).

    `position_offset` is where the model's position ids start: 0 for BERT and ELECTRA,
    padding index + 1 for RoBERTa and its kin, as their embeddings count.

    `bucket_lengths` fills each packed row up to its `bucketed_length` with filler tokens after
    the last text. They belong to no text: `cu_seq_lens` ends before them, attention keeps them
    out of every text's keys (packing.py), no classifier reads them, and so their gradients
    are zero."""

    def __init__(
        self, pad_token_id: int, position_offset: int, min_padding: float | None, bucket_lengths: bool = False
    ) -> None:
        self.pad = PadCollator(pad_token_id)
        self.pad_token_id = pad_token_id
        self.position_offset = position_offset
        self.min_padding = min_padding
        self.bucket_lengths = bucket_lengths

    def describe(self) -> str:
        if self.min_padding is None:
            text = "packed (train.unpad)"
        else:
            text = f"packed where that saves over {self.min_padding:.1%} of the positions, else padded (train.unpad)"
        return text + (", packed rows filled up to bucketed lengths" if self.bucket_lengths else "")

    def packed_row_length(self, lengths: Sequence[int]) -> int | None:
        """The length of the row texts of these lengths are packed into, filler included, or
        None where they are padded instead."""
        row_length = bucketed_length(sum(lengths)) if self.bucket_lengths else sum(lengths)
        return row_length if packs(lengths, self.min_padding, row_length) else None

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        row_length = self.packed_row_length(lengths)
        if row_length is None:
            return self.pad(examples)
        filler = row_length - sum(lengths)
        input_ids = torch.cat(
            [
                *(torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples),
                torch.full((filler,), self.pad_token_id, dtype=torch.long),
            ]
        )
        # Filler tokens take a text's first position: any position the model has would do.
        positions = torch.cat([*(torch.arange(n) for n in lengths), torch.zeros(filler, dtype=torch.long)])
        positions += self.position_offset
        cumulative = torch.zeros(len(examples) + 1, dtype=torch.int32)
        torch.cumsum(torch.as_tensor(lengths), dim=0, out=cumulative[1:])
        return {
            "input_ids": input_ids.unsqueeze(0),
            "position_ids": positions.unsqueeze(0),
            # int32: FlashAttention's varlen kernels take no other type.
            "cu_seq_lens": cumulative,
            "labels": torch.as_tensor([e["label"] for e in examples], dtype=torch.long),
            # A host int: kernels size their work by it, and reading it from the device would wait.
            "max_length": max(lengths),
        }
