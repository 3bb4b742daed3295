"""var-jax: VAR (next-scale prediction) in JAX and Flax NNX."""

import flax

# Parameters carry sharding names as metadata; placement happens explicitly in
# the trainer (jit out_shardings), never eagerly at construction.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
