"""Benchmark the DSConv layer kernel on the host against PyTorch fp32 and PyTorch int8 (x86 engine).

For each ResNet-18 3x3 conv shape (and the 1x1 stride-2 downsamples), batch 1: a float nn.Conv2d with
random weights is converted by ``DSConv2d.from_conv(conv, bits, block)``, its activation scale
calibrated on the input, and the layer plus a ReLU (the fused epilogue) compiled for the ``host``
preset with the default schedule (no tuning records). Timed, float in and float out:

- ours: the compiled layer through the Relax VM (``time_evaluator``; includes the activation
  quantization), checked against the layer's eager output (the reference op) every time;
- torch fp32: ``F.conv2d`` + ReLU with the float conv's weights;
- torch int8: ``torch.ao.nn.intrinsic.quantized.ConvReLU2d`` with per-channel symmetric int8 weights from
  the same float conv and quint8 activations (reduce_range, as PyTorch's x86 qconfig: 8-bit
  activations saturate vpmaddubsw on CPUs without VNNI), timed float in/float out (quantize_per_tensor
  + qconv + dequantize: the like-for-like figure) and as the qconv alone on a pre-quantized input.

The measurements of one layer are interleaved (one repeat of each in turn) so that the noise of a shared
machine falls on all of them alike; each repeat averages enough calls to last ``--repeat-ms``. The
median over repeats is the headline; a second table gives the fastest repeat, which on a machine shared
with other work (where the repeats come out bimodal: with a core to ourselves or not) is the steadier
estimate of undisturbed speed. Single-threaded by default; ``--threads N`` sets TVM_NUM_THREADS
(before TVM is imported) and torch.set_num_threads alike.

    python bench/dsconv.py [--bits 4] [--block 64] [--threads 1] [--repeat 40] [--json OUT] [--quick]
"""

import argparse
import json
import os
import platform
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

from common import SHAPES

