"""MetaSchedule tuning records: where they live and how compile reads them.

Records of a preset are committed in ``schedules/<preset>/`` in MetaSchedule's JSON database format
(``database_workload.json`` + ``database_tuning_record.json``).
"""

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

SCHEDULES_DIR = Path(os.environ.get("TVM_EFFCONV_SCHEDULES", Path(__file__).resolve().parent.parent / "schedules"))
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


@dataclass
class Records:
    """A loaded records folder: the database (None when there is nothing usable) and what was found."""

    directory: Path
    database: object = None
    files: dict = field(default_factory=dict)  # file name -> sha256
    problems: list[str] = field(default_factory=list)


def records_dir(preset_name: str, override: str | os.PathLike | None = None) -> Path:
    return Path(override) if override else SCHEDULES_DIR / preset_name


def load_records(directory: Path) -> Records:
    records = Records(directory=directory)
    workload, tuning = directory / WORKLOAD_FILE, directory / RECORD_FILE
    if not workload.is_file() or not tuning.is_file():
        if directory.is_dir() and any(directory.iterdir()):
            records.problems.append(f"{directory} has no {WORKLOAD_FILE} + {RECORD_FILE} pair; nothing applied")
        return records
    from tvm.s_tir import meta_schedule as ms

    try:
        records.database = ms.database.JSONDatabase(
            path_workload=str(workload), path_tuning_record=str(tuning), allow_missing=False
        )
    except Exception as err:  # a corrupt database must not stop a compile
        records.problems.append(f"cannot read the records in {directory} ({str(err).splitlines()[0]}); ignored them")
        return records
    for path in (workload, tuning):
        records.files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return records
