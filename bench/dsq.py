"""Benchmark the DSQ low-bit conv kernels on the host against PyTorch fp32 and PyTorch int8 (x86 engine).

For each ResNet-18 conv shape (batch 1) and each (activation, weight) bit pair A1W1, A2W1, A2W2, A4W4:
a float nn.Conv2d with random weights becomes ``DSQConv2d.from_conv(conv, weight_bits, act_bits)``, its
activation range set by one training-mode forward on the input (post-ReLU activations, as DSQ's layers
see them), and the layer plus a ReLU is compiled for the ``host`` preset (default schedule, no records)
twice: with the bit-serial kernel and with the int8 multiply-accumulate path (the dispatch's two
choices). Timed, float in and float out, interleaved repeats (see bench/common.py):

- bitserial / int8dot: the compiled layer through the Relax VM (incl. the activation quantization),
  checked against the layer's eager output (the reference op);
- torch fp32: F.conv2d + ReLU; torch int8: quantize + qconv-ReLU + dequantize (like for like), and the
  qconv alone on a pre-quantized input.

"ours" is the path the dispatch picks for that bit pair on this host (ops/dsq/__init__.py); the table
shows both so that the dispatch's threshold can be checked against them. Effective GMAC/s count the
conv's multiply-accumulates, whatever the bits.

    python bench/dsq.py [--bits A1W1,A2W1,A2W2,A4W4] [--threads 1] [--repeat 20] [--json OUT] [--quick]
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

QUICK_SHAPES = 2
TOLERANCE = 1e-4  # max |ours - reference op| / max |reference op|: float32 against float64, same codes


def parse_bits(text):
    pairs = []
    for item in text.split(","):
        item = item.strip().upper()
        if len(item) != 4 or item[0] != "A" or item[2] != "W" or not (item[1] + item[3]).isdigit():
            raise argparse.ArgumentTypeError(f"bit pair {item!r}: write A<act bits>W<weight bits>, e.g. A2W1")
        act, weight = int(item[1]), int(item[3])
        if not (1 <= act <= 4 and 1 <= weight <= 4):
            raise argparse.ArgumentTypeError(f"bit pair {item!r}: bits must be 1 to 4")
        pairs.append((act, weight))
    return pairs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=parse_bits, default=parse_bits("A1W1,A2W1,A2W2,A4W4"))
    parser.add_argument("--threads", type=int, default=1, help="threads for TVM and PyTorch alike (default 1)")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repeats (default 20, 3 with --quick)")
    parser.add_argument("--repeat-ms", type=float, default=None, help="length of one repeat (default 5 ms)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: the first {QUICK_SHAPES} shapes")
    parser.add_argument("--shapes", help=argparse.SUPPRESS)  # test-only: comma-separated indices into SHAPES
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (3 if args.quick else 20)
    args.repeat_ms = args.repeat_ms or (2.0 if args.quick else 5.0)
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # read when TVM starts its thread pool

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from common import (
    SHAPES,
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

from tvm_effconv.nn.dsq import DSQConv2d
from tvm_effconv.ops import dsq
from tvm_effconv.targets import get_preset

warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
warnings.filterwarnings("ignore", message=".*is deprecated. Please switch to", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel", category=UserWarning)

PATHS = (dsq.BITSERIAL, dsq.INT8_DOT)


def bench_shape(index, preset, dev, args):
    name, cin, cout, k, stride, size = SHAPES[index]
    torch.manual_seed(index)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2).eval()
    x = torch.relu(torch.randn(1, cin, size, size))
    with torch.no_grad():
        float_out = torch.relu(conv(x))
    qconv, x_scale, x_zero = torch_int8(conv, x, float_out)
    x_quantized = torch.quantize_per_tensor(x, x_scale, x_zero, torch.quint8)
    weight, bias, padding = conv.weight.detach(), conv.bias.detach(), conv.padding
    data = tvm.runtime.tensor(x.numpy())
    measurements = {
        "torch_fp32": Timed(lambda: torch.relu(F.conv2d(x, weight, bias, stride, padding))),
        "torch_int8": Timed(lambda: qconv(torch.quantize_per_tensor(x, x_scale, x_zero, torch.quint8)).dequantize()),
        "torch_qconv": Timed(lambda: qconv(x_quantized)),
    }
    errors, picked = {}, {}
    for act_bits, weight_bits in args.bits:
        layer = DSQConv2d.from_conv(conv, weight_bits, act_bits)
        with torch.no_grad():
            layer.train()(x)  # sets the activation range from the input
        model = nn.Sequential(layer.eval(), nn.ReLU()).eval()
        with torch.no_grad():
            reference = model(x).numpy()
        pair = f"A{act_bits}W{weight_bits}"
        picked[pair] = dsq.kernel_path(preset.target, weight_bits, act_bits).path
        for path in PATHS:
            with dsq.forcing_path(path):
                executable, _, _ = compile_ours(model, x, preset)
            vm = relax.VirtualMachine(executable, dev)
            got = vm["main"](data).numpy()
            errors[f"{pair} {path}"] = float(np.abs(got - reference).max() / max(float(np.abs(reference).max()), 1e-30))
            measurements[f"{pair} {path}"] = Timed(
                tvm_timer=lambda number, vm=vm: vm.time_evaluator("main", dev, number=number, repeat=1, min_repeat_ms=0),
                tvm_args=(data,),
            )
    with torch.inference_mode():
        measure(measurements, args.repeat, args.repeat_ms / 1e3)
    ms = {key: timed.median_ms() for key, timed in measurements.items()}
    best_ms = {key: min(timed.results) * 1e3 for key, timed in measurements.items()}
    mac_count = macs(cin, cout, k, stride, size)
    return {
        "index": index, "layer": name, "in_channels": cin, "out_channels": cout, "kernel": k, "stride": stride,
        "size": size, "macs": mac_count, "ms": ms, "best_ms": best_ms, "dispatch": picked,
        "max_rel_error_vs_reference_op": errors, "tolerance": TOLERANCE,
        "repeats_s": {key: timed.results for key, timed in measurements.items()},
    }


def layer_lines(result, pairs, statistic):
    times = result[statistic]
    lines = []
    for act_bits, weight_bits in pairs:
        pair = f"A{act_bits}W{weight_bits}"
        ours = times[f"{pair} {result['dispatch'][pair]}"]
        cells = [f"{result['layer']:<20}", f"{pair:<5}"]
        cells += [f"{times[f'{pair} {path}']:9.3f}" for path in PATHS]
        cells += [f"{result['dispatch'][pair]:>9}", f"{result['macs'] / ours / 1e6:7.1f}"]
        cells += [f"{times[peer] / ours:7.2f}" for peer in ("torch_fp32", "torch_int8", "torch_qconv")]
        bad = [path for path in PATHS if result["max_rel_error_vs_reference_op"][f"{pair} {path}"] > TOLERANCE]
        cells.append("FAIL " + ",".join(bad) if bad else "ok")
        lines.append(" ".join(cells))
    return lines


HEADING = (f"{'layer':<20} {'bits':<5} {'bitser ms':>9} {'int8dot ms':>9} {'ours':>9} {'GMAC/s':>7} "
           f"{'fp32/us':>7} {'int8/us':>7} {'qconv/us':>7} check")


def main(args):
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    preset, dev = get_preset("host"), tvm.cpu()
    indices = [int(i) for i in args.shapes.split(",")] if args.shapes else range(QUICK_SHAPES if args.quick else len(SHAPES))
    info = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
        "llvm_mcpu": preset.target.attrs["mcpu"], "threads": args.threads, "torch": torch.__version__,
        "tvm": tvm.__version__, "python": platform.python_version(), "repeat": args.repeat,
        "repeat_ms": args.repeat_ms, "argv": sys.argv[1:], "loadavg_start": os.getloadavg(),
    }
    print(f"DSQ layer benchmark on the host, {info['date']}")
    print(f"machine: {info['cpu']} ({info['logical_cpus']} logical CPUs), LLVM cpu {info['llvm_mcpu']}; "
          f"threads {args.threads}; torch {info['torch']}, tvm {info['tvm']}; {args.repeat} interleaved repeats "
          f"of ~{args.repeat_ms:g} ms; batch 1, float in/out, ReLU fused; load average {info['loadavg_start'][0]:.2f}")
    print("X/us = torch X time / ours (> 1: ours faster); ours = the path the dispatch picks; GMAC/s effective")
    start, rows = time.perf_counter(), []
    print("\nmedian of the repeats:\n" + HEADING, flush=True)
    for index in indices:
        rows.append(bench_shape(index, preset, dev, args))
        print("\n".join(layer_lines(rows[-1], args.bits, "ms")), flush=True)
    print("\nbest repeat:\n" + HEADING)
    for result in rows:
        print("\n".join(layer_lines(result, args.bits, "best_ms")))
    summary = {}
    for act_bits, weight_bits in args.bits:
        pair = f"A{act_bits}W{weight_bits}"
        summary[pair] = {
            path: {peer: geomean([r["ms"][peer] / r["ms"][f"{pair} {path}"] for r in rows])
                   for peer in ("torch_fp32", "torch_int8", "torch_qconv")}
            for path in PATHS
        }
        ours = rows[0]["dispatch"][pair]
        print(f"{pair}: ours ({ours}) geometric mean speed-up: "
              + ", ".join(f"{peer} {value:.2f}x" for peer, value in summary[pair][ours].items())
              + f"; the other path ({next(p for p in PATHS if p != ours)}): "
              + ", ".join(f"{peer} {value:.2f}x" for peer, value in summary[pair][next(p for p in PATHS if p != ours)].items()))
    failed = [f"{r['layer']} {key}" for r in rows for key, e in r["max_rel_error_vs_reference_op"].items() if e > TOLERANCE]
    print(f"correctness: FAILED on {failed}" if failed else
          f"correctness: every kernel matches the reference op within {TOLERANCE:g}")
    info["loadavg_end"], total_s = os.getloadavg(), time.perf_counter() - start
    print(f"total {total_s:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "layers": rows, "geomean_speedup": summary,
                                         "all_correct": not failed, "total_s": total_s}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
