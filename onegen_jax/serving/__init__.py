"""Serving a trained run over HTTP: the engine's owner thread (worker), the request bodies
(schema) and the API (app); launch/serve.py starts it."""
