"""onegen_jax: OneGen (one-pass unified generation and retrieval) in JAX/Flax."""

__version__ = "0.1.0"
