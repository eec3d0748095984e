"""A real S3-API server for the tests: moto's server mode in its own process on 127.0.0.1, and a
TCP proxy in front of it that can cut a connection, for the dropped-connection tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Dummy credentials: moto accepts any unless told to check them."""


METHODS = {b"GET", b"HEAD", b"PUT", b"POST", b"DELETE"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


class MotoServer:
    """`python -m moto.server` on 127.0.0.1 in a process of its own; `env` adds to its environment
    (e.g. INITIAL_NO_AUTH_ACTION_COUNT=0: every request's credentials are checked, and denied)."""

    def __init__(self, **env):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **DUMMY_ENV, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def client_env(endpoint: str) -> dict:
    """The environment a client (this process or a CLI subprocess) needs to reach `endpoint`."""
    return {**DUMMY_ENV, "AWS_ENDPOINT_URL": endpoint}


def s3fs_for(endpoint: str):
    """A fresh s3fs file system for setting up and checking buckets (not the code under test's)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        secret=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=endpoint,
        skip_instance_cache=True,
    )


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port`. While `cuts` > 0, a connection that
    carries a response to a GET of a key ending in `suffix` is closed after `after` bytes of the
    response (one cut per connection, `cuts` in all; -1: every time). `gets` counts the GETs of
    keys ending in `suffix` by path (with `cuts` 0 it only counts: the shard requests a store got).
    `delay`: seconds every request waits before it is passed on (a store farther away than moto)."""

    def __init__(self, target_port: int, suffix: str, after: int, cuts: int = 1, delay: float = 0.0):
        import collections

        self.target, self.suffix, self.after, self.cuts = target_port, suffix.encode(), after, cuts
        self.delay = delay
        self.cut_count = 0
        self.gets: collections.Counter = collections.Counter()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts == 0:
                return False
            if self.cuts > 0:
                self.cuts -= 1
            self.cut_count += 1
            return True

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        state = {"cut": False, "sent": 0, "closed": False}

        def close_both():
            state["closed"] = True
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

        def requests():  # client -> server: watch for a GET of the key
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    line = data.split(b"\r\n", 1)[0]
                    if self.delay and line.split(b" ", 1)[0] in METHODS:
                        time.sleep(self.delay)
                    path = line.split(b" ")[1].split(b"?")[0] if line.startswith(b"GET ") else b""
                    if path.endswith(self.suffix):
                        with self._lock:
                            self.gets[path.decode()] += 1
                    if (
                        line.startswith(b"GET ")
                        and line.split(b" ")[1].split(b"?")[0].endswith(self.suffix)
                        and not state["cut"]
                    ):
                        if self._take_cut():
                            state["cut"], state["sent"] = True, 0
                    upstream.sendall(data)
            except OSError:
                pass
            if not state["closed"]:
                close_both()

        threading.Thread(target=requests, daemon=True).start()
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if state["cut"]:
                    room = self.after - state["sent"]
                    if len(data) >= room:
                        client.sendall(data[:room])
                        break
                    state["sent"] += len(data)
                client.sendall(data)
        except OSError:
            pass
        if not state["closed"]:
            close_both()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
