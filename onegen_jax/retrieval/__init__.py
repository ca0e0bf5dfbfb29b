"""Retrieval: encoding sequences into vectors with the model, and searching them."""
