"""Moved: the official-name table is `var_jax.models.official_names`.

This alias stays only until every importer has switched to the new module.
"""

from var_jax.models.official_names import (Rule, to_official,  # noqa: F401
                                           var_rules, vqvae_rules)
