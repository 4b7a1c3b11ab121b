"""Shared test fixtures, the order modules run in, and skipping what needs the real data when it is absent."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from helpers.paths import DATA, REPO
from helpers.servers import Postgres, running_mlflow_server, running_postgres

if TYPE_CHECKING:
    from helpers.tiny import TrackedRepro


os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # xdist workers share the cores: intra-op threads split between them
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


# Modules that share a session fixture share a worker, so it is built once.
SHARED_GROUPS = {"test_pipeline.py": "tracked_repro", "test_team.py": "tracked_repro"}
SUITE_TIME = REPO / "reports" / "benchmarks" / "suite_time.json"  # written by benchmarks/suite_time.py


def module_seconds() -> dict[str, float]:
    """What each module cost its worker in the last recorded full run, a shared group's summed, so
    the slowest start first and the two xdist workers (pyproject's addopts) end together on the
    short ones. A module the record does not know yet counts as quick."""
    try:
        seconds = json.loads(SUITE_TIME.read_text())["full"]["worker_seconds_per_module"]
    except (OSError, KeyError, ValueError):
        return {}
    groups: dict[str, float] = {}
    for name, value in seconds.items():
        groups[SHARED_GROUPS.get(name, name)] = groups.get(SHARED_GROUPS.get(name, name), 0.0) + float(value)
    return {name: groups[SHARED_GROUPS.get(name, name)] for name in seconds}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 (pytest's hook signature)
    """The slowest modules first; without the real data, the tests that read it skip with the
    reason, and the rest still run."""
    seconds = module_seconds()
    items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))  # stable: a module's tests keep their order
    for item in items:  # --dist loadgroup: a module's tests stay on one worker, with its module fixtures
        item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(item.path.name, item.path.name)))
    if DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real data not found at {DATA} (set COVIDCT_TEST_DATA to ../shared/data's copy)")
    for item in items:
        if item.get_closest_marker("data"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL server for the session; each module makes its own databases on it."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def tracked_repro(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedRepro]:
    """The tiny `dvc repro` through a real MLflow server (PostgreSQL, proxied artifacts), pushed
    to a directory remote: the slowest thing the suite builds, so built once for test_pipeline
    and test_team (one xdist group: SHARED_GROUPS)."""
    from helpers.tiny import tracked_tiny_repro  # it reads REPO and DATA from here

    artifacts = tmp_path_factory.mktemp("artifacts")
    with running_mlflow_server(postgres.create_database("mlflow_team"), artifacts) as url:
        yield tracked_tiny_repro(tmp_path_factory.mktemp("team"), url)
