"""Target tensor intrinsics shared by the effconv ops (importing a module registers its intrinsics)."""


def register_all(records: str = "") -> None:
    """Register every effconv tensor intrinsic that the traces in tuning records may name: the fixed ones,
    and the sized transposes that ``records`` (the text of a record file) names."""
    from . import arm, cuda, transpose, x86  # noqa: F401 - importing registers their fixed intrinsics

    cuda.register_all()
    transpose.register_named(records)
