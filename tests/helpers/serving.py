"""A model server started by a test: a free port, and waiting until it answers."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, port: int, timeout_s: float = 180) -> None:
    """Return once ``/ping`` answers 200; fail at once, with its stderr if piped, if the server exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            stderr = server.stderr.read().decode(errors="replace")[-2000:] if server.stderr else ""
            raise AssertionError(f"the model server exited with status {server.returncode}: {stderr}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the model server did not answer on port {port} in {timeout_s:.0f} s")
        time.sleep(0.5)
