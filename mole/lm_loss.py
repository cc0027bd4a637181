"""The LM loss: one definition for every batch layout, accumulation and number of ranks.

The loss of an optimizer step is the mean token loss over *all* answer tokens of the global batch
(every micro-batch of the accumulation window on every rank), as if it were one large batch. A
per-micro-batch mean would weight a token by how few answer tokens share its micro-batch, so padded,
length-grouped and packed batches (and any ``grad_accum``) would train on different objectives.

Each micro-batch therefore returns ``sum of its answer-token losses / normaliser`` with
``normaliser = global answer tokens / (grad_accum * world_size)``: DeepSpeed divides the loss by
``grad_accum`` and averages gradients over ranks, which this undoes, so the accumulated gradient is
exactly the gradient of the global mean. The global count is one all-reduce before the window
(:func:`window_normaliser`). A micro-batch skipped for a non-finite loss (``train.on_nonfinite=skip``)
is replaced on every rank and the window counted again with its replacement, so the micro-batches
trained from then on are normalised by the tokens the window trains; those already backpropagated
before the skip keep the first count (their gradients are accumulated inside DeepSpeed already), so
the window's LM gradient is exact when the skipped micro-batch is its first, and off by the ratio of
the two counts for the micro-batches before a later one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mole.data.conversation import IGNORE_INDEX

LM_LOSS_VERSION = 2
"""What the training LM loss means: 1, each micro-batch's own mean (before this module); 2, the global
batch's mean. Results trained under another version are not comparable (the conflict experiment keys
its cached runs by it)."""


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of a (batch, seq) label tensor are predicted: position t predicts label t+1."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of next-token cross-entropies over the answer tokens, in fp32.

    ``logits``: (batch, seq, vocab); ``labels``: (batch, seq), ``IGNORE_INDEX`` where nothing is
    predicted. Same token losses as transformers' ``ForCausalLMLoss`` (shift by one, upcast)."""
    logits = logits[:, :-1].flatten(0, 1).float()  # (batch * (seq-1), vocab)
    return F.cross_entropy(logits, labels[:, 1:].flatten().to(logits.device), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def window_normaliser(batches: list[dict], grad_accum: int) -> float:
    """The ``normaliser`` of one accumulation window whose micro-batches on this rank are ``batches``:
    the answer tokens of every rank's window (one all-reduce; a collective every rank issues) divided
    by ``grad_accum * world_size``. At least one token, so an all-prompt window gives a zero loss."""
    count = torch.tensor([float(sum(int(answer_tokens(b["labels"])) for b in batches))], dtype=torch.float64)
    world = 1
    if dist.is_initialized():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return max(count.item(), 1.0) / (grad_accum * world)
