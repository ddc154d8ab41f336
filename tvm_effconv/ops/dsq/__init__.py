"""DSQ's quantized conv (``effconv::qconv2d``) for TVM: compute, schedules, dispatch, import.

- ``compute``: activation codes, bit packing, the bit-serial integer conv and its epilogue (TE);
- ``reference``: the plain numpy reference of the bit-serial arithmetic;
- ``cpu``: the bit-serial schedule for ARM NEON (``cnt``), x86 (AVX-512 VPOPCNTDQ, scalar ``popcnt``);
  ``cuda``: ``__popc``;
- this module: the dispatch between the bit-serial kernel and the low-bit multiply-accumulate path
  (the DSConv kernel with one block per group: sdot / smull, pmaddubsw / VNNI, dp4a), and the converter
  of ``torch.ops.effconv.qconv2d`` that the frontend's table maps to it.

The layer and the op's eager reference are in :mod:`tvm_effconv.nn.dsq`.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from ..dsconv import compute as dsconv_compute
from ..dsconv import kernel_choice as dot_kernel_choice
from ..dsconv.cpu import DOT_ANNOTATION
from . import compute, cpu
from . import cuda as cuda_schedule

OP_NAME = "qconv2d.default"
BITSERIAL = "bitserial"
INT8_DOT = "int8_dot"
PATH_ANNOTATION = "dsq_path"

# The bit-serial kernel costs one popcount pass per plane pair (act_bits * weight_bits of them); the
# multiply-accumulate path one pass whatever the bits. Per target family, the largest number of plane
# pairs for which the bit-serial kernel is the faster one (above it the dot path is taken):
# - x86 (AVX2, popcount by nibble lookup): measured by bench/dsq.py on the ResNet-18 layers
#   (bench/results/amd-epyc-znver2.md, AMD EPYC znver2, 1 thread), geometric mean of the speed-up over
#   PyTorch's int8 conv, bit-serial against the dot path: A1W1 2.78x against 1.08x, A2W1 1.65x against
#   1.07x, A2W2 1.02x against 1.08x (the dot path wins on 1x1 layers), A4W4 0.31x against 1.07x;
# - arm: estimated from instruction counts (no ARM hardware measured): a plane pair costs 13 NEON
#   instructions per 4 x 128 MACs (39 MACs each); sdot does 16 MACs per instruction, smull + saddlp +
#   addp about 5;
# - cuda: and + __popc + add per 32 MACs (about 10 per instruction) against __dp4a's 4.
BITSERIAL_MAX_PLANE_PAIRS = {"x86": 2, "arm_dotprod": 2, "arm": 8, "cuda": 2}
# The dot path holds activation codes in int8 lanes (sdot, dp4a: signed) and weights within
# pmaddubsw's exact range: at most 4 bits here, as DSQ's low-bit layers are.
INT8_DOT_MAX_BITS = 4


@dataclass(frozen=True)
class KernelPath:
    """Which kernel a (bits, target) gets, and why (recorded in the manifest)."""

    path: str
    family: str
    reason: str


def target_family(target) -> str:
    if target.kind.name == "cuda":
        return "cuda"
    intrinsic = dot_kernel_choice(target, INT8_DOT_MAX_BITS).intrinsic
    if "sdot" in intrinsic:
        return "arm_dotprod"
    return "arm" if "neon" in intrinsic else "x86"


# Set by :func:`forcing_path` (the benchmark times both paths to find the faster one).
_FORCED_PATH: ContextVar[str | None] = ContextVar("forced_dsq_path", default=None)


@contextmanager
def forcing_path(path: str):
    """Compile every DSQ layer with ``path`` (BITSERIAL or INT8_DOT) inside the block, whatever the
    dispatch would pick: for benchmarking the paths against each other."""
    token = _FORCED_PATH.set(path)
    try:
        yield
    finally:
        _FORCED_PATH.reset(token)


def kernel_path(target, weight_bits: int, act_bits: int) -> KernelPath:
    family = target_family(target)
    forced = _FORCED_PATH.get()
    if forced is not None:
        return KernelPath(forced, family, "forced (benchmark)")
    pairs, limit = weight_bits * act_bits, BITSERIAL_MAX_PLANE_PAIRS[family]
    if max(weight_bits, act_bits) > INT8_DOT_MAX_BITS:
        return KernelPath(BITSERIAL, family, f"{act_bits}-bit activations x {weight_bits}-bit weights: above the "
                          f"int8 dot path's {INT8_DOT_MAX_BITS} bits")
    if pairs <= limit:
        return KernelPath(BITSERIAL, family, f"{pairs} plane pair(s) <= {limit}: popcount is faster on {family}")
    return KernelPath(INT8_DOT, family, f"{pairs} plane pairs > {limit}: int8 multiply-accumulate is faster on {family}")


def bitserial_shape(target, n, c, h, w, codes, stride, padding, dilation, groups, weight_bits, act_bits, layout="NCHW"):
    """The QConvShape of a conv with these weight ``codes`` (K, C/g, R, S) in ``target``'s bit layout,
    and the popcount kind its schedule uses."""
    if target.kind.name == "cuda":
        kind, layout_ = cuda_schedule.POPC, cuda_schedule.LAYOUT
    else:
        kind = cpu.popcount_kind(target, c // groups)
        layout_ = cpu.LAYOUTS[kind]
    shape = compute.QConvShape(
        n, c, h, w, codes.shape[0], tuple(codes.shape[2:]), tuple(stride), tuple(padding), tuple(dilation), int(groups),
        int(weight_bits), int(act_bits), layout_.word_bits, layout_.chunk, layout_.lanes, layout,
    )
    return shape, kind


def converter(target, constants: dict, folded: set):
    """The frontend converter ``fn(node, importer)`` of ``qconv2d.default`` for ``target``. A batch
    norm right after the op is folded into the weight scales and the bias, and added to ``folded``."""
    from ...frontend import constant_argument, foldable_batch_norm

    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        (_, codes, weight_scale, weight_zero_point, act_scale, act_zero_point, bias, stride, padding, dilation, groups,
         weight_bits, act_bits) = node.args

        def constant(arg, name):
            return constant_argument(constants, arg, "qconv2d", name)

        codes = constant(codes, "weight_codes")
        weight_scale = constant(weight_scale, "weight_scale").astype(np.float64)
        weight_zero_point = constant(weight_zero_point, "weight_zero_point")
        act_scale, act_zero_point = float(constant(act_scale, "act_scale")), float(constant(act_zero_point, "act_zero_point"))
        bias = constant(bias, "bias")
        bias = np.zeros(codes.shape[0]) if bias is None else bias.astype(np.float64)
        norm = foldable_batch_norm(node, constants)
        if norm is not None:
            folded.add(norm[0])
            weight_scale, bias = weight_scale * norm[1], bias * norm[1] + norm[2]

        x_codes = bb.emit_te(
            compute.quantize_codes, x, act_scale, act_zero_point, int(act_bits), primfunc_name_hint="qconv2d_quantize"
        )
        n, c, h, w = (int(d) for d in x.ty.shape)
        choice = kernel_path(target, int(weight_bits), int(act_bits))
        annotations = {PATH_ANNOTATION: choice.path, "weight_bits": int(weight_bits), "act_bits": int(act_bits)}
        geometry = (stride, padding, dilation, groups)
        if choice.path == BITSERIAL:
            shape, kind = bitserial_shape(target, n, c, h, w, codes, *geometry, weight_bits, act_bits)
            weight_offset = 2 ** (shape.weight_bits - 1)  # the kernel's unsigned weight codes
            epilogue = compute.epilogue_constants(shape, weight_scale, weight_zero_point, act_scale, bias)
            tensors = {
                "w_packed": compute.pack_weights(shape, codes), "scale": epilogue.scale,
                "zero_scale": epilogue.zero_scale, "bias": epilogue.bias,
            }

            def kernel(x_codes, w_packed, scale, zero_scale, bias, tap_correction=None):
                return compute.qconv2d(
                    shape, x_codes, w_packed, scale, zero_scale, bias, tap_correction,
                    {**annotations, cpu.POPCOUNT_ANNOTATION: kind},
                )
        else:
            dot = dot_kernel_choice(target, int(weight_bits))
            shape = dsconv_compute.DSConvShape(
                n, c, h, w, codes.shape[0], tuple(codes.shape[2:]), tuple(stride), tuple(padding), tuple(dilation),
                int(groups), c // int(groups), dot.lanes,
            )
            window_shape, _ = bitserial_shape(target, n, c, h, w, codes, *geometry, weight_bits, act_bits)
            weight_offset = 0
            # One block per group with a per-output-channel scale on every tap computes sa * sw * sum qa qw;
            # the weights' zero point, sa * sw * zw * (the window's code sum), does not depend on the tap
            # and is subtracted once per output (as the KDS bias term, once per tap, it cost 4x here).
            taps = (1, 1, *codes.shape[2:])
            tensors = dsconv_compute.pack_constants(
                shape, codes, np.broadcast_to(weight_scale[:, None, None, None], codes.shape[:1] + taps[1:]),
                None, np.ones(codes.shape[0]), bias, act_scale, dot.act_offset,
            )
            tensors = {key: value for key, value in tensors.items() if value is not None}
            tensors["zero_scale"] = (act_scale * weight_scale * weight_zero_point).astype(np.float32)

            def kernel(x_codes, weights, scale, bias, zero_scale, offset=None, tap_correction=None):
                out = dsconv_compute.dsconv2d(
                    shape, x_codes, weights, scale, bias, offset, None, None, dot.act_offset,
                    {**annotations, DOT_ANNOTATION: dot.intrinsic},
                )
                return compute.add_zero_point_terms(window_shape, out, x_codes, zero_scale, tap_correction)

        correction = compute.tap_correction(codes, weight_scale, weight_zero_point, act_scale, act_zero_point, weight_offset)
        if correction is not None:
            tensors["tap_correction"] = correction
        consts = {key: relax.const(np.ascontiguousarray(value)) for key, value in tensors.items()}
        return bb.emit_te(kernel, x_codes, primfunc_name_hint=f"qconv2d_{choice.path}", **consts)

    return convert
