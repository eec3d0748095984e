"""`pack-shards --engine ray` (issue 25) on a real two-node Ray cluster on 127.0.0.1, in a network
namespace of its own (tests/raykit.py): the bytes are a local pack's, through a killed driver, a
task killed mid-write, a node lost mid-pack, and into a bucket.

One cluster serves the module (Ray nodes take seconds to start): under `-n N` its tests run in one
xdist worker (conftest.py's ONE_WORKER_MODULES).
"""

import json
import subprocess
import sys
import time
import uuid

import pytest
import raykit
import s3kit
from conftest import REPO, cli_command, cli_env, run_cli

from pipeline.cli import pack_app

pytestmark = pytest.mark.ray

ARGS = ["--quiet", "--shards", "5", "--test-shards", "3"]
MOTO_PORT = 5555
"""The bucket server's port inside the cluster's namespace (its own: nothing else listens there)."""


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason="the ray extra: pip install 'clipstream[ray]'")
    why = raykit.namespaces_allowed()
    if why is not None:
        pytest.skip(f"a Ray test cluster needs a network namespace of its own (run as root): {why}")
    ns = raykit.NetNamespace()
    try:
        c = raykit.RayCluster(ns, cli_env(**s3kit.client_env(f"http://127.0.0.1:{MOTO_PORT}")))
    except BaseException:
        ns.close()
        raise
    yield c
    c.stop()
    ns.close()


@pytest.fixture(scope="module")
def reference(small_tree, tmp_path_factory):
    """The same videos packed locally by one process."""
    out = tmp_path_factory.mktemp("local")
    result = run_cli(pack_app, small_tree[0], out, *ARGS, "--workers", "1")
    assert result.exit_code == 0, result.output
    return out


def _files(folder) -> dict[str, bytes]:
    """Everything in a pack folder: shards, index, manifest, the plan and the shard records, and any
    temporary file left behind (which would make two folders differ)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ray_pack(small_tree, out) -> list[str]:
    return cli_command("pack_app") + [str(small_tree[0]), str(out), *ARGS, "--engine", "ray"]


def _shards_written(stdout: str) -> int:
    return int(stdout.split(" shards written this run")[0].rsplit(" ", 1)[1].split("/")[0])


def test_a_ray_pack_is_the_local_pack_byte_for_byte(cluster, small_tree, reference, tmp_path):
    out = tmp_path / "out"
    done = cluster.run(_ray_pack(small_tree, out))
    assert done.returncode == 0, done.stderr
    assert "8/8 shards written this run" in done.stdout
    assert _files(out) == _files(reference)


def test_a_driver_killed_mid_pack_and_run_again_gives_the_same_bytes(cluster, small_tree, reference, tmp_path):
    out = tmp_path / "out"
    killed = cluster.run(_ray_pack(small_tree, out), CLIPSTREAM_FAILPOINT="after-shards:3")
    assert killed.returncode == -9, killed.stderr
    assert not (out / "index.json").exists()
    again = cluster.run(_ray_pack(small_tree, out))
    assert again.returncode == 0, again.stderr
    assert _shards_written(again.stdout) <= 5  # only what was missing
    assert _files(out) == _files(reference)


def test_a_task_killed_mid_write_is_retried_and_leaves_no_temp_file(cluster, small_tree, reference, tmp_path):
    """The task packing 002.tar kills its own process half way through writing it (SIGKILL, as an
    out-of-memory kill would); Ray runs the task again, and its first try's temporary file goes."""
    out, marker = tmp_path / "out", tmp_path / "fired"
    done = cluster.run(
        _ray_pack(small_tree, out), CLIPSTREAM_FAILPOINT="mid-write:002.tar", CLIPSTREAM_FAILPOINT_ONCE=str(marker)
    )
    assert done.returncode == 0, done.stderr
    assert marker.exists(), "the failpoint never fired"
    assert not list(out.rglob("*.partial"))
    assert _files(out) == _files(reference)


