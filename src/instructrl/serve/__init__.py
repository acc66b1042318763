"""Serving: a batching generation engine, an OpenAI-compatible HTTP API and a terminal chat.

Only ``app.py`` imports FastAPI; the engine and the chat need torch and transformers alone.
"""
