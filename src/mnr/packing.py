"""Packed (unpadded) encoder forward: no FLOP is spent on padding.

NLI sentences are short and uneven: padded to the longest text of a batch, most of the encoder's
work is on padding tokens. Packing concatenates the real tokens of every text in a batch into one
(1, T) sequence. Embeddings, linear layers and layer norms then see only real tokens; attention
is the one step that mixes tokens, and there each text must attend to itself only.

We plug into transformers' attention interface rather than rewriting the model: the model runs
its own forward, with ``position_ids`` restarting at every text and a plan of attention blocks
passed along as a keyword argument (transformers hands extra keyword arguments to the attention
function). Our attention function gathers the queries/keys/values of texts of similar length into
small padded blocks, runs SDPA there with a key mask, and scatters the result back. Attention is a
few percent of the FLOPs for short texts, so padding just that step costs little; every other layer
runs unpadded. Calls without the plan (ordinary padded batches) go to transformers' SDPA unchanged.

Two plans, one per kind of device:

* on CPU, texts of similar length are padded into a few blocks ("buckets") that SDPA runs on, and
  the packed length is rounded up with filler tokens (oneDNN's kernel cache, see LENGTH_MULTIPLE);
* on CUDA, one variable-length attention per layer over all texts: the packed rows are viewed as a
  nested (jagged) tensor that SDPA hands to the fused flash / memory-efficient kernels, attention
  dropout included; no filler, no Python loop, and the layout is built on the host and copied
  without waiting for the GPU.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mnr.dropout import dropout as mnr_dropout

ATTENTION_NAME = "mnr_packed"

# Architectures whose embeddings take absolute position ids and whose attention goes through
# transformers' attention interface; value: the offset of the first position id (RoBERTa counts
# positions from padding_idx + 1).
PACKABLE = {"bert": 0, "roberta": None, "xlm-roberta": None, "camembert": None}


# The packed length is rounded up to a multiple of this with filler tokens that belong to no text.
# Every new matrix shape makes oneDNN build (JIT) a new bf16 kernel; unrounded, nearly every batch
# has a new length, and kernel creation ate more than the bf16 speed-up. 64 keeps the waste small
# (< 64 tokens per forward) and the distinct shapes few.
LENGTH_MULTIPLE = 64


def pack(id_lists: Sequence[Sequence[int]], position_offset: int, device: torch.device,
         multiple: int = LENGTH_MULTIPLE) -> dict:
    """Concatenate token id lists into the inputs of one packed forward.

    Returns input_ids and position_ids of shape (1, T') on ``device``, T' the total length rounded
    up to ``multiple``; the cumulative boundaries ``cu_seq_lens`` (N + 1,) in the flash-attention
    convention (text i is tokens ``cu_seq_lens[i]:cu_seq_lens[i + 1]``; tokens from
    ``cu_seq_lens[-1]`` on are filler), on the device and as a host list ``cu_host``; and the
    longest and shortest text. Everything is computed on the host; copies to a GPU are from pinned
    memory and do not wait for the GPU.
    """
    lengths = [len(ids) for ids in id_lists]
    cu_host = [0, *itertools.accumulate(lengths)]
    total = cu_host[-1]
    filler = -total % multiple
    input_ids = torch.tensor([t for ids in id_lists for t in ids] + [0] * filler, dtype=torch.long)
    position_ids = torch.tensor([offset for n in lengths for offset in range(n)] + [0] * filler,
                                dtype=torch.long) + position_offset
    cu_seq_lens = torch.tensor(cu_host, dtype=torch.int64)
    return {
        "input_ids": to_device(input_ids.unsqueeze(0), device),
        "position_ids": to_device(position_ids.unsqueeze(0), device),
        "cu_seq_lens": to_device(cu_seq_lens, device),
        "cu_host": cu_host,
        "max_length": max(lengths),
        "min_length": min(lengths),
    }


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, asynchronously (no wait for the GPU)."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def padding_index(cu_seq_lens: torch.Tensor, max_length: int, pad_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each padded slot reads from in the packed sequence.

    Returns ``index`` (N, L) into the packed rows, ``pad_row`` for padding slots, and ``mask``
    (N, L), True at real tokens.
    """
    starts, lengths = cu_seq_lens[:-1].long(), (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    offsets = torch.arange(max_length, device=cu_seq_lens.device)
    mask = offsets.unsqueeze(0) < lengths.unsqueeze(1)  # (N, L)
    index = torch.where(mask, starts.unsqueeze(1) + offsets, pad_row)
    return index, mask


def unpack(packed: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, ...) packed rows -> (N, L, ...) zero-padded blocks and the (N, L) mask of real tokens."""
    index, mask = padding_index(cu_seq_lens, max_length, pad_row=len(packed))
    with_zero_row = torch.cat([packed, packed.new_zeros((1, *packed.shape[1:]))])  # the last row reads as padding
    # index_select, not advanced indexing: its backward is index_add_, where advanced indexing's
    # is an accumulating index_put_ that took a fifth of a training step on CPU.
    blocks = with_zero_row.index_select(0, index.flatten())
    return blocks.view(*index.shape, *packed.shape[1:]), mask


@dataclass
class Bucket:
    """Texts of similar length, attended to together in one block padded to the longest of them."""

    start: int  # first packed row of the bucket
    end: int  # one past its last packed row
    n: int  # texts
    length: int  # the longest of them: the block is (n, length)
    # None when every text has ``length`` tokens: the rows already are the block (no gather, no mask;
    # common for long texts cut at max_seq_length). Otherwise:
    gather: torch.Tensor | None = None  # (n·L,) the row (from start) each padded slot reads; padding slots read row 0
    mask: torch.Tensor | None = None  # (n, L) True at real tokens
    real: torch.Tensor | None = None  # (t,) which of the n·L slots are real tokens, in packed order


def plan_buckets(cu_seq_lens: Sequence[int], device: torch.device) -> list[Bucket]:
    """The attention blocks of a packed batch. Built once per forward and shared by every layer.

    Padding one block of all N texts costs N·L_max² in attention (and in its dropout mask);
    buckets of similar length cost about Σ L_i². Padding slots read row 0: their keys are masked
    and their outputs dropped, so what they hold does not matter.
    """
    lengths = [cu_seq_lens[i + 1] - cu_seq_lens[i] for i in range(len(cu_seq_lens) - 1)]
    buckets = []
    for a, b in length_buckets(lengths):
        bucket = Bucket(cu_seq_lens[a], cu_seq_lens[b], b - a, max(lengths[a:b]))
        if min(lengths[a:b]) < bucket.length:
            local = torch.tensor(cu_seq_lens[a : b + 1], device=device) - cu_seq_lens[a]
            index, bucket.mask = padding_index(local, bucket.length, pad_row=0)
            bucket.gather, bucket.real = index.flatten(), bucket.mask.flatten().nonzero().squeeze(1)
        buckets.append(bucket)
    return buckets


@dataclass
class Jagged:
    """The packed texts as one variable-length batch: boundaries on the device, lengths known on the host."""

    offsets: torch.Tensor  # (N + 1,) int64 cu_seq_lens on the device
    max_length: int
    min_length: int


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """Attention for transformers' interface. query/key/value: (1, H, T, d) when packed."""
    plan = kwargs.get("mnr_plan")
    if plan is None:  # an ordinary padded batch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if isinstance(plan, Jagged):
        return jagged_attention(query, key, value, plan, dropout, scaling), None
    buckets = plan
    rows = [x[0].transpose(0, 1) for x in (query, key, value)]  # (T, H, d) each
    heads, head_dim = rows[0].shape[1:]
    outs = []
    for bucket in buckets:
        n, length = bucket.n, bucket.length
        block = [x[bucket.start : bucket.end] for x in rows]  # (t, H, d)
        if bucket.gather is not None:
            block = [x.index_select(0, bucket.gather) for x in block]  # (n·L, H, d)
        q, k, v = (x.view(n, length, heads, head_dim).transpose(1, 2) for x in block)  # (n, H, L, d)
        key_mask = None if bucket.mask is None else bucket.mask[:, None, None, :]
        out = _attention(q, k, v, key_mask, dropout, scaling).transpose(1, 2).reshape(n * length, heads, head_dim)
        outs.append(out if bucket.real is None else out.index_select(0, bucket.real))
    if len(rows[0]) > buckets[-1].end:  # rows of no text stay zero
        outs.append(rows[0].new_zeros((len(rows[0]) - buckets[-1].end, heads, head_dim)))
    return (torch.cat(outs) if len(outs) > 1 else outs[0]).unsqueeze(0), None


def jagged_attention(query, key, value, plan: Jagged, dropout: float, scale: float | None) -> torch.Tensor:
    """One SDPA call over every text of the batch: (1, H, T, d) x 3 -> (1, T, H, d).

    The module's projections are (1, T, H, d) buffers viewed as (1, H, T, d); transposed back they
    are (T, H, d) without a copy, the values of a nested tensor ragged in T. SDPA runs the jagged
    batch in fused kernels on CUDA (flash for bf16/fp16, memory-efficient for fp32), dropout
    included, and by its reference implementation elsewhere (which the tests compare on the CPU).
    """
    nested = [torch.nested.nested_tensor_from_jagged(x[0].transpose(0, 1), plan.offsets, min_seqlen=plan.min_length,
                                                     max_seqlen=plan.max_length).transpose(1, 2)  # (N, H, j, d)
              for x in (query, key, value)]
    out = F.scaled_dot_product_attention(*nested, dropout_p=dropout, scale=scale)  # (N, H, j, d)
    return out.transpose(1, 2).values().unsqueeze(0)  # (1, T, H, d)


def _attention(q, k, v, key_mask, dropout: float, scale: float | None) -> torch.Tensor:
    """SDPA, except when training with dropout on CPU: SDPA draws that dropout mask with torch's
    slow per-element CPU sampler, so there we spell attention out and use ``mnr.dropout``."""
    if dropout == 0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = scores.softmax(-1)  # (n, H, L, L)
    return torch.matmul(mnr_dropout(probs, dropout).to(v.dtype), v)


def length_buckets(lengths: Sequence[int], ratio: float = 0.75) -> list[tuple[int, int]]:
    """Cut texts into contiguous runs [a, b) whose shortest is at least ``ratio`` x their longest.

    With texts in decreasing length order (as ``forward_packed`` packs them) each run pads little.
    """
    buckets, a = [], 0
    longest = shortest = lengths[0] if lengths else 0
    for i, n in enumerate(lengths[1:], start=1):
        longest, shortest = max(longest, n), min(shortest, n)
        if shortest < ratio * longest:
            buckets.append((a, i))
            a, longest, shortest = i, n, n
    if lengths:
        buckets.append((a, len(lengths)))
    return buckets


def enable(transformer) -> bool:
    """Switch ``transformer`` to packed attention if its architecture supports it; return whether it does.

    Padded calls keep working exactly as with SDPA. The switch is in memory only: the attention
    implementation is not written to config.json, so saved models load anywhere.
    """
    config = transformer.config
    if config.model_type not in PACKABLE or getattr(config, "is_decoder", False):
        return False
    module = sys.modules.get(type(transformer).__module__)
    if module is None or not hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
        return False  # an older transformers whose model does not dispatch attention through the interface
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    transformer.set_attn_implementation(ATTENTION_NAME)
    return True


def position_offset(config) -> int:
    """The first position id of a text: 0 for BERT, padding_idx + 1 for the RoBERTa family."""
    offset = PACKABLE[config.model_type]
    return offset if offset is not None else config.pad_token_id + 1


def forward_packed(transformer, id_lists: Sequence[Sequence[int]],
                   jagged: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``transformer`` packed; return (N, L, D) hidden states zero-padded per text and the (N, L) mask.

    ``jagged``: attention as one variable-length batch instead of length buckets (which one a forward
    uses is ``mnr.layout``'s decision). Texts are packed longest first so that length buckets are
    tight; the output is in the caller's order.
    """
    device = next(transformer.parameters()).device
    order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
    batch = pack([id_lists[i] for i in order], position_offset(transformer.config), device,
                 multiple=1 if jagged else LENGTH_MULTIPLE)
    plan = (Jagged(batch["cu_seq_lens"], batch["max_length"], batch["min_length"]) if jagged
            else plan_buckets(batch["cu_host"], device))
    hidden = transformer(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], mnr_plan=plan,  # reaches packed_attention
    ).last_hidden_state  # (1, T, D)
    blocks, mask = unpack(hidden[0], batch["cu_seq_lens"], batch["max_length"])  # sorted order
    restore = torch.empty(len(order), dtype=torch.long)
    restore[order] = torch.arange(len(order))
    restore = to_device(restore, device)
    return blocks.index_select(0, restore), mask.index_select(0, restore)
