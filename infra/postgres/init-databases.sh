#!/bin/bash
# Creates the two databases of the production stack, each with its own login role:
#   prefect  (owner prefect, password $PREFECT_DB_PASSWORD)  for the Prefect server (asyncpg)
#   mlflow   (owner mlflow,  password $MLFLOW_DB_PASSWORD)   for the MLflow tracking server (psycopg2)
#
# The postgres image runs the files in /docker-entrypoint-initdb.d/ once, when it initialises an EMPTY data
# directory (the first `docker compose up`), as the superuser over the local socket. It does not run again on a
# volume that already holds a cluster: to change a password later use ALTER ROLE (infra/README.md).
#
# The passwords reach psql as psql variables and are quoted by psql (:'name'), so any character is safe in SQL.
# They also appear in connection URLs in docker-compose.yml, so use URL-safe ones there (hex: openssl rand -hex 24).
set -e

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set (infra/.env)}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set (infra/.env)}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     -v prefect_password="$PREFECT_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'EOSQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
EOSQL
