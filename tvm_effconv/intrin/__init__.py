"""Target tensor intrinsics shared by the effconv ops (importing a module registers its intrinsics).

The dot and popcount intrinsics declare their accumulator in scope "local", the name the tuning records
know them by; :func:`in_scope` gives the same intrinsic for accumulators in another scope (the CPU
schedules' stack-array tiles are "global", see ``ops/varg/cpu.py``)."""

import re

SCOPED_NAME = re.compile(r"(effconv_[A-Za-z0-9_]+)_global\b")


def is_registered(name: str) -> bool:
    from tvm.s_tir import TensorIntrin

    try:
        TensorIntrin.get(name)
    except Exception:  # noqa: BLE001 - TVM raises a plain error for unknown names
        return False
    return True


def in_scope(name: str, scope: str) -> str:
    """The name of intrinsic ``name`` with its accumulator in ``scope``: ``name`` itself for "local";
    otherwise ``name_<scope>``, a copy with only the accumulator's scope changed, registered on first use
    (re-parsed from the printed script, ~0.04 s)."""
    from tvm.s_tir import TensorIntrin

    if scope == "local":
        return name
    scoped = f"{name}_{scope}"
    if not is_registered(scoped):
        import tvm

        base = TensorIntrin.get(name)
        copies = [tvm.script.from_source(f.script().replace('scope="local"', f'scope="{scope}"'))
                  for f in (base.desc, base.impl)]
        TensorIntrin.register(scoped, *copies, override=True)
    return scoped


def register_all(records: str = "") -> None:
    """Register every effconv tensor intrinsic that the traces in tuning records may name: the fixed ones,
    and the sized transposes and scoped copies that ``records`` (the text of a record file) names."""
    from . import arm, cuda, transpose, x86  # noqa: F401 - importing registers their fixed intrinsics

    cuda.register_all()
    transpose.register_named(records)
    for base in set(SCOPED_NAME.findall(records)):
        if is_registered(base):  # else not a scoped copy: a transpose's name also ends in _global
            in_scope(base, "global")
