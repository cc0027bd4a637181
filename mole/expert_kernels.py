"""The hand-written autograd functions behind :class:`mole.experts.LoraExperts` and :class:`mole.experts.MoleMLP`.

Written out by hand because plain indexing and autograd would spend most of a MoLE layer's extra cost
on bookkeeping rather than on the experts' matmuls: autograd through ``lora_A[e]`` zero-fills a whole
(K, ...) gradient for every expert it indexes, ``torch.cat`` of per-expert pieces and its split
backward copy every (tokens, out) delta again, scaling the delta (rather than the rank-r intermediate)
costs elementwise passes over (tokens, out) per projection, and the backward of ``x[perm]`` must
zero-fill and scatter-add because it cannot know ``perm`` is a permutation. Here every expert's
product writes straight into its rows of one preallocated tensor, in forward and backward, and the
permutation's gradient is a gather. ``docs/performance.md`` ("Optimisations") has the measured effect.

Two dispatches with the same maths: :class:`SortedLora` loops over experts on host-side row slices
(CPU and older GPUs); :class:`GroupedLora` runs ``torch._grouped_mm`` over device-side offsets (bf16 on
Hopper and newer, no host sync). Tokens arrive sorted by expert: expert ``e`` owns one contiguous block
of rows.
"""

from __future__ import annotations

import torch


def sorted_lora(x, base, lora_a, lora_b, token_scale, slices, scaling):
    """``base += s_t * B_e A_e x_t`` row slice by row slice (the forward of :class:`SortedLora`), with
    ``s_t`` = ``token_scale`` or else ``scaling``; also returns the rank-r intermediates ``h`` and
    ``hs = h * s`` and the scale ``s`` used."""
    # x: (tokens, in) sorted by expert; base: (tokens, out); lora_a: (K, r, in); lora_b: (K, out, r)
    used = [(e, rows) for e, rows in enumerate(slices) if rows.stop > rows.start]  # a decoded token uses one
    h = x.new_empty(x.shape[0], lora_a.shape[1])  # (tokens, r)
    for e, rows in used:
        torch.mm(x[rows], lora_a[e].t(), out=h[rows])
    scale = scaling if token_scale is None else token_scale  # (tokens, 1)
    hs = h * scale
    for e, rows in used:
        base[rows].addmm_(hs[rows], lora_b[e].t())
    return base, h, hs, scale


def grouped_lora(x, base, lora_a, lora_b, token_scale, offsets, scaling):
    """:func:`sorted_lora` as two grouped GEMMs over the device-side ``offsets`` (forward of :class:`GroupedLora`)."""
    h = torch._grouped_mm(x, lora_a.transpose(1, 2), offs=offsets)  # (tokens, r)
    scale = scaling if token_scale is None else token_scale
    hs = h * scale
    base.add_(torch._grouped_mm(hs, lora_b.transpose(1, 2), offs=offsets))
    return base, h, hs, scale


class SortedLora(torch.autograd.Function):
    """``base + s_t * B_e A_e x_t`` for tokens sorted by expert, with hand-written backward.

    Expert ``e`` owns rows ``slices[e]``. Every matmul writes its result straight
    into its rows of one preallocated tensor (``torch.mm(out=...)`` / ``addmm_``), and the token
    weights and scaling are applied to the rank-r intermediate, not to the (tokens, out) delta, so no
    pass over a (tokens, out) tensor is spent on concatenation, scaling or the residual add, and the
    stacked weights' gradients are written per expert with no zero-filled (K, ...) intermediates.
    An expert with no tokens gets an exact zero gradient (a matmul over an empty slice).
    """

    @staticmethod
    def forward(ctx, x, base, lora_a, lora_b, token_scale, slices, scaling):
        base, h, hs, scale = sorted_lora(x, base, lora_a, lora_b, token_scale, slices, scaling)
        ctx.mark_dirty(base)
        ctx.slices, ctx.scaling, ctx.weighted = slices, scaling, token_scale is not None
        ctx.save_for_backward(x, h, hs, lora_a, lora_b, scale if ctx.weighted else None)
        return base

    @staticmethod
    def backward(ctx, grad):  # grad: (tokens, out)
        x, h, hs, lora_a, lora_b, scale = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, _, need_a, need_b, need_w = ctx.needs_input_grad[:5]
        grad_hs = grad.new_empty(h.shape)  # (tokens, r)
        grad_b = torch.empty_like(lora_b) if need_b else None
        for e, rows in enumerate(ctx.slices):
            torch.mm(grad[rows], lora_b[e], out=grad_hs[rows])
            if need_b:
                torch.mm(grad[rows].t(), hs[rows], out=grad_b[e])
        grad_h = grad_hs * (scale if ctx.weighted else ctx.scaling)
        grad_w = (grad_hs * h).sum(-1, keepdim=True) if need_w else None
        grad_a = torch.empty_like(lora_a) if need_a else None
        grad_x = torch.empty_like(x) if need_x else None
        for e, rows in enumerate(ctx.slices):
            if need_a:
                torch.mm(grad_h[rows].t(), x[rows], out=grad_a[e])
            if need_x:
                torch.mm(grad_h[rows], lora_a[e], out=grad_x[rows])
        return grad_x, grad, grad_a, grad_b, grad_w, None, None


