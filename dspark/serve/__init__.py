"""OpenAI-compatible HTTP serving over the continuous-batching engine (``pip install dspark[serve]``)."""

from dspark.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
