"""CUDA schedule of the LCCL kernel (rule ``effconv_lccl_conv2d`` for the ``cuda`` target key).

Kernels: the padded input, the cheap conv and the mask each get one thread per output element (reductions
serial in a register); then the main conv, one thread per output element (n, k, p, q), threads along the
output columns (coalesced input reads and output writes, one weight shared by the threads of a block row).
Each thread tests its position's mask and runs the reduction only where it is non-zero, then writes
``relu(acc + b) * mask`` or 0 through the fused epilogue.

Knobs (defaults in brackets): ``knobs.choice(THREADS)`` threads per block [128];
``knobs.choice(UNROLL_CHOICES)`` the main kernel's ``pragma_auto_unroll_max_step`` [64].

Not done (issue 7 asks for it): compaction of the active positions by a prefix sum and a dense kernel on
the active rows; masked-out threads here still occupy their warp's slot while the others reduce.
"""

from ...schedule_rules import inline_consumers, register_rule
from ..cuda_common import bind_flat, is_bound
from .compute import SCHEDULE_RULE

THREADS = (64, 128, 256)
UNROLL_CHOICES = (0, 16, 64, 512)


@register_rule(SCHEDULE_RULE, ["cuda"])
def schedule_lccl_cuda(sch, main, knobs, variant="default"):
    write_out = sch.cache_write(main, 0, "local")
    inline_consumers(sch, write_out)
    n, k, p, q, c, *_ = sch.get_loops(main)
    bx, tx = sch.split(sch.fuse(n, k, p, q), [None, knobs.choice(THREADS, 128)])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.annotate(bx, "pragma_auto_unroll_max_step", knobs.choice(UNROLL_CHOICES, 64))
    sch.annotate(bx, "pragma_unroll_explicit", 0)
    sch.reverse_compute_at(write_out, tx, preserve_unit_loops=True)
    sch.decompose_reduction(main, c)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if not is_bound(sch, block):
            bind_flat(sch, block)
