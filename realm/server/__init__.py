"""The edges: the OpenAI-compatible HTTP server, tenants configuration, keys, metrics.

`create_app(settings)` builds the app; `realm serve` runs it with uvicorn. docs/SERVING.md
is the operator's guide.
"""

from realm.server.app import create_app
from realm.server.settings import ServerSettings, load_settings

__all__ = ["ServerSettings", "create_app", "load_settings"]
