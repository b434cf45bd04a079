"""Shared fixtures. Prefect state (database, cached results) lives in a temporary PREFECT_HOME per test session."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

from tidlq.core.params import Params, load_params

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the project root: params.yaml, README.md


def pytest_configure(config: pytest.Config) -> None:
    state = Path(tempfile.mkdtemp(prefix="tidlq-test-"))
    os.environ["PREFECT_HOME"] = str(state / "prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    (state / "mlflow").mkdir()
    for name in ("PREFECT_API_URL", "TIDLQ_S3_BUCKET", "AWS_ENDPOINT_URL"):  # a developer's sourced stack env
        os.environ.pop(name, None)
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")


def pytest_unconfigure(config: pytest.Config) -> None:
    """A `tidlq run` in a subprocess without PREFECT_API_URL starts the local Prefect server of the session's
    PREFECT_HOME (infra.local.prefect_server): stop it, so that no test leaves a server behind."""
    from infra.local import prefect_server

    prefect_server.stop(prefect_server.home())


# Small and fast, but a real run: every stage executes on real data.
FAST = {
    "float_train.epochs": 3,
    "qat.epochs": 1,
    "quant.calibration_batches": 2,
    "verify.max_accuracy_drop": 100.0,
    "verify.min_sqnr_db": -100.0,
}


@pytest.fixture
def fast_params(tmp_path: Path) -> Params:
    """Defaults with few epochs and a permissive gate, outputs in tmp_path."""
    return load_params(None, FAST | {"output_dir": str(tmp_path / "outputs")})


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real Prefect API server (temporary SQLite database) for the whole session; its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The local stack (SeaweedFS, MLflow server, Prefect server) on 127.0.0.1 for the session: (state dir, env)."""
    from tests import servers

    state = tmp_path_factory.mktemp("stack")
    env = servers.start_stack(state)
    yield state, env
    servers.stop_stack(state)
