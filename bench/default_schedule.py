"""Benchmark the default CPU schedules against the unscheduled TVM build and PyTorch fp32 eager.

Runs on the host: ResNet-18 layers and a whole ResNet-18 (tvm_effconv.models.resnet; no torchvision).
Single-threaded by default so that the figures are comparable on a shared machine; ``--threads N``
uses N threads for TVM (TVM_NUM_THREADS, set before TVM starts its pool) and PyTorch alike.

    python bench/default_schedule.py [--threads 1] [--repeat 10] [--skip-unscheduled]
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from tvm_effconv.build import prepare
from tvm_effconv.default_schedule import apply_default_schedules
from tvm_effconv.models.resnet import ResNet18


def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2)


CASES = [
    ("conv 64x56x56 3x3 64", conv(64, 64, 3), (1, 64, 56, 56)),
    ("conv 128x28x28 3x3 128", conv(128, 128, 3), (1, 128, 28, 28)),
    ("conv 256x14x14 3x3 256", conv(256, 256, 3), (1, 256, 14, 14)),
    ("conv 128x28x28 1x1 256 s2", conv(128, 256, 1, 2), (1, 128, 28, 28)),
    ("dense 512->1000", nn.Linear(512, 1000), (1, 512)),
    ("ResNet-18 1x3x224x224", ResNet18(), (1, 3, 224, 224)),
]


def fused_module(model, x, target):
    """The Relax module up to FuseTIR, as the compile flow hands it to apply_default_schedules."""
    exported = torch.export.export(model, (x,))
    return prepare(from_exported_program(exported, keep_params_as_input=False, unwrap_unit_return_tuple=True), target)


def time_tvm(mod, target, x, repeat, number):
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    data = tvm.runtime.tensor(x.numpy())
    result = vm["main"](data).numpy()
    timer = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat, min_repeat_ms=0)
    return statistics.median(timer(data).results) * 1e3, result


def time_torch(model, x, repeat, number):
    with torch.no_grad():
        model(x)
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                model(x)
            runs.append((time.perf_counter() - start) / number)
    return statistics.median(runs) * 1e3


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median taken)")
    parser.add_argument(
        "--skip-unscheduled",
        action="store_true",
        help="skip the slow unscheduled builds (0.15 s per conv run, 2.5 s per ResNet-18 run here)",
    )
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM starts its thread pool, on first use
    torch.set_num_threads(args.threads)
    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": args.threads}
    )
    print(f"machine: {cpu_model()} ({os.cpu_count()} logical CPUs), LLVM cpu {target.attrs['mcpu']}")
    print(f"threads: TVM {args.threads}, PyTorch {torch.get_num_threads()}; median of {args.repeat} runs\n")
    columns = ["unscheduled", "default", "pytorch", "unsched/default", "default/torch", "schedule s"]
    print(f"{'case':<28}" + "".join(f"{c:>16}" for c in columns))
    for name, model, shape in CASES:
        torch.manual_seed(0)
        model = model.eval()
        x = torch.randn(*shape)
        mod = fused_module(model, x, target)
        start = time.perf_counter()
        scheduled, failed = apply_default_schedules(mod, target)
        schedule_s = time.perf_counter() - start
        default_ms, out = time_tvm(scheduled, target, x, args.repeat, number=3)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)
        torch_ms = time_torch(model, x, args.repeat, number=3)
        if args.skip_unscheduled:
            unscheduled = speedup = "-"
        else:
            unscheduled_ms, _ = time_tvm(mod, target, x, repeat=3, number=1)
            unscheduled, speedup = f"{unscheduled_ms:.2f}", f"{unscheduled_ms / default_ms:.1f}x"
        row = [
            unscheduled,
            f"{default_ms:.2f}",
            f"{torch_ms:.2f}",
            speedup,
            f"{default_ms / torch_ms:.2f}x",
            f"{schedule_s:.2f}",
        ]
        print(f"{name:<28}" + "".join(f"{c:>16}" for c in row) + (f"  failed: {failed}" if failed else ""))
    print("\ntimes in ms; default/torch < 1 means the default schedule is faster than PyTorch")


if __name__ == "__main__":
    main()
