"""mnr: fine-tune sentence-embedding models with Multiple Negatives Ranking loss."""

__version__ = "0.1.0"

from mnr.model import SentenceEncoder  # noqa: E402

__all__ = ["SentenceEncoder", "__version__"]
