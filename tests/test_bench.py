"""Every benchmark under bench/ runs in its --smoke mode, so that none can rot unnoticed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = {
    "engine.py": ["speed-up of this engine", "% of matmul", "compare of 2 methods"],
    "throughput.py": ["dense float32 matmul", "overhead"],
    "gpu.py": ["rounds/s", "largest weight difference"],
    "fedproto_diagnosis.py": ["nearest prototype, own classes", "own head"],
    "adapter_diagnosis.py": ["the run's own last mean accuracy", "local model alone", "accuracy by class"],
    "scale.py": ["s / round", "store: disk", "N=40 against N=10"],
    "text.py": ["samples/s on one core, fp32", "adapter, head", "local, trainable 1"],
    "lm.py": ["training tokens/s, bf16", "obvious", "+ bf16 base", "+ packed", "% of matmul"],
}


def test_every_benchmark_is_covered():
    assert {p.name for p in BENCH.glob("*.py")} - {"common.py"} == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_smoke(script):
    env = {k: v for k, v in os.environ.items() if k != "PFEDLORA_WORKERS"}  # the engines' own defaults
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for expected in SCRIPTS[script]:
        assert expected in done.stdout, done.stdout[-3000:]
