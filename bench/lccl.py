"""Benchmark the LCCL kernels on the host: both sparse algorithms against the same kernel built dense and
against PyTorch's dense conv, at mask sparsities from 0 to 90%.

For each ResNet-18 3x3 conv shape, batch 1, "spatial" mask (one value per output position, what LCCL's
ResNets use), one thread:

- skip: our kernel (``tvm_effconv.ops.lccl``, CPU rule, default knobs): padded input, cheap conv, mask, the
  main conv's whole reduction skipped at zero positions, epilogue ``relu(acc + b) * mask``;
- compact: the active positions listed (a prefix sum), their input windows gathered into a dense matrix, a
  GEMM over its rows, the epilogue reading each active position's row back;
- dense: the skip compute and schedule without the ``if mask != 0`` guard (every position reduced);
- torch: ``relu(F.conv2d(x, W, b))``, PyTorch's dense fp32 conv (oneDNN), the conv LCCL replaces.

The sparsity is set through the cheap bias (a runtime argument): ``round(s * P * Q)`` positions have a zero
mask. Timed interleaved (one repeat of each in turn, see bench/common.py), medians reported; both sparse
kernels are checked against the numpy reference (tvm_effconv.ops.lccl.reference) at 50%. Writes
bench/results/lccl-host.{md,json,png} (the PNG needs matplotlib).

    python bench/lccl.py [--repeat 10] [--repeat-ms 20] [--quick] [--out STEM]
"""

import argparse
import json
import os
import platform
import sys
from datetime import datetime
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from common import SHAPES, Timed, cpu_model, geomean, measure

SPARSITIES = [0.0, 0.25, 0.5, 0.75, 0.9]
ALGORITHMS = ["skip", "compact"]
RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-5


def build(shape, target):
    import tvm
    from tvm import te

    from tvm_effconv.ops.lccl import compute
    from tvm_effconv.schedule_rules import apply_default_rules

    holders = [
        te.placeholder((1, shape.in_channels, shape.height, shape.width), "float32", "x"),
        te.placeholder(shape.packed_weight_shape, "float32", "main_weight"),
        te.placeholder((shape.out_channels,), "float32", "main_bias"),
        te.placeholder((1, shape.in_channels, *shape.kernel), "float32", "cheap_weight"),
        te.placeholder((1,), "float32", "cheap_bias"),
    ]
    mod, _ = apply_default_rules(tvm.IRModule({"main": compute.prim_func(shape, *holders)}), target)
    with target:
        return tvm.compile(mod, target=target)


