#!/bin/bash
# Second database and role for the Optuna studies: sandboxed job processes get this URL and nothing
# else, so they cannot reach the service's own database (jobs, users' uploads' records).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE slimconv_studies LOGIN PASSWORD '${STUDIES_PASSWORD:-studies}';
CREATE DATABASE slimconv_studies OWNER slimconv_studies;
REVOKE CONNECT ON DATABASE ${POSTGRES_DB} FROM PUBLIC;
SQL
