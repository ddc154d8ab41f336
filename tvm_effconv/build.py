"""Relax IRModule -> compiled library for a preset.

The pipeline: library dispatch, legalize and fuse (the same preparation as tuning task extraction, so
database keys match) -> tuning records from the database -> a default schedule for every function
without a record (our CPU defaults, dlight on GPU) -> lowering -> codegen. The library is exported as a
shared object: cross-linked for aarch64, with the CUDA kernels embedded for CUDA presets.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ToolMissingError
from .targets import Preset


@dataclass
class BuildReport:
    """What scheduled each fused function of the model."""

    from_records: list[str] = field(default_factory=list)
    default_schedule: list[str] = field(default_factory=list)
    # Of default_schedule, those with a tuning.DEFAULTS_FILE entry: the default measured faster than
    # tuning; or, builder-only, the default was built where no device could measure it
    default_by_measurement: list[str] = field(default_factory=list)
    default_builder_only: list[str] = field(default_factory=list)
    unscheduled: list[str] = field(default_factory=list)
    # One run's kernel calls in order: {"function", "args": [{"shape", "dtype"}...]} (inputs, then outputs)
    kernel_calls: list[dict] = field(default_factory=list)
    # The effconv kernels and the variant dispatch chose for each: {"function", "rule", <annotations>}
    kernel_variants: list[dict] = field(default_factory=list)


def _backend(target):
    """TVM's per-backend pass lists (tvm.relax.pipeline's dispatch misses cpu's dataflow_lower_passes)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    return cuda if target.kind.name == "cuda" else cpu


def prepare(mod, target):
    """Legalize and fuse: the form in which tuning tasks are extracted and records are applied."""
    import tvm
    from tvm import relax

    passes = [
        *_backend(target).library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _prim_funcs(mod):
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


# The attribute TVM's passes (dlight, MetaScheduleApplyDatabase) set and respect on a scheduled PrimFunc.
SCHEDULED_ATTR = "tirx.is_scheduled"


def is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get(SCHEDULED_ATTR, False))


def gpu_rules() -> tuple:
    """dlight's GPU rules, in the order they are tried, for the functions no effconv rule takes."""
    from tvm.s_tir import dlight as dl

    return dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()


def gpu_default_trace(func, target):
    """The GPU default schedule of one PrimFunc as a traced Schedule (what ``default_schedule_module``
    applies to it), or None when no rule takes it. Its trace is what a builder-only record stores."""
    from tvm import s_tir

    from .schedule_rules import DefaultKnobs, find_rule

    sch = s_tir.Schedule(func)
    match = find_rule(sch, target)
    if match is not None:
        block, rule = match
        rule.function(sch, block, DefaultKnobs(), rule.variants[0])
        return sch
    with target:
        for rule in gpu_rules():
            space = rule.apply(func, target, False)
            if space is not None:
                return space if isinstance(space, s_tir.Schedule) else space[0]
    return None


def default_schedule_module(mod, preset: Preset):
    """Schedule every not yet scheduled function: effconv rules with default knobs, then our CPU
    defaults or dlight's GPU rules. Returns (module, names of functions left unscheduled)."""
    from tvm.s_tir import dlight as dl

    from .schedule_rules import apply_default_rules

    target = preset.target
    mod, _ = apply_default_rules(mod, target)
    if preset.family == "cuda":
        with target:
            mod = dl.ApplyDefaultSchedule(*gpu_rules())(mod)
        return mod, []
    from .default_schedule import apply_default_schedules

    return apply_default_schedules(mod, target)


def schedule(mod, preset: Preset, database=None, defaults=None):
    """Schedule every fused function of a prepared module: records first, defaults for the rest.
    ``defaults``: workload key -> its tuning.DEFAULTS_FILE entry (compile keeps the default schedule)."""
    from tvm import relax
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from .tuning import workload_key

    report = BuildReport()
    if database is not None:
        with preset.target, database:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        report.from_records = sorted(name for name, f in _prim_funcs(mod).items() if is_scheduled(f))
    before_defaults = mod
    mod, report.unscheduled = default_schedule_module(mod, preset)
    # Named as before the default schedules (which may rename a function that packs its weights): the
    # names of the tuning tasks.
    functions = _prim_funcs(before_defaults)
    report.default_schedule = sorted(
        name for name in functions if name not in report.from_records and name not in report.unscheduled
    )
    for name in report.default_schedule:
        entry = (defaults or {}).get(workload_key(_normalize_mod(functions[name])))
        if entry is not None:
            measured = entry["default_ms"] is not None
            (report.default_by_measurement if measured else report.default_builder_only).append(name)
    return mod, report


