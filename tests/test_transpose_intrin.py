"""The in-register transpose intrinsic (tvm_effconv.intrin.transpose) against numpy: tiles narrower
than, as wide as and wider than a register (rows padded to a multiple of the lanes), float32 and int32,
in both buffer scopes the CPU schedules use; and its registration from a record file's text."""

import numpy as np
import pytest

from tvm_effconv.intrin import transpose


def transposed_on_the_host(rows, lanes, dtype, scope, data):
    import tvm
    from tvm import s_tir, te

    x = te.placeholder((rows, lanes), dtype, name="x")
    tile = te.compute((rows, lanes), lambda r, c: x[r, c], name="tile")
    y = te.compute((lanes, rows), lambda c, r: tile[r, c], name="y")
    # as the VarG schedules do it: a copy of the tile, laid out transposed, by the intrinsic
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    sch.set_scope(sch.get_sblock("tile"), 0, scope)
    copy = sch.cache_read(sch.get_sblock("y"), 0, scope)
    sch.transform_layout(copy, ("write", 0), lambda r, c: (c, r))
    sch.tensorize(sch.get_loops(copy)[0], transpose.transpose_intrin(rows, lanes, dtype, scope))
    lib = tvm.compile(sch.mod, target={"kind": "llvm"})
    out = tvm.runtime.tensor(np.zeros((lanes, rows), dtype))
    lib["main"](tvm.runtime.tensor(data), out)
    return out.numpy()


@pytest.mark.parametrize("rows, lanes, dtype, scope", [
    (2, 4, "float32", "global"),
    (3, 4, "int32", "local"),
    (7, 8, "float32", "local"),
    (14, 16, "float32", "global"),
    (16, 16, "int32", "global"),
    (21, 8, "float32", "global"),  # three chunks of 8 rows, the last padded
])
def test_transpose_matches_numpy(rows, lanes, dtype, scope):
    data = np.random.default_rng(rows * lanes).integers(-1000, 1000, (rows, lanes)).astype(dtype)
    np.testing.assert_array_equal(transposed_on_the_host(rows, lanes, dtype, scope, data), data.T)


@pytest.mark.parametrize("rows, lanes", [(1, 16), (4, 6), (4, 1)])
def test_transpose_rejects_shapes_it_cannot_build(rows, lanes):
    with pytest.raises(ValueError, match="power of two"):
        transpose.transpose_intrin(rows, lanes, "float32", "global")


def test_record_text_registers_the_transposes_it_names():
    from tvm.s_tir import TensorIntrin

    name = transpose.transpose_name(11, 8, "int32", "local")
    transpose.register_named(f'[0, [[["Tensorize", ["{name}"]]]]]')
    assert TensorIntrin.get(name) is not None
