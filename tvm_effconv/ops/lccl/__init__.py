"""LCCL (low-cost collaborative layer) for TVM: compute, schedules, import.

- ``compute``: the TE compute (padded input, cheap conv, mask, the main conv guarded by ``if mask != 0``,
  the fused ReLU / product epilogue) and the weight packing;
- ``reference``: the plain numpy reference of the sparse computation;
- ``cpu``: the skip schedule for ARM NEON and x86 (a register tile of output channels for one position,
  its whole reduction skipped where the mask is zero); ``cuda``: one thread per output element;
- this module: the converter of ``torch.ops.effconv.lccl_conv2d`` that the frontend's table maps to it.

The layer and the op's eager reference are in :mod:`tvm_effconv.nn.lccl`.
"""

import numpy as np

from . import compute, cpu
from . import cuda as cuda_schedule  # noqa: F401 - registers the CUDA rule

OP_NAME = "lccl_conv2d.default"
# Output channels per weight vector on CUDA: one thread per output channel, no vector.
CUDA_LANES = 1
OPAQUE = 8  # tvm.relay's OpPatternKind.kOpaque, the op_pattern attribute FuseOps reads


def lanes(target, out_channels: int) -> int:
    if target.kind.name == "cuda":
        return CUDA_LANES
    return compute.lanes_for(out_channels, cpu.vector_floats(target))


def layer_shape(target, x_shape, main_weight_shape, stride, padding, dilation, mode: str) -> compute.LCCLShape:
    n, c, h, w = (int(d) for d in x_shape)
    k, c_w, kh, kw = (int(d) for d in main_weight_shape)
    if c_w != c:
        raise ValueError(f"lccl_conv2d: main_weight.shape={tuple(main_weight_shape)} does not match x.shape={tuple(x_shape)}: "
                         f"expected (K, {c}, R, S)")
    return compute.LCCLShape(
        n, c, h, w, k, (kh, kw), tuple(int(v) for v in stride), tuple(int(v) for v in padding),
        tuple(int(v) for v in dilation), str(mode), lanes(target, k),
    )


def constants_of(shape: compute.LCCLShape, main_weight, main_bias, cheap_weight, cheap_bias) -> list[np.ndarray]:
    """The kernel's constant arguments after x, in order: packed main weight, main bias, cheap weight, cheap bias
    (absent biases as zeros)."""
    k, m = shape.out_channels, shape.mask_channels
    cheap_shape = (1, shape.in_channels, *shape.kernel) if shape.mode == "spatial" else (k, shape.in_channels, 1, 1)
    if tuple(cheap_weight.shape) != cheap_shape:
        raise ValueError(f"lccl_conv2d: cheap_weight.shape={tuple(cheap_weight.shape)}; expected {cheap_shape} in "
                         f"{shape.mode!r} mode")
    return [
        compute.pack_weights(shape, main_weight),
        np.zeros(k, np.float32) if main_bias is None else main_bias.astype(np.float32),
        cheap_weight.astype(np.float32),
        np.zeros(m, np.float32) if cheap_bias is None else cheap_bias.astype(np.float32),
    ]


def emit(bb, x, shape: compute.LCCLShape, values: list[np.ndarray], sparse: bool = True, name: str = "lccl_conv2d"):
    """Add the kernel's PrimFunc to ``bb`` and emit its call on ``x`` with ``values`` as constants."""
    from tvm import relax, te

    holders = [te.placeholder((shape.batch, shape.in_channels, shape.height, shape.width), "float32", "x")]
    holders += [te.placeholder(v.shape, "float32", n) for v, n in zip(values, ("main_weight", "main_bias", "cheap_weight", "cheap_bias"))]
    func = compute.prim_func(shape, *holders, sparse=sparse)
    # Opaque (op_pattern 8) to FuseOps: FuseTIR cannot merge this hand-built function with its neighbours (it
    # maps their buffers inconsistently); the epilogue is already fused inside it.
    func = func.without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
    gv = bb.add_func(func, name)  # one per layer: the builder makes the names unique
    out = relax.TensorType((shape.batch, shape.out_channels, *shape.out_size), "float32")
    return bb.emit(relax.call_tir(gv, [x, *(relax.const(v) for v in values)], out))


def converter(target, constants: dict, folded: set):
    """The frontend converter ``fn(node, importer)`` of ``lccl_conv2d.default`` for ``target``; ``constants``
    maps graph input names to the model's weights (BNs are already folded into them by the layer; nothing
    after the op is folded: its output is a product of two ReLUs)."""
    from ...frontend import constant_argument

    def convert(node, importer):
        x_arg, main_weight, main_bias, cheap_weight, cheap_bias, stride, padding, dilation, mode = node.args
        x = importer.env[x_arg]
        weights = [
            constant_argument(constants, arg, "lccl_conv2d", name)
            for arg, name in ((main_weight, "main_weight"), (main_bias, "main_bias"), (cheap_weight, "cheap_weight"),
                              (cheap_bias, "cheap_bias"))
        ]
        shape = layer_shape(target, x.ty.shape, weights[0].shape, stride, padding, dilation, mode)
        return emit(importer.block_builder, x, shape, constants_of(shape, *weights))

    return convert
