"""Scoped copies of the dot intrinsics (tvm_effconv.intrin.in_scope): the same computation with the
accumulator in another scope, registered on first use and from the names in a record file's text."""

from tvm.s_tir import TensorIntrin

from tvm_effconv import intrin
from tvm_effconv.intrin import arm, x86


def test_local_is_the_registered_intrinsic_itself():
    assert intrin.in_scope(x86.VNNI_DOT_16x4, "local") == x86.VNNI_DOT_16x4


def test_global_copy_changes_only_the_accumulator_scope():
    name = intrin.in_scope(arm.SDOT_4x4, "global")
    base, copy = TensorIntrin.get(arm.SDOT_4x4), TensorIntrin.get(name)
    for original, scoped in ((base.desc, copy.desc), (base.impl, copy.impl)):
        assert 'scope="local"' in original.script() and 'scope="local"' not in scoped.script()
        assert scoped.script().replace('scope="global", ', "") == original.script().replace('scope="local", ', "")


def test_record_text_registers_the_scoped_copies_it_names():
    name = f"{x86.AVX2_DOT_8x4}_global"
    intrin.register_all(f'[0, [[["Tensorize", ["{name}"]], ["Tensorize", ["effconv_transpose_5x4_int32_global"]]]]]')
    assert TensorIntrin.get(name) is not None
    assert TensorIntrin.get("effconv_transpose_5x4_int32_global") is not None
