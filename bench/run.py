"""The benchmark suite: tvm-effconv against what a user would pick instead, on this machine, in one run.

    python -m bench [--quick] [--threads 1] [--out bench/results] [--sections peak,e2e,ops,arm,cuda]
                    [--networks resnet18_fp32,...] [--ops dsconv,dsq,lccl,varg] [--repeat N] [--repeat-ms MS]
                    [--records schedules/host] [--machine NAME]

Sections: ``peak`` the machine's fp32 and int8 peak (bench/peak.py); ``e2e`` the reference networks against
PyTorch fp32/int8, ONNX Runtime fp32/int8 and TVM + MetaSchedule (bench/endtoend.py); ``ops`` the op
benchmarks' tables (bench/ops.py); ``arm`` llvm-mca estimates for the ARM kernels (bench/mca.py; estimates,
never emulated timings); ``cuda`` the CUDA comparison where this machine has a CUDA GPU.

Writes ``<out>/<machine>.md`` (the results page), ``<machine>.json`` (every result, and under ``figures``
every number with its machine and thread count) and ``<machine>-*.png``. ``--quick`` is a smoke test (tiny
networks, few repeats, two op benchmarks on one layer, the DSConv kernel only for ARM) for CI. Exit status 0,
or 1 when one of our builds or op benchmarks failed (the page says which), 2 for bad arguments or a missing
tool.
"""

import argparse
import json
import os
import platform
import re
import shlex
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the op benchmarks and these modules import each other as siblings

SECTIONS = ("peak", "e2e", "ops", "arm", "cuda")
QUICK = {"repeat": 3, "repeat_ms": 5.0, "arm_ops": ["dsconv"]}
FULL = {"repeat": 15, "repeat_ms": 200.0, "arm_ops": ["dsconv", "dsq", "varg", "lccl"]}


