#!/usr/bin/env bash
# Set up (idempotent), check style and types, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check models search service tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
