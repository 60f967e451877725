"""The HTTP API: llama.cpp server's routes, the OpenAI-compatible ones and llm-api's, on FastAPI."""
from .app import create_app
from .errors import APIError
from .state import ServerSettings, ServerState

__all__ = ["create_app", "APIError", "ServerSettings", "ServerState"]