def test_a_bucket_pack_on_ray_is_the_local_pack(cluster, small_tree, reference):
    """s3:// output through a moto server in the cluster's namespace: every task uploads its own
    shard in one PUT; the objects are the local pack's files."""
    moto = subprocess.Popen(
        cluster.ns.wrap([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(MOTO_PORT)]),
        env=cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    bucket = f"ray-{uuid.uuid4().hex[:12]}"
    tool = [sys.executable, str(REPO / "tests" / "raykit.py"), f"http://127.0.0.1:{MOTO_PORT}", bucket]
    try:
        made = cluster.run([*tool, "make"], timeout=60)
        assert made.returncode == 0, made.stderr
        done = cluster.run(_ray_pack(small_tree, f"s3://{bucket}/pack/"))
        assert done.returncode == 0, done.stderr
        listed = cluster.run([*tool, "dump"], timeout=60)
        assert listed.returncode == 0, listed.stderr
    finally:
        moto.kill()
        moto.wait()
    found = {k: bytes.fromhex(v) for k, v in json.loads(listed.stdout).items()}
    assert found == _files(reference)


def test_bench_pack_measures_the_ray_engine_against_local_workers(cluster):
    """bench_pack --engine ray on the cluster RAY_ADDRESS names: both variants pack every clip (it
    exits non-zero otherwise), and the overhead line is the ratio of the medians."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_pack.py"), "--engine", "ray"]
    done = cluster.run([*cmd, "--clips", "8", "--repeats", "1", "--shards", "2"], timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    runs = {r["variant"]: r for r in lines if r["bench"] == "pack"}
    assert set(runs) == {"local-w2", "ray"} and all(r["clips"] == 8 for r in runs.values())
    (engine,) = [r for r in lines if r["bench"] == "pack-engine"]
    assert engine["ray_address"] == cluster.address
    assert engine["overhead"] == pytest.approx(runs["ray"]["median_s"] / runs["local-w2"]["median_s"], rel=0.01)


def test_a_local_pack_does_not_import_ray(small_tree, tmp_path):
    """Ray is the ray engine's alone: the default engine never imports it (0.7 s, and a dependency)."""
    code = (
        "import sys; from pipeline.cli import pack_app\n"
        "try:\n    pack_app(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    args = [str(small_tree[0]), str(tmp_path / "out"), *ARGS, "--workers", "1"]
    done = subprocess.run([sys.executable, "-c", code, *args], env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_unreachable_cluster_is_one_line(small_tree, tmp_path):
    pytest.importorskip("ray", reason="the ray extra: pip install 'clipstream[ray]'")
    address = f"127.0.0.1:{s3kit.free_port()}"
    done = subprocess.run(
        _ray_pack(small_tree, tmp_path / "out") + ["--ray-address", address],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: cannot reach the Ray cluster at {address}: Connection refused"]


def test_a_node_lost_mid_pack_costs_only_its_tasks(cluster, small_tree, reference, tmp_path):
    """The task writing 003.tar is held half way through its write; the node it runs on is killed
    (SIGKILL of its raylet, object store and workers). Ray runs the task again on the other node,
    and the pack ends in the same bytes. Last in the module: the cluster has one node after it."""
    out, marker = tmp_path / "out", tmp_path / "held"
    driver = cluster.popen(
        _ray_pack(small_tree, out),
        CLIPSTREAM_FAILPOINT="pause:mid-write:003.tar",
        CLIPSTREAM_FAILPOINT_ONCE=str(marker),
    )
    deadline = time.monotonic() + 120
    while not (held := list(out.glob(".003.tar.*.partial"))) and driver.poll() is None:
        assert time.monotonic() < deadline, "the task never reached its write"
        time.sleep(0.02)
    assert driver.poll() is None, driver.communicate()
    writer = int(held[0].name.rsplit("-", 1)[1].split("@")[0])  # .NAME.<random>-<pid>@<host>.partial
    node = cluster.node_of(writer)
    assert node is not None and node.startswith("worker"), node
    cluster.kill(node)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    assert "8/8 shards written this run" in stdout
    assert not list(out.rglob("*.partial"))
    assert _files(out) == _files(reference)
