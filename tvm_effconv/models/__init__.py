"""Reference networks and bundled example models.

Each factory returns ``(model, example_inputs)`` so that
``python -m tvm_effconv.compile tvm_effconv.models.<module>:<factory>`` needs no --input-shape.
"""