QUICK_SHAPES = 3
TOLERANCE = 1e-5  # max |ours - reference| / max |reference|
PEERS = [  # (key, column heading, description)
    ("torch_fp32", "fp32", "torch fp32"),
    ("torch_int8", "int8", "torch int8 (float in/out)"),
    ("torch_qconv", "qconv", "torch int8 (qconv only)"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, help="DSConv weight bits (default 4)")
    parser.add_argument("--block", type=int, default=64, help="DSConv channel block (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="threads for TVM and PyTorch alike (default 1)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats per measurement, median taken "
                        "(default 40, 5 with --quick)")
    parser.add_argument("--repeat-ms", type=float, default=None, help="length of one repeat in ms: calls are "
                        "averaged until it is reached (default 10, 5 with --quick)")
    parser.add_argument("--engine", default="x86", help="torch quantized engine (default x86)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: the first {QUICK_SHAPES} shapes, "
                        "fewer and shorter repeats")
    parser.add_argument("--shapes", help=argparse.SUPPRESS)  # test-only: comma-separated indices into SHAPES
    args = parser.parse_args(argv)
    if args.shapes is not None:
        args.indices = [int(i) for i in args.shapes.split(",")]
        if not all(0 <= i < len(SHAPES) for i in args.indices):
            parser.error(f"--shapes: indices must be in 0..{len(SHAPES) - 1}")
    else:
        args.indices = list(range(QUICK_SHAPES if args.quick else len(SHAPES)))
    if args.repeat is None:
        args.repeat = 5 if args.quick else 40
    if args.repeat_ms is None:
        args.repeat_ms = 5.0 if args.quick else 10.0
    if args.repeat < 1 or args.threads < 1:
        parser.error("--repeat and --threads must be >= 1")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # Read when TVM starts its thread pool; set before anything imports tvm.
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from common import (
    Timed,
    compile_ours,
    cpu_model,
    geomean,
    macs,
    measure,
    torch_int8,
)
from torch import nn
from tvm import relax

from tvm_effconv.nn import DSConv2d, calibrate_activations
from tvm_effconv.ops import dsconv
from tvm_effconv.targets import get_preset

# Deprecation noise from inside torch.export (as in pyproject's pytest filters).
warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
warnings.filterwarnings("ignore", message=".*is deprecated. Please switch to", category=DeprecationWarning)
# PyTorch's quantized tensors are deprecated, but they are the int8 peer measured here.
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel", category=UserWarning)


# --- the layers ---

def make_layers(cin, cout, k, stride, size, bits, block, seed=0):
    """The float conv, our DSConv layer + ReLU (eval, calibrated) and the input."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2).eval()
    x = torch.randn(1, cin, size, size)
    layer = DSConv2d.from_conv(conv, bits, block).eval()
    calibrate_activations(layer, [x])  # act_scale = max|x| / 127
    return conv, nn.Sequential(layer, nn.ReLU()).eval(), x


def bench_shape(index, preset, dev, args):
    name, cin, cout, k, stride, size = SHAPES[index]
    conv, ours_model, x = make_layers(cin, cout, k, stride, size, args.bits, args.block)
    with torch.no_grad():
        reference = ours_model(x)  # the eager reference op + ReLU
        float_out = torch.relu(conv(x))
    executable, report, compile_s = compile_ours(ours_model, x, preset)
    vm = relax.VirtualMachine(executable, dev)
    data = tvm.runtime.tensor(x.numpy())
    got = vm["main"](data).numpy()
    ref = reference.numpy()
    error = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30))

    qconv, x_scale, x_zero = torch_int8(conv, x, float_out)
    x_quantized = torch.quantize_per_tensor(x, x_scale, x_zero, torch.quint8)
    int8_out = qconv(x_quantized).dequantize()
    weight, bias, padding = conv.weight.detach(), conv.bias.detach(), conv.padding

    def fp32():
        return torch.relu(F.conv2d(x, weight, bias, stride, padding))

    def int8():
        return qconv(torch.quantize_per_tensor(x, x_scale, x_zero, torch.quint8)).dequantize()

    def qconv_only():
        return qconv(x_quantized)

    def timer(number):
        return vm.time_evaluator("main", dev, number=number, repeat=1, min_repeat_ms=0)

    measurements = {
        "ours": Timed(tvm_timer=timer, tvm_args=(data,)),
        "torch_fp32": Timed(fp32),
        "torch_int8": Timed(int8),
        "torch_qconv": Timed(qconv_only),
    }
    with torch.inference_mode():
        measure(measurements, args.repeat, args.repeat_ms / 1e3)

    def float_error(out):
        scale = float(float_out.abs().max())
        return float((out - float_out).abs().max()) / scale

    mac_count = macs(cin, cout, k, stride, size)
    ms = {key: timed.median_ms() for key, timed in measurements.items()}
    best_ms = {key: min(timed.results) * 1e3 for key, timed in measurements.items()}
    return {
        "index": index,
        "layer": name,
        "in_channels": cin, "out_channels": cout, "kernel": k, "stride": stride, "size": size,
        "macs": mac_count,
        "ms": ms,  # medians over the repeats
        "ratio_torch_over_ours": {key: ms[key] / ms["ours"] for key, _, _ in PEERS},
        "ours_gmacs": mac_count / (ms["ours"] * 1e-3) / 1e9,
        "best_ms": best_ms,  # the fastest repeat: the least disturbed by other work on the machine
        "ratio_torch_over_ours_best": {key: best_ms[key] / best_ms["ours"] for key, _, _ in PEERS},
        "ours_gmacs_best": mac_count / (best_ms["ours"] * 1e-3) / 1e9,
        "number": {key: timed.number for key, timed in measurements.items()},
        "repeats_s": {key: timed.results for key, timed in measurements.items()},
        "correctness": {"max_rel_error_vs_reference_op": error, "tolerance": TOLERANCE, "passed": error <= TOLERANCE},
        # Not checks: how far each quantized layer is from the float conv it came from.
        "max_rel_error_vs_fp32_conv": {
            "ours_dsconv": float_error(torch.from_numpy(got)), "torch_int8": float_error(int8_out),
        },
        "compile_s": compile_s,
        "build": {"default_schedule": report.default_schedule, "from_records": report.from_records},
        "act_scale": float(ours_model[0].act_scale),
    }


# --- output ---

# statistic -> (key of the times, key of the ratios, key of ours' GMAC/s)
STATISTICS = {
    "median": ("ms", "ratio_torch_over_ours", "ours_gmacs"),
    "best": ("best_ms", "ratio_torch_over_ours_best", "ours_gmacs_best"),
}


def columns(statistic):
    """(heading, width, format of a row) of the table of ``statistic``."""
    times, ratios, gmacs = STATISTICS[statistic]
    table = [
        ("layer", 20, lambda r: r["layer"]),
        ("MMACs", 7, lambda r: f"{r['macs'] / 1e6:.1f}"),
        ("ours ms", 8, lambda r: f"{r[times]['ours']:.3f}"),
    ]
    table += [(f"{short} ms", 9, lambda r, key=key: f"{r[times][key]:.3f}") for key, short, _ in PEERS]
    table += [(f"{short}/ours", 10, lambda r, key=key: f"{r[ratios][key]:.2f}") for key, short, _ in PEERS]
    table.append(("GMAC/s", 7, lambda r: f"{r[gmacs]:.1f}"))
    if statistic == "median":
        table.append(("rel err", 8, lambda r: f"{r['correctness']['max_rel_error_vs_reference_op']:.0e}"
                      + ("" if r["correctness"]["passed"] else " FAIL")))
    return table


def row(cells):
    first, *rest = cells
    return f"{first[0]:<{first[1]}}" + "".join(f" {text:>{width}}" for text, width in rest)


def heading_row(statistic):
    return row([(heading, width) for heading, width, _ in columns(statistic)])


def table_row(statistic, result):
    return row([(cell(result), width) for _, width, cell in columns(statistic)])


def header_lines(info):
    load = ", ".join(f"{v:.2f}" for v in info["loadavg_start"])
    return [
        f"DSConv layer benchmark on the host, {info['date']}",
        (f"machine: {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['affinity_cpus']} in this process' "
         f"affinity), LLVM cpu {info['llvm_mcpu']}; load average at start {load}"),
        (f"threads: {info['threads']} (TVM_NUM_THREADS, torch.set_num_threads); torch {info['torch']}, "
         f"tvm {info['tvm']}, quantized engine {info['quantized_engine']}"),
        (f"DSConv: {info['bits']}-bit weights, blocks of {info['block']} channels, int8 activations (calibrated "
         f"max|x|/127), ReLU fused; kernel {info['dot_intrinsic']}; preset host, default schedule, no records"),
        (f"timing: {info['repeat']} interleaved repeats of ~{info['repeat_ms']:g} ms each (calls averaged); "
         "batch 1, float in and float out unless said"),
    ]


LEGEND = (
    "columns: ours = compiled DSConv+ReLU via the Relax VM (incl. activation quantization); fp32 = torch "
    "F.conv2d+ReLU; int8 = torch quantize + qconv-ReLU + dequantize (like for like); qconv = torch qconv-ReLU "
    "alone on a pre-quantized input; X/ours > 1 means ours is faster; rel err = max|ours - reference op| / "
    "max|reference|"
)


def summary_lines(rows, statistic):
    """The geometric means of the ratios and, plainly, every layer where ours is slower than a peer."""
    _, ratios, _ = STATISTICS[statistic]
    geomeans = {key: geomean([r[ratios][key] for r in rows]) for key, _, _ in PEERS}
    lines = [
        f"geometric mean torch/ours ({statistic}): "
        + ", ".join(f"{description} {geomeans[key]:.2f}" for key, _, description in PEERS)
    ]
    slower = []
    for r in rows:
        behind = [f"{1 / r[ratios][key]:.2f}x slower than {short}" for key, short, _ in PEERS if r[ratios][key] < 1]
        if behind:
            slower.append(f"  {r['layer']}: ours is " + ", ".join(behind))
    if slower:
        lines.append(f"ours is SLOWER than a peer ({statistic}) on {len(slower)} of {len(rows)} layers:")
        lines.extend(slower)
    else:
        lines.append(f"ours is faster than every peer on every layer ({statistic})")
    return lines, geomeans


def main(args):
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = args.engine
    preset = get_preset("host")
    dev = tvm.cpu()
    info = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "llvm_mcpu": preset.target.attrs["mcpu"],
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tvm": tvm.__version__,
        "python": platform.python_version(),
        "quantized_engine": torch.backends.quantized.engine,
        "bits": args.bits,
        "block": args.block,
        "dot_intrinsic": dsconv.kernel_choice(preset.target, args.bits).intrinsic,
        "repeat": args.repeat,
        "repeat_ms": args.repeat_ms,
        "argv": sys.argv[1:],
        "loadavg_start": os.getloadavg(),
    }
    for line in header_lines(info):
        print(line)
    print("\nmedian of the repeats:")
    print(heading_row("median"), flush=True)
    rows = []
    start = time.perf_counter()
    for index in args.indices:
        result = bench_shape(index, preset, dev, args)
        rows.append(result)
        print(table_row("median", result), flush=True)
    print("\nbest repeat (the least disturbed by other work on the machine):")
    print(heading_row("best"))
    for result in rows:
        print(table_row("best", result))
    print()
    print(LEGEND)
    geomeans = {}
    for statistic in STATISTICS:
        lines, geomeans[statistic] = summary_lines(rows, statistic)
        for line in lines:
            print(line)
    failed = [r["layer"] for r in rows if not r["correctness"]["passed"]]
    print(f"correctness: FAILED on {', '.join(failed)}" if failed else
          f"correctness: all {len(rows)} layers match the reference op within {TOLERANCE:g} (max relative error)")
    total_s = time.perf_counter() - start
    info["loadavg_end"] = os.getloadavg()
    print(f"total {total_s:.0f} s; load average at the end {', '.join(f'{v:.2f}' for v in info['loadavg_end'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "machine": info,
            "layers": rows,
            "geomean_torch_over_ours": geomeans["median"],
            "geomean_torch_over_ours_best": geomeans["best"],
            "all_correct": not failed,
            "total_s": total_s,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
