"""Tune a model's workloads with MetaSchedule and keep the best schedules as committed records.

    python -m tvm_effconv.tune MODEL --target PRESET [--trials N] [--records DIR]
                               [--rpc-tracker HOST:PORT --rpc-key KEY] [--only OPS]
    python -m tvm_effconv.tune MODEL --target PRESET --builder-only [--records DIR]
    python -m tvm_effconv.tune --prune [--target PRESET | --records DIR]

Tasks are the model's fused functions (the same form compile applies records to). The host measures
locally; a device measures through an RPC tracker, which spreads the candidates over every device
registered under the key. Measured records land in a work database as they come; at the end, or when
the run is interrupted, they are merged into the records folder (best per workload, one atomic
rename). Running the same command again resumes: tasks already tuned with the requested trials are
skipped. Where no device can measure (a CUDA preset on a machine without a GPU; an emulated ARM device,
whose timings mean nothing), ``--builder-only`` records each task's default schedule, built but not
measured, marked as such (see ``tuning.UNMEASURED_SECONDS`` and ``tuning.DEFAULTS_FILE``): any later
measured record replaces it.
"""

import argparse
import functools
import hashlib
import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import frontend
from .build import default_schedule_module, gpu_default_trace, prepare
from .errors import EffconvError, run_cli
from .targets import get_preset
from .tuning import (
    DATABASE_FILES,
    RECORD_FILE,
    UNMEASURED_SECONDS,
    best_records,
    load_records,
    mean_seconds,
    records_dir,
    target_identity,
    workload_key,
    write_records,
)

PROGRESS_FILE = "progress.json"


@dataclass
class TaskResult:
    name: str
    weight: int
    trials: int = 0
    untuned_ms: float | None = None
    tuned_ms: float | None = None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        if self.untuned_ms and self.tuned_ms:
            return self.untuned_ms / self.tuned_ms
        return None


@dataclass
class TuneReport:
    preset: str
    records: Path
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0
    emulated: bool = False

    def table(self) -> str:
        rows = [f"{'task':<40} {'weight':>6} {'trials':>6} {'untuned ms':>11} {'tuned ms':>9} {'speed-up':>8}"]
        for t in self.tasks:
            untuned = f"{t.untuned_ms:.4f}" if t.untuned_ms is not None else "-"
            tuned = f"{t.tuned_ms:.4f}" if t.tuned_ms is not None else "-"
            speedup = f"{t.speedup:.2f}x" if t.speedup else "-"
            rows.append(f"{t.name[:40]:<40} {t.weight:>6} {t.trials:>6} {untuned:>11} {tuned:>9} {speedup:>8}  {t.note}")
        return "\n".join(rows)


def work_dir(records: Path) -> Path:
    """Where a tuning run for ``records`` keeps its MetaSchedule database and logs (for resuming)."""
    from .device.emulator import cache_dir

    root = cache_dir() / "tuning"
    digest = hashlib.sha256(str(records.resolve()).encode()).hexdigest()[:12]
    return root / f"{records.name}-{digest}"


def build_candidate(mod, target, _params):
    """MetaSchedule builder build. TVM's default also imports every tensor intrinsic, which parses
    hundreds of TVMScript functions in each fresh worker (a minute per batch on 2 busy cores); the
    candidates arrive already tensorized, so building needs none of them."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def export_shared_object(module, compiler: str) -> str:
    """MetaSchedule builder export: a shared object cross-linked on the host, so the device needs no
    compiler. Runs in the builder's worker processes."""
    import os
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tuned.so")
    module.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


