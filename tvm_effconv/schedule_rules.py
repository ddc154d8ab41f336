"""Schedule rules of the effconv ops: one function per op and target family, tunable by MetaSchedule.

An op's compute tags its main block with the annotation ``schedule_rule = "<rule name>"``. A rule is
``rule(sch, block, knobs, variant)``: it schedules ``block`` of ``sch`` and asks ``knobs`` for every tunable
decision (tile sizes, unroll depth, vector width); ``variant`` picks one of the kernel variants the rule
was registered with. The same function serves two masters:

- tuning: MetaSchedule's ApplyCustomRule calls the global function ``s_tir.meta_schedule.<key>.<name>``
  for a tagged block; it returns one schedule per variant, each with :class:`SampledKnobs`, whose draws
  are trace instructions, so the search mutates them and records replay them;
- compiling without a record: :func:`apply_default_rules` applies the first variant with
  :class:`DefaultKnobs`, the defaults each rule states next to each knob.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

RULE_ANNOTATION = "schedule_rule"


@dataclass(frozen=True)
class Rule:
    name: str
    target_key: str  # TVM target key: "cpu", "arm_cpu", "cuda"
    function: Callable
    variants: tuple[str, ...]


# (rule name, target key) -> Rule
RULES: dict[tuple[str, str], Rule] = {}


class SampledKnobs:
    """Knobs drawn by MetaSchedule's sampling instructions (used while tuning)."""

    def __init__(self, sch):
        self.sch = sch

    def tile(self, loop, parts: int, default: Sequence[int], max_innermost: int = 64):
        return self.sch.sample_perfect_tile(loop, n=parts, max_innermost_factor=max_innermost)

    def choice(self, candidates: Sequence[int], default: int):
        return self.sch.sample_categorical(list(candidates), [1.0 / len(candidates)] * len(candidates))


class DefaultKnobs:
    """Each knob's stated default (used to compile without a tuning record)."""

    def tile(self, loop, parts: int, default: Sequence[int], max_innermost: int = 64):
        return list(default)

    def choice(self, candidates: Sequence[int], default: int):
        return default


def register_rule(name: str, target_keys: Sequence[str], variants: Sequence[str] = ("default",)):
    """Register ``rule(sch, block, knobs, variant)`` for blocks annotated ``schedule_rule = name``."""
    import tvm_ffi

    def register(function):
        for key in target_keys:
            RULES[(name, key)] = Rule(name, key, function, tuple(variants))

            def design_space(sch, block, function=function):
                spaces = []
                for variant in variants:
                    fork = sch.copy()
                    function(fork, block, SampledKnobs(fork), variant)
                    spaces.append(fork)
                return spaces

            tvm_ffi.register_global_func(f"s_tir.meta_schedule.{key}.{name}", design_space, override=True)
        return function

    return register


# Scope of the CPU kernels' register tiles. TVM lowers a CPU buffer to a stack array only in scope
# "global" (and under 1 KiB); one in "local" is a TVMBackendAllocWorkspace/FreeWorkspace pair per tile:
# 6% of the VarG float reference layer's time, 39% of its int8 one's (Emerald Rapids). LLVM keeps the
# tile in registers either way. Tensor intrinsics for such tiles: ``intrin.in_scope(name, REGISTER_SCOPE)``.
REGISTER_SCOPE = "global"


@dataclass(frozen=True)
class RegisterBudget:
    """What one register tile of a CPU kernel costs, in registers of one file.

    A tile is ``kv`` weight vectors x ``yt`` x ``xt`` output positions; it holds ``per_output``
    registers per (vector, position) (accumulators), ``per_vector`` per weight vector (0 where the
    instruction reads weights from memory) and ``per_position`` per position (a loaded input), and
    leaves ``reserved`` for temporaries."""

    registers: int
    per_output: int
    per_vector: int = 0
    per_position: int = 0
    reserved: int = 0

    def fits(self, kv: int, yt: int, xt: int) -> bool:
        used = kv * yt * xt * self.per_output + kv * self.per_vector + yt * xt * self.per_position
        return used + self.reserved <= self.registers


def register_tile(vectors: int, height: int, width: int, budget: RegisterBudget) -> tuple[int, int, int]:
    """(kv, yt, xt): the register tile with the most multiply-accumulates per load (kv weight vectors
    and yt * xt inputs loaded per step) among the perfect tiles that fit ``budget``; rows limited to
    the first three divisors of the height (wide rows reuse each weight vector longer)."""
    fitting = [
        (kv, yt, xt)
        for kv in divisors(vectors)
        for yt in divisors(height)[:3]
        for xt in divisors(width)
        if budget.fits(kv, yt, xt)
    ] or [(1, 1, 1)]

    def score(tile):
        kv, yt, xt = tile
        return (kv * yt * xt / (kv + yt * xt), kv * yt * xt, xt)

    return max(fitting, key=score)


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending: the perfect tile factors of a loop of extent ``n``."""
    return [d for d in range(1, n + 1) if n % d == 0]


def parallel_outer(sch, block, count: int) -> None:
    """Fuse the outer ``count`` loops of ``block`` and run them in parallel."""
    loops = sch.get_loops(block)[:count]
    sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def inline_producers(sch, block) -> None:
    """compute_inline the elementwise producers that FuseOps put before ``block`` (e.g. a quantization),
    and theirs in turn; producers that cannot be inlined (reductions) stay blocks of their own."""
    from tvm.s_tir import ScheduleError

    progress = True
    while progress:
        progress = False
        for producer in sch.get_producers(block):
            try:
                sch.compute_inline(producer)
                progress = True
                break
            except ScheduleError:
                continue


def inline_consumers(sch, block) -> None:
    """reverse_compute_inline the elementwise consumers of ``block`` (bias, ReLU, residual adds, the next
    layer's quantization) into it; a consumer that cannot be inlined (an unpadding that drops channels)
    stays a block and gets its own elementwise consumers inlined instead."""
    from tvm.s_tir import ScheduleError

    def into(target):
        progress = True
        while progress:
            progress = False
            for consumer in sch.get_consumers(target):
                try:
                    sch.reverse_compute_inline(consumer)
                    progress = True
                    break
                except ScheduleError:
                    continue

    into(block)
    for consumer in sch.get_consumers(block):
        into(consumer)


def find_rule(sch, target):
    """(block RV, Rule) of the first block of ``sch`` annotated with a rule registered for ``target``."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        annotations = sch.get(block).annotations
        if RULE_ANNOTATION not in annotations:
            continue
        for key in target.keys:
            rule = RULES.get((str(annotations[RULE_ANNOTATION]), str(key)))
            if rule is not None:
                return block, rule
    return None


def apply_default_rules(mod, target):
    """Schedule every PrimFunc whose block has a registered rule, with default knobs.

    Returns the module and the names of the functions it scheduled."""
    import tvm
    from tvm import s_tir

    from .build import SCHEDULED_ATTR, is_scheduled

    scheduled = []
    mod = mod.clone()  # IRModule updates are in place; leave the caller's module as it was
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
            continue
        sch = s_tir.Schedule(func)
        match = find_rule(sch, target)
        if match is None:
            continue
        block, rule = match
        rule.function(sch, block, DefaultKnobs(), rule.variants[0])
        mod[gv] = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
        scheduled.append(gv.name_hint)
    return mod, scheduled
