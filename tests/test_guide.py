"""--guide: a model that keeps likely false negatives out of each anchor's softmax (GISTEmbed)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from mnr.cli import main
from mnr.config import TrainConfig
from mnr.data import load_training_set
from mnr.errors import ConfigError
from mnr.guide import Guide, GuideSettings, storage
from mnr.losses import Excluded, Matryoshka, MultipleNegativesRankingLoss
from mnr.model import SentenceEncoder
from mnr.recipe import batches_of_epoch, prepare
from mnr.train import forward_backward

from .conftest import SENTENCES, write_jsonl
from .test_checkpoint import SLOW, args, assert_bitwise_equal, make_pairs, run_to_end, stop_at, weights
from .test_matryoshka import refused_before_writing


@pytest.fixture
def triplets(tmp_path):
    rows = [{"anchor": SENTENCES[i], "positive": f"{SENTENCES[i + 12]} ({i})", "negative": f"not {SENTENCES[i]}"}
            for i in range(12)]
    return write_jsonl(tmp_path / "triplets.jsonl", rows)


@pytest.fixture(scope="module")
def other_guide(tmp_path_factory):
    """A guide unlike the trained model: its own (word-level) vocabulary and tokenizer, 48 dimensions."""
    folder = tmp_path_factory.mktemp("guide")
    words = sorted({w.strip(".,()").lower() for s in SENTENCES for w in s.split()} | {"not", "maybe", "so"})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(1)
    return SentenceEncoder(transformers.BertModel(config), tokenizer, pooling="mean", max_seq_length=32).save(
        folder / "word-guide")


def config_of(model, data, **extra) -> TrainConfig:
    # fp32: the references are computed in fp32
    return TrainConfig(model=str(model), data=[str(data)], output="unused", max_seq_length=32, batch_size=4, bf16=False,
                       **extra)


def brute_force(embeddings: torch.Tensor, ids: torch.Tensor, batch: list[int], margin: float, relative: bool):
    """Anchor i against every candidate, one pair at a time in float64: left out when the guide scores it above
    the positive's score less the margin (``relative``: less |positive's score| x margin), never its own positive."""
    e = embeddings.double()
    a = [e[ids[i, 0]] for i in batch]
    candidates = [e[ids[i, c]] for c in range(1, ids.shape[1]) for i in batch]
    out = torch.zeros(len(batch), len(candidates), dtype=torch.bool)
    for i in range(len(batch)):
        own = float(a[i] @ candidates[i])
        threshold = own - (abs(own) * margin if relative else margin)
        for j, c in enumerate(candidates):
            out[i, j] = j != i and float(a[i] @ c) > threshold
    return out


@pytest.mark.parametrize("margin, strategy", [(0.0, "absolute"), (0.02, "absolute"), (0.02, "relative")])
def test_left_out_are_exactly_the_candidates_scored_above_the_positive_less_the_margin(
        tiny_model_dir, triplets, margin, strategy):
    settings = GuideSettings(guide=str(tiny_model_dir), guide_margin=margin, guide_margin_strategy=strategy)
    data = load_training_set([str(triplets)])
    model = SentenceEncoder.load(str(tiny_model_dir))
    guide = Guide.embed(model, settings, data, torch.device("cpu"), bf16=False, processes=1)
    # the guide's embeddings are the model's own, each text embedded once
    texts = [t for row in data.rows for t in row]
    expected = torch.from_numpy(model.encode(texts, normalize=True))
    torch.testing.assert_close(guide.embeddings[guide.ids[0].flatten()], expected, atol=1e-6, rtol=0)
    assert len(guide.embeddings) == len(set(texts))
    batch = [0, 3, 5, 7, 9, 11]
    excluded = guide.exclude(batch)
    reference = brute_force(guide.embeddings, guide.ids[0], batch, margin, strategy == "relative")
    assert torch.equal(excluded.candidates, reference)
    assert 0 < reference.sum() < reference.numel() - len(batch)  # a random guide leaves some out, not all
    assert not excluded.candidates[range(6), range(6)].any()
    # the symmetric direction: positive i against every anchor, by its own pair's score
    positives = guide.embeddings[guide.ids[0][batch, 1]].double()
    anchors = guide.embeddings[guide.ids[0][batch, 0]].double()
    scores = positives @ anchors.T
    own = scores.diagonal().unsqueeze(1)
    threshold = own - (own.abs() * margin if strategy == "relative" else margin)
    assert torch.equal(excluded.anchors, (scores > threshold) & ~torch.eye(6, dtype=torch.bool))
    assert guide.read()[0].item() == pytest.approx(reference.sum().item() / (reference.numel() - 6))


def test_the_loss_ranks_each_anchor_among_the_candidates_left_in():
    torch.manual_seed(0)
    columns = [torch.randn(4, 8) for _ in range(3)]
    out = torch.rand(4, 8) < 0.4
    out[range(4), range(4)] = False
    back = torch.rand(4, 4) < 0.4
    back[range(4), range(4)] = False
    loss = MultipleNegativesRankingLoss(scale=20.0, symmetric=True)(columns, exclude=Excluded(out, back))
    a, c = F.normalize(columns[0], dim=-1), F.normalize(torch.cat(columns[1:]), dim=-1)
    p = F.normalize(columns[1], dim=-1)
    forward = [-(20 * a[i] @ c[i]) + torch.logsumexp(20 * (a[i] @ c[~out[i]].T), 0) for i in range(4)]
    backward = [-(20 * p[i] @ a[i]) + torch.logsumexp(20 * (p[i] @ a[~back[i]].T), 0) for i in range(4)]
    assert loss.item() == pytest.approx((sum(forward) / 4 + sum(backward) / 4).item() / 2, rel=1e-6)
    # Matryoshka passes the same candidates to every size
    matryoshka = Matryoshka(MultipleNegativesRankingLoss(), [8, 4])(columns, exclude=Excluded(out, back))
    plain = MultipleNegativesRankingLoss()
    assert matryoshka == plain(columns, exclude=Excluded(out, back)) + plain(
        [x[:, :4] for x in columns], exclude=Excluded(out, back))


def nothing_left_out(s) -> Guide:
    """A guide that scores each anchor's own positive 1, its own negatives -1 and everything else 0: it leaves
    nothing out."""
    rows, columns = len(s.data.parts[0].data.rows), len(s.data.parts[0].data.columns)
    ids = torch.tensor([[rows * c + r for c in range(columns)] for r in range(rows)])
    own = torch.eye(rows)
    return Guide(torch.cat([own, own] + [-own] * (columns - 2)), ids)


def step(s, config, batch):
    loss = forward_backward(s, batch, config).item()
    grads = {n: p.grad.clone() for n, p in s.encoder.named_parameters() if p.grad is not None}
    return loss, grads


def test_a_guide_that_leaves_nothing_out_is_plain_mnr_exactly(no_dropout_model, triplets):
    config = config_of(no_dropout_model, triplets)
    plain = prepare(config)
    batch = batches_of_epoch(plain.data, config, 0)[0]
    loss, grads = step(plain, config, batch)
    guided = prepare(config)
    guided.guide = nothing_left_out(guided)
    guided_loss, guided_grads = step(guided, config, batch)
    assert guided.guide.read()[0].item() == 0
    assert guided_loss == loss
    assert all(torch.equal(guided_grads[n], grads[n]) for n in grads)


def test_a_guided_step_is_mnr_over_the_candidates_left_in(no_dropout_model, triplets):
    config = config_of(no_dropout_model, triplets, guide=str(no_dropout_model), guide_margin=0.05, symmetric=True)
    s = prepare(config)
    batch = batches_of_epoch(s.data, config, 0)[0]
    excluded = Guide(s.guide.embeddings, s.guide.ids, 0.05).exclude(batch)
    assert excluded.candidates.any()
    loss = forward_backward(s, batch, config).item()
    columns = [torch.from_numpy(s.encoder.encode([s.data.parts[0].data.rows[i][c] for i in batch])) for c in range(3)]
    expected = MultipleNegativesRankingLoss(symmetric=True)(columns, exclude=excluded)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert loss != pytest.approx(MultipleNegativesRankingLoss(symmetric=True)(columns).item(), rel=1e-3)


@pytest.mark.parametrize("mini_batch", [3, 5])
def test_cached_equals_plain_with_the_guide(no_dropout_model, tiny_model_dir, triplets, mini_batch):
    """Gradient caching: the same masks, and the same loss and gradients as one plain step (no dropout: a plain
    step draws its masks for the whole batch at once; test_cache checks the replay of dropout masks)."""
    results = []
    for size in (0, mini_batch):
        config = config_of(no_dropout_model, triplets, guide=str(tiny_model_dir), mini_batch_size=size)
        s = prepare(config)
        results.append(step(s, config, batches_of_epoch(s.data, config, 0)[0]))
        assert s.guide.read()[0] > 0
    (loss, grads), (cached_loss, cached_grads) = results
    assert cached_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_a_guided_run_logs_what_it_left_out_and_names_the_guide(tiny_model_dir, other_guide, triplets, tmp_path,
                                                               capsys):
    """A guide with another tokenizer and another dimension embeds the same texts; the log has each step's share of
    candidates left out, the summary their mean, the card the guide."""
    output = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(triplets), "--output", str(output),
                 "--batch-size", "4", "--max-seq-length", "32", "--save-every", "0", "--guide", str(other_guide),
                 "--epochs", "2"]) == 0
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    shares = [e["guide_left_out"] for e in log if "loss" in e]
    assert len(shares) == 6 and all(0 <= x < 1 for x in shares) and any(shares)
    assert log[-1]["summary"]["guide_left_out"] == pytest.approx(sum(shares) / 6, abs=1e-4)
    assert "guide:       left out" in capsys.readouterr().out
    card = (output / "final" / "README.md").read_text()
    assert f"| guide | `{other_guide}` leaves out of each anchor's softmax the candidates it scores above the " \
           "positive's score (likely false negatives; GISTEmbed) |" in card
    assert f'guide = "{other_guide}"' in (output / "config.toml").read_text()


def test_a_stopped_guided_run_resumes_to_the_same_weights(tiny_model_dir, no_dropout_model, tmp_path):
    """The guide embeds again on resume (deterministic on a device): the same masks, the same weights and log; a
    resume with another guide is refused."""
    pairs = make_pairs(tmp_path)
    guided = ("--guide", str(tiny_model_dir), "--guide-margin", "0.02")
    whole = run_to_end(SLOW, args(tiny_model_dir, pairs, tmp_path / "whole", *guided))
    assert whole.returncode == 0, whole.stderr[-2000:]
    output = tmp_path / "stopped"
    stop_at(4, args(tiny_model_dir, pairs, output, *guided))
    other = run_to_end(SLOW, args(tiny_model_dir, pairs, output, "--guide", str(no_dropout_model), "--resume"))
    assert other.returncode == 2 and "--guide was" in other.stderr, other.stderr[-2000:]
    resumed = run_to_end(SLOW, args(tiny_model_dir, pairs, output, *guided, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bitwise_equal(weights(output), weights(tmp_path / "whole"))

    def shares(run):
        return [(e["step"], e["guide_left_out"]) for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if "loss" in e]
    assert shares(output) == shares(tmp_path / "whole") and len(shares(output)) == 30


@pytest.mark.parametrize("flags, message", [
    (["--guide", "{missing}"], r"--guide .*missing"),
    (["--guide", "{model}", "--loss", "softmax"], r"--guide: --loss softmax has no in-batch candidates"),
    (["--guide", "{model}", "--guide-margin", "-0.1"], r"--guide-margin must be a number >= 0, got -0.1"),
    (["--guide", "{model}", "--guide-margin-strategy", "ratio"], r"--guide-margin-strategy must be one of absolute"),
], ids=["does-not-load", "softmax", "negative-margin", "strategy"])
def test_bad_guides_are_refused_before_anything_is_written(tiny_model_dir, triplets, tmp_path, capsys, flags,
                                                           message):
    flags = [f.format(missing=tmp_path / "missing", model=tiny_model_dir) for f in flags]
    refused_before_writing(tiny_model_dir, triplets, tmp_path, capsys, flags, message)


def test_guide_settings_are_checked_in_code_too():
    with pytest.raises(ConfigError, match="--loss softmax"):
        TrainConfig(guide="some/model", loss="softmax")
    with pytest.raises(ConfigError, match="guide-margin"):
        TrainConfig(guide="m", guide_margin=float("nan"))


@pytest.mark.parametrize("margin, strategy, contrast, columns", [
    (0.0, "absolute", (False, False), 3), (0.02, "relative", (False, False), 3),
    (0.02, "absolute", (True, False), 3), (0.0, "absolute", (True, True), 2)],
    ids=["absolute", "relative", "contrast-anchors", "contrast-both-pairs"])
def test_a_guided_step_equals_sentence_transformers_gistembedloss(no_dropout_model, tiny_model_dir, triplets, margin,
                                                                  strategy, contrast, columns, tmp_path):
    """GISTEmbedLoss with the same guide, temperature 1/scale, and the same candidates: positives and hard negatives
    (query_to_doc); contrast_anchors is --directions query_to_query; contrast_positives, on pairs, doc_to_doc (with
    hard negatives GISTEmbedLoss leaves them out of that block, MNR's doc_to_doc has them)."""
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss
    except ImportError:  # releases before 6.1
        from sentence_transformers.losses import GISTEmbedLoss

    data = triplets
    if columns == 2:
        data = write_jsonl(tmp_path / "pairs.jsonl", [{k: v for k, v in json.loads(line).items() if k != "negative"}
                                                      for line in triplets.read_text().splitlines()])
    directions = ["query_to_doc"] + ["query_to_query"] * contrast[0] + ["doc_to_doc"] * contrast[1]
    config = config_of(no_dropout_model, data, guide=str(tiny_model_dir), guide_margin=margin,
                       guide_margin_strategy=strategy, directions=directions)
    s = prepare(config)
    batch = batches_of_epoch(s.data, config, 0)[0]
    ours = forward_backward(s, batch, config).item()
    assert s.guide.read()[0] > 0  # it left some out
    model = st.SentenceTransformer(str(no_dropout_model), device="cpu")
    model.max_seq_length = 32
    gist = GISTEmbedLoss(model, st.SentenceTransformer(str(tiny_model_dir), device="cpu"), temperature=0.05,
                         margin_strategy=strategy, margin=margin, contrast_anchors=contrast[0],
                         contrast_positives=contrast[1])
    features = [model.tokenize([s.data.parts[0].data.rows[i][c] for i in batch]) for c in range(columns)]
    theirs = gist(features, None).item()
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_the_guide_s_embeddings_stay_on_a_gpu_only_where_they_fit_in_a_tenth_of_its_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 4000))  # bytes free, in all
    gpu = torch.device("cuda", 0)
    assert storage(100, gpu) == gpu and storage(101, gpu) == torch.device("cpu")
    assert storage(10**12, torch.device("cpu")) == torch.device("cpu")


@pytest.mark.cuda
def test_a_guided_step_on_the_gpu_leaves_out_what_the_cpu_does(no_dropout_model, triplets):
    """The guide's embeddings on the GPU, its row ids on the host: the same masks and loss as on the CPU (fp32); the
    embeddings kept in the host's memory (too large for the GPU) give the same masks too."""
    losses, masks = [], []
    for device in ("cpu", "cuda"):
        config = config_of(no_dropout_model, triplets, guide=str(no_dropout_model), guide_margin=0.02, device=device,
                           layout="padded")
        s = prepare(config)
        assert s.guide.embeddings.device == s.device  # a few kilobytes: on the device
        batch = batches_of_epoch(s.data, config, 0)[0]
        masks.append(Guide(s.guide.embeddings, s.guide.ids, 0.02).exclude(batch).candidates.cpu())
        losses.append(forward_backward(s, batch, config).item())
    on_host = Guide(s.guide.embeddings.cpu(), s.guide.ids, 0.02, device=s.device).exclude(batch).candidates
    assert on_host.device == s.device and torch.equal(on_host.cpu(), masks[1])
    assert torch.equal(masks[0], masks[1]) and masks[0].any()
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
