"""Command-line entry points: flags and wiring only; the logic lives in onegen_jax."""
