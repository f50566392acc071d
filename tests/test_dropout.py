from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnr.dropout import FastDropout, dropout, keep_mask, use_fast_dropout
from mnr.packing import _attention


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_and_scale(p):
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([400_000]), p)
    assert abs((1 - keep.float().mean().item()) - p) < 0.003
    dropped = round(p * 65536) / 65536
    assert scale == pytest.approx(1 / (1 - dropped))
    x = torch.ones(400_000)
    assert dropout(x, p).mean().item() == pytest.approx(1.0, abs=0.01)  # the expectation is kept


def test_mask_lanes_are_uniform_and_independent():
    """Three 16-bit lanes per 63-bit draw: no lane may be biased (the draw's top lane has 15 bits)."""
    torch.manual_seed(1)
    keep, _ = keep_mask(torch.Size([300_000]), 0.5)
    for lane in range(3):
        assert abs(keep[lane::3].float().mean().item() - 0.5) < 0.006, lane
    pairs = keep[0::3].float() * keep[1::3].float()
    assert abs(pairs.mean().item() - 0.25) < 0.006


def test_backward_uses_the_same_mask():
    torch.manual_seed(2)
    x = torch.randn(1000, requires_grad=True)
    y = dropout(x, 0.3)
    y.sum().backward()
    kept = y != 0
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], y[kept][0].item() / x[kept][0].item()))
    assert (x.grad[~kept] == 0).all()


def test_reproducible_under_manual_seed_and_off_in_eval():
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    a = dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.2))
    assert dropout(x, 0.2, training=False) is x
    module = FastDropout(0.2).eval()
    assert module(x) is x


def test_modules_are_swapped():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3), torch.nn.Sequential(torch.nn.Dropout(0.1)))
    use_fast_dropout(net)
    assert [type(m).__name__ for m in net.modules()].count("FastDropout") == 2
    assert net[1].p == 0.3 and isinstance(net[1], torch.nn.Dropout)


def test_spelled_out_attention_equals_sdpa():
    """The CPU training path of packed attention computes what SDPA computes (checked with a drop
    probability that rounds to zero, so no element is dropped)."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(3, 2, 7, 8) for _ in range(3))
    key_mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    key_mask[1, ..., 5:] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    torch.testing.assert_close(_attention(q, k, v, key_mask, dropout=1e-9, scale=None), expected)
