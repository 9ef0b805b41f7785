#!/usr/bin/env bash
# Set up (idempotent) and start the service: the API on 127.0.0.1:8000 and one worker process,
# SQLite and files in ./data. Extra arguments go to `python -m service serve`
# (--host, --port, --data-dir, --workers, --database-url).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m service serve "$@"
