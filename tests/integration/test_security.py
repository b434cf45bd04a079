"""Security (issue #7): loading never runs a pickle, names from params cannot steer a file or an S3 key out of its
folder, the local stack listens on loopback only, and no credential reaches MLflow, Prefect's logs or the outputs."""

from __future__ import annotations

import ast
import json
import os
import posixpath
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow.artifacts
import numpy as np
import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from flows.quantize import quantize
from infra.local.config import service_ports
from infra.local.processes import group_members
from tests import servers
from tests.conftest import FAST, PROJECT_ROOT
from tidlq.core import inputs, s3
from tidlq.core.errors import UserError
from tidlq.core.params import DataParams, StorageParams, load_params
from tidlq.models import builtin, networks
from tidlq.results import storage
from tidlq.stages.prepare_data import run as prepare
from tidlq.tidl import options

# ---------------------------------------------------------------- 1. no pickle is ever executed on load


class Payload:
    """Unpickling it creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_npz_with_object_array_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    x = np.empty(30, dtype=object)
    x[:] = [Payload(marker)] * 30
    np.savez(tmp_path / "evil.npz", x=x, y=np.arange(30) % 3)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError) as err:
        prepare(DataParams(source=str(tmp_path / "evil.npz")), out)
    assert "data.source" in str(err.value) and "Object arrays cannot be loaded" in str(err.value)
    assert not marker.exists()
    assert not list(out.iterdir())
    np.load(tmp_path / "evil.npz", allow_pickle=True)["x"]  # the control: the payload is live
    assert marker.exists()


def test_torch_zip_weights_with_code_are_refused_and_run_nothing(tmp_path: Path) -> None:
    """The raw-pickle case is in tests/unit/test_models.py; this is torch.save's zip format."""
    marker = tmp_path / "pwned"
    torch.save({"weight": Payload(marker)}, tmp_path / "w.pt")
    with pytest.raises(UserError, match="tensor-only"):
        networks.load_weights(torch.nn.Linear(1, 1), tmp_path / "w.pt")
    assert not marker.exists()


