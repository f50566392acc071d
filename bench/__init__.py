"""Benchmarks of mnr against sentence-transformers (not installed, not run by make test).

Each script runs from the repository root as a module, e.g. ``python -m bench.compare``; the shared pieces are
``bench.common`` (paths, the machine line, BENCHMARKS.md sections) and ``bench.st`` (the one
sentence-transformers training harness every comparison uses).
"""
