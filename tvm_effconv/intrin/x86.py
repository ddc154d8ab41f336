"""x86 integer dot-product intrinsics: C[lanes] int32 += A[4] uint8 . B[lanes, 4] int8.

The accumulator is a ``local`` (register) buffer, as the schedules keep it.
Registered under our own names: TVM's bundled ``dot_16x4_vnni`` calls ``vpdpbusd`` with the operand
types LLVM 22 no longer accepts, and importing ``tvm.s_tir.tensor_intrin`` costs ~50 s.

``pmaddubsw`` adds two u8 x s8 products with int16 saturation, so the AVX2/AVX-512 forms are exact
only while |a0 b0 + a1 b1| <= 32767, i.e. for weights of at most 7 bits against uint8 activations;
``vpdpbusd`` accumulates in int32 and is exact for 8-bit weights too.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

AVX2_DOT_8x4 = "effconv_dot_8x4_u8i8i32_avx2"
AVX512_DOT_16x4 = "effconv_dot_16x4_u8i8i32_avx512"
VNNI_DOT_16x4 = "effconv_dot_16x4_u8i8i32_vnni"

# Largest weight bit width the pmaddubsw forms compute exactly (see above).
PMADDUBSW_MAX_WEIGHT_BITS = 7


def _description(lanes: int):
    @T.prim_func(s_tir=True)
    def description(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return description


def _pmaddubsw(lanes: int, madd_ub: str, madd_wd: str):
    bytes_ = lanes * 4

    @T.prim_func(s_tir=True)
    def implementation(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=f"uint8x{bytes_}")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(madd_ub), a, B.vload([0, 0], dtype=f"int8x{bytes_}"), dtype=f"int16x{lanes * 2}"
            )
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(madd_wd), pairs, T.broadcast(T.int16(1), lanes * 2), dtype=f"int32x{lanes}"
            )

    return implementation


@T.prim_func(s_tir=True)
def _vnni_16x4(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64")
        # LLVM 22's signature: (<16 x i32> acc, <64 x i8> unsigned, <64 x i8> signed).
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            a,
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


TensorIntrin.register(AVX2_DOT_8x4, _description(8), _pmaddubsw(8, "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"), override=True)
TensorIntrin.register(
    AVX512_DOT_16x4,
    _description(16),
    _pmaddubsw(16, "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
    override=True,
)
TensorIntrin.register(VNNI_DOT_16x4, _description(16), _vnni_16x4, override=True)
