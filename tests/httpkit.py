"""One real HTTP server on 127.0.0.1 for the tests: a folder served by http.server, through a
handler class a test may change (drop a connection, refuse a name, trickle bytes)."""

from __future__ import annotations

import contextlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Quiet(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler without a log line per request."""

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder: Path | None = None, handler=Quiet):
    """Serve `folder` (or whatever `handler` answers) on a free port; yields the base URL."""
    factory = handler if folder is None else partial(handler, directory=str(folder))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
