"""A guide model against false negatives (GISTEmbed: Solatorio 2024, arXiv:2402.16829; sentence-transformers'
GISTEmbedLoss).

MNR ranks each anchor's positive above every other candidate of its batch, so another row's positive that also
answers this anchor (a duplicate question, a second relevant passage) is pushed away from it. A guide, any model mnr
loads (the base model, a first run's best/, a larger model), scores each anchor against the batch's candidates; a
candidate it scores above the anchor's own positive, less a margin, is left out of that anchor's softmax.

The guide embeds every distinct training text once per run, before the first step (anchors as queries, the other
columns as documents, each with the guide's own prompts), and keeps the embeddings on the run's device: a step
only looks its rows up. Where they would take more than a tenth of the GPU's free memory (millions of texts, a
large guide: memory training needs), they stay in the host's memory instead and a step sends its rows' embeddings
over (kilobytes), a choice made from the device's free memory at run time and logged.

Its masks follow the loss's candidates across processes (each process gathers the guide embeddings of the others'
rows, as the loss gathers their embeddings), so they compose with hard negatives, gradient caching, Matryoshka and
DistributedDataParallel alike.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from mnr import distributed
from mnr.data import TrainingSet
from mnr.errors import ModelError
from mnr.losses import LOSSES, Excluded
from mnr.mixture import Mixture
from mnr.model import SentenceEncoder
from mnr.packing import to_device
from mnr.settings import check_types, require, setting

log = logging.getLogger(__name__)

STRATEGIES = ("absolute", "relative")
DEVICE_SHARE = 0.1  # the guide's embeddings stay on a GPU if they take at most this share of its free memory


@dataclass
class GuideSettings:
    guide: str = setting("", "a model (a folder or a hub name) that scores each anchor against its batch's candidates: "
                             "a candidate it scores above the anchor's positive, less --guide-margin, is left out of "
                             "that anchor's softmax as a likely false negative (GISTEmbed); e.g. the base model or a "
                             "first run's best/. It embeds each distinct training text once per run (default: none)",
                         weights=True, metavar="MODEL")
    guide_margin: float = setting(0.0, "how far below the positive's guide score a candidate may score and still be "
                                       "left out: absolute, in cosine (0: only candidates the guide scores above the "
                                       "positive), or relative, a fraction of the positive's score "
                                       "(--guide-margin-strategy)", weights=True)
    guide_margin_strategy: str = setting("absolute", "absolute: left out above (positive's score - margin); "
                                                     "relative: above (positive's score - |positive's score| x margin)",
                                         weights=True)

    def __post_init__(self):
        check_types(self)
        require(self, "guide_margin", math.isfinite(self.guide_margin) and self.guide_margin >= 0,
                "must be a number >= 0")
        require(self, "guide_margin_strategy", self.guide_margin_strategy in STRATEGIES,
                f"must be one of {', '.join(STRATEGIES)}")

    def describe(self) -> str:
        """The guide and its rule, for logs and the model card."""
        margin = self.guide_margin
        rule = ("the positive's score" if not margin else
                f"the positive's score - {margin:g}" if self.guide_margin_strategy == "absolute" else
                f"the positive's score - {margin:g} x |the positive's score|")
        return f"`{self.guide}` leaves out of each anchor's softmax the candidates it scores above {rule}"


def storage(nbytes: int, device: torch.device) -> torch.device:
    """Where the guide's embeddings (``nbytes``) stay: the run's device, unless it is a GPU on which they would take
    more than DEVICE_SHARE of its free memory now (before training's own memory), then the host's memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= DEVICE_SHARE * free else torch.device("cpu")


def load_guide(settings: GuideSettings, device: torch.device) -> SentenceEncoder | None:
    """--guide, loaded (before any work: a guide that does not load fails the run before mining and training)."""
    if not settings.guide:
        return None
    try:
        return SentenceEncoder.load(settings.guide, device=device)
    except (ModelError, OSError) as e:
        raise ModelError(f"--guide {settings.guide}: {e}") from None


class Guide:
    """The guide's embeddings of every text of the training rows, and the candidates they leave out of a batch.

    ``embeddings``: (T, G) normalised, on the run's device (or the host's memory: ``device``, the run's, is then
    where a step's rows go); ``ids``: per dataset of the run, (rows, columns) -> the row of each text's embedding,
    on the host (None for a dataset whose loss has no in-batch candidates; one tensor: a run of one dataset). The
    guide's dimension and tokenizer need not be the trained model's: it embeds text.
    """

    def __init__(self, embeddings: torch.Tensor, ids: torch.Tensor | list[torch.Tensor | None], margin: float = 0.0,
                 relative: bool = False, gather: bool = False, device: torch.device | None = None):
        self.embeddings, self.ids = embeddings, [ids] if isinstance(ids, torch.Tensor) else ids
        self.margin, self.relative, self.gather = margin, relative, gather
        self.device = device or embeddings.device
        self.left_out: list[torch.Tensor | None] = []  # per step since the last read: the share of candidates left out

    @classmethod
    def embed(cls, model: SentenceEncoder, settings: GuideSettings, data: Mixture | TrainingSet,
              device: torch.device, bf16: bool, processes: int, progress: bool = False) -> Guide:
        """Embed every distinct text of ``data`` (of its datasets whose loss ranks in-batch candidates) with
        ``model``: anchors with its query prompt, the other columns with its document prompt (as its encode_query /
        encode_document would)."""
        parts = [(data, True)] if isinstance(data, TrainingSet) else [
            (p.data, getattr(LOSSES[p.dataset.loss], "excludes", False)) for p in data.parts]
        query, document = model.prompt(role="query"), model.prompt(role="document")
        texts: dict[str, dict[str, None]] = {}  # prompt -> its distinct texts, in order
        for rows, guided in parts:
            sides = [query] + [document] * (len(rows.columns) - 1)
            for row in rows.rows if guided else []:
                for c, prompt in enumerate(sides):
                    texts.setdefault(prompt, {})[row[c]] = None
        position, embedded = {}, []
        for prompt, distinct in texts.items():  # the prompt passed apart: pooling may leave its tokens out
            position |= {(prompt, text): len(position) + i for i, text in enumerate(distinct)}
            embedded.append(torch.from_numpy(model.encode(list(distinct), normalize=True, bf16=bf16, prompt=prompt,
                                                          show_progress="guide" if progress else False)))
        ids = [torch.tensor([[position[query if c == 0 else document, t] for c, t in enumerate(row)]
                             for row in rows.rows]) if guided else None for rows, guided in parts]
        embeddings = torch.cat(embedded)
        where = storage(embeddings.numel() * embeddings.element_size(), device)
        log.info("guide: %s embedded %s distinct texts (%.0f MB, kept %s)", settings.guide, f"{len(position):,}",
                 embeddings.numel() * embeddings.element_size() / 2**20,
                 "on the run's device" if where == device else "in the host's memory (a step sends its rows')")
        return cls(embeddings.to(where), ids, settings.guide_margin, settings.guide_margin_strategy == "relative",
                   gather=processes > 1, device=device)

    def exclude(self, batch: list[int], part: int = 0) -> Excluded | None:
        """The candidates the guide leaves out for the rows ``batch`` (this process's, of dataset ``part``), in the
        loss's layout: a candidate scored above the anchor's positive less the margin; never the anchor's own
        positive. None for a dataset whose loss has no in-batch candidates."""
        if self.ids[part] is None:
            self.left_out.append(None)
            return None
        if self.embeddings.device == self.device:
            looked_up = self.embeddings[to_device(self.ids[part][batch], self.device)]  # ids on the host: no wait
        else:  # kept in the host's memory
            looked_up = to_device(self.embeddings[self.ids[part][batch]], self.device)
        columns = looked_up.unbind(1)  # C x (B, G)
        anchors, positives = columns[0], columns[1]
        rank = distributed.world()[0] if self.gather else 0
        if self.gather:  # every process's rows, in the order the loss gathers them
            candidates = torch.cat([distributed.gather(c) for c in columns[1:]])
            all_anchors = distributed.gather(anchors)
        else:
            candidates, all_anchors = torch.cat(columns[1:]), anchors
        rows = torch.arange(len(batch), device=anchors.device)
        target = rank * len(batch) + rows
        to_candidates = anchors @ candidates.T  # (B, W·B·(1+N)): query_to_doc
        own = to_candidates[rows, target].unsqueeze(1)  # the guide's score of each row's own pair
        threshold = own - (own.abs() * self.margin if self.relative else self.margin)

        def above(scores: torch.Tensor) -> torch.Tensor:  # the row's own pair is never left out
            out = scores > threshold
            out[rows, target] = False
            return out

        candidates_out = above(to_candidates)
        fraction = candidates_out.sum() / max(1, candidates_out.numel() - len(batch))
        self.left_out.append(distributed.mean(fraction.float()))
        # every direction a loss may rank (MNR's --directions), each against the same threshold
        return Excluded(candidates_out, anchors=above(positives @ all_anchors.T),
                        queries=above(anchors @ all_anchors.T), documents=above(positives @ candidates.T))

    def read(self) -> list[torch.Tensor | None]:
        """The steps' shares since the last read, in step order (tensors on the device, not yet read; None for a
        step on a dataset the guide has no say in)."""
        out, self.left_out = self.left_out, []
        return out