class _Progress:
    """Prints one line per measured batch (task, trials, best time, elapsed and remaining time) and stops
    tasks whose search space is exhausted, or every task after Ctrl-C."""

    # MetaSchedule keeps re-picking a task whose search finds no new candidate (an elementwise op has
    # few schedules); after this many empty batches in a row the task is ended.
    EMPTY_BATCHES_TO_STOP = 2

    def __init__(self, results: list[TaskResult], trials: int, log):
        self.results, self.trials, self.log = results, trials, log
        self.started = time.time()
        self.empty_batches = [0] * len(results)
        self.interrupted = False

    def __call__(self, scheduler, task_id: int, runner_results) -> None:
        result = self.results[task_id]
        for run in runner_results:
            result.trials += 1
            if run.error_msg is None and run.run_secs:
                ms = 1e3 * mean_seconds(run.run_secs)
                result.tuned_ms = ms if result.tuned_ms is None else min(result.tuned_ms, ms)
        self.empty_batches[task_id] = 0 if runner_results else self.empty_batches[task_id] + 1
        if self.empty_batches[task_id] >= self.EMPTY_BATCHES_TO_STOP:
            result.note = "search space exhausted"
            scheduler.terminate_task(task_id)
        if self.interrupted:
            for index, task in enumerate(scheduler.tasks_):
                if not task.is_terminated:
                    scheduler.terminate_task(index)
        if not runner_results:
            return
        finished = {i for i, task in enumerate(scheduler.tasks_) if task.is_terminated}
        finished |= {i for i, r in enumerate(self.results) if r.trials >= self.trials}
        open_trials = sum(max(self.trials - r.trials, 0) for i, r in enumerate(self.results) if i not in finished)
        measured = sum(r.trials for r in self.results)
        elapsed = time.time() - self.started
        best = f"{result.tuned_ms:.4f} ms" if result.tuned_ms is not None else "no valid candidate yet"
        self.log(
            f"[{_clock(elapsed)}] task {task_id + 1}/{len(self.results)} {result.name}: "
            f"{result.trials}/{self.trials} trials, best {best} | tasks done {len(finished)}/{len(self.results)}, "
            f"remaining ~{_clock(elapsed / measured * open_trials if measured else 0.0)}"
        )

    def interrupt(self, _signum, _frame) -> None:
        # A KeyboardInterrupt raised inside MetaSchedule's C++ loop crashes the process; end the tasks
        # after the batch in flight instead, so the records measured so far are merged.
        if not self.interrupted:
            self.log("interrupted: finishing the batch in flight, then saving the records measured so far")
        self.interrupted = True


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _measure_callback(progress: _Progress):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            progress(task_scheduler, task_id, runner_results)

    return ProgressCallback()


def _builder_and_runner(preset, tracker: str | None, key: str | None, timeout: float):
    from tvm.s_tir import meta_schedule as ms

    if preset.family == "cuda" and not tracker:
        import tvm

        if not tvm.cuda(0).exist:
            raise EffconvError(
                f"tuning for {preset.name} measures on a CUDA GPU and this machine has none: run it on a machine "
                "with one, or pass --rpc-tracker HOST:PORT --rpc-key KEY for GPUs registered at a tracker, or "
                "--builder-only to commit the default schedules as records that were built but not measured"
            )
    if preset.family == "arm" and not tracker:
        raise EffconvError(
            f"tuning for {preset.name} measures on a device: pass --rpc-tracker HOST:PORT --rpc-key KEY "
            "(an emulated device registers with `python -m tvm_effconv.device emulate --preset "
            f"{preset.name} --tracker HOST:PORT --key KEY`)"
        )
    f_export = functools.partial(export_shared_object, compiler=preset.cross_compiler) if preset.cross_compiler else None
    builder = ms.builder.LocalBuilder(timeout_sec=120, f_build=build_candidate, f_export=f_export)
    if not tracker:
        return builder, ms.runner.LocalRunner(timeout_sec=timeout)
    from .device import rpc

    host, port = rpc.parse_address(tracker)
    if key not in rpc.registered_keys(tracker):
        raise EffconvError(
            f"no device is registered under key {key!r} at the tracker {tracker}; start one with "
            f"`python -m tvm_effconv.device emulate --preset {preset.name} --tracker {tracker} --key {key}` "
            "or register a board's rpc_server with that key"
        )
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=int(timeout))
    return builder, ms.runner.RPCRunner(rpc_config=config, evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1))