def bench_shape(spec, target, args):
    import tvm

    from tvm_effconv.ops import lccl
    from tvm_effconv.ops.lccl import reference

    name, cin, cout, k, stride, size = spec

    def shape_of(algorithm):
        return lccl.layer_shape(target, (1, cin, size, size), (cout, cin, k, k), (stride, stride), (k // 2, k // 2),
                                (1, 1), "spatial", algorithm)

    shapes = {algorithm: shape_of(algorithm) for algorithm in ["dense", *ALGORITHMS]}
    shape = shapes["dense"]  # the same geometry for all three
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cin, size, size)).astype(np.float32)
    weight = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32) * 0.1
    cheap = (rng.standard_normal((1, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    pre = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(cheap).double(), None, stride, k // 2).numpy().ravel()
    libs = {algorithm: build(algorithm_shape, target) for algorithm, algorithm_shape in shapes.items()}
    dev = tvm.cpu()
    # per algorithm: compact reduces channels last, its weights are packed so
    packed = {algorithm: tvm.runtime.tensor(lccl.compute.pack_weights(algorithm_shape, weight))
              for algorithm, algorithm_shape in shapes.items()}
    main_bias, cheap_w = tvm.runtime.tensor(bias), tvm.runtime.tensor(cheap)
    data = tvm.runtime.tensor(x)
    out = tvm.runtime.tensor(np.zeros((1, cout, *shape.out_size), np.float32))

    def cheap_bias(sparsity):
        # mask = relu(pre + b): zero where pre <= the sparsity-quantile (b > -min(pre) for 0%)
        ordered = np.sort(pre)
        count = round(sparsity * len(ordered))
        threshold = ordered[0] - 1.0 if count == 0 else (ordered[count - 1] + ordered[min(count, len(ordered) - 1)]) / 2
        return np.array([-threshold], np.float32)

    def timer(algorithm, b):
        args_ = (data, packed[algorithm], main_bias, cheap_w, tvm.runtime.tensor(b), out)
        return Timed(tvm_timer=lambda number: libs[algorithm].mod.time_evaluator("main", dev, number=number, repeat=1),
                     tvm_args=args_)

    b50 = cheap_bias(0.5)
    want = reference.lccl_conv2d(x, weight, bias, cheap, b50, shape.stride, shape.padding, shape.dilation, "spatial")
    errors = {}
    for algorithm in ALGORITHMS:
        libs[algorithm](data, packed[algorithm], main_bias, cheap_w, tvm.runtime.tensor(b50), out)
        errors[algorithm] = float(np.abs(out.numpy() - want).max() / max(float(np.abs(want).max()), 1e-30))
    mask_zero = float((np.maximum(pre + b50[0], 0) == 0).mean())

    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)
    measurements = {
        "torch": Timed(lambda: torch.relu(F.conv2d(xt, wt, bt, stride, k // 2))),
        "dense": timer("dense", cheap_bias(0.0)),
        **{f"{a} {s:.2f}": timer(a, cheap_bias(s)) for s in SPARSITIES for a in ALGORITHMS},
    }
    with torch.inference_mode():
        measure(measurements, args.repeat, args.repeat_ms / 1e3)
    medians = {key: timed.median_ms() for key, timed in measurements.items()}

    def result(algorithm):
        sparse = {s: medians[f"{algorithm} {s:.2f}"] for s in SPARSITIES}
        return {
            "sparse_ms": {f"{s:.2f}": v for s, v in sparse.items()},
            "speedup_over_dense": {f"{s:.2f}": medians["dense"] / v for s, v in sparse.items()},
            "speedup_over_torch": {f"{s:.2f}": medians["torch"] / v for s, v in sparse.items()},
            # the algorithm against itself with no zeros: what the mask buys, whatever the dense baseline's speed
            "speedup_over_own_0": {f"{s:.2f}": sparse[0.0] / v for s, v in sparse.items()},
            "overhead_at_0": sparse[0.0] / medians["dense"] - 1,
            "max_relative_error_at_50": errors[algorithm],
            "passed": errors[algorithm] <= TOLERANCE,
        }

    return {
        "layer": name,
        "torch_ms": medians["torch"],
        "dense_ms": medians["dense"],
        "mask_zero_fraction_at_50": mask_zero,
        "compact_rows": shapes["compact"].rows,
        "algorithms": {algorithm: result(algorithm) for algorithm in ALGORITHMS},
    }


def table(rows):
    heads = ["layer", "algorithm", "torch ms", "dense ms"] + [f"{s:.0%}" for s in SPARSITIES] + ["0% overhead", "ok"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        for algorithm, a in r["algorithms"].items():
            cells = [r["layer"], algorithm, f"{r['torch_ms']:.2f}", f"{r['dense_ms']:.2f}"]
            cells += [f"{a['sparse_ms'][f'{s:.2f}']:.2f} ({a['speedup_over_dense'][f'{s:.2f}']:.2f}x)" for s in SPARSITIES]
            cells += [f"{a['overhead_at_0']:+.1%}", "yes" if a["passed"] else "NO"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def geomean_curve(results, key):
    """``key``'s speed-up per sparsity, geomean over layers."""
    return {f"{s:.2f}": geomean([a[key][f"{s:.2f}"] for a in results]) for s in SPARSITIES}


def summary(rows):
    lines, document = [], {}
    for algorithm in ALGORITHMS:
        results = [r["algorithms"][algorithm] for r in rows]
        curve, versus_torch, versus_own = (geomean_curve(results, key) for key in
                                           ("speedup_over_dense", "speedup_over_torch", "speedup_over_own_0"))
        overhead = geomean([1 + a["overhead_at_0"] for a in results]) - 1
        document[algorithm] = {"speedup_over_dense": curve, "speedup_over_torch": versus_torch,
                               "speedup_over_own_0": versus_own, "overhead_at_0": overhead}
        lines += [
            f"{algorithm}: speed-up over the same kernel built dense (geomean over layers): "
            + ", ".join(f"{float(s):.0%}: {v:.2f}x" for s, v in curve.items()),
            f"{algorithm}: speed-up over PyTorch's dense conv (geomean): "
            + ", ".join(f"{float(s):.0%}: {v:.2f}x" for s, v in versus_torch.items()),
            f"{algorithm}: speed-up over itself at 0% zeros (geomean): "
            + ", ".join(f"{float(s):.0%}: {v:.2f}x" for s, v in versus_own.items()),
            f"{algorithm}: overhead at 0% sparsity (cheap conv + mask + guard, geomean): {overhead:+.1%}",
            (f"{algorithm}: goals: >= 1.7x at 50% zeros -> {curve['0.50']:.2f}x "
             f"({'met' if curve['0.50'] >= 1.7 else 'NOT met'}); overhead at 0% < 10% -> {overhead:+.1%} "
             f"({'met' if overhead < 0.10 else 'NOT met'})"),
        ]
    # compact over skip per sparsity: > 1 where compaction wins
    ratio = {f"{s:.2f}": geomean([r["algorithms"]["skip"]["sparse_ms"][f"{s:.2f}"]
                                  / r["algorithms"]["compact"]["sparse_ms"][f"{s:.2f}"] for r in rows])
             for s in SPARSITIES}
    document["compact_over_skip"] = ratio
    lines.append("compact's speed-up over skip (geomean): " + ", ".join(f"{float(s):.0%}: {v:.2f}x" for s, v in ratio.items()))
    return lines, document


STYLES = {"skip": "-o", "compact": "--s"}
COLOURS = {"skip": "tab:blue", "compact": "tab:orange"}


def plot(rows, document, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s * 100 for s in SPARSITIES]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algorithm in ALGORITHMS:
        for r in rows:
            ax.plot(xs, [r["algorithms"][algorithm]["speedup_over_dense"][f"{s:.2f}"] for s in SPARSITIES],
                    STYLES[algorithm][:-1], color=COLOURS[algorithm], alpha=0.25, lw=1)
        curve = document[algorithm]["speedup_over_dense"]
        ax.plot(xs, [curve[f"{s:.2f}"] for s in SPARSITIES], STYLES[algorithm], color=COLOURS[algorithm], lw=2.5,
                label=f"{algorithm} (geomean; thin: layers)")
    ax.plot(xs, [1 / (1 - s) for s in SPARSITIES], "k:", lw=1, label="ideal 1 / (1 - s)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("mask zero positions (%)")
    ax.set_ylabel("speed-up over the dense kernel")
    ax.set_title("LCCL sparse conv on the host, 1 thread, ResNet-18 3x3 layers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--repeat-ms", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="two shapes, short repeats, no result files")
    parser.add_argument("--out", type=Path, help="results path without suffix (default bench/results/lccl-host; "
                        "with --quick, result files only where given)")
    args = parser.parse_args(argv)
    out = args.out or (None if args.quick else RESULTS / "lccl-host")
    import tvm

    from tvm_effconv.targets import get_preset

    torch.set_num_threads(1)
    target = get_preset("host").target
    shapes = [s for s in SHAPES if s[3] == 3]
    if args.quick:
        shapes, args.repeat, args.repeat_ms = shapes[-2:], 3, 5.0
    info = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "llvm_mcpu": str(target.attrs.get("mcpu", "")),
        "threads": 1,
        "torch": torch.__version__,
        "tvm": tvm.__version__,
        "python": platform.python_version(),
        "repeat": args.repeat,
        "repeat_ms": args.repeat_ms,
        "loadavg_start": os.getloadavg(),
    }
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs ({info['affinity_cpus']} usable), "
          f"1 thread; torch {info['torch']}, TVM {info['tvm']}")
    rows = []
    for spec in shapes:
        rows.append(bench_shape(spec, target, args))
        print("\n".join(table(rows)[-len(ALGORITHMS):]), flush=True)
    info["loadavg_end"] = os.getloadavg()
    lines, document = summary(rows)
    machine = (f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, 1 thread; torch {info['torch']}, "
               f"TVM {info['tvm']}; {info['date']}; load average {info['loadavg_start'][0]:.2f} at the start (the "
               "machine is shared: absolute times are noisy, ratios are interleaved)")
    legend = ("medians in ms; sparse columns: our kernel (algorithm: skip the reduction of a zero position, or "
              "compact the active positions and run a GEMM over them) at that fraction of zero mask positions "
              "(speed-up over the same kernel built dense)")
    md = ["# LCCL sparse conv, host", "", machine, "", legend, "", *table(rows), "", *lines]
    print("\n".join(["", *lines]))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text("\n".join(md) + "\n")
        out.with_suffix(".json").write_text(json.dumps({"machine": info, "layers": rows, **document}, indent=2) + "\n")
        plot(rows, document, out.with_suffix(".png"))
    return 0 if all(a["passed"] for r in rows for a in r["algorithms"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
