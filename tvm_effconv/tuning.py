"""MetaSchedule tuning records: where they live, how they are read, merged and written.

Records of a preset are committed in ``schedules/<preset>/`` in MetaSchedule's JSON database format:
``database_workload.json`` (one workload per line: structural hash + the TIR module) and
``database_tuning_record.json`` (one measured schedule per line: workload index, trace, run times,
target, argument info). Reading is line by line: a corrupt line or a foreign file is reported and
skipped, and the rest is used. Records for other targets are kept but never applied: one folder may hold
the records of several CPUs (the ``host`` preset is whatever CPU LLVM detects), and a folder with none
for this target is reported as the wrong one. Writing merges, keeps the best record per workload and
target, and replaces the folder in one rename, so a reader never sees half a database.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

SCHEDULES_DIR = Path(os.environ.get("TVM_EFFCONV_SCHEDULES", Path(__file__).resolve().parent.parent / "schedules"))
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
DATABASE_FILES = (WORKLOAD_FILE, RECORD_FILE)
# The workloads whose default schedule measured faster than every tuned candidate: one JSON object per
# line, {"workload_key", "task", "target", "default_ms", "tuned_ms"}. Compile keeps the default for them
# and counts them as covered; their records stay in the database (they are MetaSchedule's best, which a
# comparison with MetaSchedule alone needs) but are not applied. A builder-only entry (tune --builder-only
# on a CPU preset, where no device measures) has both times null: the default was built, never measured.
DEFAULTS_FILE = "default_schedules.json"
# Besides those, a records folder may hold a README that says how the records were made.
ALLOWED_EXTRA = ("README.md", DEFAULTS_FILE)

# The run time of a builder-only record: a default schedule that was built but never measured (no device
# to run it on). MetaSchedule needs a run time to apply a record; this one marks it and loses to any
# measurement when records are merged, so tuning on a real device replaces it.
UNMEASURED_SECONDS = 1e9

# Target attributes that decide whether a schedule fits: a record tuned for another CPU or GPU
# architecture may not even compile (intrinsics), so it is never applied.
TARGET_IDENTITY = ("kind", "mtriple", "mcpu", "mattr", "arch")


@dataclass
class Records:
    """The usable records of a folder (``database`` is None when there are none) and what was wrong."""

    directory: Path
    database: object = None  # the records compile applies
    superseded: object = None  # this target's records of workloads in ``defaults``: kept, not applied
    other_targets: object = None  # a database of the records tuned for other targets (kept when merging)
    workloads: int = 0
    records: int = 0
    unmeasured: int = 0  # builder-only records among ``records``
    files: dict = field(default_factory=dict)  # file name -> sha256
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # DEFAULTS_FILE: workload key -> entry, for this target; and the other targets' entries, kept as they are
    defaults: dict = field(default_factory=dict)
    other_defaults: list = field(default_factory=list)


def records_dir(preset_name: str, override: str | os.PathLike | None = None) -> Path:
    return Path(override) if override else SCHEDULES_DIR / preset_name


def target_identity(target) -> dict:
    exported = target.export()
    return {key: _plain(exported[key]) for key in TARGET_IDENTITY if key in exported}


def _plain(value):
    return [str(v) for v in value] if not isinstance(value, str) and hasattr(value, "__len__") else str(value)


def _read_lines(path: Path, what: str, problems: list[str]) -> list:
    """JSON values of a file's lines; an unreadable line becomes None (and a problem)."""
    values = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            values.append(json.loads(line))
        except ValueError:
            problems.append(f"{path.name} line {number} is corrupt (not JSON); skipped that {what}")
            values.append(None)
    return values


