"""The production side (infra/): docker-compose.yml, the Dockerfiles, the Kubernetes base job template.

None of it can run here (no Docker engine, no cluster), so these tests check it statically and against the real
tools the images contain: the compose file is parsed with pyyaml and interpolated with infra/.env.example the way
`docker compose config` does, and the settings, environment variables and CLI options it uses are checked against
the installed prefect 3.9.1 and mlflow 3.17.2.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from docker.utils.build import PatternMatcher
from dockerfile_parse import DockerfileParser
from dotenv import dotenv_values

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
WORKER_DOCKERFILE = INFRA / "worker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
K8S_TEMPLATE = INFRA / "k8s" / "base-job-template.json"

SERVICES = {"postgres", "s3", "create-bucket", "prefect-server", "mlflow", "worker"}
STATEFUL = {"postgres": "/var/lib/postgresql/data", "s3": "/data"}
PUBLISHED = {"prefect-server": 4200, "mlflow": 5000}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|API_KEY")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------- helpers


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file, as python-dotenv reads them (every line must be one)."""
    values = dotenv_values(path)
    assert all(v is not None for v in values.values()), f"{path.name}: a line is not KEY=VALUE"
    return {k: str(v) for k, v in values.items()}


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        present = name in env and (env[name] != "" or op not in (":-", ":?"))
        if present:
            return env[name]
        if op in (":?", "?"):
            raise KeyError(f"required variable {name} is missing: {arg}")
        return arg if op in (":-", "-") else ""

    return VAR.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def env_of(service: dict) -> dict[str, str]:
    """A service's environment as a dict (compose allows a mapping or a list of KEY=VALUE)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(cmd: list[str], name: str) -> str:
    """The value of `name VALUE` or `name=VALUE` in a command line."""
    for i, arg in enumerate(cmd):
        if arg == name:
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {cmd}")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile (dockerfile-parse: continuation lines joined), comments dropped."""
    return [(i["instruction"], i["value"]) for i in DockerfileParser(str(path)).structure
            if i["instruction"] != "COMMENT"]


def ignored(patterns: list[str], path: str) -> bool:
    """Whether a .dockerignore excludes `path` (the docker SDK's matcher, Docker's own rules)."""
    return PatternMatcher(patterns).matches(path)


def constraint(name: str) -> str:
    """The pinned version of `name` in constraints.txt."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(name.lower() + "=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw() -> dict:
    """docker-compose.yml as written (anchors and merge keys resolved by pyyaml, variables not substituted)."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def resolved(raw: dict, example_env: dict[str, str]) -> dict:
    """The compose model with infra/.env.example substituted (what `docker compose --env-file ... config` does)."""
    return interpolate(raw, example_env)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(WORKER_DOCKERFILE)


# ---------------------------------------------------------------- compose: services and images


def test_services_and_pinned_images(raw: dict, resolved: dict) -> None:
    services = resolved["services"]
    assert set(services) == SERVICES
    assert raw["name"] == "tidlq"
    images = {name: svc["image"] for name, svc in services.items()}
    assert images["postgres"].startswith("postgres:17.")
    assert images["s3"] == "chrislusf/seaweedfs:4.48"
    assert images["prefect-server"] == "prefecthq/prefect:3.9.1-python3.11"
    assert images["mlflow"] == "tidlq-mlflow:3.17.2"
    assert images["worker"] == images["create-bucket"] == "tidlq-worker:0.1.0"
    for name, image in images.items():
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: image {image!r} is not pinned to a version"
    # the versions agree with what the project is tested with
    prefect_yaml = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert images["prefect-server"].split(":")[1].startswith(prefect_yaml["prefect-version"] + "-")
    assert constraint("prefect") == prefect_yaml["prefect-version"] == "3.9.1"
    assert images["mlflow"].split(":")[1] == constraint("mlflow") == "3.17.2"


