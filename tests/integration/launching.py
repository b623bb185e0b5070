"""Helpers of the integration tests that start process trees (launchers and their ranks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tree(cmd: list[str], timeout: float, **kw) -> tuple[int, str]:
    """Run ``cmd`` in its own process group, stdout and stderr together; past ``timeout`` the
    whole group (a launcher *and* its ranks) is killed and the test fails with the output's tail.
    Returns (exit code, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:3]}: no exit within {timeout} s (process group killed):\n{out[-4000:]}")
    return proc.returncode, out


def user_shell_env(folder: Path) -> dict[str, str]:
    """The environment of a user's shell in this checkout: this venv's console scripts first on
    PATH (``python``, ``megamt``), and ``deepspeed`` a wrapper (written into ``folder``) that adds
    a free ``--master_port``: the default 29500 may be taken on a shared machine."""
    folder.mkdir(parents=True, exist_ok=True)
    venv_bin = Path(sys.executable).parent
    shim = folder / "deepspeed"
    shim.write_text(f'#!/bin/bash\nexec "{venv_bin / "deepspeed"}" --master_port {free_port()} "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{venv_bin}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
