"""Prefect flow runs whose process died: a `tidlq run` killed with SIGKILL cannot end its flow run, which would stay
RUNNING forever. Each quantize flow run started outside a deployment labels itself with its host and PID
(`tidlq.host`, `tidlq.pid`); the next one marks CRASHED every RUNNING quantize flow run of this host whose process
is gone, as `tracking.close_orphans` does for its MLflow run. Runs of deployments are their worker's to watch (it
reports a flow process that died as crashed); runs of other hosts are left alone (their processes may be alive).
"""

from __future__ import annotations

import os
import socket

from tidlq.core import files

HOST_LABEL, PID_LABEL = "tidlq.host", "tidlq.pid"


def claim_and_close_crashed(flow_name: str) -> list[str]:
    """Label the current flow run with this process (when it is not a deployment's), then mark CRASHED the RUNNING
    runs of `flow_name` whose labelled process on this host is gone; their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext
    from prefect.states import Crashed

    host = socket.gethostname()
    context = FlowRunContext.get()
    current = context.flow_run if context else None
    with get_client(sync_client=True) as client:
        if current is not None and current.deployment_id is None:
            client.update_flow_run_labels(current.id, {HOST_LABEL: host, PID_LABEL: str(os.getpid())})
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name={"any_": [flow_name]}),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING]))),
            limit=200)
        crashed = [run for run in running if run.id != getattr(current, "id", None) and _dead(run.labels, host)]
        for run in crashed:
            message = f"its process {run.labels[PID_LABEL]} on {host} ended without ending the flow run (killed)"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return [str(run.id) for run in crashed]


def _dead(labels: dict, host: str) -> bool:
    """Whether labels name a process of this host that is gone."""
    pid = str(labels.get(PID_LABEL, ""))
    return labels.get(HOST_LABEL) == host and pid.isdigit() and not files.pid_alive(int(pid))