def _default_module(task, preset, constant_params: dict):
    """A task's default schedule as compile builds it: on CPUs the weights packed at compile time. The
    packing is a layout-rewrite block, which the builder removes (as for MetaSchedule's candidates): the
    measurement takes packed weights."""
    import tvm

    from .default_schedule import default_schedule
    from .schedule_rules import apply_default_rules

    mod = task.dispatched[0]
    if preset.family != "cuda":
        mod, scheduled = apply_default_rules(mod, preset.target)
        if not scheduled:
            try:
                func = default_schedule(mod["main"], preset.target, constant_params.get(task.task_name, ()))
                return tvm.IRModule({"main": func})
            except Exception:  # noqa: BLE001 - as in compile: the fallback below
                pass
    return default_schedule_module(mod, preset)[0]


def _measure_default(tasks, preset, builder, runner, constant_params: dict) -> list[float | None]:
    """Run time (ms) of each task under the default schedule, measured like the tuning candidates."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    modules = [_default_module(task, preset, constant_params) for task in tasks]
    built = builder.build([ms.builder.BuilderInput(mod, preset.target) for mod in modules])
    device_type = "cuda" if preset.family == "cuda" else "cpu"
    futures = {}
    for index, (mod, result) in enumerate(zip(modules, built)):
        if result.error_msg is None:
            measured = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
            args = ms.arg_info.ArgInfo.from_prim_func(measured["main"])
            futures[index] = runner.run([ms.runner.RunnerInput(result.artifact_path, device_type, args)])[0]
    times: list[float | None] = [None] * len(tasks)
    for index, future in futures.items():
        run = future.result()
        if run.error_msg is None and run.run_secs:
            times[index] = 1e3 * mean_seconds(run.run_secs)
    return times


def _tune_contexts(tasks, work: Path) -> list:
    """One MetaSchedule TuneContext per task, each logging to its own file under ``work/logs``.

    MetaSchedule's own helper installs its loggers with logging.dictConfig, which fails when another
    library left unnamed handlers on its logger, and prints its tables to the console; our progress
    lines replace those."""
    from tvm.s_tir import meta_schedule as ms

    (work / "logs").mkdir(parents=True, exist_ok=True)
    contexts = []
    for index, task in enumerate(tasks):
        logger = logging.getLogger(f"tvm_effconv.tune.task_{index}")
        logger.handlers.clear()
        handler = logging.FileHandler(work / "logs" / f"task_{index:02d}_{task.task_name[:80]}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator=_space(task),
                                       search_strategy="evolutionary", task_name=task.task_name, logger=logger,
                                       num_threads="physical").clone())
    return contexts


def _space(task):
    """MetaSchedule's design space for a task. An effconv rule schedules every block of its function,
    parallel loops, vectors and unrolling included; MetaSchedule's generic rules on top (the root's
    parallel/vectorize annotations among them) made RewriteParallelVectorizeUnroll reject every
    candidate, so such tasks get the custom rule alone."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from .schedule_rules import find_rule

    if find_rule(s_tir.Schedule(task.dispatched[0]), task.target) is None:
        return "post-order-apply"
    return ms.space_generator.PostOrderApply(sch_rules=[ms.schedule_rule.ApplyCustomRule()])


def merge_into_records(folder: Path, work: Path | None, target, log, extra=(), verdicts=None) -> int:
    """Merge the work database (if any) and the ``extra`` databases into the records folder; returns
    the workloads written. ``verdicts`` maps workload keys to a DEFAULTS_FILE entry (the default schedule
    measured faster: its records are kept but not applied) or None (a tuned record won: the entry is dropped)."""
    from tvm.s_tir import meta_schedule as ms

    current = load_records(folder, target)
    sources = [*extra, current.database, current.superseded, current.other_targets]
    if work is not None and (work / RECORD_FILE).is_file():
        sources.append(ms.database.JSONDatabase(work_dir=str(work)))
    defaults = dict(current.defaults)
    for key, entry in (verdicts or {}).items():
        if entry is None:
            defaults.pop(key, None)
        else:
            defaults[key] = entry
    records = best_records(sources)
    if records or defaults != current.defaults:
        write_records(folder, records, [*current.other_defaults, *defaults.values()])
    return len(records)