def test_built_images_use_the_repository_root_as_context(raw: dict) -> None:
    for name, dockerfile_path in (("worker", WORKER_DOCKERFILE), ("create-bucket", WORKER_DOCKERFILE),
                                  ("mlflow", MLFLOW_DOCKERFILE)):
        build = raw["services"][name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == dockerfile_path, name
        # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile
        assert dockerfile_path.with_name(dockerfile_path.name + ".dockerignore").is_file(), name
    for name in SERVICES - {"worker", "create-bucket", "mlflow"}:
        assert "build" not in raw["services"][name], f"{name} should use a published image"


def test_healthchecks(resolved: dict) -> None:
    services = resolved["services"]
    tests = {}
    for name in ("postgres", "s3", "prefect-server", "mlflow", "worker"):
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert int(check["retries"]) >= 3 and check["interval"] and check["timeout"], name
        tests[name] = " ".join(check["test"][1:])
    assert tests["prefect-server"].count("http://127.0.0.1:4200/api/health") == 1
    assert "http://127.0.0.1:5000/health" in tests["mlflow"]
    assert "http://127.0.0.1:8333/healthz" in tests["s3"]
    # over TCP: during the init scripts the image's temporary server listens on its socket only
    assert tests["postgres"].startswith("pg_isready") and "--host=127.0.0.1" in tests["postgres"]
    # the worker's health server: `prefect worker start --with-healthcheck` on PREFECT_WORKER_WEBSERVER_PORT
    port = env_of(services["worker"])["PREFECT_WORKER_WEBSERVER_PORT"]
    assert f"http://127.0.0.1:{port}/health" in tests["worker"]
    assert "--with-healthcheck" in command_of(services["worker"])
    assert "healthcheck" not in services["create-bucket"]  # a one-shot job
    assert services["create-bucket"]["restart"] == "no"


def test_depends_on_conditions(resolved: dict) -> None:
    services = resolved["services"]
    expected = {
        "postgres": {},
        "s3": {},
        "create-bucket": {"s3": "service_healthy"},
        "prefect-server": {"postgres": "service_healthy"},
        "mlflow": {"postgres": "service_healthy", "create-bucket": "service_completed_successfully"},
        "worker": {"prefect-server": "service_healthy", "mlflow": "service_healthy",
                   "create-bucket": "service_completed_successfully"},
    }
    for name, deps in expected.items():
        got = services[name].get("depends_on") or {}
        assert isinstance(got, dict), f"{name}: depends_on must be the long form with conditions"
        assert {dep: spec["condition"] for dep, spec in got.items()} == deps, name
        for dep, condition in deps.items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, which has no check"


def test_worker_environment_points_at_the_services(resolved: dict) -> None:
    services = resolved["services"]
    env = env_of(services["worker"])

    prefect_cmd = command_of(services["prefect-server"])
    assert prefect_cmd[:3] == ["prefect", "server", "start"]
    assert option(prefect_cmd, "--host") == "0.0.0.0"
    api = urlsplit(env["PREFECT_API_URL"])
    assert (api.scheme, api.hostname, api.port, api.path) == ("http", "prefect-server", 4200, "/api")
    assert int(option(prefect_cmd, "--port")) == api.port

    mlflow_cmd = command_of(services["mlflow"])
    tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert (tracking.scheme, tracking.hostname, tracking.port) == ("http", "mlflow", 5000)
    assert option(mlflow_cmd, "--host") == "0.0.0.0" and int(option(mlflow_cmd, "--port")) == tracking.port

    s3_cmd = command_of(services["s3"])
    endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "s3", 8333)
    assert "server" in s3_cmd and "-s3" in s3_cmd and int(option(s3_cmd, "-s3.port")) == endpoint.port
    assert option(s3_cmd, "-ip") == "s3" and option(s3_cmd, "-ip.bind") == "0.0.0.0"
    assert option(s3_cmd, "-master.telemetry") == "false"

    # the same endpoint, keys, region and bucket everywhere
    mlflow_env, bucket_env, s3_env = (env_of(services[n]) for n in ("mlflow", "create-bucket", "s3"))
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == bucket_env["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == mlflow_env[key] == bucket_env[key] == s3_env[key]
    assert env["AWS_DEFAULT_REGION"] == mlflow_env["AWS_DEFAULT_REGION"] == bucket_env["AWS_DEFAULT_REGION"]
    assert env["TIDLQ_S3_BUCKET"] == bucket_env["TIDLQ_S3_BUCKET"] == "tidlq"
    assert option(mlflow_cmd, "--artifacts-destination") == f"s3://{env['TIDLQ_S3_BUCKET']}/mlflow"
    assert command_of(services["create-bucket"]) == ["python", "infra/s3/create_bucket.py"]
    assert (ROOT / "infra" / "s3" / "create_bucket.py").is_file()


def test_the_bucket_is_one_variable(raw: dict) -> None:
    """Every mention of the bucket is the same ${TIDLQ_S3_BUCKET...} expression, never a literal name."""
    text = COMPOSE.read_text()
    uses = set(re.findall(r"\$\{TIDLQ_S3_BUCKET[^}]*\}", text))
    assert uses == {"${TIDLQ_S3_BUCKET:-tidlq}"}
    assert "s3://${TIDLQ_S3_BUCKET:-tidlq}/mlflow" in command_of(raw["services"]["mlflow"])
    for name in ("worker", "create-bucket"):
        assert env_of(raw["services"][name])["TIDLQ_S3_BUCKET"] == "${TIDLQ_S3_BUCKET:-tidlq}"


def test_databases(resolved: dict, raw: dict) -> None:
    services = resolved["services"]
    prefect_url = urlsplit(env_of(services["prefect-server"])["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert (prefect_url.scheme, prefect_url.username, prefect_url.hostname, prefect_url.port, prefect_url.path) == \
        ("postgresql+asyncpg", "prefect", "postgres", 5432, "/prefect")
    mlflow_url = urlsplit(env_of(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"])
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the MLflow image has psycopg2
    assert (mlflow_url.scheme, mlflow_url.username, mlflow_url.hostname, mlflow_url.port, mlflow_url.path) == \
        ("postgresql+psycopg2", "mlflow", "postgres", 5432, "/mlflow")
    assert "psycopg2-binary==" in MLFLOW_DOCKERFILE.read_text()
    pg_env = env_of(services["postgres"])
    assert prefect_url.password == pg_env["PREFECT_DB_PASSWORD"]
    assert mlflow_url.password == pg_env["MLFLOW_DB_PASSWORD"]
    # the init script is mounted read-only into the image's init folder and creates both databases and roles
    mounts = [v for v in raw["services"]["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert len(mounts) == 1 and mounts[0].endswith(":ro")
    script = (COMPOSE.parent / mounts[0].split(":")[0]).resolve()
    assert script == INFRA / "postgres" / "init-databases.sh"
    text = script.read_text()
    for db in ("prefect", "mlflow"):
        assert f"CREATE ROLE {db} LOGIN PASSWORD :'{db}_password';" in text
        assert f"CREATE DATABASE {db} OWNER {db};" in text
        assert f"{db}_password=\"${db.upper()}_DB_PASSWORD\"" in text
    assert "ON_ERROR_STOP=1" in text and text.startswith("#!/bin/bash")


def test_volumes_for_stateful_services(raw: dict) -> None:
    declared = set(raw["volumes"])
    for name, target in STATEFUL.items():
        named = [v.split(":") for v in raw["services"][name]["volumes"] if not v.startswith((".", "/"))]
        assert [(src, dst) for src, dst, *_ in named if dst == target], f"{name} keeps {target} in no named volume"
        assert {src for src, *_ in named} <= declared
    assert declared == {"postgres-data", "s3-data"}
    for name in STATEFUL:  # longer than docker's 10 s before SIGKILL: both need more to stop cleanly
        assert re.fullmatch(r"[1-9]\d*s", raw["services"][name]["stop_grace_period"]), name
        assert int(raw["services"][name]["stop_grace_period"][:-1]) >= 30, name
    for name in ("prefect-server", "mlflow", "worker", "create-bucket"):  # state lives in postgres and S3
        assert not raw["services"][name].get("volumes"), name


def test_only_the_uis_are_published_on_localhost(raw: dict, resolved: dict, example_env: dict[str, str]) -> None:
    for name, svc in resolved["services"].items():
        ports = svc.get("ports") or []
        if name not in PUBLISHED:
            assert not ports, f"{name} must not publish a port"
            assert not svc.get("network_mode"), name
            continue
        assert len(ports) == 1, name
        host_ip, host_port, container_port = str(ports[0]).split(":")
        assert host_ip == "127.0.0.1" and int(container_port) == PUBLISHED[name] == int(host_port), name
    # the defaults bind to 127.0.0.1 too, not only the example file
    for name, var in (("prefect-server", "PREFECT_UI_BIND"), ("mlflow", "MLFLOW_UI_BIND")):
        assert str(raw["services"][name]["ports"][0]).startswith(f"${{{var}:-127.0.0.1}}:")
        assert example_env[var] == "127.0.0.1"
    assert example_env["PREFECT_UI_API_URL"] == f"http://127.0.0.1:{example_env['PREFECT_UI_PORT']}/api"


def test_no_literal_secrets(raw: dict) -> None:
    """Every credential is a required ${VAR:?...} (no default), in variables and inside connection URLs."""
    seen = 0
    for name, svc in raw["services"].items():
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key):
                seen += 1
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), f"{name}.{key} is not a required ${{VAR}}"
            if "://" in value and "@" in value:  # credentials in a URL: user:${PASSWORD:?...}@host
                seen += 1
                assert re.search(r"://\w+:\$\{[A-Z0-9_]+:\?[^}]+\}@", value), f"{name}.{key} has a literal password"
        assert not SECRET_NAME.search(" ".join(command_of(svc))), f"{name}: a secret on the command line"
    assert seen == 13  # 11 credential variables in 5 services, 2 database URLs
    for match in VAR.finditer(COMPOSE.read_text()):
        if SECRET_NAME.search(match.group(1)):
            assert match.group(2) == ":?", f"${{{match.group(1)}}} must be required, without a default"


def test_env_example_covers_every_variable(raw: dict, example_env: dict[str, str]) -> None:
    used = {m.group(1) for m in VAR.finditer(COMPOSE.read_text())}
    assert used - set(example_env) == set(), "variables of docker-compose.yml missing in .env.example"
    assert set(example_env) - used == set(), ".env.example sets variables docker-compose.yml does not read"
    secrets = {k for k in example_env if SECRET_NAME.search(k)}
    assert secrets == {"POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "S3_ACCESS_KEY_ID",
                       "S3_SECRET_ACCESS_KEY"}
    for key in secrets:
        assert example_env[key].startswith("change-me"), f"{key} in .env.example must be a placeholder"
    # without an env file compose refuses to start: the first required secret is reported
    with pytest.raises(KeyError, match="required variable"):
        interpolate(raw, {})
    # and with only the placeholders every value resolves
    assert "${" not in json.dumps(interpolate(raw, example_env))


def test_deploying_from_the_worker_image(resolved: dict, dockerfile: list[tuple[str, str]]) -> None:
    """prefect.yaml's {{ $VAR }}s are set in the worker, and its pull step names the image's WORKDIR."""
    env = env_of(resolved["services"]["worker"])
    deployments = json.dumps(yaml.safe_load((ROOT / "prefect.yaml").read_text()))  # without the comments
    wanted = set(re.findall(r"\{\{\s*\$([A-Z0-9_]+)\s*\}\}", deployments))
    assert wanted >= {"TIDLQ_PROJECT_DIR", "TIDLQ_WORK_POOL"}
    assert wanted <= set(env)
    workdir = [arg for instr, arg in dockerfile if instr == "WORKDIR"]
    assert workdir == ["/opt/tidlq"] == [env["TIDLQ_PROJECT_DIR"]]
    cmd = command_of(resolved["services"]["worker"])
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert option(cmd, "--pool") == env["TIDLQ_WORK_POOL"] == "tidlq-docker"
    assert option(cmd, "--type") == "process" and int(option(cmd, "--limit")) == 1
    assert resolved["services"]["worker"]["init"] is True
    assert "container_name" not in resolved["services"]["worker"]  # --scale worker=N


def test_settings_and_options_exist_in_the_installed_versions(resolved: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PREFECT_* variables are prefect 3.9.1 settings with the meaning intended; the MLflow variables and the
    CLI options exist."""
    from click import Command
    from mlflow import environment_variables
    from mlflow.cli import server as mlflow_server
    from prefect.settings import Settings

    services = resolved["services"]
    for key, value in {**env_of(services["prefect-server"]), **env_of(services["worker"])}.items():
        if key.startswith("PREFECT_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    prefect_env = env_of(services["prefect-server"])
    assert settings.server.database.connection_url.get_secret_value() == \
        prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert settings.server.ui.api_url == prefect_env["PREFECT_SERVER_UI_API_URL"]
    assert settings.server.analytics_enabled is False
    assert settings.api.url == "http://prefect-server:4200/api"
    assert settings.worker.webserver.port == 8080

    assert isinstance(mlflow_server, Command)
    params = {p.name: p for p in mlflow_server.params}
    assert params["backend_store_uri"].envvar == "MLFLOW_BACKEND_STORE_URI"
    opts = {o for p in mlflow_server.params for o in p.opts}
    for arg in command_of(services["mlflow"])[2:]:
        if arg.startswith("--"):
            assert arg in opts, f"mlflow server has no option {arg}"
    for key in env_of(services["mlflow"]):
        if key.startswith("MLFLOW_") and key != "MLFLOW_BACKEND_STORE_URI":
            assert getattr(environment_variables, key).name == key

    cli_env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    prefect = str(Path(sys.executable).with_name("prefect"))
    for service, words in (("worker", ["worker", "start"]), ("prefect-server", ["server", "start"])):
        helptext = subprocess.run([prefect, *words, "--help"], capture_output=True, text=True, env=cli_env,
                                  timeout=120, check=True).stdout
        for arg in command_of(services[service]):
            if arg.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(arg)}(?![\w-])", helptext), f"prefect {words}: no {arg}"


# ---------------------------------------------------------------- Dockerfiles


def test_worker_dockerfile(dockerfile: list[tuple[str, str]]) -> None:
    instructions = [i for i, _ in dockerfile]
    assert dockerfile[0] == ("FROM", "python:3.11-slim")
    runs = [arg for instr, arg in dockerfile if instr == "RUN"]
    torch_runs = [r for r in runs if "torch==" in r]
    assert len(torch_runs) == 1
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_runs[0]
    assert re.search(r"\btorch==2\.13\.0(\s|$)", torch_runs[0])
    assert constraint("torch").startswith("2.13.0")  # the constraint (2.13.0+cpu) accepts the wheel installed here
    project_runs = [r for r in runs if "pip install -c constraints.txt ." in r]
    assert len(project_runs) == 1
    assert runs.index(torch_runs[0]) < runs.index(project_runs[0]), "torch must be installed before the project"
    # everything the project install and the flows need is copied before / with it
    copied = " ".join(arg for instr, arg in dockerfile if instr == "COPY")
    for item in ("pyproject.toml", "README.md", "constraints.txt", "flows/", "tidlq/", "infra/", "params.yaml",
                 "prefect.yaml"):
        assert item in copied.split(), f"{item} is not copied"
    # non-root, numeric (so Kubernetes can check runAsNonRoot), after the installs
    users = [arg for instr, arg in dockerfile if instr == "USER"]
    assert len(users) == 1 and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[0])
    assert instructions.index("USER") > max(i for i, (instr, arg) in enumerate(dockerfile) if "pip install" in arg)
    # no ENTRYPOINT: Prefect's Kubernetes job passes `prefect flow-run execute` as args
    assert "ENTRYPOINT" not in instructions
    cmd = json.loads([arg for instr, arg in dockerfile if instr == "CMD"][-1])
    assert "prefect worker start" in " ".join(cmd)
    assert "--with-healthcheck" in " ".join(cmd)
    # the flow writes outputs/ relative to the WORKDIR as the non-root user
    assert any("chown tidlq:tidlq /opt/tidlq/outputs" in r for r in runs)


def test_worker_dockerignore_keeps_the_context_small() -> None:
    patterns = [line.strip() for line in
                (WORKER_DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", "outputs/mobilenet_v2_tiny/summary.json", ".git/HEAD", ".stack/credentials",
                 "infra/.env", "tidlq/__pycache__/params.cpython-311.pyc", "mlflow.db", ".dvc/config.local"):
        assert ignored(patterns, path), f"{path} would be sent to the build"
    sources = []
    for instr, arg in dockerfile_instructions(WORKER_DOCKERFILE):
        if instr == "COPY" and not arg.startswith("--from"):
            sources += [s.rstrip("/") for s in arg.split()[:-1] if not s.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not ignored(patterns, source), f"COPY {source} is excluded by the ignore file"
        assert not ignored(patterns, source + "/x.py" if (ROOT / source).is_dir() else source)
    mlflow_patterns = [line.strip() for line in
                       (MLFLOW_DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
                       if line.strip() and not line.startswith("#")]
    assert not ignored(mlflow_patterns, "constraints.txt") and ignored(mlflow_patterns, ".venv/bin/python")


def test_mlflow_dockerfile() -> None:
    instructions = dockerfile_instructions(MLFLOW_DOCKERFILE)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    install = " ".join(arg for instr, arg in instructions if instr == "RUN" and "pip install" in arg)
    assert "-c /tmp/constraints.txt" in install
    assert f"mlflow=={constraint('mlflow')}" in install.split()
    assert "boto3" in install.split() and "psycopg2-binary==2.9.13" in install.split()
    users = [arg for instr, arg in instructions if instr == "USER"]
    assert len(users) == 1 and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[0])


# ---------------------------------------------------------------- Kubernetes work pool


def test_k8s_base_job_template(dockerfile: list[tuple[str, str]]) -> None:
    template = json.loads(K8S_TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    config, variables = template["job_configuration"], template["variables"]
    props = variables["properties"]
    assert variables["type"] == "object"
    # every {{ placeholder }} of the job configuration is a declared variable
    placeholders = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(config)))
    assert placeholders and placeholders <= set(props), placeholders - set(props)

    manifest = config["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["image"] == "{{ image }}" and container["args"] == "{{ command }}"
    assert "tidlq-worker" in props["image"]["default"] and not props["image"]["default"].endswith(":latest")
    assert container["envFrom"] == [{"secretRef": {"name": "{{ env_secret_name }}"}}]
    assert props["env_secret_name"]["default"] == "tidlq-env"
    resources = container["resources"]
    assert resources["requests"] == {"cpu": "{{ cpu_request }}", "memory": "{{ memory_request }}"}
    assert resources["limits"] == {"cpu": "{{ cpu_limit }}", "memory": "{{ memory_limit }}"}
    assert (props["cpu_request"]["default"], props["memory_request"]["default"]) == ("2", "4Gi")
    assert (props["cpu_limit"]["default"], props["memory_limit"]["default"]) == ("4", "8Gi")
    # the image's user, enforced
    uid, gid = [arg for instr, arg in dockerfile if instr == "USER"][0].split(":")
    assert container["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(uid), int(gid))
    # the worker settings of prefect-kubernetes are kept
    for key in ("command", "env", "labels", "name", "namespace", "job_manifest", "stream_output"):
        assert key in config, key


def test_k8s_secret_example_matches_the_worker_environment(resolved: dict) -> None:
    secret = read_env_file(INFRA / "k8s" / "tidlq-env.example")
    worker = env_of(resolved["services"]["worker"])
    needed = {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_DEFAULT_REGION", "TIDLQ_S3_BUCKET"}
    assert needed <= set(worker)
    assert set(secret) == needed  # PREFECT_API_URL comes from the Kubernetes worker
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert secret[key].startswith("change-me")
    readme = (INFRA / "k8s" / "README.md").read_text()
    assert "prefect work-pool create tidlq-k8s --type kubernetes --base-job-template infra/k8s/base-job-template.json" \
        in readme
    assert "--from-env-file=infra/k8s/tidlq-env" in readme
