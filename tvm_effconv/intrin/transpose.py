"""In-register transpose of a register tile: B[lanes, rows] = A[rows, lanes]^T, both buffers of one
scope (the CPU schedules' tile scope).

The CPU kernels accumulate channels innermost (one SIMD register per output position) and write NCHW
(positions innermost). Stored element by element, that write-out costs one lane extract and one scalar
store per output value; on x86 with two FMA units the extracts run on the second one's port.
Transposed in registers it costs ``log2(lanes)`` two-source shuffles per register, after which each
channel's row of positions is one vector store (5% on the VarG reference layer, Emerald Rapids).

The transpose swaps one bit of the row index with the same bit of the lane index per stage (rows padded
with zeros to a multiple of ``lanes``, a power of two); LLVM lowers each stage's two-source shuffles to
unpack / shuffle / permute instructions. Intrinsics are registered on first use
(:func:`transpose_intrin`): one per (rows, lanes, dtype, scope), ~0.05 s each, and a tuning record names
the ones its trace tensorizes with, which :func:`register_named` registers before a database is applied.
"""

import re

from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from . import is_registered

NAME_PATTERN = re.compile(r"effconv_transpose_(\d+)x(\d+)_(float32|int32)_(global|local)")


def transpose_name(rows: int, lanes: int, dtype: str, scope: str) -> str:
    return f"effconv_transpose_{rows}x{lanes}_{dtype}_{scope}"


def _stages(vectors: list, lanes: int, dtype: str, name: str, body: list) -> list:
    """Transpose ``lanes`` x ``lanes`` (vectors of ``lanes``): per bit b of the row index, rows r and
    r + 2^b (bit b clear in r) exchange the halves of each 2^(b+1)-lane block that differ in bit b. Each
    stage's vectors are bound to variables (appended to ``body``), so that each is computed once."""
    bit = 1
    while bit < lanes:
        out = list(vectors)
        for low in range(lanes):
            if low & bit:
                continue
            high = low + bit
            pair = [vectors[low], vectors[high]]  # lanes of the concatenation: low 0.., high lanes..
            out[low] = tirx.Shuffle(pair, _indices(c if not c & bit else lanes + c - bit for c in range(lanes)))
            out[high] = tirx.Shuffle(pair, _indices(c + bit if not c & bit else lanes + c for c in range(lanes)))
        vectors = []
        for row, value in enumerate(out):
            var = tirx.Var(f"{name}_{bit}_{row}", f"{dtype}x{lanes}")
            body.append(tirx.Bind(var, value))
            vectors.append(var)
        bit *= 2
    return vectors


def _indices(values) -> list:
    return [tirx.IntImm("int32", int(v)) for v in values]


def _intrin(rows: int, lanes: int, dtype: str, scope: str):
    if rows < 2 or lanes < 2 or lanes & (lanes - 1):
        raise ValueError(f"a transpose needs rows >= 2 and lanes a power of two >= 2, got {rows} x {lanes}")
    # strides free: the tile is a slice of the accumulator (kv weight vectors wide) and of its copy
    @T.prim_func(s_tir=True)
    def description(a: T.handle, b: T.handle) -> None:
        a_stride, b_stride = T.int32(), T.int32()
        A = T.match_buffer(a, (rows, lanes), dtype, strides=[a_stride, 1], offset_factor=1, scope=scope)
        B = T.match_buffer(b, (lanes, rows), dtype, strides=[b_stride, 1], offset_factor=1, scope=scope)
        with T.sblock("root"):
            T.reads(A[0:rows, 0:lanes])
            T.writes(B[0:lanes, 0:rows])
            for r, c in T.grid(rows, lanes):
                with T.sblock("transpose"):
                    vr, vc = T.axis.remap("SS", [r, c])
                    B[vc, vr] = A[vr, vc]

    # the implementation: the description's buffers, reads and writes, with the shuffles as its body
    root = description.body.block
    a, b = root.reads[0].source, root.writes[0].source
    zero = tirx.Broadcast(tirx.const(0, dtype), lanes)
    loads = [tirx.BufferLoad(a, [tirx.IntImm("int32", r), tirx.Ramp(0, 1, lanes)]) for r in range(rows)]
    body = []
    chunks = []  # per chunk of ``lanes`` rows: ``lanes`` vectors, vector c holding lane c of those rows
    for start in range(0, rows, lanes):
        chunk = loads[start:start + lanes]
        chunks.append(_stages(chunk + [zero] * (lanes - len(chunk)), lanes, dtype, f"t{start}", body))
    for c in range(lanes):
        value = tirx.Shuffle([chunk[c] for chunk in chunks], _indices(range(rows)))
        body.append(tirx.BufferStore(b, value, [tirx.IntImm("int32", c), tirx.Ramp(0, 1, rows)]))
    block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, tirx.SeqStmt(body))
    return description, description.with_body(s_tir.SBlockRealize([], True, block))


def transpose_intrin(rows: int, lanes: int, dtype: str, scope: str) -> str:
    """The name of the transpose intrinsic of (rows, lanes, dtype) tiles in buffers of ``scope``,
    registered if it is not yet."""
    name = transpose_name(rows, lanes, dtype, scope)
    if not is_registered(name):
        TensorIntrin.register(name, *_intrin(rows, lanes, dtype, scope), override=True)
    return name


def register_named(text: str) -> None:
    """Register every transpose intrinsic ``text`` (a tuning record file) names."""
    for rows, lanes, dtype, scope in set(NAME_PATTERN.findall(text)):
        transpose_intrin(int(rows), int(lanes), dtype, scope)
