"""TVM side of the effconv ops: one package per op (TE compute, reference, schedules, converter)."""