def kernel_calls(mod) -> list[dict]:
    """The kernel (PrimFunc) calls of ``main`` in order, with their argument shapes, for timing each kernel
    alone where the Relax VM cannot be instrumented (over RPC). Calls with symbolic shapes are skipped."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")

    def spec(ty):
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return None
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
        return None if None in shape else {"shape": shape, "dtype": str(ty.dtype)}

    calls = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
                continue
            outputs = value.ty.fields if isinstance(value.ty, relax.TupleType) else [value.ty]
            args = [spec(arg.ty) for arg in value.args[1].fields] + [spec(ty) for ty in outputs]
            if None not in args:
                calls.append({"function": value.args[0].name_hint, "args": args})
    return calls


def kernel_variants(mod) -> list[dict]:
    """For every function with an effconv kernel: its schedule rule and the variant the op's dispatch
    recorded in the kernel block's annotations (e.g. the bit-serial or the int8 dot path of DSQ, the
    dot intrinsic), sorted by function name."""
    from tvm import s_tir

    from .schedule_rules import RULE_ANNOTATION

    variants = []
    for name, func in sorted(_prim_funcs(mod).items()):
        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            annotations = sch.get(block).annotations
            if RULE_ANNOTATION not in annotations:
                continue
            entry = {key: (v if isinstance(v, int) else str(v)) for key, v in annotations.items()}
            variants.append({"function": name, "rule": entry.pop(RULE_ANNOTATION), **entry})
    return variants


def build(mod, preset: Preset, database=None, defaults=None):
    """Compile a Relax module (as imported) for a preset. Returns (VMExecutable, BuildReport)."""
    import tvm
    from tvm import relax

    target = preset.target
    backend = _backend(target)
    mod = prepare(mod, target)
    variants = kernel_variants(mod)
    mod, report = schedule(mod, preset, database, defaults)
    report.kernel_variants = variants
    report.kernel_calls = kernel_calls(mod)

    @tvm.transform.module_pass(opt_level=3)
    def lower(mod, _ctx):
        passes = backend.dataflow_lower_passes(target) + backend.finalize_passes(target)
        return tvm.transform.Sequential(passes)(mod)

    with target, tvm.transform.PassContext(opt_level=3):
        executable = relax.build(mod, target=target, relax_pipeline=lower)
    return executable, report


def check_cross_compiler(preset: Preset) -> None:
    if preset.cross_compiler and shutil.which(preset.cross_compiler) is None:
        raise ToolMissingError(
            f"the cross compiler {preset.cross_compiler} for preset {preset.name} is not installed; install it "
            f"with `apt-get install {preset.cross_compiler_package}` (or run `bash scripts/install.sh`)"
        )


def export_library(executable, preset: Preset, path: Path) -> None:
    """Write the shared object: cross-linked for aarch64, native otherwise."""
    _export(executable, preset, path)


def export_kernels(executable, preset: Preset, path: Path) -> None:
    """Write the model's kernels alone as a shared object, for timing them one by one on a device."""
    _export(executable.mod.imports[0], preset, path)


def _export(module, preset: Preset, path: Path) -> None:
    from tvm.support import cc

    if preset.cross_compiler:
        check_cross_compiler(preset)
        module.export_library(str(path), fcompile=cc.cross_compiler(preset.cross_compiler))
    else:
        module.export_library(str(path))


def generated_source(executable, kind: str = "cuda", form: str = "cuda") -> str:
    """Generated code of an executable's ``kind`` module: CUDA C (``"cuda"``, ``"cuda"``) or the
    assembly of its CPU kernels (``"llvm"``, ``"asm"``); empty if it has none."""

    def find(module):
        if module.kind == kind:
            return module.inspect_source(form)
        for imported in module.imports:
            found = find(imported)
            if found is not None:
                return found
        return None

    return find(executable.mod) or ""
