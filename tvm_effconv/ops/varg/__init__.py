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
    :func:`fuses` says it is faster, else the grouped kernel followed by TVM's pointwise conv.

The layers (``VarGConv2d``, ``VarGSeparable`` and the blocks) are in :mod:`tvm_effconv.nn.varg`.
"""

import contextlib

import numpy as np

from . import compute, cpu
from . import cuda as cuda_schedule

OP_NAME = "convolution.default"
SEPARABLE_OP_NAME = "varg_separable.default"


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
    kernel followed by TVM's pointwise conv)."""
    if _FORCED_FUSION[-1] is not None:
        return _FORCED_FUSION[-1]
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
