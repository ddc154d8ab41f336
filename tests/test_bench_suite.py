"""The benchmark suite (python -m bench): a --quick run writes the page, the JSON and the plots, every figure
carries its machine and thread count, and no peer goes missing; plus its parts that need no run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

# Written out here, not imported from the suite: a peer dropped from the suite must fail this test.
SYSTEMS = ["ours", "torch_fp32", "torch_int8", "ort_fp32", "ort_int8", "tvm_ms"]
NETWORKS = ["resnet18_fp32", "resnet18_dsq4", "resnet18_dsq2", "resnet18_dsconv4", "lccl_resnet18", "vargnet"]
ARM_PRESETS = ["arm-a53", "arm-a72", "arm-a76"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--machine", "ci-machine", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, json.loads((out / "ci-machine.json").read_text())


def test_quick_run_writes_the_page_the_json_and_the_plots(quick_run):
    out, results = quick_run
    page = (out / "ci-machine.md").read_text()
    for name in ("ci-machine-latency.png", "ci-machine-lowbit.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert results["plots"]["lccl_sparsity"]["reason"]  # not drawn in --quick, and the page says why
    assert "--quick" in page and "ESTIMATES" in page
    assert all(row["label"] in page for row in results["end_to_end"]["networks"])
    slower = [result for row in results["end_to_end"]["networks"] for result in row["systems"].values()
              if result.get("ratio_to_ours", 1) < 1]
    assert ("Where ours is slower than a peer" in page) == bool(slower)  # said plainly, where it is so
    context = results["context"]
    assert context["threads"] == 1 and context["cpu"] and context["logical_cpus"] >= 1 and context["llvm_mcpu"]
    assert "loadavg_end" in context and results["failures"] == []
    checkout = str(Path(__file__).resolve().parents[1]) + "/"
    assert checkout not in page and checkout not in (out / "ci-machine.json").read_text()  # committed pages


def test_every_figure_has_its_machine_and_threads(quick_run):
    _, results = quick_run
    figures = results["figures"]
    assert {f["section"] for f in figures} == {"peak", "end_to_end", "ops", "arm_estimates"}
    for figure in figures:
        assert figure["machine"] and isinstance(figure["threads"], int) and figure["threads"] >= 1, figure
        assert figure["source"] and figure["unit"] and figure["value"] == figure["value"], figure  # not NaN
    assert all(f["source"].startswith("ESTIMATE") for f in figures if f["section"] == "arm_estimates")


def test_no_peer_goes_missing(quick_run):
    _, results = quick_run
    rows = {row["network"]: row for row in results["end_to_end"]["networks"]}
    assert list(rows) == NETWORKS
    for key, row in rows.items():
        assert list(row["systems"]) == SYSTEMS, key
        assert row["systems"]["ours"]["status"] == "measured", row["systems"]["ours"]
        assert row["build"]["verification"]["passed"]
        for system, result in row["systems"].items():
            assert result["status"] in ("measured", "n/a"), (key, system, result)
            assert result["detail"], (key, system)  # an n/a says why
            if result["status"] == "measured":
                assert result["median_ms"] > 0 and len(result["repeats_ms"]) == 3
                assert result["ratio_to_ours"] > 0
    # The plain float ResNet-18 quantizes and exports: every peer but TVM + MetaSchedule must be measured;
    # that one needs records for every workload, which the tiny --quick networks do not have.
    plain = rows["resnet18_fp32"]["systems"]
    assert all(plain[peer]["status"] == "measured" for peer in SYSTEMS[:-1])
    assert plain["tvm_ms"]["status"] == "measured" or "records" in plain["tvm_ms"]["detail"]


def test_op_tables_and_arm_estimates(quick_run):
    _, results = quick_run
    assert results["ops"]["dsconv"]["status"] == "measured" and results["ops"]["dsq"]["status"] == "measured"
    assert results["ops"]["varg"]["status"] == "skipped" and results["ops"]["lccl"]["reason"]
    estimates = {row["preset"]: row for row in results["arm_estimates"]["kernels"] if row["op"] == "dsconv"}
    assert list(estimates) == ARM_PRESETS
    assert "sdot" in estimates["arm-a76"]["mac_instructions"]
    assert "smull" in estimates["arm-a53"]["mac_instructions"]
    for row in estimates.values():
        assert row["status"] == "estimated" and 0 < row["fraction_of_peak"] <= 1.05, row
    assert estimates["arm-a76"]["scheduling_model_units"] == "N1"


# --- parts that need no run ---

def _committed_op_documents():
    """(op, document) of every op benchmark in the committed suite pages (bench/results/<machine>.json)."""
    for path in sorted((BENCH / "results").glob("*.json")):
        page = json.loads(path.read_text())
        for op, result in page.get("ops", {}).items():
            if result.get("status") == "measured":
                yield pytest.param(op, result["document"], id=f"{path.stem}-{op}")


@pytest.mark.parametrize("op, document", list(_committed_op_documents()))
def test_the_committed_op_benchmark_documents_read_as_rows(op, document):
    import ops

    rows = ops.ROWS[op](document)
    assert rows
    for row in rows:
        assert row["ours_ms"] > 0 and row["peers"] and all(ms > 0 for ms in row["peers"].values())
        assert row["kind"] in ("fp32", "int8", "bitserial") and isinstance(row["correct"], bool)
    assert ops.context(document)["threads"] == 1


def test_a_committed_suite_page_has_every_op():
    assert {param.values[0] for param in _committed_op_documents()} >= {"dsconv", "dsq", "lccl", "varg"}


def test_machine_names():
    from run import machine_name

    assert machine_name("AMD EPYC", "znver3") == "amd-epyc-znver3"
    assert machine_name("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "icelake-server") == \
        "intel-xeon-platinum-8375c-icelake-server"


def test_hot_loop_and_mac_count_from_assembly():
    import mca

    assembly = """
kernel_compute_:
\tmov x8, xzr
.LBB0_1:
\tldr q0, [x1], #16
.LBB0_2:
\tfmla v1.4s, v0.4s, v2.s[0]
\tsdot v3.4s, v4.16b, v5.16b
\tsubs x9, x9, #1
\tb.ne .LBB0_2
\tcnt v6.16b, v7.16b
\tcbnz x8, .LBB0_1
\tret
other:
.LBB1_1:
\tfmla v1.4s, v0.4s, v2.4s
\tfmla v1.4s, v0.4s, v2.4s
\tfmla v1.4s, v0.4s, v2.4s
\tb.ne .LBB1_1
"""
    loop = mca.hot_loop(assembly, ["kernel"])
    assert loop.label == ".LBB0_2" and loop.macs() == {"fmla": 4, "sdot": 16}
    assert mca.instruction_macs("smull2 v1.8h, v2.16b, v3.16b") == 8
    assert mca.instruction_macs("cnt v1.16b, v2.16b") == 128
    assert mca.instruction_macs("fmadd s0, s1, s2, s0") == 1


def test_a_missing_llvm_mca_names_the_fix(monkeypatch, tmp_path):
    import mca

    monkeypatch.setattr(mca, "LLVM_ROOT", tmp_path)
    monkeypatch.setattr(mca.shutil, "which", lambda name: None)
    with pytest.raises(mca.ToolMissing, match="apt-get install llvm-19"):
        mca.find_llvm_mca()


def test_an_unknown_network_is_one_line_naming_the_choices():
    result = subprocess.run([sys.executable, "-m", "bench", "--networks", "resnet50"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown network resnet50: choose from " + ", ".join(NETWORKS)]
