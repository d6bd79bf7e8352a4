"""Sampling: parameters, the batched sampler and grammar-constrained decoding."""

from adrenaline.core.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
