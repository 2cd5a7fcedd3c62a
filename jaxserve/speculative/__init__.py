"""Speculative decoding: proposers (n-gram lookup, a draft model, a self-draft), exact verification of k drafts
in one (R, k + 1) target step, and an adaptive controller that switches speculation off when it does not pay.
See docs/speculative.md."""

from jaxserve.speculative.config import SpeculativeConfig
from jaxserve.speculative.verify import Speculator, build_speculator, speculator_factory

__all__ = ["SpeculativeConfig", "Speculator", "build_speculator", "speculator_factory"]
