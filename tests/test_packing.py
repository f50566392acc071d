"""The packed forward must be the padded forward, minus the padding: same embeddings, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from mnr.losses import MultipleNegativesRankingLoss
from mnr.model import SentenceEncoder
from mnr.packing import LENGTH_MULTIPLE, length_buckets, pack, padding_index, plan_buckets, unpack

from .conftest import SENTENCES


def tiny(model_type: str, tokenizer, pooling: str) -> SentenceEncoder:
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    if model_type == "bert":
        transformer = transformers.BertModel(transformers.BertConfig(max_position_embeddings=128, **common))
    else:  # RoBERTa numbers positions from padding_idx + 1
        transformer = transformers.RobertaModel(transformers.RobertaConfig(max_position_embeddings=130,
                                                                           pad_token_id=1, **common))
    encoder = SentenceEncoder(transformer, tokenizer, pooling=pooling, max_seq_length=64)
    assert encoder.enable_packing()
    return encoder


def padded_twin(encoder: SentenceEncoder) -> SentenceEncoder:
    twin = copy.deepcopy(encoder)
    twin.transformer.set_attn_implementation("sdpa")
    twin.set_layout("padded")
    return twin


# fp32: equal up to summation order; fp64: the same computation to 1e-10
TOLERANCES = {torch.float32: dict(atol=5e-6, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_packed_equals_padded_in_value_and_gradient(tiny_encoder, model_type, pooling, dtype):
    packed = tiny(model_type, tiny_encoder.tokenizer, pooling).to(dtype)
    assert packed.packed
    padded = padded_twin(packed)
    # lengths 3..42: lots of padding; the two long texts have the same length: a bucket without a gather
    ids = packed.tokenize(SENTENCES[:12] + ["word " * 40, "more " * 40, "x"])
    assert len(ids[-3]) == len(ids[-2]) > max(map(len, ids[:-3])) / 0.75

    a = packed(ids)
    b = padded(ids)
    assert a.dtype == dtype
    torch.testing.assert_close(a, b, **TOLERANCES[dtype])

    for name, p, q in gradients_of_the_same_loss(packed, a, padded, b):
        torch.testing.assert_close(p, q, **TOLERANCES[dtype], msg=lambda m, name=name: f"{name}: {m}")


def gradients_of_the_same_loss(packed, a, padded, b):
    """Backpropagate the same MNR loss through both models' embeddings of the same texts; yield
    (name, packed gradient, padded gradient) of every parameter that has one (asserting that a
    parameter without a gradient in one model has none in the other)."""
    loss = MultipleNegativesRankingLoss()
    loss(list(a[:14].split(7))).backward()
    loss(list(b[:14].split(7))).backward()
    for (name, p), q in zip(packed.named_parameters(), padded.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        yield name, p.grad, q.grad


CUDA = pytest.mark.cuda


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float32), ("cpu", torch.float64), ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float32, marks=CUDA), pytest.param("cuda", torch.bfloat16, marks=CUDA),
], ids=["cpu-fp32", "cpu-fp64", "cpu-bf16", "cuda-fp32", "cuda-bf16"])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
# on the CPU, SDPA's reference path unbinds the jagged batch through torch's older nested layout, which warns
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_jagged_attention_equals_padded_in_value_and_gradient(tiny_encoder, model_type, device, dtype):
    """The CUDA path (one variable-length attention per layer, no filler) is the padded forward minus the
    padding. On the CPU it runs through SDPA's reference implementation; on a GPU through the fused
    kernels, in fp32 and under bf16 autocast (as training runs it)."""
    packed, padded, a, b = jagged_and_padded(tiny_encoder, model_type, device, dtype)
    torch.testing.assert_close(a, b, **TOLERANCES.get(dtype, BF16_EMBEDDINGS))
    assert_same_gradients(list(gradients_of_the_same_loss(packed, a, padded, b)), dtype)


def jagged_and_padded(tiny_encoder, model_type, device, dtype):
    """The tiny model in the jagged layout and its padded twin, and their embeddings of the same texts
    (weights in fp64 for an fp64 run, else fp32; bf16 means fp32 weights under bf16 autocast)."""
    packed = tiny(model_type, tiny_encoder.tokenizer, "mean").to(device)
    packed.set_layout("jagged")
    packed = packed.to(torch.float64 if dtype == torch.float64 else torch.float32)
    padded = padded_twin(packed)
    ids = packed.tokenize(SENTENCES[:12] + ["word " * 40, "x"])
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        a = packed(ids)
    with autocast:
        b = padded(ids)
    return packed, padded, a, b


BF16_EMBEDDINGS = dict(atol=3e-2, rtol=3e-2)
# Parameters whose exact gradient is zero: a key bias adds the same number to every score of a query,
# which softmax ignores, so both layouts' gradients are rounding noise (on an H200 under bf16: 2.7e-7
# apart, against 3.7e-7 of noise). They are compared against the whole model's gradient scale instead.
ZERO_GRADIENT = ("attention.self.key.bias",)


def assert_same_gradients(gradients: list[tuple[str, torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> None:
    """(name, jagged gradient, padded gradient) triples agree: to TOLERANCES in fp32/fp64; under bf16
    autocast, each within 10% of its own largest value (rounding to 8 bits of mantissa, many times over),
    and a gradient that is zero in exact arithmetic within 1% of the largest gradient of the model."""
    scale = max(q.abs().max().item() for _, _, q in gradients)
    for name, p, q in gradients:
        if dtype != torch.bfloat16:
            torch.testing.assert_close(p, q, **TOLERANCES[dtype], msg=lambda m, name=name: f"{name}: {m}")
        elif name.endswith(ZERO_GRADIENT):
            assert (p - q).abs().max() <= 0.01 * scale, (name, (p - q).abs().max().item(), scale)
        else:
            assert (p - q).abs().max() <= 0.1 * q.abs().max(), (name, (p - q).abs().max().item(), q.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("wrong", ["attention.self.value.weight", "attention.self.key.bias"])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_the_gradient_check_catches_a_wrong_gradient(tiny_encoder, dtype, wrong):
    """The comparison above is not vacuous: one layer's gradient off (a 20% error in an ordinary one,
    an error of 5% of the model's gradient scale in one whose exact value is zero) fails it."""
    packed, padded, a, b = jagged_and_padded(tiny_encoder, "bert", "cpu", dtype)
    gradients = list(gradients_of_the_same_loss(packed, a, padded, b))
    assert_same_gradients(gradients, dtype)
    scale = max(q.abs().max().item() for _, _, q in gradients)
    name = f"transformer.encoder.layer.1.{wrong}"
    broken = [(n, p * 1.2 if wrong.endswith("weight") else p + 0.05 * scale, q) if n == name else (n, p, q)
              for n, p, q in gradients]
    with pytest.raises(AssertionError, match=name):
        assert_same_gradients(broken, dtype)


