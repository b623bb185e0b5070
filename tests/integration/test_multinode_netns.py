"""Two real nodes on one machine: two network namespaces joined by a veth pair (addresses of the
test's own making, 10.77.0.1/30 and 10.77.0.2/30, on the veth only: traffic only between these
two namespaces), one ``deepspeed --no_ssh --node_rank i --master_addr 10.77.0.1`` per namespace,
both writing one run_dir (like a cluster's shared file system). ZeRO-3, one rank per node.

- the 2-node run equals the 1-node 2-rank run step for step (per-task losses);
- SIGKILL of node 1's rank ends node 0's launcher non-zero within 60 s (and node 1's);
- relaunched on both nodes, the run resumes from the last checkpoint and finishes with the
  same losses.

Each namespace gets its own /etc/netns/<name>/hosts (the two node names) and an empty
resolv.conf (``ip netns exec`` mounts them over /etc): without them every reverse lookup of the
peer's address waits on a DNS server the namespace cannot reach (a minute per start here).
Skipped where namespaces cannot be created (not root, no ``ip``, no CAP_NET_ADMIN); the
namespaces and their files are removed afterwards in every case.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_runs import STEPS, THREADS, TRAIN, assert_losses_match, free_port, reference_run
from test_train_deepspeed import records

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TAG = f"mmt{os.getpid() % 100000}"
NS = (f"{TAG}a", f"{TAG}b")              # namespace names = veth names (<= 15 characters)
ADDRS = ("10.77.0.1", "10.77.0.2")       # a /30 of our own, inside the namespaces only
HOSTS = ("node0", "node1")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _remove_namespaces() -> None:
    for ns in NS:
        _ip("netns", "del", ns, check=False)  # deleting a namespace destroys its end of the veth pair
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


@pytest.fixture(scope="module")
def nodes():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    try:
        _ip("netns", "add", NS[0])
        _ip("netns", "add", NS[1])
        _ip("link", "add", NS[0], "type", "veth", "peer", "name", NS[1])
        for ns, addr in zip(NS, ADDRS):
            _ip("link", "set", ns, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", ns, "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(ADDRS, HOSTS)))
            (etc / "resolv.conf").write_text("")
    except (subprocess.CalledProcessError, OSError) as e:
        _remove_namespaces()
        detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else e
        pytest.skip(f"cannot create network namespaces here: {detail}")
    try:
        yield
    finally:
        _remove_namespaces()


def launch_node(i: int, config: Path, run_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """Node i's launcher in its namespace, in its own process group (killed whole on failure)."""
    hostfile = run_dir.parent / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    cmd = ["ip", "netns", "exec", NS[i], str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile),
           "--no_ssh", "--node_rank", str(i), "--master_addr", ADDRS[0], "--master_port", str(port),
           "--module", "megamt.train", str(config), f"train.run_dir={run_dir}", *TRAIN]
    env = {**os.environ, **THREADS, "GLOO_SOCKET_IFNAME": NS[i]}
    with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_all(procs: list[subprocess.Popen], timeout: float, logs: list[Path]) -> list[int]:
    """Exit codes of every launcher; past ``timeout`` kill them all and fail with the logs."""
    t0 = time.time()
    try:
        return [p.wait(timeout=max(1.0, timeout - (time.time() - t0))) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        pytest.fail(f"no exit within {timeout} s (killed); logs:\n" +
                    "\n".join(log.read_text(errors="replace")[-2000:] for log in logs))


def drop_shm(port: int) -> None:
    """A SIGKILLed CPU rank leaves its shared-memory all-reduce buffer in /dev/shm."""
    from megamt.trainer import cpu_shm_buffer

    for rank in range(2):
        cpu_shm_buffer(rank, ADDRS[0], port).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def killed_and_resumed(nodes, tmp_path_factory):
    """2 nodes train; node 1's rank is SIGKILLed after a checkpoint; both are relaunched and
    resume. Returns what the tests inspect."""
    import psutil

    config, reference = reference_run(tmp_path_factory)
    work = tmp_path_factory.mktemp("two_nodes")
    run_dir = work / "run"
    logs = [work / "node0.log", work / "node1.log"]
    t_start = time.time()
    port = free_port()
    procs = [launch_node(i, config, run_dir, port, logs[i]) for i in (0, 1)]
    t0 = time.time()
    while not ((run_dir / "checkpoints" / "latest").exists()
               and max([r["step"] for r in records(run_dir) if "train/loss" in r], default=0) >= 5):
        if time.time() - t0 > 300 or any(p.poll() is not None for p in procs):
            wait_all(procs, 1, logs)
            pytest.fail("the 2-node run did not reach step 5 with a checkpoint:\n" + "\n".join(log.read_text(errors="replace")[-3000:] for log in logs))
        time.sleep(0.1)
    rank1 = [c for c in psutil.Process(procs[1].pid).children(recursive=True)
             if any(a.startswith("--local_rank=") for a in c.cmdline())]
    latest_at_kill = (run_dir / "checkpoints" / "latest").read_text().strip()
    t_kill = time.time()
    rank1[0].send_signal(signal.SIGKILL)
    rc_killed = wait_all(procs, 120, logs)
    survivor_s = time.time() - t_kill
    drop_shm(port)
    steps_before = sorted(r["step"] for r in records(run_dir) if "train/loss" in r)

    port = free_port()
    procs = [launch_node(i, config, run_dir, port, logs[i]) for i in (0, 1)]
    rc_resumed = wait_all(procs, 400, logs)
    return {"rank1": len(rank1), "rc_killed": rc_killed, "survivor_s": survivor_s, "latest_at_kill": latest_at_kill,
            "steps_before": steps_before, "rc_resumed": rc_resumed, "run_dir": run_dir, "reference": reference,
            "logs": [log.read_text(errors="replace") for log in logs], "seconds": time.time() - t_start}


def test_two_nodes_train_die_together_and_resume_equal_to_one_node(killed_and_resumed):
    r = killed_and_resumed
    print(f"two nodes: launch, kill, relaunch and resume {r['seconds']:.0f} s; survivor exited "
          f"{r['survivor_s']:.1f} s after the kill")
    node0, node1 = r["logs"]
    assert "nnodes=2, num_local_procs=1, node_rank=0" in node0 and "nnodes=2, num_local_procs=1, node_rank=1" in node1
    assert r["rank1"] == 1
    # the kill: node 0's launcher (whose rank survived it) ends non-zero, promptly; node 1's too
    assert r["rc_killed"][0] != 0 and r["rc_killed"][1] != 0, r["rc_killed"]
    assert r["survivor_s"] < 60
    k = int(r["latest_at_kill"].removeprefix("step_"))
    assert k >= 4 and max(r["steps_before"]) < STEPS, "the kill came too late to test a resume"
    # the relaunch: both nodes resume from the last complete checkpoint and finish
    assert r["rc_resumed"] == [0, 0], node0[-3000:] + node1[-3000:]
    assert f"resumed from {r['run_dir'] / 'checkpoints'}/step_{k:08d} at step {k}" in node0
    assert "  world_size: 2" in node0
    # step for step: every logged step (before the kill and after the resume) = the 1-node run
    assert_losses_match(r["run_dir"], r["reference"])
