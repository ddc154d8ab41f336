"""AArch64 NEON integer dot-product intrinsics: C[4] int32 += A[4] int8 . B[4, 4] int8.

- ``sdot`` (Armv8.2 dotprod, e.g. Cortex-A76, A55): one instruction per 16 multiply-accumulates.
- plain NEON (every Armv8-A core, e.g. Cortex-A53, A72): widening multiply ``smull`` to int16, then
  pairwise widening adds (``saddlp``, ``addp``) into the int32 accumulators; int8 x int8 products fit
  int16 exactly, so the sum is exact.

The accumulator is a ``local`` (register) buffer, as the schedules keep it.
Registered under our own names: importing ``tvm.s_tir.tensor_intrin`` costs ~50 s.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

SDOT_4x4 = "effconv_dot_4x4_i8i8i32_sdot"
NEON_DOT_4x4 = "effconv_dot_4x4_i8i8i32_neon"


@T.prim_func(s_tir=True)
def _description(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i in T.serial(0, 4):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _sdot(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"),
            a,
            B.vload([0, 0], dtype="int8x16"),
            dtype="int32x4",
        )


@T.prim_func(s_tir=True)
def _neon(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2), dtype="int8x8")
        b = B.vload([0, 0], dtype="int8x16")
        low = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"), a, T.vectorlow(b, dtype="int8x8"), dtype="int16x8"
            ),
            dtype="int32x4",
        )
        high = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"), a, T.vectorhigh(b, dtype="int8x8"), dtype="int16x8"
            ),
            dtype="int32x4",
        )
        C[T.ramp(T.int32(0), 1, 4)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"), low, high, dtype="int32x4"
        )


TensorIntrin.register(SDOT_4x4, _description, _sdot, override=True)
TensorIntrin.register(NEON_DOT_4x4, _description, _neon, override=True)


# Bit-serial popcount dot: C[4] int32 += sum_b popcount(A[b] & B[l, b]) over `width` bytes (8 or 16,
# i.e. 64 or 128 channels of one bit plane), for four output channels l. NEON: and + cnt per byte,
# pairwise adds (addp) of the four rows' counts down to four bytes each (at most 4 * 8 * 4 = 128: no
# overflow), then pairwise widening adds (uaddlp) to one uint32 per row, added to the accumulator
# (LLVM folds that add into uadalp).
POPCOUNT_4x8 = "effconv_popcount_4x8_u8_neon"
POPCOUNT_4x16 = "effconv_popcount_4x16_u8_neon"


def _popcount_description(width: int):
    @T.prim_func(s_tir=True)
    def description(
        A: T.Buffer((width,), "uint8", offset_factor=1),
        B: T.Buffer((4, width), "uint8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:width], B[0:4, 0:width])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, width):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(T.popcount(T.bitwise_and(A[vk], B[vi, vk])), "int32")

    return description


def _addp(x, y):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v16i8"), x, y, dtype="uint8x16")


def _rows_to_lanes(quads):
    """uint8x16 with four partial counts per row, rows in order -> uint32x4, one total per row."""
    halves = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.uaddlp.v8i16.v16i8"), quads, dtype="uint16x8")
    totals = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.uaddlp.v4i32.v8i16"), halves, dtype="uint32x4")
    return T.reinterpret(totals, dtype="int32x4")


@T.prim_func(s_tir=True)
def _popcount_4x16(
    A: T.Buffer((16,), "uint8", offset_factor=1),
    B: T.Buffer((4, 16), "uint8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:16], B[0:4, 0:16])
        T.writes(C[0:4])
        a = A.vload([0], "uint8x16")
        c0 = T.popcount(T.bitwise_and(a, B.vload([0, 0], "uint8x16")))
        c1 = T.popcount(T.bitwise_and(a, B.vload([1, 0], "uint8x16")))
        c2 = T.popcount(T.bitwise_and(a, B.vload([2, 0], "uint8x16")))
        c3 = T.popcount(T.bitwise_and(a, B.vload([3, 0], "uint8x16")))
        C[T.ramp(T.int32(0), 1, 4)] += _rows_to_lanes(_addp(_addp(c0, c1), _addp(c2, c3)))


@T.prim_func(s_tir=True)
def _popcount_4x8(
    A: T.Buffer((8,), "uint8", offset_factor=1),
    B: T.Buffer((4, 8), "uint8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:8], B[0:4, 0:8])
        T.writes(C[0:4])
        # the 8 input bytes twice, against two rows per 16-byte register
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x8"), dtype="uint64"), 2), dtype="uint8x16")
        c01 = T.popcount(T.bitwise_and(a, B.vload([0, 0], "uint8x16")))
        c23 = T.popcount(T.bitwise_and(a, B.vload([2, 0], "uint8x16")))
        C[T.ramp(T.int32(0), 1, 4)] += _rows_to_lanes(_addp(c01, c23))


TensorIntrin.register(POPCOUNT_4x16, _popcount_description(16), _popcount_4x16, override=True)
TensorIntrin.register(POPCOUNT_4x8, _popcount_description(8), _popcount_4x8, override=True)
