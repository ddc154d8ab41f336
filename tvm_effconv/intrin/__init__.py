"""Target tensor intrinsics shared by the effconv ops (importing a module registers its intrinsics)."""


def register_all() -> None:
    """Register every effconv tensor intrinsic (the traces in tuning records name them)."""
    from . import arm, cuda, x86  # noqa: F401 - importing registers their fixed intrinsics

    cuda.register_all()
