"""Per-op tables: run the op benchmarks (bench/dsconv.py, dsq.py, lccl.py, varg.py) as they are, each in its own
process with the suite's thread count, and read back the JSON each one writes.

Every op benchmark interleaves its kernels with its own peers and records the machine it ran on; this module
only turns their documents into rows of one shape (a layer, our time, each peer's time), keeping each
document's own machine and thread context with its rows.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from common import SHAPES, macs

BENCH = Path(__file__).resolve().parent
SMALL_SHAPE = 7  # 1x1 64->128 56 s2: 6.4 MMACs, the op benchmarks' quickest layer

# op -> script, its arguments given the JSON file to write and the threads, and its --quick arguments (None:
# --quick skips it, with the reason)
OP_BENCHMARKS = {
    "dsconv": {
        "script": "dsconv.py",
        "args": lambda out, threads: ["--threads", str(threads), "--json", str(out)],
        "quick": ["--quick", "--shapes", str(SMALL_SHAPE), "--repeat", "2", "--repeat-ms", "2"],
    },
    "dsq": {
        "script": "dsq.py",
        "args": lambda out, threads: ["--threads", str(threads), "--json", str(out)],
        "quick": ["--quick", "--shapes", str(SMALL_SHAPE), "--bits", "A2W2", "--repeat", "2", "--repeat-ms", "2"],
    },
    "varg": {
        "script": "varg.py",
        "args": lambda out, threads: ["--threads", str(threads), "--out", str(out.with_suffix(""))],
        "quick": None,
        "skip_reason": "bench/varg.py --quick still compiles 12 kernels (about a minute); run the suite without --quick",
    },
    "lccl": {
        "script": "lccl.py",
        "args": lambda out, threads: ["--out", str(out.with_suffix(""))],  # one thread, whatever the suite's count
        "quick": None,
        "skip_reason": ("bench/lccl.py --quick alone takes about 30 s, over the CI smoke test's budget; run the suite "
                        "without --quick"),
    },
}


def run(names: list[str], threads: int, quick: bool, folder: Path, log=print) -> dict:
    """{op: {"status", "document" or "reason", "command", "seconds"}} for each op benchmark in ``names``."""
    results = {}
    for name in names:
        spec = OP_BENCHMARKS[name]
        if quick and spec["quick"] is None:
            results[name] = {"status": "skipped", "reason": spec["skip_reason"]}
            continue
        out = folder / f"{name}-op-benchmark.json"
        command = [sys.executable, str(BENCH / spec["script"]), *spec["args"](out, threads), *(spec["quick"] if quick else [])]
        log(f"op benchmark: {' '.join(Path(c).name if c.startswith('/') else c for c in command[1:])}")
        started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True)
        entry = {"command": command[1:], "seconds": time.perf_counter() - started, "exit_status": finished.returncode}
        if not out.is_file():
            tail = (finished.stderr or finished.stdout).strip().splitlines()[-1:] or ["no output"]
            results[name] = {**entry, "status": "failed", "reason": f"no results file ({tail[0]})"}
            continue
        document = json.loads(out.read_text())
        results[name] = {**entry, "status": "measured" if finished.returncode == 0 else "failed", "document": document}
        if finished.returncode != 0:
            results[name]["reason"] = f"exit status {finished.returncode} (a correctness check failed or it crashed)"
    return results


# --- the documents as rows: {"layer", "macs", "ours_ms", "peers": {name: ms}, "correct", "kind"} ---

PEER_LABELS = {
    "torch_fp32": "PyTorch fp32", "torch_int8": "PyTorch int8 (float in/out)", "torch_qconv": "PyTorch qconv only",
    "torch_dense": "PyTorch fp32 dense conv", "dense": "same kernel built dense", "tvm_default": "TVM grouped conv",
    "torch_grouped": "PyTorch grouped conv", "torch_dw_pw": "PyTorch depthwise+pointwise", "unfused": "unfused pair",
    "torch": "PyTorch eager", "other_path": "the other DSQ path",
}


def rows_dsconv(document: dict) -> list[dict]:
    return [{"layer": r["layer"], "macs": r["macs"], "ours_ms": r["ms"]["ours"], "kind": "int8",
             "peers": {key: ms for key, ms in r["ms"].items() if key != "ours"},
             "correct": r["correctness"]["passed"]} for r in document["layers"]]


def rows_dsq(document: dict) -> list[dict]:
    rows = []
    for r in document["layers"]:
        for pair, path in r["dispatch"].items():
            other = [key for key in r["ms"] if key.startswith(f"{pair} ") and key != f"{pair} {path}"]
            peers = {key: ms for key, ms in r["ms"].items() if key.startswith("torch")}
            peers.update({"other_path": r["ms"][key] for key in other})
            errors = [e for key, e in r["max_rel_error_vs_reference_op"].items() if key.startswith(f"{pair} ")]
            rows.append({"layer": f"{r['layer']} {pair} ({path})", "macs": r["macs"], "ours_ms": r["ms"][f"{pair} {path}"],
                         "kind": "int8" if path == "int8_dot" else "bitserial", "peers": peers,
                         "correct": all(e <= r["tolerance"] for e in errors), "bits": pair})
    return rows


def _shape_macs(layer: str) -> int | None:
    for name, cin, cout, k, stride, size in SHAPES:
        if name == layer:
            return macs(cin, cout, k, stride, size)
    return None


def rows_lccl(document: dict, sparsity: str = "0.50") -> list[dict]:
    rows = []
    for r in document["layers"]:
        # one algorithm per layer in the first format, several ("skip", "compact") since
        algorithms = r.get("algorithms") or {"sparse": r}
        for algorithm, a in algorithms.items():
            rows.append({"layer": f"{r['layer']} {algorithm} at {float(sparsity):.0%} zeros",
                         "macs": _shape_macs(r["layer"]), "ours_ms": a["sparse_ms"][sparsity], "kind": "fp32",
                         "peers": {"torch_dense": r["torch_ms"], "dense": r["dense_ms"]}, "correct": a["passed"]})
    return rows


def rows_varg(document: dict) -> list[dict]:
    rows = [{"layer": f"grouped {r['in_channels']}->{r['out_channels']} {r['height']}x{r['height']} s{r['stride']}",
             "macs": r["macs"], "ours_ms": r["ms"]["ours"], "kind": "fp32",
             "peers": {key: ms for key, ms in r["ms"].items() if key != "ours"},
             "correct": r["max_rel_error"] <= r["tolerance"]} for r in document["layers"]]
    rows += [{"layer": f"separable unit {r['in_channels']}->{r['mid_channels']}->{r['out_channels']} "
                       f"{r['height']}x{r['height']} s{r['stride']}",
              "macs": r["macs"], "ours_ms": r["ms"]["fused"], "kind": "fp32",
              "peers": {key: ms for key, ms in r["ms"].items() if key != "fused"},
              "correct": r["max_rel_error"] <= r["tolerance"]} for r in document.get("units", [])]
    return rows


ROWS = {"dsconv": rows_dsconv, "dsq": rows_dsq, "lccl": rows_lccl, "varg": rows_varg}


def lccl_curves(document: dict) -> dict:
    """{algorithm: {"speedup_over_dense": {sparsity: x}, "speedup_over_torch": ...}} (geomeans over layers)."""
    from common import geomean

    curves = {}
    for r in document["layers"]:
        for algorithm, a in (r.get("algorithms") or {"sparse": r}).items():
            for key in ("speedup_over_dense", "speedup_over_torch"):
                for sparsity, value in a[key].items():
                    curves.setdefault(algorithm, {}).setdefault(key, {}).setdefault(sparsity, []).append(value)
    return {algorithm: {key: {s: geomean(v) for s, v in per.items()} for key, per in keys.items()}
            for algorithm, keys in curves.items()}


def context(document: dict) -> dict:
    """The machine and threads an op benchmark's document says it ran on."""
    machine = document.get("machine", {})
    return {key: machine.get(key) for key in ("cpu", "llvm_mcpu", "threads", "date", "loadavg_start")}
