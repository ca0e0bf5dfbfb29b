"""Training: sharded state, the OneGen train step and the fit loop."""
