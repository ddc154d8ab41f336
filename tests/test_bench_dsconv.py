"""Smoke test of bench/dsconv.py, the DSConv layer benchmark: one small layer, two repeats."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dsconv.py"
SMALL_SHAPE = 7  # 1x1 64->128 56 s2: 6.4 MMACs


def test_dsconv_benchmark_writes_every_figure_and_passes_its_check(tmp_path):
    out = tmp_path / "dsconv.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeat", "2", "--repeat-ms", "2", "--shapes", str(SMALL_SHAPE),
         "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "geometric mean torch/ours" in result.stdout
    document = json.loads(out.read_text())
    assert document["all_correct"] is True
    assert document["machine"]["threads"] == 1 and document["machine"]["cpu"]
    (layer,) = document["layers"]
    assert layer["layer"].startswith("1x1 64->128")
    assert layer["macs"] == 128 * 28 * 28 * 64
    for key in ("ours", "torch_fp32", "torch_int8", "torch_qconv"):
        assert layer["ms"][key] > 0
        assert len(layer["repeats_s"][key]) == 2
    for key in ("torch_fp32", "torch_int8", "torch_qconv"):
        assert layer["ratio_torch_over_ours"][key] > 0
        assert document["geomean_torch_over_ours"][key] > 0
    assert layer["ours_gmacs"] > 0
    assert layer["correctness"]["passed"] and layer["correctness"]["max_rel_error_vs_reference_op"] <= 1e-5
