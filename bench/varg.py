"""Benchmark the VarG kernels on the host: the grouped 3x3 conv against PyTorch's grouped conv and against
the depthwise + pointwise pair a MobileNet would use instead; the fused separable unit against the unfused
pair and PyTorch.

Shapes: every distinct variable group conv of the full VarGNet (``vargnet()``, 224 x 224, batch 1, width
1.0, group_base 8), with how often it occurs, plus the issue's reference layer (256 channels, 14 x 14,
32 groups, output factor 2). For each, timed float in / float out, single-threaded by default:

- ours: the layer (an ``nn.Conv2d`` with ``groups = C / 8``) compiled for the ``host`` preset with the
  default schedule (no tuning records) and run through the Relax VM (``time_evaluator``); checked
  against PyTorch every time;
- tvm default: the same layer imported by TVM's own converter (one ``R.nn.conv2d`` with groups) and
  compiled with the project's default CPU schedule (``tvm_effconv.default_schedule``), no VarG kernel;
- torch grouped: ``F.conv2d(x, w, groups=C / 8)`` (oneDNN / PyTorch's native grouped kernels);
- torch dw+pw: ``F.conv2d`` depthwise 3x3 (C -> C, same stride) then pointwise 1x1 (C -> K): a
  separable layer of the same input and output shape (fewer MACs: its GMAC/s counts its own MACs).

Separable units (group conv -> BN -> act -> pointwise -> BN (-> act)): every distinct unit of the full
VarGNet, timed as

- fused: ``VarGSeparable`` compiled for ``host``: the fused kernel (intermediate kept in cache per tile);
- unfused: the same with fusion switched off (``forced_fusion(False)``): our grouped kernel, then TVM's
  pointwise conv (the project's default CPU schedule), each with its BN folded and act fused;
- torch: PyTorch eager with both batch norms folded into the convs (grouped conv + bias, act, 1x1 conv
  + bias, act), what a PyTorch deployment runs.

Measurements of one layer are interleaved (one repeat of each in turn, see bench/common.py) so that the
noise of a shared machine falls on all alike; the median over repeats is the headline, the fastest
repeat is reported too.

    python bench/varg.py [--threads 1] [--repeat 30] [--repeat-ms 5] [--quick]

Writes bench/results/varg-host.md and bench/results/varg-host.json (``--out`` to change the stem).
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

TOLERANCE = 1e-5  # max |ours - torch| / max |torch|
RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_LAYER = {"in_channels": 256, "height": 14, "out_channels": 512, "stride": 1, "group_base": 8}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for TVM and PyTorch alike (default 1)")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repeats (default 30, 5 with --quick)")
    parser.add_argument("--repeat-ms", type=float, default=None, help="length of one repeat in ms (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke test: three shapes, fewer repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "varg-host", help="results path without suffix")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (5 if args.quick else 30)
    args.repeat_ms = args.repeat_ms or (2.0 if args.quick else 5.0)
    if args.repeat < 1 or args.threads < 1:
        parser.error("--repeat and --threads must be >= 1")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # read when TVM starts its thread pool

import numpy as np
import torch
import torch.nn.functional as F
import tvm
import peak
from common import SETTLE_S, Timed, compile_ours, cpu_model, geomean, measure
from torch import nn
from tvm import relax

from tvm_effconv.models.vargnet import vargnet, vargnet_conv_shapes
from tvm_effconv.nn.varg import VarGSeparable
from tvm_effconv.ops import varg
from tvm_effconv.ops.varg import compute
from tvm_effconv.targets import get_preset

warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")

PEERS = ("tvm_default", "torch_grouped", "torch_dw_pw")


def compile_tvm_default(model, x, preset):
    """The layer through TVM's importer alone (no effconv converters) and the default schedules."""
    from tvm.relax.frontend.torch import from_exported_program

    from tvm_effconv import build as builder

    with torch.no_grad():
        exported = torch.export.export(model, (x,)).run_decompositions()
    mod = from_exported_program(exported, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    executable, report = builder.build(mod, preset)
    assert not any(v["rule"] == compute.SCHEDULE_RULE for v in report.kernel_variants)
    return executable


def layer_shapes():
    """Distinct (in, size, out, stride, group_base) of VarGNet's grouped convs with their counts, then the
    reference layer."""
    model, (x,) = vargnet()
    counts = {}
    for d in vargnet_conv_shapes(model, x):
        key = (d["in_channels"], d["height"], d["out_channels"], d["stride"][0], d["group_base"])
        counts[key] = counts.get(key, 0) + 1
    rows = [{"in_channels": c, "height": h, "out_channels": k, "stride": s, "group_base": g, "count": n}
            for (c, h, k, s, g), n in sorted(counts.items(), key=lambda item: (-item[0][1], item[0]))]
    ref = dict(REFERENCE_LAYER, count=0)
    if not any(all(r[key] == ref[key] for key in REFERENCE_LAYER) for r in rows):
        rows.append(ref)
    return rows


def bench_shape(row, preset, dev, args):
    cin, size, cout, stride, group_base = (row[k] for k in ("in_channels", "height", "out_channels", "stride",
                                                           "group_base"))
    groups = cin // group_base
    torch.manual_seed(cin + size + stride)
    conv = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False).eval()
    x = torch.randn(1, cin, size, size)
    weight = conv.weight.detach()
    depthwise, pointwise = torch.randn(cin, 1, 3, 3) * 0.3, torch.randn(cout, cin, 1, 1) * 0.1
    with torch.no_grad():
        reference = conv(x).numpy()
    executable, report, compile_s = compile_ours(conv, x, preset)
    assert any(v["rule"] == compute.SCHEDULE_RULE for v in report.kernel_variants), "not routed to VarG's kernel"
    data = tvm.runtime.tensor(x.numpy())
    vms, errors = {}, {}
    for key, compiled in (("ours", executable), ("tvm_default", compile_tvm_default(conv, x, preset))):
        vms[key] = relax.VirtualMachine(compiled, dev)
        got = vms[key]["main"](data).numpy()
        errors[key] = float(np.abs(got - reference).max() / np.abs(reference).max())
    error = max(errors.values())

    def tvm_timer(vm):
        return lambda number: vm.time_evaluator("main", dev, number=number, repeat=1, min_repeat_ms=0)

    measurements = {
        "ours": Timed(tvm_timer=tvm_timer(vms["ours"]), tvm_args=(data,)),
        "tvm_default": Timed(tvm_timer=tvm_timer(vms["tvm_default"]), tvm_args=(data,)),
        "torch_grouped": Timed(lambda: F.conv2d(x, weight, None, stride, 1, 1, groups)),
        "torch_dw_pw": Timed(lambda: F.conv2d(F.conv2d(x, depthwise, None, stride, 1, 1, cin), pointwise)),
    }
    with torch.inference_mode():
        measure(measurements, args.repeat, args.repeat_ms / 1e3)
    out = (size + 2 - 3) // stride + 1
    macs = cout * out * out * group_base * 9
    dw_pw_macs = cin * out * out * 9 + cout * cin * out * out
    return {
        **row, "groups": groups, "out_size": out, "macs": macs, "dw_pw_macs": dw_pw_macs,
        "ms": {key: t.median_ms() for key, t in measurements.items()},
        "best_ms": {key: min(t.results) * 1e3 for key, t in measurements.items()},
        "max_rel_error": error, "max_rel_error_by_kernel": errors, "tolerance": TOLERANCE, "compile_s": compile_s,
        "repeats_s": {key: t.results for key, t in measurements.items()},
    }


