"""tvm-effconv: compile PyTorch CNNs with efficient convolutions through Apache TVM."""

__version__ = "0.1.0"
