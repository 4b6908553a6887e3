"""The operator console: a web page over what `rsaga health`, `rsaga process` and `rsaga dlq` read.

Install with ``pip install 'rsaga[web]'``; serve with ``rsaga web`` or mount `create_app()` in
your own ASGI application. Without a token the console is read-only.
"""

from rsaga.web.app import create_app, serve

__all__ = ["create_app", "serve"]
