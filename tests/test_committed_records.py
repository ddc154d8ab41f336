"""CI compiles the bundled examples from the committed tuning records, with zero tuning."""

import json
import subprocess
import sys

import pytest
from tvm.s_tir import meta_schedule as ms

from tvm_effconv.compile import compile_model
from tvm_effconv.targets import get_preset
from tvm_effconv.tuning import SCHEDULES_DIR, target_identity

# The bundled example and the reference network of each op (scripts/tune_records.sh tunes these).
MODELS = [
    "tvm_effconv.models.examples:small_cnn",
    "tvm_effconv.models.resnet:resnet18_dsconv_small",
    "tvm_effconv.models.resnet:resnet18_dsq_small_2bit",
    "tvm_effconv.models.lccl_resnet:lccl_resnet18_small",
    "tvm_effconv.models.vargnet:vargnet_small",
]
EXAMPLE = MODELS[0]
# Host records are tuned for one CPU model (LLVM's mcpu, the build machine's): LLVM cpu -> models.
HOST_COVERED = {
    "znver2": ["tvm_effconv.models.resnet:resnet18"],  # the README's tuned-against-untuned figure
    # VarGNet's znver5 records predate the branch-free PReLU, which changed its workloads: re-tune on a Zen 5.
    "znver5": MODELS[:4],
    "rocketlake": [EXAMPLE, "tvm_effconv.models.vargnet:vargnet_small"],  # Intel Xeon (AVX-512 VNNI)
}
# Preset -> the models whose every workload has a committed record, or a default-schedule entry (measured
# faster than tuning, or builder-only), in schedules/<preset>/.
COVERED = {
    "host": sorted({m for models in HOST_COVERED.values() for m in models}),
    # The example measured on the emulated device (plumbing only); the reference networks builder-only.
    "arm-a72": MODELS,
    "arm-a76": MODELS,
    "cuda": MODELS,  # builder-only: compiled to a fatbin, not run (see its README)
}


def test_every_covered_preset_has_a_records_folder():
    assert {p.name for p in SCHEDULES_DIR.iterdir() if p.is_dir()} >= set(COVERED)


def test_committed_records_read_back_whole_in_a_fresh_process():
    # A trace names the tensor intrinsics its schedule used; in a fresh process none of our rules has run
    # yet to register them (CUDA's dp4a records were once all skipped as invalid this way).
    script = (
        "import json, sys\n"
        "from tvm_effconv.targets import get_preset\n"
        "from tvm_effconv.tuning import SCHEDULES_DIR, load_records\n"
        "print(json.dumps({p: load_records(SCHEDULES_DIR / p, get_preset(p).target).problems for p in sys.argv[1:]}))\n"
    )
    presets = [p for p in COVERED if p != "host"]
    done = subprocess.run([sys.executable, "-c", script, *presets], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {p: [] for p in presets}


# The example's ARM builds are verified on the emulated device with the preset's CPU (records must also
# be correct); the reference networks' ARM builds are verified by their own tests, here only compiled.
CASES = [pytest.param(p, m, marks=[pytest.mark.emulated] if p.startswith("arm") and m == EXAMPLE else [])
         for p, models in COVERED.items() for m in models]


@pytest.mark.parametrize("preset, model", CASES)
def test_committed_records_cover_and_apply(preset, model, tmp_path, monkeypatch):
    def no_tuning(*_args, **_kwargs):
        raise AssertionError("compile must never tune")

    target = get_preset(preset).target
    cpu = target_identity(target).get("mcpu")
    if preset == "host" and model not in HOST_COVERED.get(cpu, []):
        tuned_on = [c for c, models in HOST_COVERED.items() if model in models]
        pytest.skip(f"the committed host records of {model} were tuned on LLVM cpu {', '.join(tuned_on)}; this "
                    f"machine is {cpu}: tune here with python -m tvm_effconv.tune {model} --target host")
    monkeypatch.setattr(ms.tune, "tune_tasks", no_tuning)
    monkeypatch.setattr(ms.relax_integration, "tune_relax", no_tuning)
    verify = not preset.startswith("arm") or model == EXAMPLE
    out = compile_model(model, preset, tmp_path / preset, require_records=True, run_verify=verify,
                        log=lambda _msg: None)
    manifest = json.loads((out / "manifest.json").read_text())
    status = "compiled" if preset == "cuda" else "passed" if verify else "skipped"
    assert manifest["verification"]["status"] == status
    records = manifest["records"]
    assert records["problems"] == [] and records["missing"] == []
    assert records["applied"] + records["default_by_measurement"] + records["default_builder_only"]
    assert set(records["files"]) == {"database_workload.json", "database_tuning_record.json"}
