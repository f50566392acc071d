from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from mnr.errors import ModelError
from mnr.model import SentenceEncoder, length_batches, pad_ids

from .conftest import SENTENCES


def test_pooling_modes_ignore_padding(tiny_encoder):
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    tiny_encoder.pooling = "mean"
    assert torch.allclose(tiny_encoder.pool(hidden, mask)[1], hidden[1, :2].mean(0))
    tiny_encoder.pooling = "max"
    hidden[1, 2:] = 100.0  # padding must never win the max
    assert torch.allclose(tiny_encoder.pool(hidden, mask)[1], hidden[1, :2].max(0).values)
    tiny_encoder.pooling = "cls"
    assert torch.allclose(tiny_encoder.pool(hidden, mask), hidden[:, 0])


def test_padding_does_not_change_an_embedding(tiny_encoder):
    tiny_encoder.eval()
    ids = tiny_encoder.tokenize(["short", "a considerably longer sentence with many tokens"])
    alone = tiny_encoder.forward_padded(**pad_ids([ids[0]], 0))
    padded = tiny_encoder.forward_padded(**pad_ids(ids, 0))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_encode_keeps_the_callers_order(tiny_encoder):
    texts = SENTENCES[:10] + ["x " * 40]
    batched = tiny_encoder.encode(texts, batch_size=3)
    one_by_one = np.stack([tiny_encoder.encode([t])[0] for t in texts])
    assert batched.shape == (11, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    normalized = tiny_encoder.encode(texts, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    assert tiny_encoder.encode([]).shape == (0, 32)
    with pytest.raises(TypeError, match="list of texts"):
        tiny_encoder.encode("one text")


def test_batches_of_long_texts_end_at_a_token_budget(tiny_encoder, monkeypatch):
    assert length_batches([10, 10, 5, 5, 5, 1], batch_size=4, max_tokens=20) == [(0, 2), (2, 6)]
    assert length_batches([50, 3, 3], batch_size=4, max_tokens=20) == [(0, 1), (1, 3)]  # too long: alone
    assert length_batches([50, 3, 3], batch_size=2) == [(0, 2), (2, 3)]  # no budget: batch_size texts
    texts = SENTENCES[:10] + ["x " * 40]
    sizes: list[int] = []
    forward = SentenceEncoder.forward
    monkeypatch.setattr(SentenceEncoder, "forward",
                        lambda self, ids, skip=None: sizes.append(len(ids)) or forward(self, ids, skip))
    budgeted = tiny_encoder.encode(texts, batch_size=8, max_tokens=60)
    assert sizes[0] == 1 and max(sizes) <= 8 and sum(sizes) == 11  # the 40-token text alone
    sizes.clear()
    np.testing.assert_allclose(budgeted, tiny_encoder.encode(texts, batch_size=8, max_tokens=0), atol=1e-5)
    assert sizes == [8, 3]


def test_save_writes_the_sentence_transformers_layout(tiny_encoder, tmp_path):
    tiny_encoder.normalize = True
    path = tiny_encoder.save(tmp_path / "m")
    names = {p.relative_to(path).as_posix() for p in path.rglob("*")}
    assert {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "config.json",
            "model.safetensors", "tokenizer.json", "tokenizer_config.json", "1_Pooling/config.json",
            "2_Normalize"} <= names
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                            "sentence_transformers.models.Pooling",
                                            "sentence_transformers.models.Normalize"]
    assert json.loads((path / "sentence_bert_config.json").read_text()) == {"max_seq_length": 64,
                                                                            "do_lower_case": False}
    assert json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_save_load_round_trip(tiny_encoder, tmp_path):
    tiny_encoder.pooling = "max"
    path = tiny_encoder.save(tmp_path / "m")
    loaded = SentenceEncoder.load(str(path))
    assert (loaded.pooling, loaded.max_seq_length, loaded.normalize) == ("max", 64, False)
    np.testing.assert_array_equal(loaded.encode(SENTENCES), tiny_encoder.encode(SENTENCES))


def test_save_replaces_an_existing_model_and_never_leaves_a_partial_one(tiny_encoder, tmp_path, monkeypatch):
    path = tiny_encoder.save(tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny_encoder.tokenizer, "save_pretrained", fail)
    with torch.no_grad():
        tiny_encoder.transformer.embeddings.word_embeddings.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        tiny_encoder.save(path)
    assert (path / "model.safetensors").read_bytes() == before, "the previous model was damaged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "temporary directory left behind"


def test_loads_a_plain_hugging_face_checkpoint(tiny_encoder, tmp_path):
    tiny_encoder.transformer.save_pretrained(tmp_path / "hf")
    tiny_encoder.tokenizer.save_pretrained(tmp_path / "hf")
    plain = SentenceEncoder.load(str(tmp_path / "hf"), max_seq_length=64)
    assert plain.pooling == "mean" and not plain.normalize
    np.testing.assert_allclose(plain.encode(SENTENCES), tiny_encoder.encode(SENTENCES), atol=1e-6)


def test_loads_the_packaged_sentence_transformers_model(packaged_model):
    encoder = SentenceEncoder.load("sentence-transformers/all-MiniLM-L6-v2")
    assert (encoder.pooling, encoder.normalize, encoder.max_seq_length, encoder.dim) == ("mean", True, 256, 384)


def test_missing_model_path():
    with pytest.raises(ModelError, match="^./no/such/model: no such model directory"):
        SentenceEncoder.load("./no/such/model")


def test_unreachable_hub_model():
    with pytest.raises(ModelError, match="^nobody/no-such-model: not a local directory, and downloading it"):
        SentenceEncoder.load("nobody/no-such-model")


def test_unsupported_module_is_a_clear_error(tiny_encoder, tmp_path):
    path = tiny_encoder.save(tmp_path / "m")
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelError, match=r"modules.json: module 'sentence_transformers.models.Dense' is not supported"):
        SentenceEncoder.load(str(path))


