"""An OpenAI-compatible HTTP server (FastAPI + uvicorn, server-sent events) over the continuous-batching
scheduler: `python -m gptoss.tools.serve --model DIR`."""
from .app import create_app

__all__ = ["create_app"]