def _extract_tasks(model: str, preset, only, input_shapes, trust_pickle) -> tuple[list, dict]:
    """The model's tuning tasks, and per function the indices of the parameters that are constants."""
    from tvm.s_tir import meta_schedule as ms

    from .default_schedule import constant_params

    specs = [frontend.InputSpec.parse(s) for s in input_shapes]
    loaded = frontend.load_model(model, specs, trust_pickle)
    prepared = prepare(frontend.to_relax(loaded.exported, preset.target), preset.target)
    tasks = list(ms.relax_integration.extract_tasks(prepared, preset.target))
    constants = constant_params(prepared)
    if not only:
        return tasks, constants
    chosen = [t for t in tasks if any(op in t.task_name for op in only)]
    if not chosen:
        raise EffconvError(
            f"--only {','.join(only)} matches none of the model's tasks: {', '.join(t.task_name for t in tasks)}"
        )
    return chosen, constants


def record_default_schedules(model: str, target: str, records: str | None = None, only: list[str] = (),
                             input_shapes: list[str] = (), trust_pickle: bool = False, log=print) -> TuneReport:
    """Builder-only records where no device can measure: each task's default schedule, built (cross-built
    for ARM) to check it compiles, and committed as not measured. On a GPU the default is a single trace,
    committed as a MetaSchedule record with the run time UNMEASURED_SECONDS; on a CPU it packs weights at
    compile time (no trace holds that), so the record is a DEFAULTS_FILE entry without times. Either
    kind is replaced by any later measurement of the workload."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    preset = get_preset(target)
    tasks, constants = _extract_tasks(model, preset, only, input_shapes, trust_pickle)
    folder = records_dir(preset.name, records)
    report = TuneReport(preset=preset.name, records=folder)
    started = time.time()
    existing = load_records(folder, preset.target)
    results = [TaskResult(task.task_name, int(task.weight)) for task in tasks]
    report.tasks = results
    traced = []
    for task, result in zip(tasks, results):
        if preset.family == "cuda":
            sch = gpu_default_trace(task.dispatched[0]["main"], preset.target)
            if sch is None:
                result.note = "no default schedule: left out"
                continue
        elif workload_key(task.dispatched[0]) in existing.defaults or (
                existing.database is not None and existing.database.has_workload(task.dispatched[0])):
            result.note = "has a record (kept)"
            continue
        else:
            sch = None  # built from the module compile would build
        traced.append((task, result, sch))
    modules = [sch.mod if sch is not None else _default_module(task, preset, constants) for task, _, sch in traced]
    f_export = functools.partial(export_shared_object, compiler=preset.cross_compiler) if preset.cross_compiler else None
    builder = ms.builder.LocalBuilder(timeout_sec=120, f_build=build_candidate, f_export=f_export)
    built = builder.build([ms.builder.BuilderInput(mod, preset.target) for mod in modules])
    database = ms.database.MemoryDatabase()
    unmeasured = [tvm.tirx.FloatImm("float64", UNMEASURED_SECONDS)]
    verdicts = {}
    for (task, result, sch), build_result in zip(traced, built):
        if build_result.error_msg is not None:
            result.note = "default schedule does not build: left out: " + build_result.error_msg.strip().splitlines()[-1]
            continue
        result.note = "builder-only: built, not measured"
        if sch is None:
            verdicts[workload_key(task.dispatched[0])] = {
                "workload_key": workload_key(task.dispatched[0]), "task": task.task_name,
                "target": target_identity(preset.target), "default_ms": None, "tuned_ms": None}
            continue
        workload = database.commit_workload(task.dispatched[0])
        args = ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, unmeasured, preset.target, args))
    made = len(verdicts) + len(database.get_all_tuning_records())
    log(f"{len(tasks)} task(s): {made} default schedule(s) built for {preset.name}")
    written = merge_into_records(folder, None, preset.target, log, extra=[database], verdicts=verdicts)
    log(f"records: {written} workload(s) and {len(verdicts)} default-schedule entries in {folder} "
        "(builder-only ones are replaced by any measured record)")
    report.seconds = time.time() - started
    return report


def tune_model(model: str, target: str, trials: int = 64, records: str | None = None, tracker: str | None = None,
               key: str | None = None, only: list[str] = (), input_shapes: list[str] = (), trust_pickle: bool = False,
               timeout: float = 60, log=print) -> TuneReport:
    from tvm.s_tir import meta_schedule as ms

    if trials < 1:
        raise EffconvError(f"--trials must be at least 1 (got {trials})")
    preset = get_preset(target)
    key = key or preset.rpc_key
    builder, runner = _builder_and_runner(preset, tracker, key, timeout)
    tasks, constants = _extract_tasks(model, preset, only, input_shapes, trust_pickle)

    folder = records_dir(preset.name, records)
    work = work_dir(folder)
    report = TuneReport(preset=preset.name, records=folder, emulated=preset.family == "arm")
    if report.emulated:
        log("note: measurements on an emulated device check the plumbing only; their timings mean nothing for real boards")
    progress_path = work / PROGRESS_FILE
    done = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    if (work / RECORD_FILE).is_file():
        # A run that was killed: count its trials, then merge its records.
        for record in ms.database.JSONDatabase(work_dir=str(work)).get_all_tuning_records():
            key = workload_key(record.workload.mod)
            done[key] = done.get(key, 0) + 1
        log(f"resuming: merged {merge_into_records(folder, work, preset.target, log)} workloads of an interrupted run into {folder}")
        _finish_work(work, progress_path, done)
    existing = load_records(folder, preset.target)
    for problem in existing.problems:
        log(f"warning: {problem}")

    todo = []
    for task in tasks:
        result = TaskResult(task.task_name, int(task.weight))
        key = workload_key(task.dispatched[0])
        if key in existing.defaults and done.get(key, 0) >= trials:
            result.note, result.trials = "default schedule is faster (skipped)", done[key]
            result.untuned_ms = result.tuned_ms = existing.defaults[key]["default_ms"]
        elif done.get(key, 0) >= trials and existing.database is not None \
                and existing.database.has_workload(task.dispatched[0]):
            result.note, result.trials = "already tuned (skipped)", done[key]
            record = existing.database.query_tuning_record(task.dispatched[0], preset.target, task.task_name)
            result.tuned_ms = 1e3 * mean_seconds(record.run_secs) if record is not None and record.run_secs else None
        else:
            todo.append((task, result))
        report.tasks.append(result)
    log(f"{len(tasks)} task(s), {len(todo)} to tune with {trials} trials each")
    if not todo:
        return report

    started = time.time()
    for (task, result), ms_time in zip(todo, _measure_default([t for t, _ in todo], preset, builder, runner, constants)):
        result.untuned_ms = ms_time
    shutil.rmtree(work / "logs", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    contexts = _tune_contexts([t for t, _ in todo], work)
    progress = _Progress([r for _, r in todo], trials, log)
    previous_handler = signal.signal(signal.SIGINT, progress.interrupt)
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=[float(t.weight) for t, _ in todo],
            work_dir=str(work),
            max_trials_global=trials * len(todo),
            max_trials_per_task=trials,
            num_trials_per_iter=min(trials, 16),
            builder=builder,
            runner=runner,
            database=ms.database.JSONDatabase(work_dir=str(work)),
            cost_model="xgb",
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), _measure_callback(progress)],
        )
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        # Interrupted or not, every measured record is kept.
        verdicts = {}
        for task, result in todo:
            key = workload_key(task.dispatched[0])
            # An exhausted search space counts as fully tuned.
            done[key] = max(done.get(key, 0), trials if result.note else result.trials)
            verdicts[key] = _default_verdict(task, result, preset.target)
        written = merge_into_records(folder, work, preset.target, log, verdicts=verdicts)
        _finish_work(work, progress_path, done)
        log(f"records: {written} workload(s) in {folder}")
    if progress.interrupted:
        raise KeyboardInterrupt
    report.seconds = time.time() - started
    return report


def _default_verdict(task, result: TaskResult, target) -> dict | None:
    """The DEFAULTS_FILE entry of a task whose default schedule measured faster than every candidate
    (MetaSchedule's generic space can lose to our default, e.g. on fused batch-norm epilogues), else None."""
    if result.untuned_ms is None or (result.tuned_ms is not None and result.tuned_ms < result.untuned_ms):
        return None
    tuned = "none valid" if result.tuned_ms is None else f"{result.tuned_ms:.4f} ms"
    result.note = f"default schedule kept: faster than the best candidate ({tuned})"
    return {"workload_key": workload_key(task.dispatched[0]), "task": task.task_name,
            "target": target_identity(target), "default_ms": result.untuned_ms, "tuned_ms": result.tuned_ms}


def _finish_work(work: Path, progress_path: Path, done: dict) -> None:
    """Record the trials per workload and drop the merged work database."""
    progress_path.write_text(json.dumps(done))
    for name in DATABASE_FILES:
        (work / name).unlink(missing_ok=True)


def _database_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in DATABASE_FILES if (folder / name).is_file())


