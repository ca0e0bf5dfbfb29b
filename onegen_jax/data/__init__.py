"""Data: OneGen records -> tokens with roles -> packed static batches (see docs/architecture.md)."""