def workload_key(mod) -> str:
    """The key of a workload (a single-function IRModule as MetaSchedule normalises it)."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def _load_defaults(path: Path, want: dict, found: Records) -> None:
    for number, value in enumerate(_read_lines(path, "entry", found.problems), start=1):
        if value is None:
            continue
        if not isinstance(value, dict) or not {"workload_key", "target", "default_ms"} <= set(value):
            found.problems.append(f"{DEFAULTS_FILE} line {number} is not a default-schedule entry; skipped it")
        elif value["target"] == want:
            found.defaults[str(value["workload_key"])] = value
        else:
            found.other_defaults.append(value)


def load_records(directory: Path, target) -> Records:
    """Read a records folder for ``target`` into an in-memory MetaSchedule database."""
    from tvm.s_tir import meta_schedule as ms

    found = Records(directory=directory)
    if not directory.is_dir():
        return found
    for entry in sorted(directory.iterdir()):
        if entry.name not in DATABASE_FILES + ALLOWED_EXTRA:
            found.problems.append(f"{entry} is not part of a MetaSchedule database; ignored it")
    want = target_identity(target)
    if (directory / DEFAULTS_FILE).is_file():
        _load_defaults(directory / DEFAULTS_FILE, want, found)
    paths = [directory / name for name in DATABASE_FILES]
    if not all(p.is_file() for p in paths):
        if any(p.is_file() for p in paths):
            found.problems.append(f"{directory} needs both {WORKLOAD_FILE} and {RECORD_FILE}; nothing applied")
        return found
    found.files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    workloads = []
    for number, value in enumerate(_read_lines(paths[0], "workload", found.problems), start=1):
        try:
            workloads.append(ms.database.Workload.from_json(value) if value is not None else None)
        except Exception:  # TVM raises several types for a malformed module
            found.problems.append(f"{WORKLOAD_FILE} line {number} is not a valid workload; skipped it")
            workloads.append(None)

    from .intrin import register_all

    records = _read_lines(paths[1], "record", found.problems)
    register_all(json.dumps(records))  # replaying a record's trace needs the tensor intrinsics it names
    database, others, superseded = (ms.database.MemoryDatabase() for _ in range(3))
    foreign_targets: dict[str, int] = {}
    for number, value in enumerate(records, start=1):
        if value is None:
            continue
        try:
            index, body = value
            workload = workloads[index]
            if workload is None:
                found.problems.append(f"{RECORD_FILE} line {number} refers to a bad workload; skipped it")
                continue
            record = ms.database.TuningRecord.from_json(body, workload)
        except Exception:
            found.problems.append(f"{RECORD_FILE} line {number} is not a valid tuning record; skipped it")
            continue
        have = target_identity(record.target)
        if have != want:
            into = others
        else:
            into = superseded if workload_key(workload.mod) in found.defaults else database
        into.commit_tuning_record(
            ms.database.TuningRecord(
                record.trace, into.commit_workload(workload.mod), record.run_secs, record.target, record.args_info
            )
        )
        if have != want:
            key = json.dumps(have, sort_keys=True)
            foreign_targets[key] = foreign_targets.get(key, 0) + 1
            continue
        if into is superseded:
            found.superseded = superseded
            continue
        found.records += 1
        found.unmeasured += is_unmeasured(record)
    for key, count in foreign_targets.items():
        if found.records:
            found.notes.append(f"{directory} also holds {count} record(s) for another target {key}; not applied here")
        else:
            found.problems.append(
                f"{count} record(s) in {directory} were tuned for another target {key}, not "
                f"{json.dumps(want, sort_keys=True)}; ignored them (tune for this preset, or pass the right --records folder)"
            )
    if foreign_targets:
        found.other_targets = others
    if found.records:
        found.database = database
        found.workloads = len({str(r.workload.as_json()[0]) for r in database.get_all_tuning_records()})
    return found


def is_unmeasured(record) -> bool:
    return bool(record.run_secs) and mean_seconds(record.run_secs) >= UNMEASURED_SECONDS


def tuned_database(found: Records):
    """Every record of ``found``'s target, the superseded ones too: MetaSchedule's best per workload."""
    from tvm.s_tir import meta_schedule as ms

    if found.superseded is None:
        return found.database
    merged = ms.database.MemoryDatabase()
    for source in (found.database, found.superseded):
        for record in [] if source is None else source.get_all_tuning_records():
            merged.commit_tuning_record(ms.database.TuningRecord(
                record.trace, merged.commit_workload(record.workload.mod), record.run_secs, record.target,
                record.args_info))
    return merged


def mean_seconds(run_secs) -> float:
    return sum(float(getattr(s, "value", s)) for s in run_secs) / len(run_secs)


def best_records(databases) -> list:
    """The fastest successful record of every (workload, target) found in ``databases`` (None: skipped)."""
    best: dict = {}
    for database in databases:
        if database is None:
            continue
        for record in database.get_all_tuning_records():
            if not record.run_secs:
                continue
            seconds = mean_seconds(record.run_secs)
            # (structural hash, module, target identity)
            key = (*(str(part) for part in record.workload.as_json()), json.dumps(target_identity(record.target)))
            if key not in best or seconds < best[key][0]:
                best[key] = (seconds, record)
    return [record for _, record in sorted(best.values(), key=lambda item: item[0])]


def _block_names(mod) -> list[str]:
    """The SBlock names of ``mod``'s function, in a fixed (pre-order) traversal."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    names, stack = [], [sch.get_sblock("root", func_name=sch.mod.get_global_vars()[0].name_hint)]
    while stack:
        block = stack.pop()
        names.append(sch.get(block).name_hint)
        stack.extend(reversed(sch.get_child_blocks(block)))
    return names


def _under(record, workload):
    """``record`` stored under ``workload``: the JSON database keeps one workload per structural hash,
    which ignores block names, while a trace finds its blocks by name (TOPI names a reduction after its
    input, ``lv69_red``, so a mean of two models is one workload with two spellings). The trace's block
    names are mapped to the stored workload's (blocks the trace creates, ``lv69_red_rf``, by prefix)."""
    from tvm.s_tir import meta_schedule as ms

    renamed = {old: new for old, new in zip(_block_names(record.workload.mod), _block_names(workload.mod)) if old != new}
    if not renamed:
        return ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)

    def rename(name: str) -> str:
        for old, new in sorted(renamed.items(), key=lambda pair: -len(pair[0])):  # the longest name that fits
            if name == old or name.startswith(old + "_"):
                return new + name[len(old):]
        return name

    trace, *rest = record.as_json()
    instructions, decisions = trace
    for instruction in instructions:
        if instruction[0] == "GetSBlock":
            instruction[2][0] = rename(instruction[2][0])
    return ms.database.TuningRecord.from_json([[instructions, decisions], *rest], workload)


def write_records(directory: Path, records: list, defaults: list | None = None) -> None:
    """Write ``records`` (one per workload) as a MetaSchedule JSON database, and ``defaults`` (entries of
    DEFAULTS_FILE) unless None, replacing the folder's database in a single rename. Other files in the
    folder are carried over."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.new-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        # MetaSchedule's own writer: a trace may hold objects (an IndexMap) that only its C++ JSON
        # serialiser can write.
        from tvm.s_tir import meta_schedule as ms

        database = ms.database.JSONDatabase(
            path_workload=str(staging / WORKLOAD_FILE), path_tuning_record=str(staging / RECORD_FILE)
        )
        for record in records:
            workload = database.commit_workload(record.workload.mod)
            database.commit_tuning_record(_under(record, workload))
        del database
        written = DATABASE_FILES
        if defaults is not None:
            written += (DEFAULTS_FILE,)
            if defaults:
                (staging / DEFAULTS_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in defaults))
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name not in written:
                    shutil.move(str(entry), staging / entry.name)
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            directory.rename(old)
            staging.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
