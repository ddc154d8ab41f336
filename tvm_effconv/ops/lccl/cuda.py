"""CUDA schedule of the LCCL kernel (rule ``effconv_lccl_conv2d`` for the ``cuda`` target key): compaction,
then a dense kernel over the active rows only.

The compute is the "compact" algorithm (:mod:`.compute`): one list per image ("spatial" mode) or per image
and output channel ("channel" mode, ``lanes`` = 1: every zero element is skipped, not just whole
positions). Kernels, in launch order:

1. the padded input and the cheap conv, one thread per element (the cheap conv's bias + ReLU, and the
   activity test of the compaction, inlined into their readers);
2. the compaction, five kernels of one thread per element, each a short serial reduction in a register
   (rows' counts, their offsets = the prefix sum over rows, ranks within rows, then per list entry its row
   and column): no shared memory and no barrier, every thread independent, so each stage is a plain TE
   block. The price of a barrier-free scan is about 3 (P + Q) integer operations per unit against the
   unit's C R S multiply-adds per output channel: small in "spatial" mode (a unit feeds all K channels),
   comparable in "channel" mode on large maps (a unit is one channel: 336 against 576 for a 3x3 layer of 64
   channels at 56 x 56; not measured on a GPU);
3. the GEMM over the list: threads over (list entries x output channels): ``threadIdx.x`` along the
   channels (the weights are packed ``[1, C, R, S, K]`` in "spatial" mode, so a warp's weight loads are
   contiguous and its input loads one broadcast), ``threadIdx.y`` along the entries; each thread
   accumulates a register tile of ``ROWS`` entries x ``ji`` channels over (c, r, s), reading the input
   windows through the list. The grid covers the worst case (every unit active); the guard
   ``t // ROWS * ROWS < count`` is invariant in a thread's tile, so its predicate is computed once per thread
   and threads (and whole blocks) past the count skip every multiply-add (nvcc keeps a warp-uniform branch
   per reduction step);
4. the write: one thread per output element, ``mask > 0 ? relu(acc[rank] + b) * mask : 0`` with any fused
   elementwise consumer inlined: zeros where the mask is zero, the GEMM's row of the position elsewhere.

Register tiles only, no shared memory: the kernels stay checkable on a machine without a GPU, by running
their CUDA C thread by thread (tests/test_lccl_kernel.py).

Knobs (defaults in brackets): ``knobs.tile`` of the list's tiles of ``ROWS`` entries into (blocks,
threads) [threads up to ``THREADS`` / channel threads]; of the channels into (blocks, threads, per thread)
[per thread up to 2, threads up to 32]; ``knobs.choice(UNROLL_CHOICES)`` the GEMM's
``pragma_auto_unroll_max_step`` [64].
"""

from ...schedule_rules import inline_consumers, inline_producers, register_rule
from ..cuda_common import MAX_INNER, UNROLL_CHOICES, bind_unbound, extent, largest_divisor
from .compute import ACTIVE_BLOCK, MASK_BLOCK, OUT_BLOCK, PAD_BLOCK, SCHEDULE_RULE

ROWS = 2  # list entries per thread (the compute's guard granularity)
THREADS = 128  # default threads per block of the GEMM
CHANNEL_THREADS = 32  # default threads along the output channels: a warp's weight loads in one line
DEFAULT_UNROLL = 64


@register_rule(SCHEDULE_RULE, ["cuda"])
def schedule_lccl_cuda(sch, main, knobs, variant="default"):
    inline_producers(sch, sch.get_sblock(PAD_BLOCK))
    for name in (MASK_BLOCK, ACTIVE_BLOCK):  # elementwise: into their readers' loads
        sch.compute_inline(sch.get_sblock(name))

    n, l, t, j, c, r, s = sch.get_loops(main)
    to, ti = sch.split(t, [None, ROWS])
    channels = extent(sch, j)
    ji = largest_divisor(channels, 2)
    jt = largest_divisor(channels // ji, CHANNEL_THREADS)
    jb, jt, ji = sch.split(j, knobs.tile(j, 3, [channels // (jt * ji), jt, ji], max_innermost=MAX_INNER))
    tiles = extent(sch, to)
    tt = largest_divisor(tiles, THREADS // extent(sch, jt))
    tb, tt = sch.split(to, knobs.tile(to, 2, [tiles // tt, tt]))
    sch.reorder(n, l, tb, jb, tt, jt, c, r, s, ti, ji)
    bx = sch.fuse(n, l, tb)
    sch.bind(bx, "blockIdx.x")
    sch.bind(jb, "blockIdx.y")
    sch.bind(tt, "threadIdx.y")
    sch.bind(jt, "threadIdx.x")
    sch.annotate(bx, "pragma_auto_unroll_max_step", knobs.choice(UNROLL_CHOICES, DEFAULT_UNROLL))
    sch.annotate(bx, "pragma_unroll_explicit", 0)
    accumulators = sch.cache_write(main, 0, "local")
    sch.reverse_compute_at(accumulators, jt, preserve_unit_loops=True)
    sch.decompose_reduction(main, c)

    inline_consumers(sch, sch.get_sblock(OUT_BLOCK))
    bind_unbound(sch)