def test_jagged_packing_has_no_filler():
    batch = pack([[5, 6, 7], [8]], position_offset=0, device=torch.device("cpu"), multiple=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8]] and batch["cu_host"] == [0, 3, 4]
    assert (batch["max_length"], batch["min_length"]) == (3, 1)


@CUDA
def test_a_cuda_training_step_never_waits_for_the_gpu(tiny_model_dir, nli_file):
    """Forward, backward, clipping and the optimizer step queue work without a host synchronisation
    (torch raises on one in this mode); reading the loss afterwards is the only wait."""
    from mnr.config import TrainConfig
    from mnr.recipe import prepare
    from mnr.train import make_optimizer, train_step

    config = TrainConfig(model=str(tiny_model_dir), data=[str(nli_file)], output="unused", batch_size=4,
                         device="cuda", bf16=True, hard_negatives=True)
    s = prepare(config)
    optimizer = make_optimizer(s, config)
    train_step(s, optimizer, [0, 1, 2, 3], config)  # first step: allocations, kernel selection
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [train_step(s, optimizer, [4, 5, 6, 7], config), train_step(s, optimizer, [8, 9, 10, 11], config)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)


def test_packed_training_with_dropout_runs(tiny_encoder):
    """Dropout is drawn differently in the two layouts, so only check it runs and is finite."""
    encoder = tiny("bert", tiny_encoder.tokenizer, "mean")
    encoder.transformer.config.attention_probs_dropout_prob = 0.1
    encoder.train()
    out = encoder(encoder.tokenize(SENTENCES[:6]))
    assert out.shape == (6, 32) and torch.isfinite(out).all()
    encoder.set_layout("jagged")  # the CUDA layout keeps attention dropout too
    out = encoder(encoder.tokenize(SENTENCES[:6]))
    assert out.shape == (6, 32) and torch.isfinite(out).all()


