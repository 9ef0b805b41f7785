from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search", *args], capture_output=True, text=True, timeout=300)


def test_zoo_then_analyse_json(tmp_path: Path) -> None:
    model = tmp_path / "tiny.pt2"
    assert _run("zoo", "tiny_resnet", "--out", str(model)).returncode == 0
    proc = _run("analyse", str(model), "--input-shape", "3,16,16", "--json", "--runtime", "onnxruntime",
                "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["flops"] > 0 and result["params"] > 0 and result["latency_ms"] > 0
    assert [s["name"] for s in result["sites"]][:2] == ["stem.0", "layers.0.conv1"]
    for key in ("name", "in_channels", "out_channels", "kernel", "stride", "flops"):
        assert key in result["sites"][0]
    assert result["skipped"][0]["name"] == "layers.1.short.0"


def test_analyse_table_and_refusal(tmp_path: Path) -> None:
    model = tmp_path / "m.pt2"
    _run("zoo", "tiny_vgg", "--out", str(model))
    proc = _run("analyse", str(model), "--runtime", "")
    assert proc.returncode == 0 and "features.7" in proc.stdout
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip at all")
    proc = _run("analyse", str(bad))
    assert proc.returncode != 0 and "not a .pt2 archive" in proc.stderr