# Calls that deserialise with code execution, or run strings as code: refused outright.
FORBIDDEN = {"pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads", "dill.load",
             "dill.loads", "joblib.load", "shelve.open", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load",
             "numpy.lib.format.read_array", "eval", "exec", "builtins.eval", "builtins.exec"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (`import numpy as np`, `from torch import load`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                          for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    return names


def _dotted(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([aliases.get(func.id, func.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, where: str) -> tuple[list[str], dict[str, int]]:
    """The unsafe load/eval calls in `source` ("file:line: why"), and how many loads of each kind were checked."""
    tree = ast.parse(source)
    aliases, problems, seen = _aliases(tree), [], {"torch.load": 0, "numpy.load": 0, "yaml.load": 0}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = _dotted(call.func, aliases)
        at = f"{where}:{call.lineno}: {ast.unparse(call)[:100]}"
        if name in FORBIDDEN:
            problems.append(f"{at}: {name} is not allowed")
        elif name == "torch.load":
            seen[name] += 1
            flag = _keyword(call, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{at}: torch.load without weights_only=True")
        elif name == "numpy.load":
            seen[name] += 1
            flag = _keyword(call, "allow_pickle")
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{at}: np.load without allow_pickle=False")
        elif name == "yaml.load":
            seen[name] += 1
            loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            if not (loader is not None and ast.unparse(loader).rsplit(".", 1)[-1] in SAFE_YAML_LOADERS):
                problems.append(f"{at}: yaml.load without a SafeLoader")
    return problems, seen


def project_sources() -> Iterator[tuple[str, str]]:
    """(where, source) of every Python file of flows/, tidlq/, infra/, and the compile script tidlq ships."""
    for folder in ("flows", "tidlq", "infra"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            yield str(path.relative_to(PROJECT_ROOT)), path.read_text()
    yield "tidl/compile.py (tidlq/tidl/options.py)", options.COMPILE_SCRIPT


def test_static_check_catches_unsafe_calls() -> None:
    bad = ("import torch, pickle, yaml\nimport numpy as np\nfrom torch import load as tl\n"
           "torch.load(p)\ntl(p, weights_only=False)\nnp.load(p)\nnp.load(p, allow_pickle=True)\npickle.loads(b)\n"
           "yaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\neval('1')\nexec('x')\n"
           "torch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
           "model.eval()\nyaml.safe_load(s)\n")
    problems, seen = unsafe_calls(bad, "snippet")
    assert [int(p.split(":")[1]) for p in problems] == list(range(4, 13))
    assert seen == {"torch.load": 3, "numpy.load": 3, "yaml.load": 3}


def test_project_source_loads_nothing_unsafely() -> None:
    problems, seen = [], {"torch.load": 0, "numpy.load": 0, "yaml.load": 0}
    for where, source in project_sources():
        found, counts = unsafe_calls(source, where)
        problems += found
        seen = {k: seen[k] + counts[k] for k in seen}
    assert problems == []
    assert seen["torch.load"] >= 4 and seen["numpy.load"] >= 4  # the check did look at the real loads


# ---------------------------------------------------------------- 2. user strings never leave their folder or prefix


@pytest.mark.parametrize(("field", "value"), [
    ("model.name", "../../evil"), ("model.name", "a/b"), ("model.name", ".."), ("model.name", "/etc"),
    ("model.name", "evil\n"), ("model.name", "ｅｖｉｌ"),
    ("model.source", "pkg.mod:fn\n"), ("model.source", "pkg.mod:fn/../../x"),
    ("storage.prefix", "../x"), ("storage.prefix", "a/../../b"), ("storage.prefix", "a//b"), ("storage.prefix", "."),
    ("storage.prefix", ""), ("storage.bucket", "tidlq/../other"), ("storage.bucket", ".."),
    ("storage.endpoint_url", "http://AKIAEXAMPLE:secret@127.0.0.1:9000"),
])
def test_names_that_could_escape_are_refused(field: str, value: str) -> None:
    with pytest.raises(UserError) as err:
        load_params(None, {field: value})
    assert f"--set {field}: {field}:" in str(err.value)


def test_refused_endpoint_url_is_not_echoed() -> None:
    """The message of a refused endpoint_url does not repeat it: it would put the password in logs and states."""
    with pytest.raises(UserError) as err:
        load_params(None, {"storage.endpoint_url": "http://AKIAEXAMPLE:pa55-SECRET@127.0.0.1:9000"})
    assert "storage.endpoint_url" in str(err.value) and "pa55-SECRET" not in str(err.value)


def _inside(child: Path, parent: Path) -> bool:
    return child.resolve().is_relative_to(parent.resolve())


@settings(max_examples=300, deadline=None)
@given(name=st.text(st.sampled_from("ab./\\-_~:\n%"), max_size=12),
       prefix=st.text(st.sampled_from("ab./-_"), max_size=12))
def test_accepted_names_stay_inside(name: str, prefix: str) -> None:
    """Whatever model.name / storage.prefix are accepted, outputs stay in output_dir and keys under the prefix."""
    out = Path("/tmp/tidlq-security/outputs")
    try:
        p = load_params(None, {"model.name": name or None, "storage.prefix": prefix, "output_dir": str(out)})
    except UserError:
        return
    assert _inside(p.model_dir, out) and p.model_dir.resolve() != out.resolve()
    assert _inside(p.stage_root, out)
    dest = storage.destination(p.storage.model_copy(update={"bucket": "tidlq"}), p.model.display_name, "run1")
    assert ".." not in dest.prefix.split("/") and "" not in dest.prefix.split("/")
    assert posixpath.normpath(dest.prefix) == dest.prefix
    assert dest.prefix.startswith(prefix.strip("/") + "/")
    assert f"{p.model.display_name}-qdq" == posixpath.basename(f"{p.model.display_name}-qdq")  # registry name


def test_bucket_from_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDLQ_S3_BUCKET", "tidlq/../other")
    with pytest.raises(UserError, match="TIDLQ_S3_BUCKET 'tidlq/../other' is not an S3 bucket name"):
        storage.destination(StorageParams(), "m", "r")


@pytest.mark.parametrize("uri", ["s3://tidlq/../x.npz", "s3://tidlq/data/..", "s3://tidlq/./x.npz",
                                 "s3://tidlq/a/../../b.npz", "s3://../x.npz", "s3://Tidlq/x.npz"])
def test_s3_inputs_with_dot_parts_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setenv("TIDLQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # refused before any request: nothing listens
    for call in (lambda: inputs.resolve(uri, "data.source"), lambda: inputs.fingerprint(uri, "model.weights")):
        with pytest.raises(UserError, match=r"(data\.source|model\.weights) .*'\.' or '\.\.' parts"):
            call()
    assert not (tmp_path / "cache").exists()


def test_cli_refuses_an_escaping_name_with_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "deep" / "outputs"
    for field, value in (("model.name", "../../evil"), ("storage.prefix", "../../evil")):
        result = CliRunner().invoke(app, ["run", "-p", str(PROJECT_ROOT / "params.yaml"), "--set",
                                          f"{field}={value}", "--set", f"output_dir={out}"])
        text = result.output
        assert result.exit_code == 2, text
        assert field in text and "Traceback" not in text
    assert not list(tmp_path.rglob("*evil*")) and not out.exists()


# ---------------------------------------------------------------- 3. the stack listens on loopback only

LOOPBACK = {"127.0.0.1", "::1"}


def listening(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, tcp|udp, ip, port) of every listening TCP socket and unconnected bound UDP socket of `pids`."""
    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            tcp = c.type == 1  # SOCK_STREAM
            if (tcp and c.status == psutil.CONN_LISTEN) or (not tcp and not c.raddr and c.laddr):
                found.append((pid, "tcp" if tcp else "udp", c.laddr.ip, c.laddr.port))
    return found


def test_stack_binds_loopback_only_and_hides_its_keys(stack) -> None:
    state, env = stack
    config = json.loads((state / "stack.json").read_text())
    secret_values = [env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"]]
    for name, pid in servers.pids(state).items():
        assert pid is not None, f"{name} is not running"
        members = group_members(pid)
        sockets = listening(members)
        exposed = [s for s in sockets if s[2] not in LOOPBACK]
        assert exposed == [], f"{name} listens beyond loopback: {exposed}"
        ports = {port for _, kind, _, port in sockets if kind == "tcp"}
        assert set(service_ports(name, config).values()) <= ports, (name, sorted(ports))
        for member in members:  # a command line is readable by every user of the machine; the environment is not
            cmdline = " ".join(psutil.Process(member).cmdline())
            assert not any(value in cmdline for value in secret_values), f"{name} has a key on its command line"
    for private in ("credentials", "env"):
        assert (state / private).stat().st_mode & 0o077 == 0, f"{private} is readable by others"


# ---------------------------------------------------------------- 4. no credential in MLflow, Prefect or the outputs

SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


def secret_values(env: dict[str, str]) -> dict[str, str]:
    """name -> value of every credential in the stack env and the process environment (not paths, 8+ characters)."""
    merged = {**os.environ, **env}
    return {k: v for k, v in merged.items() if SECRET_NAME.search(k) and len(v) >= 8 and "/" not in v}


def file_blobs(root: Path, label: str) -> dict[str, bytes]:
    return {f"{label}/{p.relative_to(root)}": p.read_bytes() for p in root.rglob("*") if p.is_file()}


def mlflow_blobs(client: MlflowClient, run_id: str, dst: Path) -> dict[str, bytes]:
    """The run's params, tags, inputs and run name, and every artifact file it logged."""
    run = client.get_run(run_id)
    blobs = {"mlflow/params": json.dumps(run.data.params).encode(), "mlflow/tags": json.dumps(run.data.tags).encode(),
             "mlflow/run_name": (run.info.run_name or "").encode(),
             "mlflow/inputs": json.dumps([d.dataset.to_dictionary() for d in run.inputs.dataset_inputs]).encode()}
    if client.list_artifacts(run_id):
        blobs |= file_blobs(Path(client.download_artifacts(run_id, "", str(dst))), "mlflow-artifacts")
    return blobs


def prefect_blobs(flow_run_id: str) -> dict[str, bytes]:
    """The flow run's logs (after the API log handler is flushed), parameters, state and task run states."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:  # the log worker may still be sending
            found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if found and len(found) == len(logs):
                break
            logs = found
            time.sleep(1)
        run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert logs, f"no Prefect logs for flow run {flow_run_id}"
    return {"prefect/logs": "\n".join(f"{log.name} {log.message}" for log in logs).encode(),
            "prefect/flow_run": run.model_dump_json().encode(),
            "prefect/task_runs": json.dumps([t.model_dump(mode="json") for t in tasks]).encode()}


def leaks(blobs: dict[str, bytes], secrets_: dict[str, str]) -> list[str]:
    return [f"{name} in {where}" for where, blob in blobs.items() for name, value in secrets_.items()
            if value.encode() in blob]


def upload_inputs(env: dict[str, str], folder: Path) -> dict[str, str]:
    """The digits as an .npz and untrained MobileNetV2Tiny weights (no training: the run stays short) in the stack's
    S3; the params overrides that read them from there (and let the untrained model through the float check)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(folder / "digits.npz", x=(digits.images * 255 / 16).astype(np.uint8), y=digits.target)
    torch.manual_seed(0)
    torch.save(builtin.MobileNetV2Tiny().state_dict(), folder / "weights.pt")
    bucket = env["TIDLQ_S3_BUCKET"]
    for name in ("digits.npz", "weights.pt"):
        servers.s3_client(env).upload_file(str(folder / name), bucket, f"security/inputs/{name}")
    return {"data.source": f"s3://{bucket}/security/inputs/digits.npz",
            "model.weights": f"s3://{bucket}/security/inputs/weights.pt",
            "verify.min_float_accuracy": 0}  # untrained on purpose: the float check would stop the run


@pytest.mark.slow
def test_no_credential_in_tracking_logs_or_outputs(prefect_api: str, stack, tmp_path: Path) -> None:
    """One real run on the stack (data and weights from S3, published to S3), then every place it wrote is searched."""
    _, env = stack
    found = secret_values(env)
    assert {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} <= set(found)
    (tmp_path / "inputs").mkdir()
    sources = upload_inputs(env, tmp_path / "inputs")
    cache_dir = tmp_path / "cache"
    out = tmp_path / "outputs"
    with servers.env_applied(env | {"TIDLQ_CACHE_DIR": str(cache_dir)}):
        summary = quantize(None, FAST | sources | {"output_dir": str(out), "model.name": "sec-net",
                                                   "tracking.experiment": "it-security"})
        blobs = prefect_blobs(summary["run"]["prefect_flow_run_id"])
    cached = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert sorted(p.name for p in cached) == ["digits.npz", "weights.pt"]
    assert all(_inside(p, cache_dir / "downloads") for p in cached)

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = summary["run"]["mlflow_run_id"]
    blobs |= mlflow_blobs(client, run_id, tmp_path / "mlflow")
    version = client.get_model_version_by_alias("sec-net-qdq", "candidate")
    blobs["mlflow/model_version"] = json.dumps({"tags": version.tags, "source": version.source,
                                                "description": version.description}).encode()
    model_files = mlflow.artifacts.download_artifacts(f"models:/sec-net-qdq/{version.version}",
                                                      dst_path=str(tmp_path / "model"),
                                                      tracking_uri=env["MLFLOW_TRACKING_URI"])
    blobs |= file_blobs(Path(model_files), "mlflow-model")
    s3, bucket = servers.s3_client(env), env["TIDLQ_S3_BUCKET"]
    prefix = summary["run"]["s3_uri"].removeprefix(f"s3://{bucket}/")
    assert prefix == f"tidlq/sec-net/{run_id}/"
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        blobs[f"s3/{obj['Key']}"] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    blobs |= file_blobs(out, "outputs")
    blobs["summary (returned)"] = json.dumps(summary).encode()

    names = set(blobs)
    assert {"mlflow-artifacts/summary.json", "mlflow-artifacts/report.md", "mlflow-artifacts/tidl/compile_options.yaml",
            "outputs/sec-net/params.json", f"s3/{prefix}_complete.json", "mlflow-model/MLmodel"} <= names
    assert len(json.loads(blobs["mlflow/params"])) > 30
    assert leaks(blobs, found) == []


@pytest.mark.slow
def test_no_credential_in_a_run_refused_by_s3(prefect_api: str, stack, tmp_path: Path) -> None:
    """A run with a wrong (distinctive) secret fails before any work; its failure reason and logs do not show it."""
    _, env = stack
    wrong = env | {"AWS_SECRET_ACCESS_KEY": f"tidlq-WRONG-secret-{secrets.token_hex(12)}"}
    with servers.env_applied(wrong):
        state = quantize(None, FAST | {"output_dir": str(tmp_path), "tracking.experiment": "it-security-refused"},
                         return_state=True)
        assert state.is_failed()
        with pytest.raises(s3.StorageError, match="access refused"):
            state.result()
        blobs = prefect_blobs(str(state.state_details.flow_run_id))
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("it-security-refused").experiment_id])
    assert runs[0].info.status == "FAILED" and "access refused" in runs[0].data.tags["failure_reason"]
    blobs |= mlflow_blobs(client, runs[0].info.run_id, tmp_path / "mlflow")
    blobs["prefect/state"] = str(state.message).encode()
    assert leaks(blobs, secret_values(wrong)) == []

