"""A real Ray cluster for the tests: a head node and worker nodes started with `ray start`, inside a
network namespace of their own where only loopback exists.

Why a namespace: Ray replaces `--node-ip-address 127.0.0.1` with the machine's own address, and
tests may reach nothing but loopback; inside `unshare -n` loopback is all there is, so Ray stays on
127.0.0.1. The namespace is held open by a sleeping process; every node, driver and server of a
test enters it with `nsenter -t PID -n`. The cluster gets its own HOME and temp folder and
RAY_AUTH_MODE=disabled: a `ray.init()` elsewhere leaves ~/.ray/auth_token, which would turn
authentication on for a head started later, and its second node could not join.

Every process is started in a session of its own and stopped by its process group id.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_PORT = 6379
"""The head's GCS port: fixed, the namespace is the cluster's alone."""


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process now."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def namespaces_allowed() -> str | None:
    """None when this process may make a network namespace (root, unshare, nsenter, ip), else why not."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n refused: {probe.stderr.strip()}"
    return None


class NetNamespace:
    """A network namespace with loopback up, alive as long as its holder process sleeps."""

    def __init__(self):
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep 100000"],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        if self.holder.stdout.readline().strip() != "up":
            raise RuntimeError("could not bring loopback up in a new network namespace")

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["nsenter", "-t", str(self.holder.pid), "-n", *argv]

    def close(self) -> None:
        os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait()


class RayCluster:
    """`ray start --head` with `head_cpus` plus `workers` nodes of one CPU each, in `ns`; `env` is
    every node's environment (and so its tasks'): PYTHONPATH to this tree, dummy AWS keys, ...
    With `head_cpus=0` every task runs on a worker node, so a test can kill the node a task is on."""

    def __init__(self, ns: NetNamespace, env: dict, workers: int = 2, head_cpus: int = 0):
        self.ns = ns
        self.root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
        (self.root / "home").mkdir()
        self.env = {
            **env,
            "HOME": str(self.root / "home"),
            "TMPDIR": str(self.root),
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            # a node killed by a test is declared dead in about 2 s, not 30
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "500",
            "RAY_health_check_failure_threshold": "3",
        }
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.groups: dict[str, int] = {}
        try:
            self._start("head", head_cpus, ["--head", "--port", str(HEAD_PORT), "--include-dashboard", "false"])
            for i in range(workers):  # one at a time: nodes starting together time out on 2 cores
                self._start(f"worker{i}", 1, ["--address", self.address])
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, cpus: int, args: list[str]) -> None:
        cmd = [
            RAY,
            "start",
            *args,
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(cpus),
            "--object-store-memory",
            str(100 * 2**20),
            "--temp-dir",
            str(self.root / "t"),
            "--disable-usage-stats",
        ]
        # `ray start` returns once the node is up; its daemons stay in its process group
        proc = subprocess.Popen(
            self.ns.wrap(cmd),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.groups[name] = proc.pid
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start for {name} failed:\n{out}")

    def node_of(self, pid: int) -> str | None:
        """The node that runs process `pid` (a Ray worker process: its own process group, a child of
        its node's raylet)."""
        table = _processes()
        while pid in table:
            ppid, group = table[pid]
            name = next((n for n, g in self.groups.items() if g == group), None)
            if name is not None:
                return name
            pid = ppid
        return None

    def kill(self, name: str) -> None:
        """SIGKILL a node, as if its machine died: its daemons and every process they started (Ray's
        worker processes have process groups of their own, so killing the node's group is not enough)."""
        group = self.groups.pop(name)
        table = _processes()
        doomed = {pid for pid, (_, g) in table.items() if g == group}
        grew = True
        while grew:
            more = {pid for pid, (ppid, _) in table.items() if ppid in doomed} - doomed
            doomed |= more
            grew = bool(more)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def driver_env(self, **extra) -> dict:
        return {**self.env, "RAY_ADDRESS": self.address, **extra}

    def run(self, argv: list[str], timeout: float = 300, **extra) -> subprocess.CompletedProcess:
        """A driver (or any command) in the cluster's namespace, with RAY_ADDRESS set."""
        return subprocess.run(
            self.ns.wrap(argv), env=self.driver_env(**extra), capture_output=True, text=True, timeout=timeout
        )

    def popen(self, argv: list[str], **extra) -> subprocess.Popen:
        return subprocess.Popen(
            self.ns.wrap(argv),
            env=self.driver_env(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def stop(self) -> None:
        for name in list(self.groups):
            self.kill(name)
        time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


def _bucket_tool(endpoint: str, bucket: str, action: str) -> None:
    """Run inside the namespace (this file as a script): `make` the bucket, or `dump` its objects
    under pack/ as JSON, name -> hex bytes, for the test outside to compare."""
    import json

    sys.path.insert(0, str(Path(__file__).parent))
    import s3kit

    fs = s3kit.s3fs_for(endpoint)
    deadline = time.monotonic() + 60
    while True:  # the server may still be starting
        try:
            fs.ls("")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    if action == "make":
        fs.mkdir(bucket)
        return
    root = f"{bucket}/pack"
    print(json.dumps({p[len(root) + 1 :]: fs.cat_file(p).hex() for p in fs.find(root)}))


if __name__ == "__main__":
    _bucket_tool(*sys.argv[1:4])
