"""VarG (variable group convolution) for TVM: the grouped conv with few channels per group, and the
separable unit (grouped conv -> BN -> act -> pointwise -> BN -> act) as one fused kernel.

- ``compute``: the TE computes (output channels of a group vectorised, weights packed per group; the
  fused unit);
- ``reference``: the plain numpy references;
- ``cpu``: the schedules for x86 (AVX2, AVX-512) and ARM NEON; ``cuda``: the CUDA schedules;
- this module: the dispatch and the converters the frontend's table maps to them:

  - ``aten.convolution``: the grouped convs with ``group_base`` = C / groups in
    :data:`compute.GROUP_BASES` (and more than one group), whose weights are model constants, go to the
    grouped kernel; every other convolution stays with TVM's importer;
  - ``effconv::varg_separable`` (a separable unit in eval mode): the fused kernel where
    :func:`fuses` says it is faster, else the grouped kernel followed by TVM's pointwise conv;
  - ``effconv::varg_qconv2d`` (an int8 VarG conv, see ``quantize_varg``): the int8 grouped kernel with
    the dot instruction :func:`int8_kernel` picks for the target.

The layers (``VarGConv2d``, ``VarGSeparable`` and the blocks) are in :mod:`tvm_effconv.nn.varg`.
"""

import contextlib
from dataclasses import dataclass

import numpy as np

from ..dsconv import cpu as dsconv_cpu
from . import compute, cpu
from . import cuda as cuda_schedule

OP_NAME = "convolution.default"
SEPARABLE_OP_NAME = "varg_separable.default"
QCONV_OP_NAME = "varg_qconv2d.default"


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


        def kernel(x, weights, bias=None):
            return compute.varg_conv2d(shape, x, weights, bias, cpu_annotations(target))

        return bb.emit_te(kernel, x, weights, primfunc_name_hint="varg_conv2d", **tensors)

    return convert


def cpu_annotations(target) -> dict:
    """The kernel block's annotations that size the CPU schedules' default tiles."""
    return {} if target.kind.name == "cuda" else {cpu.REGISTERS_ANNOTATION: cpu.simd_registers(target)}


# None: :func:`fuses` decides; True / False: every unit fused / unfused (see :func:`forced_fusion`).
_FORCED_FUSION: list = [None]


@contextlib.contextmanager
def forced_fusion(fused: bool):
    """Within the block, every separable unit converts fused (True) or as the unfused pair (False), whatever
    :func:`fuses` says: for benchmarks and tests that compare the two."""
    _FORCED_FUSION.append(fused)
    try:
        yield
    finally:
        _FORCED_FUSION.pop()


def fuses(shape: compute.SeparableShape, target) -> bool:
    """Whether the separable unit of ``shape`` runs as the fused kernel on ``target`` (else as the grouped
    kernel followed by TVM's pointwise conv).

    CPU: always. bench/varg.py on the host (EPYC znver3, AVX2, 1 thread, default schedules, load average
    ~3.5 on 2 cores: preliminary) timed every distinct unit of VarGNet 1.0x at 224 x 224 (11 shapes,
    32 -> 512 channels, 112 x 112 to 7 x 7, stride 1 and 2, with and without the last act): the unfused
    pair took 1.20x (32 -> 32 -> 32 at 112 x 112, s2, with act) to 2.59x (64 -> 128 -> 64 at 28 x 28) the
    fused kernel's time, geomean 1.78x; no shape favoured the pair.
    CUDA: wherever the intermediate of one output position fits the shared memory the schedule allows
    itself (``cuda.SHARED_BYTES``); not measured on a GPU yet."""
    if _FORCED_FUSION[-1] is not None:
        return _FORCED_FUSION[-1]
    if target.kind.name == "cuda":
        return shape.mid_channels * 4 <= cuda_schedule.SHARED_BYTES
    return True


def _batch_norm(weight, bias, mean, var, eps: float):
    """(scale, shift) of an eval-mode batch norm, float64."""
    scale = weight.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    return scale, bias.astype(np.float64) - mean.astype(np.float64) * scale


