"""What the host benchmarks share: the machine, ResNet-18's conv shapes, PyTorch's int8 conv, compiling
one layer, and interleaved timing. Imported by the scripts in bench/ (run as ``python bench/X.py``); it
imports torch and TVM only inside its functions, so that a script can set TVM_NUM_THREADS first."""

import math
import os
import platform
import statistics
import time
from pathlib import Path

# (name, in channels, out channels, kernel, stride, input size): ResNet-18's conv shapes, batch 1.
SHAPES = [
    ("3x3 64->64 56 s1", 64, 64, 3, 1, 56),
    ("3x3 64->128 56 s2", 64, 128, 3, 2, 56),
    ("3x3 128->128 28 s1", 128, 128, 3, 1, 28),
    ("3x3 128->256 28 s2", 128, 256, 3, 2, 28),
    ("3x3 256->256 14 s1", 256, 256, 3, 1, 14),
    ("3x3 256->512 14 s2", 256, 512, 3, 2, 14),
    ("3x3 512->512 7 s1", 512, 512, 3, 1, 7),
    ("1x1 64->128 56 s2", 64, 128, 1, 2, 56),
    ("1x1 128->256 28 s2", 128, 256, 1, 2, 28),
    ("1x1 256->512 14 s2", 256, 512, 1, 2, 14),
]


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def macs(cin, cout, k, stride, size):
    out = (size + 2 * (k // 2) - k) // stride + 1
    return cout * out * out * cin * k * k


def compile_ours(model, x, preset):
    """Export ``model`` on ``x`` and build it for ``preset``: (executable, build report, seconds)."""
    import torch

    from tvm_effconv import build as builder
    from tvm_effconv import frontend

    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
    executable, report = builder.build(frontend.to_relax(exported, preset.target), preset)
    if report.unscheduled:
        raise RuntimeError(f"functions left unscheduled: {report.unscheduled}")
    return executable, report, time.perf_counter() - start


def torch_int8(conv, x, reference):
    """The qconv (ConvReLU2d, per-channel int8 weights) and its input quantization parameters, from
    PyTorch's observers: quint8 activations with reduce_range, as its default x86 qconfig."""
    import torch
    import torch.ao.nn.intrinsic.quantized as nniq
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    weight_observer = PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    weight_observer(conv.weight.detach())
    w_scale, w_zero = weight_observer.calculate_qparams()
    weight = torch.quantize_per_channel(conv.weight.detach(), w_scale.double(), w_zero.long(), 0, torch.qint8)
    input_observer = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=127)  # reduce_range
    input_observer(x)
    x_scale, x_zero = (float(v) for v in input_observer.calculate_qparams())
    output_observer = MinMaxObserver(dtype=torch.quint8)
    output_observer(reference)
    y_scale, y_zero = (float(v) for v in output_observer.calculate_qparams())
    qconv = nniq.ConvReLU2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    qconv.set_weight_bias(weight, conv.bias.detach())
    qconv.scale, qconv.zero_point = y_scale, int(y_zero)
    return qconv, x_scale, int(x_zero)


# --- timing ---

class Timed:
    """One measurement: ``once()`` calls the thing ``number`` times and returns the mean seconds."""

    def __init__(self, call=None, tvm_timer=None, tvm_args=()):
        self.call, self.tvm_timer, self.tvm_args, self.number = call, tvm_timer, tvm_args, 1
        self.results = []

    def once(self):
        if self.tvm_timer is not None:
            return self.tvm_timer(self.number)(*self.tvm_args).results[0]
        call, number = self.call, self.number
        start = time.perf_counter()
        for _ in range(number):
            call()
        return (time.perf_counter() - start) / number

    def calibrate(self, repeat_s):
        """Warm up for ~2 repeats' length (at least 3 calls), then pick ``number`` for one repeat."""
        self.number = 1
        spent, calls, single = 0.0, 0, math.inf
        while calls < 3 or spent < 2 * repeat_s:
            seconds = self.once()
            spent, calls, single = spent + seconds, calls + 1, min(single, seconds)
        self.number = max(1, round(repeat_s / single))

    def median_ms(self):
        return statistics.median(self.results) * 1e3


# Untimed calls of a system before each of its timed repeats, when more than one thread runs. A runtime's
# idle worker threads keep spinning for milliseconds after its last parallel region (libgomp's default,
# PyTorch's; TVM's pool likewise) and, with no spare core, slow whatever runs next: at 2 threads on a
# 2-core host, interleaving PyTorch's grouped conv with ours slowed ours 2.4x and PyTorch's 1.7x, which
# no deployment (one runtime at a time) sees. After 5 ms of its own calls each ran at its solo speed.
SETTLE_S = 0.01


def threads() -> int:
    return int(os.environ.get("TVM_NUM_THREADS", "1"))


def measure(measurements: dict, repeat: int, repeat_s: float) -> None:
    """``repeat`` rounds, each one timed repeat of every measurement in turn (interleaved: the noise of a
    shared machine falls on all alike), each preceded by SETTLE_S of untimed calls when threads > 1."""
    settle_s = SETTLE_S if threads() > 1 else 0.0
    for timed in measurements.values():
        timed.calibrate(repeat_s)
    for _ in range(repeat):
        for timed in measurements.values():
            end = time.perf_counter() + settle_s
            while time.perf_counter() < end:
                timed.once()
            timed.results.append(timed.once())


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


