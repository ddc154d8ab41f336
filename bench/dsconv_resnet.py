"""DSConv ResNet-18 (4-bit codes, blocks of 32/64/128): storage, drift from the fp32 network, and the
compiled network's latency against PyTorch fp32 eager, on the host, in one run.

    python bench/dsconv_resnet.py [--threads 1] [--images 4] [--repeat 5] [--json OUT]

Storage counts the converted convs (codes at ``bits`` bits plus float32 KDS scales) against the same
convs in fp32, and the whole network (the float stem conv, batch norms and classifier included).
Drift compares logits with the fp32 network's on a fixed set of random images: relative L2 error and
top-1 agreement. The fp32 network has random weights, so drift measures conversion error, not accuracy.
"""

import argparse
import json
import os
import statistics
import sys
import time

from common import cpu_model


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--blocks", default="32,64,128")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", help="write every figure to this JSON file")
    return parser.parse_args()


def main():
    args = parse()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from tvm_effconv import build as builder
    from tvm_effconv import frontend
    from tvm_effconv.models.resnet import resnet18, resnet18_dsconv
    from tvm_effconv.nn import DSConv2d
    from tvm_effconv.targets import get_preset

    torch.set_num_threads(args.threads)
    preset = get_preset("host")
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(args.images, 3, args.size, args.size, generator=generator)
    fp32, _ = resnet18(batch=1, size=args.size)
    with torch.no_grad():
        reference = fp32(images).numpy()
    x1 = images[:1]

    def median_ms(fn, repeat):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    with torch.no_grad():
        torch_ms = median_ms(lambda: fp32(x1), args.repeat)
    arg = tvm.runtime.tensor(x1.numpy())

    def tvm_ms_of(model):
        """Compiled for the host with the default schedules (no records): (VM, median ms)."""
        executable, _ = builder.build(frontend.to_relax(torch.export.export(model, (x1,)), preset.target), preset)
        vm = relax.VirtualMachine(executable, tvm.cpu())
        return vm, 1e3 * vm.time_evaluator("main", tvm.cpu(), number=1, repeat=args.repeat)(arg).median

    _, tvm_fp32_ms = tvm_ms_of(fp32)

    rows = []
    print(f"# DSConv ResNet-18, {args.bits}-bit codes, {args.size}x{args.size}, batch 1")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} thread(s); torch {torch.__version__}, "
          f"tvm {tvm.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"float ResNet-18: PyTorch fp32 eager {torch_ms:.1f} ms, TVM fp32 (default schedules) {tvm_fp32_ms:.1f} ms\n")
    header = ("block", "conv storage ratio", "network storage ratio", "logit rel. L2 drift", "top-1 agreement",
              "TVM vs eager max err", "TVM ms", "fp32 torch / TVM", "fp32 TVM / TVM")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for block in (int(b) for b in args.blocks.split(",")):
        model, _ = resnet18_dsconv(bits=args.bits, block=block, size=args.size)
        layers = [m for m in model.modules() if isinstance(m, DSConv2d)]
        fp32_bits = 32 * sum(m.weight_codes.numel() for m in layers)
        ds_bits = sum(m.storage_bits_per_weight * m.weight_codes.numel() for m in layers)
        other = sum(p.numel() for p in model.parameters() if p.dim() > 0) - sum(
            m.kds_scale.numel() + m.cds_scale.numel() + m.cds_bias.numel() for m in layers
        )
        network_fp32 = 32 * sum(p.numel() for p in fp32.parameters())
        network_ds = ds_bits + 32 * other
        with torch.no_grad():
            logits = model(images).numpy()
        drift = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))
        agreement = float(np.mean(logits.argmax(1) == reference.argmax(1)))
        vm, tvm_ms = tvm_ms_of(model)
        out = vm["main"](arg).numpy()
        tvm_err = float(np.abs(out - logits[:1]).max() / np.abs(logits[:1]).max())
        row = {
            "block": block, "conv_storage_ratio": fp32_bits / ds_bits, "network_storage_ratio": network_fp32 / network_ds,
            "logit_relative_l2_drift": drift, "top1_agreement": agreement, "tvm_vs_eager_max_rel_error": tvm_err,
            "tvm_ms": tvm_ms, "torch_fp32_ms": torch_ms, "tvm_fp32_ms": tvm_fp32_ms,
        }
        rows.append(row)
        print(f"| {block} | {row['conv_storage_ratio']:.2f}x | {row['network_storage_ratio']:.2f}x | {drift:.3f} | "
              f"{agreement:.2f} | {tvm_err:.1e} | {tvm_ms:.1f} | {torch_ms / tvm_ms:.2f}x | {tvm_fp32_ms / tvm_ms:.2f}x |")
        sys.stdout.flush()
    print("\nTVM: default schedules (no tuning records); a ratio > 1 means the compiled DSConv network is faster.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": cpu_model(), "threads": args.threads, "bits": args.bits, "size": args.size,
                       "images": args.images, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
