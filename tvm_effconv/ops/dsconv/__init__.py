"""DSConv (distribution shifting convolution) for TVM: compute, schedules, dispatch, import.

- ``compute``: the TE compute of the inference form and the packing of the layer's constants;
- ``reference``: the plain numpy reference of the same arithmetic;
- ``cpu``: the schedule for ARM NEON (sdot / smull) and x86 (AVX2, AVX-512, VNNI); ``cuda``: dp4a;
- this module: the dispatch (which kernel layout a target gets) and the converter of
  ``torch.ops.effconv.dsconv2d`` that the frontend's table maps to it.

The layer and the op's eager reference are in :mod:`tvm_effconv.nn.dsconv`.
"""

from dataclasses import dataclass

import numpy as np

from . import compute, cpu
from . import cuda as cuda_schedule

OP_NAME = "dsconv2d.default"


@dataclass(frozen=True)
class KernelChoice:
    """What a target's kernel needs from the packing: the weight vector width, the activation offset
    and the dot-product intrinsic its schedule uses."""

    lanes: int
    act_offset: int
    intrinsic: str


def kernel_choice(target, weight_bits: int) -> KernelChoice:
    if target.kind.name == "cuda":
        return KernelChoice(cuda_schedule.LANES, cuda_schedule.ACT_OFFSET, "dp4a")
    intrinsic = cpu.dot_intrinsic(target, weight_bits)
    lanes, offset = cpu.kernel_layout(intrinsic)
    return KernelChoice(lanes, offset, intrinsic)


def weight_bits(codes: np.ndarray) -> int:
    """The fewest signed bits that hold every code."""
    peak = max(int(codes.max(initial=0)), -int(codes.min(initial=0)) - 1, 1)
    return max(2, int(peak).bit_length() + 1)


def converter(target, constants: dict, folded: set):
    """The frontend converter ``fn(node, importer)`` of ``dsconv2d.default`` for ``target``;
    ``constants`` maps graph input names to the model's weights. A batch norm right after the op is
    folded into the CDS (the output scale and bias, as the paper does at inference) and added to
    ``folded``."""
    from ...frontend import constant_argument, foldable_batch_norm

    def constant(arg, name: str):
        return constant_argument(constants, arg, "dsconv2d", name)

    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        (_, codes, kds_scale, kds_bias, cds_scale, cds_bias, act_scale, stride, padding, dilation, groups, block,
         act_mode, act_bits) = node.args
        codes = constant(codes, "weight_codes")
        kds_bias = constant(kds_bias, "kds_bias")
        act_scale = float(constant(act_scale, "act_scale"))
        choice = kernel_choice(target, weight_bits(codes))
        n, c, h, w = (int(d) for d in x.ty.shape)
        shape = compute.DSConvShape(
            n, c, h, w, codes.shape[0], tuple(codes.shape[2:]), tuple(stride), tuple(padding), tuple(dilation),
            int(groups), int(block), choice.lanes,
        )
        int8_mode = act_mode == "int8"
        cds_scale_, cds_bias_ = constant(cds_scale, "cds_scale"), constant(cds_bias, "cds_bias")
        norm = foldable_batch_norm(node, constants)
        if norm is not None:
            folded.add(norm[0])
            cds_scale_, cds_bias_ = cds_scale_ * norm[1], cds_bias_ * norm[1] + norm[2]
        packed = compute.pack_constants(
            shape, codes, constant(kds_scale, "kds_scale"), kds_bias, cds_scale_, cds_bias_,
            act_scale if int8_mode else None, choice.act_offset,
        )
        if int8_mode:
            inv_scale = float(np.float32(1.0) / np.float32(act_scale))
            x_q = bb.emit_te(compute.quantize_int8, x, inv_scale, int(act_bits), primfunc_name_hint="dsconv2d_quantize")
            x_scale = None
        else:
            both = bb.emit_te(compute.quantize_bfp, x, int(groups), int(block), int(act_bits), primfunc_name_hint="dsconv2d_quantize_bfp")
            x_q, x_scale = bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))
        tensors = {key: relax.const(value) for key, value in packed.items() if value is not None}
        if x_scale is not None:
            tensors["x_scale"] = x_scale

        def kernel(x_q, weights, scale, bias, offset=None, bias_scale=None, x_scale=None):
            return compute.dsconv2d(
                shape, x_q, weights, scale, bias, offset, bias_scale, x_scale, choice.act_offset,
                {cpu.DOT_ANNOTATION: choice.intrinsic},
            )

        return bb.emit_te(kernel, x_q, primfunc_name_hint="dsconv2d", **tensors)

    return convert
