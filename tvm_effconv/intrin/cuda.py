"""CUDA integer dot-product intrinsic: C[0] int32 += A[0:4] . B[0:4] int8 with ``__dp4a`` (sm_61+).

A is int8 (``dp4a.s32.s32``) or uint8 (``dp4a.u32.s32``: TVM's CUDA prelude declares that overload).

Registered under our own names (importing ``tvm.s_tir.tensor_intrin`` costs ~50 s, and TVM's bundled
``dp4a_*`` intrinsics only match operands in shared memory). Tensorize compares storage scopes, so
there is one intrinsic per (A, B, C) scope triple: :func:`dp4a_intrin` registers it on first use.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

SCOPES = ("global", "shared", "local")
_REGISTERED: set[str] = set()


def _dp4a(scope_a: str, scope_b: str, scope_c: str, dtype_a: str):
    vector_a = f"{dtype_a}x4"

    @T.prim_func(s_tir=True)
    def description(
        A: T.Buffer((4,), dtype_a, offset_factor=1, scope=scope_a),
        B: T.Buffer((4,), "int8", offset_factor=1, scope=scope_b),
        C: T.Buffer((1,), "int32", offset_factor=1, scope=scope_c),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for i in range(4):
                with T.sblock("update"):
                    vi = T.axis.remap("R", [i])
                    C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def implementation(
        A: T.Buffer((4,), dtype_a, offset_factor=1, scope=scope_a),
        B: T.Buffer((4,), "int8", offset_factor=1, scope=scope_b),
        C: T.Buffer((1,), "int32", offset_factor=1, scope=scope_c),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = T.call_pure_extern("int32", "__dp4a", A.vload([0], vector_a), B.vload([0], "int8x4"), C[0])

    return description, implementation


def dp4a_intrin(scope_a: str = "global", scope_b: str = "global", scope_c: str = "local", dtype_a: str = "int8") -> str:
    """Name of the (s8 or u8) x s8 -> s32 dp4a intrinsic for operands in these storage scopes (registered
    on first use)."""
    if dtype_a not in ("int8", "uint8"):
        raise ValueError(f"dp4a operand A must be int8 or uint8, not {dtype_a}")
    for scope in (scope_a, scope_b, scope_c):
        if scope not in SCOPES:
            raise ValueError(f"dp4a operand scope {scope!r} not in {SCOPES}")
    name = f"effconv_dp4a_{dtype_a[0]}8s8s32_{scope_a}_{scope_b}_{scope_c}"
    if name not in _REGISTERED:
        TensorIntrin.register(name, *_dp4a(scope_a, scope_b, scope_c, dtype_a), override=True)
        _REGISTERED.add(name)
    return name


# The operand scopes the DSConv CUDA schedule tensorizes with, registered at import: replaying a tuning
# record looks the intrinsic up by name before any schedule rule runs.
for _dtype in ("int8", "uint8"):
    dp4a_intrin("global", "local", "local", _dtype)


def register_all() -> None:
    """Register every dp4a variant: a record's trace names the one its schedule used, and replaying it
    (reading a records folder) needs that intrinsic before any rule has run."""
    for dtype_a in ("int8", "uint8"):
        for scope_a in SCOPES:
            for scope_b in SCOPES:
                for scope_c in SCOPES:
                    dp4a_intrin(scope_a, scope_b, scope_c, dtype_a)
