"""CUDA schedule of the bit-serial kernel (rule ``effconv_qconv2d_bitserial`` for the ``cuda`` key)."""

from ..dsq.cpu import PopcountLayout
from ...schedule_rules import RegisterBudget

POPC = "cuda_popc"
# 32 channels per word (__popc on 32-bit words), one word per operand, four output channels per vector
LAYOUT = PopcountLayout(32, 1, 4, RegisterBudget(255, 1))
