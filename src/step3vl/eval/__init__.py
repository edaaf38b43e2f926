"""Held-out evaluation: per-family accuracy of a model under a decoding mode."""