def unit_shapes():
    """Distinct separable units of VarGNet (in, size, mid, out, stride, act after the pointwise conv) with
    their counts."""
    model, (x,) = vargnet()
    counts = {}
    for d in vargnet_conv_shapes(model, x):
        unit = model.get_submodule(d["name"].rpartition(".")[0])
        key = (d["in_channels"], d["height"], d["out_channels"], unit.pointwise.out_channels, d["stride"][0],
               not isinstance(unit.pointwise_act, nn.Identity))
        counts[key] = counts.get(key, 0) + 1
    return [{"in_channels": c, "height": h, "mid_channels": m, "out_channels": k, "stride": s, "pointwise_act": a,
             "count": n} for (c, h, m, k, s, a), n in sorted(counts.items(), key=lambda item: (-item[0][1], item[0]))]


def randomized_unit(row):
    torch.manual_seed(row["in_channels"] + row["height"])
    unit = VarGSeparable(row["in_channels"], row["out_channels"], stride=row["stride"],
                         factor=row["mid_channels"] // row["in_channels"], pointwise_activation=row["pointwise_act"])
    with torch.no_grad():
        for bn in (unit.group_bn, unit.pointwise_bn):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
        for act in unit.modules():
            if isinstance(act, nn.PReLU):
                act.weight.uniform_(0.05, 0.45)
    return unit.eval()


def folded_torch_unit(unit):
    """The unit as PyTorch eager with its batch norms folded into the convs."""

    def fold(conv, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return (conv.weight * scale.view(-1, 1, 1, 1)).detach(), (bn.bias - bn.running_mean * scale).detach()

    (w1, b1), (w2, b2) = fold(unit.group_conv, unit.group_bn), fold(unit.pointwise, unit.pointwise_bn)
    conv, act1, act2 = unit.group_conv, unit.group_act, unit.pointwise_act

    def run(x):
        y = act1(F.conv2d(x, w1, b1, conv.stride, conv.padding, 1, conv.groups))
        return act2(F.conv2d(y, w2, b2))

    return run


def bench_unit(row, preset, dev, args):
    unit = randomized_unit(row)
    x = torch.randn(1, row["in_channels"], row["height"], row["height"])
    with torch.no_grad():
        reference = unit(x).numpy()
    data = tvm.runtime.tensor(x.numpy())
    vms, errors, rules = {}, {}, {}
    for key, fused in (("fused", True), ("unfused", False)):
        with varg.forced_fusion(fused):
            executable, report, _ = compile_ours(unit, x, preset)
        rules[key] = sorted({v["rule"] for v in report.kernel_variants})
        vms[key] = relax.VirtualMachine(executable, dev)
        got = vms[key]["main"](data).numpy()
        errors[key] = float(np.abs(got - reference).max() / np.abs(reference).max())
    assert rules["fused"] == [compute.SEPARABLE_RULE] and rules["unfused"] == [compute.SCHEDULE_RULE], rules

    def tvm_timer(vm):
        return lambda number: vm.time_evaluator("main", dev, number=number, repeat=1, min_repeat_ms=0)

    torch_unit = folded_torch_unit(unit)
    measurements = {key: Timed(tvm_timer=tvm_timer(vm), tvm_args=(data,)) for key, vm in vms.items()}
    measurements["torch"] = Timed(lambda: torch_unit(x))
    with torch.inference_mode():
        measure(measurements, args.repeat, args.repeat_ms / 1e3)
    out = (row["height"] - 1) // row["stride"] + 1
    macs = out * out * row["mid_channels"] * (unit.group_conv.group_base * 9 + row["out_channels"])
    return {
        **row, "out_size": out, "macs": macs,
        "ms": {key: t.median_ms() for key, t in measurements.items()},
        "best_ms": {key: min(t.results) * 1e3 for key, t in measurements.items()},
        "max_rel_error": max(errors.values()), "max_rel_error_by_kernel": errors, "tolerance": TOLERANCE,
        "repeats_s": {key: t.results for key, t in measurements.items()},
    }


UNIT_PEERS = ("unfused", "torch")


def unit_table(rows, statistic):
    head = ("| unit (in -> mid -> out, size, stride, act) | x in net | fused ms | unfused ms | torch ms | fused GMAC/s "
            "| unfused / fused | torch / fused | check |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        t = r[statistic]
        name = (f"{r['in_channels']} -> {r['mid_channels']} -> {r['out_channels']}, {r['height']}x{r['height']}, "
                f"s{r['stride']}{', act' if r['pointwise_act'] else ''}")
        check = "ok" if r["max_rel_error"] <= TOLERANCE else f"FAIL {r['max_rel_error']:.1e}"
        lines.append(
            f"| {name} | {r['count']} | {t['fused']:.3f} | {t['unfused']:.3f} | {t['torch']:.3f} "
            f"| {r['macs'] / t['fused'] / 1e6:.1f} | {t['unfused'] / t['fused']:.2f} | {t['torch'] / t['fused']:.2f} "
            f"| {check} |"
        )
    return lines


def table(rows, statistic):
    head = ("| layer (in -> out, size, stride) | x in net | groups | ours ms | tvm default ms | grouped ms | dw+pw ms "
            "| ours GMAC/s | grouped GMAC/s | dw+pw GMAC/s | tvm default / ours | grouped / ours | dw+pw / ours "
            "| check |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        t = r[statistic]
        name = f"{r['in_channels']} -> {r['out_channels']}, {r['height']}x{r['height']}, s{r['stride']}"
        check = "ok" if r["max_rel_error"] <= TOLERANCE else f"FAIL {r['max_rel_error']:.1e}"
        lines.append(
            f"| {name} | {r['count'] or 'ref'} | {r['groups']} | {t['ours']:.3f} | {t['tvm_default']:.3f} "
            f"| {t['torch_grouped']:.3f} "
            f"| {t['torch_dw_pw']:.3f} | {r['macs'] / t['ours'] / 1e6:.1f} | {r['macs'] / t['torch_grouped'] / 1e6:.1f} "
            f"| {r['dw_pw_macs'] / t['torch_dw_pw'] / 1e6:.1f} | {t['tvm_default'] / t['ours']:.2f} "
            f"| {t['torch_grouped'] / t['ours']:.2f} "
            f"| {t['torch_dw_pw'] / t['ours']:.2f} | {check} |"
        )
    return lines


def main(args):
    torch.set_num_threads(args.threads)
    preset, dev = get_preset("host"), tvm.cpu()
    info = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
        "llvm_mcpu": str(preset.target.attrs.get("mcpu", "")), "threads": args.threads,
        "torch": torch.__version__, "tvm": tvm.__version__, "python": platform.python_version(),
        "repeat": args.repeat, "repeat_ms": args.repeat_ms, "argv": sys.argv[1:], "loadavg_start": os.getloadavg(),
    }
    info["peak"] = peak.measure(args.threads, args.quick)  # what the GMAC/s columns are out of
    shapes = layer_shapes()
    if args.quick:
        shapes = shapes[:3]
    start, rows = time.perf_counter(), []
    for row in shapes:
        rows.append(bench_shape(row, preset, dev, args))
        r = rows[-1]
        print(f"{r['in_channels']}->{r['out_channels']} {r['height']} s{r['stride']}: ours {r['ms']['ours']:.3f} ms "
              f"({r['macs'] / r['ms']['ours'] / 1e6:.1f} GMAC/s), tvm default {r['ms']['tvm_default']:.3f} ms, grouped {r['ms']['torch_grouped']:.3f} ms, "
              f"dw+pw {r['ms']['torch_dw_pw']:.3f} ms, err {r['max_rel_error']:.1e}", flush=True)
    units = unit_shapes()[:3] if args.quick else unit_shapes()
    unit_rows = []
    for row in units:
        unit_rows.append(bench_unit(row, preset, dev, args))
        r = unit_rows[-1]
        print(f"unit {r['in_channels']}->{r['mid_channels']}->{r['out_channels']} {r['height']} s{r['stride']}: "
              + ", ".join(f"{key} {ms:.3f} ms" for key, ms in r["ms"].items()) + f", err {r['max_rel_error']:.1e}",
              flush=True)
    info["loadavg_end"], info["seconds"] = os.getloadavg(), time.perf_counter() - start
    summary = {peer: geomean([r["ms"][peer] / r["ms"]["ours"] for r in rows]) for peer in PEERS}
    weighted = {peer: sum(r["ms"][peer] * r["count"] for r in rows) / sum(r["ms"]["ours"] * r["count"] for r in rows)
                for peer in PEERS}
    unit_summary = {peer: geomean([r["ms"][peer] / r["ms"]["fused"] for r in unit_rows]) for peer in UNIT_PEERS}
    unit_weighted = {peer: sum(r["ms"][peer] * r["count"] for r in unit_rows)
                     / sum(r["ms"]["fused"] * r["count"] for r in unit_rows) for peer in UNIT_PEERS}
    lines = [
        "# VarG grouped 3x3 conv on the host",
        "",
        (f"{info['date']}; {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['affinity_cpus']} usable), "
        f"LLVM cpu {info['llvm_mcpu']}; {args.threads} thread(s) for TVM and PyTorch; torch {info['torch']}, "
        f"tvm {info['tvm']}; {args.repeat} interleaved repeats of ~{args.repeat_ms:g} ms (at threads > 1 each after "
        f"{SETTLE_S * 1e3:g} ms of untimed calls, see bench/common.py); batch 1, float32, "
        f"group_base 8; load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end."),
        "",
        ("ours: `python -m tvm_effconv.compile`'s pipeline, default schedule (no tuning records). tvm default: "
        "the same pipeline without the VarG kernel (TVM's grouped conv2d with the project's default CPU schedule). "
        "grouped: PyTorch `F.conv2d(groups=C/8)`. dw+pw: PyTorch depthwise 3x3 + pointwise 1x1 with the same input and "
        "output shape (its GMAC/s counts its own, fewer, MACs). X / ours > 1: ours faster. `x in net`: how often "
        "the layer occurs in VarGNet (224x224); `ref`: the issue's reference layer."),
        "",
        (f"fp32 peak, measured (bench/peak.py, {info['peak']['fp32']['instruction']}): "
         + ", ".join(f"{rate / 1e9:.0f} GMAC/s on {n} thread(s)" for n, rate in info["peak"]["fp32"]["macs_per_s"].items())
         + "."),
        "",
        "## Median of the repeats",
        "",
        *table(rows, "ms"),
        "",
        "## Fastest repeat",
        "",
        *table(rows, "best_ms"),
        "",
        ("Geometric mean over the layers, their time / ours: "
         + ", ".join(f"{peer} {value:.2f}x" for peer, value in summary.items())
         + ". Weighted by the layers' counts in VarGNet (sum of times): "
         + ", ".join(f"{peer} {value:.2f}x" for peer, value in weighted.items()) + "."),
        "",
        "# VarG separable unit, fused against unfused",
        "",
        ("fused: the fused kernel (`VarGSeparable` compiled for `host`, no tuning records); unfused: our grouped "
         "kernel, then TVM's pointwise conv (project default schedule); torch: PyTorch eager with the batch norms "
         "folded. GMAC/s counts both convs' MACs. X / fused > 1: fused faster."),
        "",
        "## Median of the repeats",
        "",
        *unit_table(unit_rows, "ms"),
        "",
        "## Fastest repeat",
        "",
        *unit_table(unit_rows, "best_ms"),
        "",
        ("Geometric mean over the units, their time / fused: "
         + ", ".join(f"{peer} {value:.2f}x" for peer, value in unit_summary.items())
         + ". Weighted by the units' counts in VarGNet: "
         + ", ".join(f"{peer} {value:.2f}x" for peer, value in unit_weighted.items()) + "."),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "summary_geomean": summary, "summary_weighted": weighted, "layers": rows,
         "units_geomean": unit_summary, "units_weighted": unit_weighted, "units": unit_rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main(ARGS)