def separable_converter(target, constants: dict):
    """The frontend converter ``fn(node, importer)`` of ``effconv::varg_separable`` for ``target``: the
    unit's batch norms folded into the packed weights and biases, then the fused kernel or the unfused
    pair (see :func:`fuses`)."""
    from ...frontend import constant_argument

    def convert(node, importer):
        from tvm import relax, te

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        (group_weight, *group_bn, group_slope, pointwise_weight) = node.args[1:9]
        (*pointwise_bn, pointwise_slope, stride, padding, groups, eps, group_act, pointwise_act) = node.args[9:]
        names = ["group_weight", "group_bn_weight", "group_bn_bias", "group_bn_mean", "group_bn_var", "group_slope",
                 "pointwise_weight", "pointwise_bn_weight", "pointwise_bn_bias", "pointwise_bn_mean",
                 "pointwise_bn_var", "pointwise_slope"]
        values = dict(zip(names, (constant_argument(constants, arg, "varg_separable", name) for arg, name in zip(
            (group_weight, *group_bn, group_slope, pointwise_weight, *pointwise_bn, pointwise_slope), names))))
        group_scale, group_shift, pointwise_scale, pointwise_shift = (
            value
            for prefix, epsilon in (("group", eps[0]), ("pointwise", eps[1]))
            for value in _batch_norm(*[values[f"{prefix}_bn_{k}"] for k in ("weight", "bias", "mean", "var")],
                                     float(epsilon))
        )
        n, c, h, w = (int(d) for d in x.ty.shape)
        weight = values["group_weight"]
        mid = int(weight.shape[0])
        conv = compute.VarGShape(
            n, c, h, w, mid, tuple(weight.shape[2:]), tuple(stride), tuple(padding), (1, 1), int(groups),
            vector_lanes(target, mid // int(groups)),
        )
        out_channels = int(values["pointwise_weight"].shape[0])
        shape = compute.SeparableShape(conv, out_channels, vector_lanes(target, out_channels))
        group_weights = relax.const(compute.pack_weights(conv, weight, group_scale))
        slopes = {key: relax.const(values[key].astype(np.float32))
                  for key in ("group_slope", "pointwise_slope") if values[key] is not None}
        group_bias = relax.const(group_shift.astype(np.float32))
        pointwise_bias = relax.const(pointwise_shift.astype(np.float32))

        if fuses(shape, target):
            def fused(x, group_weights, group_bias, pointwise_weights, pointwise_bias, group_slope=None,
                      pointwise_slope=None):
                return compute.varg_separable(
                    shape, x, group_weights, group_bias, pointwise_weights, pointwise_bias, group_act, pointwise_act,
                    group_slope, pointwise_slope, cpu_annotations(target),
                )

            pointwise_weights = relax.const(compute.pack_pointwise_weights(shape, values["pointwise_weight"],
                                                                           pointwise_scale))
            return bb.emit_te(fused, x, group_weights, group_bias, pointwise_weights, pointwise_bias,
                              primfunc_name_hint="varg_separable", **slopes)

        def grouped(x, group_weights, group_bias, group_slope=None):
            y = compute.varg_conv2d(conv, x, group_weights, group_bias, cpu_annotations(target))
            return te.compute(y.shape, lambda n, k, p, q: compute.activation(group_act, y[n, k, p, q], group_slope, k),
                              name="varg_activation")

        def bias_activation(y, bias, pointwise_slope=None):
            return te.compute(y.shape, lambda n, k, p, q: compute.activation(
                pointwise_act, y[n, k, p, q] + bias[k], pointwise_slope, k), name="pointwise_activation")

        group_slopes = {key: value for key, value in slopes.items() if key == "group_slope"}
        y = bb.emit_te(grouped, x, group_weights, group_bias, primfunc_name_hint="varg_conv2d", **group_slopes)
        pointwise = values["pointwise_weight"].astype(np.float64) * pointwise_scale[:, None, None, None]
        y = bb.emit(relax.op.nn.conv2d(y, relax.const(pointwise.astype(np.float32))))
        pointwise_slopes = {key: value for key, value in slopes.items() if key == "pointwise_slope"}
        return bb.emit_te(bias_activation, y, pointwise_bias, primfunc_name_hint="pointwise_activation",
                          **pointwise_slopes)

    return convert


@dataclass(frozen=True)
class Int8Kernel:
    """The int8 kernel a target gets: output channels per weight vector, the activation offset (x86's
    dot instructions take unsigned activations) and the dot intrinsic (``dp4a`` on CUDA)."""

    lanes: int
    act_offset: int
    intrinsic: str


def int8_kernel(target, group_out: int, weight_bits: int) -> Int8Kernel:
    """The dot instruction for ``target`` and weights of ``weight_bits`` bits (as DSConv picks it: sdot,
    smull, VNNI, pmaddubsw for at most 7-bit weights), if its width divides the group's ``group_out``
    output channels; else plain widening multiplies on vectors of up to 8 int32 lanes."""
    if target.kind.name == "cuda":
        return Int8Kernel(vector_lanes(target, group_out), 0, "dp4a")
    intrinsic = dsconv_cpu.dot_intrinsic(target, weight_bits)
    lanes, offset = dsconv_cpu.kernel_layout(intrinsic)
    if group_out % lanes == 0:
        return Int8Kernel(lanes, offset, intrinsic)
    lanes = 8
    while group_out % lanes:
        lanes //= 2
    return Int8Kernel(lanes, 0, dsconv_cpu.PLAIN)


def qconv_converter(target, constants: dict, folded: set):
    """The frontend converter ``fn(node, importer)`` of ``effconv::varg_qconv2d`` for ``target``: the input
    quantized to int8 (fused into the kernel's packing), the int8 kernel; a batch norm right after the op
    is folded into its output scale and bias and added to ``folded``."""
    from ...frontend import constant_argument, foldable_batch_norm
    from ..dsconv import compute as dsconv_compute
    from ..dsconv import weight_bits

    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        codes, weight_scale, act_scale, bias = (
            constant_argument(constants, arg, "varg_qconv2d", name)
            for arg, name in zip(node.args[1:5], ("weight_codes", "weight_scale", "act_scale", "bias"))
        )
        stride, padding, groups = node.args[5:8]
        n, c, h, w = (int(d) for d in x.ty.shape)
        k = int(codes.shape[0])
        kernel = int8_kernel(target, k // int(groups), weight_bits(codes))
        shape = compute.VarGShape(n, c, h, w, k, tuple(codes.shape[2:]), tuple(stride), tuple(padding), (1, 1),
                                  int(groups), kernel.lanes)
        scale = float(act_scale) * weight_scale.astype(np.float64)
        shift = np.zeros(k) if bias is None else bias.astype(np.float64)
        norm = foldable_batch_norm(node, constants)
        if norm is not None:
            folded.add(norm[0])
            scale, shift = scale * norm[1], shift * norm[1] + norm[2]
        weights, offset = compute.pack_int8_weights(shape, codes, kernel.act_offset)
        inverse_scale = float(np.float32(1.0) / np.float32(act_scale))
        x_q = bb.emit_te(dsconv_compute.quantize_int8, x, inverse_scale, 8, primfunc_name_hint="varg_quantize")
        tensors = {"offset": relax.const(offset)} if kernel.act_offset else {}
        annotations = {dsconv_cpu.DOT_ANNOTATION: kernel.intrinsic, **cpu_annotations(target)}

        def qconv(x_q, weights, scale, bias, offset=None):
            return compute.varg_qconv2d(shape, x_q, weights, scale, bias, offset, kernel.act_offset, annotations)

        return bb.emit_te(qconv, x_q, relax.const(weights), relax.const(scale.astype(np.float32)),
                          relax.const(shift.astype(np.float32)), primfunc_name_hint="varg_qconv2d", **tensors)

    return convert
