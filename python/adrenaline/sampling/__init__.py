"""Sampling: parameters, the batched sampler and grammar-constrained decoding."""

from adrenaline.sampling.params import SamplingParams

__all__ = ["SamplingParams"]
