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


@contextlib.contextmanager
def trickle(folder: Path, every: float = 0.05, whole: tuple[str, ...] = ("index.json",)):
    """A server of `folder` that sends each file's headers at once, then one byte every `every`
    seconds: each read succeeds well within any read time-out, a shard never ends. The files named in
    `whole` (the index) are sent at once. Yields the base URL."""
    import threading as _threading
    from http.server import BaseHTTPRequestHandler

    stop = _threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            name = self.path.lstrip("/")
            data = (folder / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if name in whole:
                self.wfile.write(data)
                return
            for i in range(len(data)):
                if stop.wait(every):
                    return
                try:
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                except OSError:
                    return

    with serve(handler=Trickle) as base:
        try:
            yield base
        finally:
            stop.set()  # before the server's shutdown, which waits for nothing but its own loop