class GroupedLora(torch.autograd.Function):
    """:class:`SortedLora` with each per-expert loop replaced by one ``torch._grouped_mm`` over the
    device-side ``offsets``: 2 + 4 kernels per projection instead of 2K + 4K, and no host sync.

    A grouped GEMM need not write the weight gradient of a group with no rows, so those experts'
    gradients are zeroed explicitly (a masked fill by ``idle``, which also clears NaN garbage).
    """

    @staticmethod
    def forward(ctx, x, base, lora_a, lora_b, token_scale, offsets, idle, scaling):
        base, h, hs, scale = grouped_lora(x, base, lora_a, lora_b, token_scale, offsets, scaling)
        ctx.mark_dirty(base)
        ctx.scaling, ctx.weighted = scaling, token_scale is not None
        ctx.save_for_backward(x, h, hs, lora_a, lora_b, offsets, idle, scale if ctx.weighted else None)
        return base

    @staticmethod
    def backward(ctx, grad):  # grad: (tokens, out)
        x, h, hs, lora_a, lora_b, offsets, idle, scale = ctx.saved_tensors
        # saved parameters hold whatever storage ZeRO-3 gathered them into for the backward
        lora_a, lora_b, grad = aligned(lora_a), aligned(lora_b), aligned(grad.contiguous())
        need_x, _, need_a, need_b, need_w = ctx.needs_input_grad[:5]
        empty = idle.view(-1, 1, 1)
        grad_hs = torch._grouped_mm(grad, lora_b, offs=offsets)  # (tokens, r)
        grad_b = torch._grouped_mm(grad.t(), hs, offs=offsets).masked_fill_(empty, 0) if need_b else None
        grad_h = grad_hs * (scale if ctx.weighted else ctx.scaling)
        grad_w = (grad_hs * h).sum(-1, keepdim=True) if need_w else None
        grad_a = torch._grouped_mm(grad_h.t(), x, offs=offsets).masked_fill_(empty, 0) if need_a else None
        grad_x = torch._grouped_mm(grad_h, lora_a, offs=offsets) if need_x else None
        return grad_x, grad, grad_a, grad_b, grad_w, None, None, None


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a fresh copy where its data is not 16-byte aligned, as ``torch._grouped_mm`` requires
    (ZeRO-3 gathers a parameter into a flat buffer at whatever offset it has there)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def grouped_mm_supported(x: torch.Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` runs natively here: bf16 on a Hopper-or-newer GPU and every matrix
    width a multiple of 8 (16-byte rows); misaligned operands are copied (:func:`aligned`)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and all(w % 8 == 0 for w in widths)
    )


def grouped_mm_runs_on_cpu() -> bool:
    """Whether this torch has a CPU ``torch._grouped_mm`` (2.9 and newer), so the GPU's dispatch path can
    be exercised and counted on a CPU."""
    try:
        torch._grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 8), offs=torch.tensor([1, 4], dtype=torch.int32))
    except (AttributeError, TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def row_slices(ends: list[int]) -> list[slice]:
    """Row ranges of consecutive groups ending (exclusive) at ``ends``."""
    return [slice(lo, hi) for lo, hi in zip([0, *ends[:-1]], ends)]


class PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation; its gradient is a gather by the inverse permutation, not a
    zero-filled scatter-add as plain indexing's backward must assume for arbitrary indices."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
