"""Evaluation: PPL / BPC on held-out text per block, paired bootstrap statistics, generator diagnostics."""