def prune(folder: Path, target, log) -> None:
    before = _database_bytes(folder)
    found = load_records(folder, target)
    for problem in found.problems:
        log(f"warning: {problem}")
    if found.database is None and found.superseded is None:
        raise EffconvError(f"{folder} holds no usable records to prune")
    kept = best_records([found.database, found.superseded, found.other_targets])
    write_records(folder, kept)
    after = _database_bytes(folder)
    log(f"pruned {folder}: {found.records} record(s) -> {len(kept)} (best per workload), {before} -> {after} bytes")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_effconv.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model file or package.module:factory (as for compile)")
    parser.add_argument("--target", help="target preset")
    parser.add_argument("--trials", type=int, default=64, help="measured candidates per task (default 64)")
    parser.add_argument("--records", help="records folder (default schedules/<preset>)")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on devices registered at this tracker")
    parser.add_argument("--rpc-key", help="device key at the tracker (default: the preset's rpc_key)")
    parser.add_argument("--only", action="append", default=[], metavar="OPS",
                        help="tune only tasks whose name contains one of these (comma-separated, repeatable)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="N,C,H,W[:DTYPE]")
    parser.add_argument("--trust-pickle", action="store_true")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per measurement session")
    parser.add_argument("--prune", action="store_true", help="keep only the best record per workload and exit")
    parser.add_argument("--builder-only", action="store_true",
                        help="no device to measure on: record the default schedules, built but not measured")
    args = parser.parse_args(argv)
    if not args.target and not args.records:
        parser.error("--target is required")
    log = functools.partial(print, flush=True)
    if args.prune:
        if not args.target:
            parser.error("--prune needs --target (records are checked against its target)")
        preset = get_preset(args.target)
        prune(records_dir(preset.name, args.records), preset.target, log)
        return 0
    if not args.model:
        parser.error("MODEL is required (or --prune)")
    only = [op for item in args.only for op in item.split(",") if op]
    if args.builder_only:
        report = record_default_schedules(args.model, args.target, args.records, only, args.input_shape,
                                          args.trust_pickle, log)
        print(report.table())
        return 0
    report = tune_model(args.model, args.target, args.trials, args.records, args.rpc_tracker, args.rpc_key, only,
                        args.input_shape, args.trust_pickle, args.timeout, log)
    print(report.table())
    if report.emulated:
        print("(emulated device: these timings check the plumbing only and mean nothing for real boards)")
    return 0


if __name__ == "__main__":
    run_cli(main)
