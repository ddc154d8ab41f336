"""Target tensor intrinsics shared by the effconv ops (importing a module registers its intrinsics)."""
