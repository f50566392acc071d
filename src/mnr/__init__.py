"""mnr: fine-tune sentence-embedding models with Multiple Negatives Ranking loss."""

from mnr.model import SentenceEncoder
from mnr.version import __version__

__all__ = ["SentenceEncoder", "__version__"]
