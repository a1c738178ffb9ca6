"""Tensor- and expert-parallel layers and small decoders built on ``spmd``."""
