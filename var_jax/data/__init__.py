"""Training data: official VAR augmentation over folder, TFDS, digits."""

from var_jax.data.loader import Loader, make_loader
from var_jax.data.sources import DataError

__all__ = ["DataError", "Loader", "make_loader"]