def test_unsupported_pooling_is_a_clear_error(tiny_encoder, tmp_path):
    path = tiny_encoder.save(tmp_path / "m")
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    with pytest.raises(ModelError, match=r"1_Pooling/config.json: pooling lasttoken is not supported"):
        SentenceEncoder.load(str(path))


# ------------------------------------------------------------------ interoperability


def test_sentence_transformers_and_transformers_load_what_we_save(tiny_encoder, tmp_path):
    """What we write loads in sentence-transformers with equal embeddings, and in AutoModel."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    for pooling, normalize in [("mean", False), ("cls", True), ("max", False)]:
        tiny_encoder.pooling, tiny_encoder.normalize = pooling, normalize
        path = tiny_encoder.save(tmp_path / f"{pooling}-{normalize}")
        theirs = sentence_transformers.SentenceTransformer(str(path), device="cpu")
        assert theirs.max_seq_length == 64
        diff = np.abs(theirs.encode(SENTENCES, batch_size=5) - tiny_encoder.encode(SENTENCES, batch_size=7)).max()
        assert diff < 1e-5, (pooling, normalize, diff)
    hf = transformers.AutoModel.from_pretrained(path)
    assert isinstance(hf, transformers.BertModel)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, tiny_encoder.transformer.state_dict()[name]), name


def test_we_load_what_sentence_transformers_saves(tiny_model_dir, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    theirs = sentence_transformers.SentenceTransformer(str(tiny_model_dir), device="cpu")
    theirs.save(str(tmp_path / "st"))
    ours = SentenceEncoder.load(str(tmp_path / "st"))
    np.testing.assert_allclose(ours.encode(SENTENCES), theirs.encode(SENTENCES), atol=1e-5)


def test_tokenize_truncates_and_matches_the_tokenizer(tiny_encoder):
    texts = ["a short one", "a much longer sentence " * 20]
    tiny_encoder.max_seq_length = 16
    ids = tiny_encoder.tokenize(texts)
    assert ids == tiny_encoder.tokenizer(texts, truncation=True, max_length=16)["input_ids"]
    assert [len(x) for x in ids] == [5, 16]


def test_bf16_encoding_is_close_to_fp32(tiny_encoder):
    fp32 = tiny_encoder.encode(SENTENCES, normalize=True)
    bf16 = tiny_encoder.encode(SENTENCES, normalize=True, bf16=True)
    assert bf16.dtype == np.float32
    assert (fp32 * bf16).sum(axis=1).min() > 0.999


def test_pad_to_longest_in_batch():
    batch = pad_ids([[101, 7, 102], [101, 102]], pad_id=0)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    from mnr.fileio import atomic_file

    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    with atomic_file(path) as tmp:
        tmp.write_text("new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"], "temporary file left behind"
