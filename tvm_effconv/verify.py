"""Run a compiled artifact (locally or on an RPC device) and compare it with PyTorch."""

from dataclasses import dataclass

import numpy as np

# Float outputs pass when max |tvm - torch| <= ATOL + RTOL * max |torch|: kernels reorder the sums,
# so bit equality is not expected; integer outputs must match exactly.
RTOL = 1e-4
ATOL = 1e-5
# Models that quantize activations inside (effconv quantized ops): a float sum taken in another order
# can put a value that sits on a rounding boundary into the neighbouring integer code, and the step
# propagates through the following layers; the tolerance allows such isolated one-code flips.
QUANTIZED_RTOL = 1e-2


@dataclass
class Comparison:
    max_abs_error: float
    tolerance: float
    passed: bool


def flatten_outputs(value) -> list:
    """Tensors of a (possibly nested) tuple/list output, in order."""
    if isinstance(value, (tuple, list)) or type(value).__name__ == "Array":
        return [leaf for item in value for leaf in flatten_outputs(item)]
    return [value]


def reference_outputs(reference, inputs) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [t.detach().cpu().numpy() for t in flatten_outputs(reference(*inputs))]


def run_vm(library, device, inputs) -> list[np.ndarray]:
    """Run the Relax VM's main on numpy inputs; ``library`` is a loaded (local or remote) module."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(library, device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(x), device) for x in inputs]
    return [out.numpy() for out in flatten_outputs(vm["main"](*args))]


def compare(outputs: list[np.ndarray], expected: list[np.ndarray], rtol: float = RTOL) -> Comparison:
    if len(outputs) != len(expected):
        return Comparison(float("inf"), 0.0, False)
    worst, tolerance, passed = 0.0, 0.0, True
    for out, ref in zip(outputs, expected):
        if out.shape != ref.shape:
            return Comparison(float("inf"), 0.0, False)
        err = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64)))) if out.size else 0.0
        tol = 0.0 if np.issubdtype(ref.dtype, np.integer) else ATOL + rtol * float(np.max(np.abs(ref), initial=0.0))
        worst, tolerance = max(worst, err), max(tolerance, tol)
        passed = passed and err <= tol
    return Comparison(worst, tolerance, passed)
