"""schemathesis against the app's own OpenAPI document (a real server on loopback): every documented
operation, positive and negative examples, a bounded number each — no 5xx, responses match the schema.

Runs schemathesis' CLI (its pytest plugin does not load under pytest 9)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service.conftest import Server, world_dir


def test_api_conforms_to_its_schema() -> None:
    server = Server(world_dir("slimconv-fuzz-"), workers=0, env={"SLIMCONV_MAX_UPLOAD_BYTES": str(1 << 20)})
    try:
        cli = Path(sys.executable).with_name("schemathesis")
        res = subprocess.run(
            # positive_data_acceptance is left out: no schema can say "these bytes are a torch.export
            # archive" or "this id exists", so schema-valid requests are rightly refused with a 4xx.
            [str(cli), "run", f"{server.url}/openapi.json", "--checks", "all", "--exclude-checks",
             "positive_data_acceptance", "--max-examples", "25",
             "--seed", "1", "--workers", "1", "--request-timeout", "60", "--no-color"],
            capture_output=True, text=True, timeout=900)
        report = res.stdout[-6000:] + res.stderr[-2000:]
        assert res.returncode == 0, report
        assert "No issues found" in report or "passed" in report.lower(), report
        assert server.client.get("/healthz").status_code == 200
    finally:
        server.stop()