def parse_args(argv=None):
    import endtoend
    import mca
    import ops

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny networks and repeats (CI)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every system (default 1)")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="folder of the results (default bench/results)")
    parser.add_argument("--machine", help="name of the results files (default: from the CPU model and LLVM's cpu name)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--networks", default=",".join(endtoend.NETWORK_KEYS), help="end-to-end networks")
    parser.add_argument("--ops", default=",".join(ops.OP_BENCHMARKS), help="op benchmarks to run")
    parser.add_argument("--arm-presets", default=",".join(mca.PRESETS), help="ARM presets for the llvm-mca estimates")
    parser.add_argument("--repeat", type=int, help="timed repeats, median taken (default 15; 3 with --quick)")
    parser.add_argument("--repeat-ms", type=float, help="length of one repeat in ms (default 200; 5 with --quick)")
    parser.add_argument("--records", type=Path, default=BENCH.parent / "schedules" / "host",
                        help="tuning records for the host (default schedules/host)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.repeat = args.repeat or defaults["repeat"]
    args.repeat_ms = args.repeat_ms or defaults["repeat_ms"]
    args.arm_ops = defaults["arm_ops"]

    def choose(text, allowed, what):
        chosen = [item for item in text.split(",") if item]
        unknown = [item for item in chosen if item not in allowed]
        if unknown:  # one line, no usage block: the choices are the fix
            print(f"error: unknown {what} {', '.join(unknown)}: choose from {', '.join(allowed)}", file=sys.stderr)
            sys.exit(2)
        return chosen

    args.sections = choose(args.sections, SECTIONS, "section")
    args.networks = choose(args.networks, endtoend.NETWORK_KEYS, "network")
    args.ops = choose(args.ops, list(ops.OP_BENCHMARKS), "op benchmark")
    args.arm_presets = choose(args.arm_presets, list(mca.PRESETS), "ARM preset")
    if args.threads < 1 or args.repeat < 1:
        parser.error("--threads and --repeat must be >= 1")
    return args


def inside_checkout(text: str) -> str:
    """``text`` with the paths inside this checkout written relative to it: the pages are committed, and
    the folder they were measured in means nothing elsewhere."""
    return text.replace(str(BENCH.parent) + "/", "")


def machine_name(cpu: str, llvm_mcpu: str) -> str:
    """A file name from the CPU model and LLVM's name for the core, e.g. amd-epyc-znver3."""
    text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\bprocessor\b|\d+-core", " ", cpu.lower())
    words = re.findall(r"[a-z0-9]+", f"{text} {llvm_mcpu.lower()}")
    return "-".join(dict.fromkeys(words)) or "unknown-machine"


def check_tools(args) -> None:
    """Missing tools fail before anything runs, with the fix."""
    import shutil

    import mca

    if "arm" in args.sections:
        mca.find_llvm_mca()
    if "peak" in args.sections and not (shutil.which("gcc") or shutil.which("cc")):
        raise mca.ToolMissing("measuring the machine's peak needs a C compiler: install it with `apt-get install gcc`")


def main(argv=None) -> int:
    import mca

    args = parse_args(argv)
    try:
        check_tools(args)
    except mca.ToolMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Read when TVM starts its thread pool: set before anything imports tvm.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch
    import tvm

    import endtoend
    import ops
    import peak
    import report
    from common import cpu_model
    from tvm_effconv.targets import get_preset

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - started:5.0f} s] {message}", flush=True)  # noqa: E731
    llvm_mcpu = str(get_preset("host").target.attrs.get("mcpu", ""))
    name = args.machine or machine_name(cpu_model(), llvm_mcpu)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "tvm": tvm.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        versions["onnxruntime"] = "not installed"
    results = {"context": {
        "machine": name, "host": socket.gethostname(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)), "llvm_mcpu": llvm_mcpu, "flags": peak.cpu_flags(),
        "threads": args.threads, "quick": args.quick, "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "versions": versions, "loadavg_start": os.getloadavg(), "sections": args.sections,
    }}
    args.out.mkdir(parents=True, exist_ok=True)
    failures = []
    if "peak" in args.sections:
        log("machine peak (fp32 FMA, int8 dot) on 1 and on the suite's threads")
        results["peak"] = peak.measure(args.threads, args.quick)
    if "e2e" in args.sections:
        results["end_to_end"] = endtoend.run(args.quick, args.threads, args.records, args.networks, args.repeat,
                                             args.repeat_ms, log)
        failures += [f"ours on {row['label']}: {row['systems']['ours']['detail']}"
                     for row in results["end_to_end"]["networks"] if row["systems"]["ours"]["status"] == "failed"]
    if "ops" in args.sections:
        with tempfile.TemporaryDirectory(prefix="tvm-effconv-ops-") as folder:  # the documents go into our JSON
            results["ops"] = ops.run(args.ops, args.threads, args.quick, Path(folder), log)
        failures += [f"op benchmark {op}: {entry['reason']}" for op, entry in results["ops"].items()
                     if entry["status"] == "failed"]
    if "arm" in args.sections:
        results["arm_estimates"] = mca.run(args.arm_ops, args.arm_presets, log)
    if "cuda" in args.sections:
        results["cuda"] = {"status": (
            "not run: no CUDA GPU on this machine (tvm.cuda(0).exist is False)" if not tvm.cuda(0).exist else
            "not run: the CUDA comparison against PyTorch (cuDNN fp32/fp16, int8) is not implemented in this suite yet; "
            "bench on a GPU with `python -m tvm_effconv.bench ARTIFACT --compare-torch` meanwhile")}
    results["context"]["loadavg_end"] = os.getloadavg()
    results["context"]["seconds"] = time.perf_counter() - started
    results["failures"] = failures
    plots = report.plots(results, args.out, name)
    results["plots"] = plots
    results["figures"] = report.figures(results)
    (args.out / f"{name}.json").write_text(inside_checkout(json.dumps(results, indent=1, default=str) + "\n"))
    (args.out / f"{name}.md").write_text(inside_checkout(report.page(results, plots)))
    log(f"wrote {args.out / (name + '.md')}, {name}.json and {len([p for p in plots.values() if 'file' in p])} plot(s)")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
