"""VarG (variable group convolution) for TVM: the grouped conv with few channels per group.

- ``compute``: the TE compute (output channels of a group vectorised, weights packed per group);
- ``reference``: the plain numpy reference;
- ``cpu``: the schedule for x86 (AVX2, AVX-512) and ARM NEON; ``cuda``: the CUDA schedule;
- this module: the converter of ``aten.convolution`` that the frontend's table maps to it. It takes the
  grouped convs with ``group_base`` = C / groups in :data:`compute.GROUP_BASES` (and more than one
  group), whose weights are model constants, and leaves every other convolution to TVM's importer.

The layers (``VarGConv2d`` and the blocks) are in :mod:`tvm_effconv.nn.varg`; they export as standard
grouped convs, so there is no custom op.
"""

import numpy as np

from . import compute, cpu
from . import cuda as cuda_schedule

OP_NAME = "convolution.default"


def vector_lanes(target, group_out: int) -> int:
    """Output channels per packed weight vector for ``target``."""
    if target.kind.name == "cuda":
        lanes = cuda_schedule.LANES
        while group_out % lanes:
            lanes //= 2
        return lanes
    return cpu.vector_lanes(target, group_out)


def is_varg_conv(node, constants: dict) -> bool:
    """Whether ``aten.convolution`` ``node`` is a 2-D grouped conv this kernel takes: not transposed,
    groups > 1, C / groups in GROUP_BASES, constant weights (a constant bias or none)."""
    args = node.args
    x, weight, bias = args[0], args[1], args[2]
    transposed, groups = bool(args[6]), int(args[8])
    shape = x.meta.get("val").shape if "val" in getattr(x, "meta", {}) else None
    if transposed or groups <= 1 or shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return False
    if getattr(weight, "name", None) not in constants:
        return False
    if bias is not None and getattr(bias, "name", None) not in constants:
        return False
    return int(shape[1]) % groups == 0 and int(shape[1]) // groups in compute.GROUP_BASES


def converter(target, constants: dict, folded: set):
    """The frontend converter ``fn(node, importer)`` of ``convolution.default`` for ``target``: VarG's
    kernel for the convs :func:`is_varg_conv` accepts, TVM's own conversion for the rest. A batch norm
    right after a VarG conv is folded into its weights and bias and added to ``folded``."""
    from ...frontend import foldable_batch_norm

    def convert(node, importer):
        from tvm import relax, tirx

        x = importer.env[node.args[0]]
        static = x.ty.shape is not None and all(isinstance(d, tirx.IntImm) for d in x.ty.shape.values)
        if not static or not is_varg_conv(node, constants):  # symbolic shapes: TVM's conv2d
            return type(importer)._convolution(importer, node)
        bb = importer.block_builder
        _, weight, bias, stride, padding, dilation, _, _, groups = node.args[:9]
        weight = constants[weight.name]
        bias = None if bias is None else constants[bias.name].astype(np.float64)
        n, c, h, w = (int(d) for d in x.ty.shape)
        k = int(weight.shape[0])
        shape = compute.VarGShape(
            n, c, h, w, k, tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation), int(groups),
            vector_lanes(target, k // int(groups)),
        )
        scale = None
        norm = foldable_batch_norm(node, constants)
        if norm is not None:
            folded.add(norm[0])
            scale = norm[1]
            bias = norm[2] if bias is None else bias * norm[1] + norm[2]
        weights = relax.const(compute.pack_weights(shape, weight, scale))
        tensors = {} if bias is None else {"bias": relax.const(np.asarray(bias, np.float32))}

        annotations = {} if target.kind.name == "cuda" else {cpu.REGISTERS_ANNOTATION: cpu.simd_registers(target)}

        def kernel(x, weights, bias=None):
            return compute.varg_conv2d(shape, x, weights, bias, annotations)

        return bb.emit_te(kernel, x, weights, primfunc_name_hint="varg_conv2d", **tensors)

    return convert
