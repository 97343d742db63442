"""The documented cluster path with the Ray the project installs: a head started by `ray start --head` (token
authentication on, as Ray turns it on when a token exists), a sweep attached to it with --address."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.sweep.helpers import TINY_BASE, read_rows, write_sweep

pytest.importorskip("ray")
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A head on a free local port under its own HOME (its token in HOME/.ray/auth_token) and temp dir."""
    if RAY is None:
        pytest.skip("the ray command is not installed")
    home = tmp_path / "home"
    home.mkdir()
    temp = tempfile.mkdtemp(prefix="rh")  # the system temp folder, not pytest's deep tmp_path: Ray's socket paths live under it
    env = {**os.environ, "HOME": str(home)}
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").is_file()
    port = _free_port()
    started = subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                              f"--temp-dir={temp}", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_sweep_runs_on_a_ray_start_head_with_token_authentication(tmp_path, ray_head):
    address, env = ray_head
    path = write_sweep(tmp_path, base=TINY_BASE, seeds=[0, 1])
    out = tmp_path / "sweeps"
    proc = subprocess.run([sys.executable, "-m", "mrplab", "sweep", str(path), "--executor", "ray",
                           "--address", address, "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out / "tiny" / "results.sqlite")
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows.values())
