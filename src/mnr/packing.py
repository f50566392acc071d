"""Packed (unpadded) encoder forward: no FLOP is spent on padding.

NLI sentences are short and uneven: padded to the longest text of a batch, most of the encoder's
work is on padding tokens. Packing concatenates the real tokens of every text in a batch into one
(1, T) sequence. Embeddings, linear layers and layer norms then see only real tokens; attention
is the one step that mixes tokens, and there each text must attend to itself only.

We plug into transformers' attention interface rather than rewriting the model: the model runs
its own forward, with ``position_ids`` restarting at every text and the flash-attention style
``cu_seq_lens_q/k`` boundaries passed along as keyword arguments, and our attention function
gathers each text's queries/keys/values into a small padded block, runs SDPA there with a key
mask, and scatters the result back. Attention is a few percent of the FLOPs for short texts, so
padding just that step costs little; every other layer runs unpadded.
Calls without ``cu_seq_lens_q`` (ordinary padded batches) go to transformers' own SDPA unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

ATTENTION_NAME = "mnr_packed"

# Architectures whose embeddings take absolute position ids and whose attention goes through
# transformers' attention interface; value: the offset of the first position id (RoBERTa counts
# positions from padding_idx + 1).
PACKABLE = {"bert": 0, "roberta": None, "xlm-roberta": None, "camembert": None}


def pack(id_lists: Sequence[Sequence[int]], position_offset: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Concatenate token id lists into the inputs of one packed forward.

    Returns input_ids and position_ids of shape (1, T) and the cumulative boundaries
    ``cu_seq_lens`` (N + 1,) in the flash-attention convention: text i is tokens
    ``cu_seq_lens[i]:cu_seq_lens[i + 1]``.
    """
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.int32)
    cu_seq_lens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    input_ids = torch.tensor([t for ids in id_lists for t in ids], dtype=torch.long)
    starts = torch.repeat_interleave(cu_seq_lens[:-1].long(), lengths.long())
    position_ids = torch.arange(len(input_ids)) - starts + position_offset
    return {
        "input_ids": input_ids.unsqueeze(0).to(device),
        "position_ids": position_ids.unsqueeze(0).to(device),
        "cu_seq_lens": cu_seq_lens.to(device),
        "max_length": int(lengths.max()),
    }


def padding_index(cu_seq_lens: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each padded slot reads from in the packed sequence.

    Returns ``index`` (N, L) into the packed tokens, with T (one past the end) for padding slots,
    and ``mask`` (N, L), True at real tokens.
    """
    starts, lengths = cu_seq_lens[:-1].long(), (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    offsets = torch.arange(max_length, device=cu_seq_lens.device)
    mask = offsets.unsqueeze(0) < lengths.unsqueeze(1)  # (N, L)
    index = torch.where(mask, starts.unsqueeze(1) + offsets, cu_seq_lens[-1].long())
    return index, mask


def unpack(packed: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, ...) packed rows -> (N, L, ...) zero-padded blocks and the (N, L) mask of real tokens."""
    index, mask = padding_index(cu_seq_lens, max_length)
    with_zero_row = torch.cat([packed, packed.new_zeros((1, *packed.shape[1:]))])  # row T reads as padding
    # index_select, not advanced indexing: its backward is index_add_, where advanced indexing's
    # is an accumulating index_put_ that took a fifth of a training step on CPU.
    blocks = with_zero_row.index_select(0, index.flatten())
    return blocks.view(*index.shape, *packed.shape[1:]), mask


def repack(blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, L, ...) blocks -> (T, ...) real rows in packed order; the inverse of ``unpack``."""
    real = mask.flatten().nonzero().squeeze(1)
    return blocks.reshape(-1, *blocks.shape[2:]).index_select(0, real)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """Attention for transformers' interface. query/key/value: (1, H, T, d) when packed."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:  # an ordinary padded batch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # (1, H, T, d) -> (T, H, d); attention runs per bucket of similar-length texts, each padded to
    # its own longest text: padded attention costs N·L_max², bucketed about Σ L_i².
    q_all, k_all, v_all = (x[0].transpose(0, 1) for x in (query, key, value))
    bounds = cu_seq_lens.tolist()
    outs = []
    for a, b in length_buckets([bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]):
        start, end = bounds[a], bounds[b]
        local = cu_seq_lens[a : b + 1] - start
        longest = max(bounds[i + 1] - bounds[i] for i in range(a, b))
        # (n, L, H, d) -> (n, H, L, d)
        q, k, v = (unpack(x[start:end], local, longest)[0].transpose(1, 2) for x in (q_all, k_all, v_all))
        _, mask = padding_index(local, longest)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=dropout,
                                             scale=scaling)  # (n, H, L, d)
        outs.append(repack(out.transpose(1, 2), mask))  # (t, H, d): real tokens only, in packed order
    return torch.cat(outs).unsqueeze(0), None


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


def forward_packed(transformer, id_lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``transformer`` packed; return (N, L, D) hidden states zero-padded per text and the (N, L) mask.

    Texts are packed longest first so that attention's length buckets are tight; the output is in
    the caller's order.
    """
    device = next(transformer.parameters()).device
    order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
    batch = pack([id_lists[i] for i in order], position_offset(transformer.config), device)
    hidden = transformer(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"],
        cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
        max_length_q=batch["max_length"], max_length_k=batch["max_length"],
    ).last_hidden_state  # (1, T, D)
    blocks, mask = unpack(hidden[0], batch["cu_seq_lens"], batch["max_length"])  # sorted order
    restore = torch.empty(len(order), dtype=torch.long)
    restore[order] = torch.arange(len(order))
    restore = restore.to(device)
    return blocks.index_select(0, restore), mask.index_select(0, restore)
