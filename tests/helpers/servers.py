"""The servers a research group runs, started for real by a test: PostgreSQL in a temporary
directory (Debian's package; ``.ci/run`` installs it) and ``mlflow server`` on it with proxied
artifacts, exactly as docs/team.md starts the team's."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers.serving import free_port


@dataclass(frozen=True)
class Postgres:
    """A running server; ``uri(db)`` is an SQLAlchemy URL for MLflow and Optuna alike."""

    base: Path
    port: int
    bindir: Path
    as_postgres: tuple[str, ...]

    def uri(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@/{db}?host={self.base}&port={self.port}"

    def create_database(self, db: str) -> str:
        subprocess.run(
            [*self.as_postgres, str(self.bindir / "createdb"), "-h", str(self.base), "-p", str(self.port)]
            + ["-U", "postgres", db],
            check=True,
            capture_output=True,
        )
        return self.uri(db)


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server in a temporary directory, on a unix socket only."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert bins, "PostgreSQL server binaries are missing: .ci/run installs Debian's postgresql package"
    bindir = bins[-1].parent
    base = Path(tempfile.mkdtemp(prefix="covidct-pg-"))
    as_postgres = ("runuser", "-u", "postgres", "--") if os.geteuid() == 0 else ()
    if as_postgres:
        shutil.chown(base, "postgres")
    base.chmod(0o755)
    data, port = base / "data", free_port()
    subprocess.run(
        [*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    options = f"-k {base} -c listen_addresses='' -p {port}"
    subprocess.run(
        [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield Postgres(base, port, bindir, as_postgres)
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def running_mlflow_server(backend: str, artifacts: Path, timeout_s: float = 180) -> Iterator[str]:
    """``mlflow server`` on ``backend`` with proxied artifacts in ``artifacts``; yields its URL."""
    port = free_port()
    log = artifacts.parent / f"mlflow-server-{port}.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(artifacts),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as docs/team.md: no GenAI job runners
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise AssertionError(f"mlflow server exited with status {server.returncode}: {log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not answer in {timeout_s:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
