"""The local Prefect server's bookkeeping, without starting one (the integration test test_cli starts, reuses and
stops it): a record that is not its process is not reused, and an unwritable PREFECT_HOME is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.local import prefect_server
from infra.local.config import StackError
from tidlq.core import files


def test_a_recorded_pid_that_is_another_process_is_not_the_server(tmp_path: Path) -> None:
    state = prefect_server.state_dir(tmp_path)
    state.mkdir()
    files.write_text(state / "server.pid", f"{os.getpid()}\n")  # alive, but it started at another time
    files.write_text(state / "server.start", "1.0\n")
    files.write_text(state / "port", "9\n")
    assert prefect_server.running(tmp_path) is None
    assert prefect_server.stop(tmp_path) is None  # and stopping it signals nothing: this test still runs
    assert not (state / "server.pid").exists()


def test_an_unwritable_prefect_home_names_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StackError, match=r"writable PREFECT_HOME .*file/home.*Set PREFECT_HOME"):
        prefect_server.ensure(tmp_path / "file" / "home")
