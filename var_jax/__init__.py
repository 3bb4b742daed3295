"""var-jax: VAR (next-scale prediction) in JAX and Flax NNX."""

__version__ = "0.1.0"
