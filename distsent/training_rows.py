"""Word-embedding rows of tokens the training texts never hold, kept out of the optimizer.

Fine-tuning reads the word-embedding rows of the tokens in its training texts and no others:
Rotten Tomatoes' 7,677 training texts hold 12,503 of MiniLM's 30,522 WordPiece tokens. The
other rows' gradients are exactly zero at every step, so their Adam moments stay zero and
AdamW's update of such a row is its weight decay alone, row x (1 - lr x weight_decay). Yet
the fused AdamW, the gradient's zero-fill and the gradient norm pass over all 11.7M values of
the matrix every step, a tenth of a CPU step.

`TrainingRowsEmbedding` trains the training tokens' rows as one compact parameter and keeps
the others aside, multiplied by AdamW's decay factor after each optimizer step (one pass over
them, instead of AdamW's, the zero-fill's and the norm's). Its state_dict() and
load_state_dict() hold the whole matrix in the original order under nn.Embedding's key, so
checkpoints, resumes and exports are unchanged. In the profile harness's step on the 2-core
AMX VM: 127.7 against 134.3 ms (bench/RESULTS.md, twenty-second session).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from distsent.packing import transformers_model

log = logging.getLogger("distsent")


def token_ids_in(train_set) -> torch.Tensor:
    """The distinct token ids of a tokenised dataset's input_ids, read from its Arrow column."""
    column = train_set.data.column("input_ids").combine_chunks()
    return torch.from_numpy(np.unique(column.flatten().to_numpy()))


class TrainingRowsEmbedding(nn.Module):
    """nn.Embedding whose rows outside `training_ids` are held aside, with their weight decay.

    Texts with other tokens (evaluation, prediction) still read every row, decay applied."""

    def __init__(self, embedding: nn.Embedding, training_ids: torch.Tensor) -> None:
        super().__init__()
        weight = embedding.weight.detach()
        trained = torch.zeros(weight.size(0), dtype=torch.bool, device=weight.device)
        trained[training_ids.to(weight.device)] = True
        if embedding.padding_idx is not None:
            trained[embedding.padding_idx] = True  # padded and packed rows' filler read it
        # slot: a row's place in cat([trained rows, the rest]); plain tensors, not buffers, so
        # DDP does not broadcast them every step and state_dict() does not hold them.
        self._order = torch.cat([trained.nonzero().flatten(), (~trained).nonzero().flatten()])
        self._slot_of = torch.empty_like(self._order)
        self._slot_of[self._order] = torch.arange(self._order.numel(), device=weight.device)
        self.trained = nn.Parameter(weight[trained].clone())
        self._untrained = weight[~trained].clone()
        self.padding_idx = embedding.padding_idx
        # Where the padding row sits among the slots, for F.embedding (fixed, like the slots).
        self._padding_slot = None if self.padding_idx is None else int(self._slot_of[self.padding_idx])
        self._register_state_dict_hook(_whole_matrix_state)
        self._register_load_state_dict_pre_hook(_split_whole_matrix, with_module=True)

    @property
    def num_embeddings(self) -> int:
        return self._order.numel()

    @property
    def held_aside_rows(self) -> int:
        return self._untrained.size(0)

    def whole_weight(self) -> torch.Tensor:
        """The matrix nn.Embedding would hold, in token-id order (no gradient)."""
        return torch.cat([self.trained.detach(), self._untrained])[self._slot_of]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slots = self._slot_of[input_ids]
        table = self.trained
        if bool((slots >= self.trained.size(0)).any()):  # a token training never saw
            table = torch.cat([self.trained, self._untrained])
        return functional.embedding(slots, table, self._padding_slot)

    def decay_after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Decay the held-aside rows as AdamW decayed the trained rows' group in the step just
        taken. Applied now, not folded into a factor for later: a checkpoint then holds the
        rows as they are, and a resumed run continues bit for bit as an uninterrupted one."""
        group = next(g for g in optimizer.param_groups if any(p is self.trained for p in g["params"]))
        if group["weight_decay"]:
            self._untrained.mul_(1 - group["lr"] * group["weight_decay"])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.trained.size(1)}, trained rows={self.trained.size(0)}"


def _whole_matrix_state(module: TrainingRowsEmbedding, state_dict: dict, prefix: str, local_metadata) -> None:
    del state_dict[prefix + "trained"]
    state_dict[prefix + "weight"] = module.whole_weight()


def _split_whole_matrix(module: TrainingRowsEmbedding, state_dict: dict, prefix: str, *args) -> None:
    weight = state_dict.get(prefix + "weight")
    if weight is None:
        return  # load_state_dict reports the missing key
    expected = (module.num_embeddings, module.trained.size(1))
    if tuple(weight.shape) != expected:
        error_messages = args[-1]  # load_state_dict's, reported with the rest
        error_messages.append(
            f"size mismatch for {prefix}weight: the checkpoint's is {tuple(weight.shape)}, the model's {expected}"
        )
        return
    del state_dict[prefix + "weight"]
    weight = weight.to(module.trained.device)
    ordered = weight[module._order]
    trained = module.trained.size(0)
    state_dict[prefix + "trained"] = ordered[:trained]
    module._untrained = ordered[trained:].to(module.trained.dtype).clone()


def train_only_training_rows(model: nn.Module, training_ids: torch.Tensor) -> TrainingRowsEmbedding | None:
    """Replace `model`'s trainable word-embedding nn.Embedding with a `TrainingRowsEmbedding`
    over `training_ids` and return it (None: nothing changed). Call before the optimizer is
    built, then `decay_held_aside_rows` with it."""
    owner = transformers_model(model)  # the classifier, or the encoder inside a distsent head
    embeddings = owner.get_input_embeddings()
    if type(embeddings) is not nn.Embedding or not embeddings.weight.requires_grad:
        return None
    if embeddings.max_norm is not None or embeddings.scale_grad_by_freq or embeddings.sparse:
        return None
    replacement = TrainingRowsEmbedding(embeddings, training_ids)
    owner.set_input_embeddings(replacement)
    log.debug(
        "word embeddings: %d rows trained, %d held aside", replacement.trained.size(0), replacement.held_aside_rows
    )
    return replacement


def decay_held_aside_rows(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """After each step of `optimizer` (the torch optimizer itself, not a wrapper), give the rows
    `train_only_training_rows` held aside the weight decay AdamW gave the trained ones."""
    for module in model.modules():
        if isinstance(module, TrainingRowsEmbedding):
            optimizer.register_step_post_hook(lambda opt, args, kwargs, module=module: module.decay_after_step(opt))
