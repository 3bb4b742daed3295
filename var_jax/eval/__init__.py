"""Evaluation: the ADM suite (FID, sFID, IS, precision, recall) in JAX."""
