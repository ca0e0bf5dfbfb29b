"""Training: the program (model, optimizer, sharded train step) built from a config, run
length, and the fit loop."""
