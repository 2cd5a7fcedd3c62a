"""Benchmark harnesses: importable (and tested) measurement code that is not part of the jaxserve library.
Each has a thin command in scripts/."""
