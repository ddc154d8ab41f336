"""CI compiles the bundled examples from the committed tuning records, with zero tuning."""

import json

import pytest
from tvm.s_tir import meta_schedule as ms

from tvm_effconv.compile import compile_model
from tvm_effconv.targets import get_preset
from tvm_effconv.tuning import SCHEDULES_DIR, load_records

# Preset -> the models whose every workload has a committed record in schedules/<preset>/.
COVERED = {
    "host": ["tvm_effconv.models.examples:small_cnn"],
    "arm-a72": ["tvm_effconv.models.examples:small_cnn"],  # emulated: plumbing only (see its README)
    "arm-a76": ["tvm_effconv.models.examples:small_cnn"],
}


def test_every_covered_preset_has_a_records_folder():
    assert {p.name for p in SCHEDULES_DIR.iterdir() if p.is_dir()} >= set(COVERED)


# ARM builds are verified on the emulated device with the preset's CPU: records must also be correct.
CASES = [pytest.param(p, m, marks=[pytest.mark.emulated] if p.startswith("arm") else [])
         for p, models in COVERED.items() for m in models]


@pytest.mark.parametrize("preset, model", CASES)
def test_committed_records_cover_and_apply(preset, model, tmp_path, monkeypatch):
    def no_tuning(*_args, **_kwargs):
        raise AssertionError("compile must never tune")

    found = load_records(SCHEDULES_DIR / preset, get_preset(preset).target)
    if preset == "host" and found.database is None and any("another target" in p for p in found.problems):
        # Host records are tuned for one CPU model (the preset's mcpu is the build machine's).
        pytest.skip("the committed host records were tuned on another CPU model: " + found.problems[0])
    monkeypatch.setattr(ms.tune, "tune_tasks", no_tuning)
    monkeypatch.setattr(ms.relax_integration, "tune_relax", no_tuning)
    out = compile_model(model, preset, tmp_path / preset, require_records=True, log=lambda _msg: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "passed"
    records = manifest["records"]
    assert records["problems"] == [] and records["missing"] == [] and records["applied"]
    assert set(records["files"]) == {"database_workload.json", "database_tuning_record.json"}
