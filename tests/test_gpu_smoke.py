"""benchmarks/gpu.py --smoke: the GPU benchmark script runs end to end on whatever backend
is at hand (CPU here) and its float64 results agree with a CPU refit (exit status 0)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["info"]["genes"] == 200
    for name in ("satterthwaite", "kenward-roger"):
        assert res["agreement"][name]["estimate"] < 1e-6
    assert res["agreement"]["float32 data pass"]["estimate"] < 1e-3
