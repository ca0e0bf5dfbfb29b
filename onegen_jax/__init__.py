"""onegen_jax: OneGen (one-pass unified generation and retrieval) in JAX/Flax."""

import jax as _jax

# Random bits that XLA can partition: a sharded init draws each shard's values where it lives
# (no replicated [V, D] tensor of bits to slice) and equals the unsharded init. Default-on since
# jax 0.5; set here so the project never depends on that default.
_jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"