def test_encode_is_the_same_packed_or_padded(tiny_encoder):
    assert tiny_encoder.packed
    padded = padded_twin(tiny_encoder)
    torch.testing.assert_close(torch.from_numpy(tiny_encoder.encode(SENTENCES, batch_size=5)),
                               torch.from_numpy(padded.encode(SENTENCES, batch_size=5)), atol=2e-6, rtol=1e-5)


def test_pack_and_unpack():
    batch = pack([[5, 6, 7], [8], [9, 10]], position_offset=0, device=torch.device("cpu"))
    filler = LENGTH_MULTIPLE - 6  # the packed length is rounded up with filler tokens of no text
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10] + [0] * filler]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1] + [0] * filler]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 4, 6] and batch["max_length"] == 3
    positions = pack([[1, 2], [3]], position_offset=2, device=torch.device("cpu"))["position_ids"]
    assert positions[0, :3].tolist() == [2, 3, 2]
    index, mask = padding_index(batch["cu_seq_lens"], 3, pad_row=6)
    assert index.tolist() == [[0, 1, 2], [3, 6, 6], [4, 5, 6]]
    blocks, mask2 = unpack(torch.arange(1.0, 7.0).unsqueeze(1), batch["cu_seq_lens"], 3)
    assert blocks.squeeze(-1).tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert torch.equal(mask, mask2)


def test_unsupported_architectures_fall_back_to_padding(tiny_encoder):
    config = transformers.DistilBertConfig(vocab_size=tiny_encoder.tokenizer.vocab_size, dim=32, n_layers=1,
                                           n_heads=2, hidden_dim=64)
    encoder = SentenceEncoder(transformers.DistilBertModel(config), tiny_encoder.tokenizer)
    assert not encoder.enable_packing() and not encoder.packed
    assert encoder(encoder.tokenize(SENTENCES[:3])).shape == (3, 32)


def test_length_buckets():
    assert length_buckets([40, 38, 31, 29, 20, 16, 15, 4]) == [(0, 3), (3, 4), (4, 7), (7, 8)]
    assert length_buckets([10, 10, 10]) == [(0, 3)]
    assert length_buckets([5, 50, 45]) == [(0, 1), (1, 3)]  # unsorted input still gives valid runs
    assert length_buckets([]) == []


def test_buckets_of_equal_lengths_are_used_as_they_are():
    """Texts of one length (long texts cut at max_seq_length) are already a block: no gather, no mask."""
    same, mixed = plan_buckets([0, 5, 10, 15, 18], torch.device("cpu"))  # lengths 5, 5, 5 | 3
    assert (same.n, same.length, same.gather, same.mask) == (3, 5, None, None)
    assert (mixed.start, mixed.end, mixed.gather) == (15, 18, None)  # one text: its own block
    (uneven,) = plan_buckets([0, 6, 11], torch.device("cpu"))  # lengths 6, 5
    assert (uneven.n, uneven.length) == (2, 6)
    assert uneven.gather.tolist() == [*range(6), *range(6, 11), 0]
    assert uneven.real.tolist() == list(range(11))
