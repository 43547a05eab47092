"""The multi-tenant HTTP server: `create_app(settings, backend=None)` and `ServerSettings`."""

from matryoshka_lora.server.app import create_app
from matryoshka_lora.server.settings import ServerSettings, load_settings

__all__ = ["create_app", "ServerSettings", "load_settings"]
