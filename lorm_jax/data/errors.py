"""Error type raised by the data loaders (defined in `lorm_jax.errors`)."""

from lorm_jax.errors import DataError

__all__ = ['DataError']
