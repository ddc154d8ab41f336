"""Tuning records: tune end to end on the host, apply, reuse, and survive bad record folders."""

import json
import shutil

import numpy as np
import pytest
import torch
import tvm

from tvm_effconv.compile import compile_model
from tvm_effconv.device import emulator
from tvm_effconv.errors import EffconvError
from tvm_effconv.schedule_rules import RULES, apply_default_rules, register_rule
from tvm_effconv.targets import get_preset
from tvm_effconv.tune import merge_into_records, prune, record_default_schedules, tune_model
from tvm_effconv.tuning import (
    DEFAULTS_FILE,
    RECORD_FILE,
    UNMEASURED_SECONDS,
    WORKLOAD_FILE,
    load_records,
    mean_seconds,
    tuned_database,
)

TINY = f"{__name__}:tiny_conv"


def tiny_conv():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()).eval()
    return model, (torch.randn(1, 8, 10, 10),)


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A real (short) tuning run of a tiny model on the host; returns (records folder, report, log)."""
    folder = tmp_path_factory.mktemp("records") / "host"
    lines = []
    report = tune_model(TINY, "host", trials=2, records=str(folder), log=lines.append)
    return folder, report, lines


def test_tuning_writes_records_and_reports_progress(tuned):
    folder, report, lines = tuned
    assert (folder / WORKLOAD_FILE).is_file() and (folder / RECORD_FILE).is_file()
    assert report.tasks and all(t.trials >= 2 for t in report.tasks)
    assert all(t.untuned_ms and t.tuned_ms for t in report.tasks)
    assert any("trials, best" in line and "remaining" in line for line in lines)
    table = report.table()
    assert "untuned ms" in table and "speed-up" in table


def test_compile_applies_the_records_without_tuning(tuned, tmp_path):
    folder, report, _ = tuned
    out = compile_model(TINY, "host", tmp_path / "a", records=str(folder), require_records=True, log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    records = manifest["records"]
    # each workload: its tuned record, or the default schedule where that measured faster
    assert records["missing"] == [] and records["applied"] + records["default_by_measurement"]
    assert manifest["verification"]["status"] == "passed"


def test_rerun_resumes_and_skips_tuned_tasks(tuned):
    folder, report, _ = tuned
    again = tune_model(TINY, "host", trials=2, records=str(folder), log=quiet)
    assert all("skipped" in t.note for t in again.tasks)


def test_require_records_names_missing_workloads_and_the_fix(tuned, tmp_path):
    folder, _, _ = tuned
    with pytest.raises(EffconvError, match=r"no applicable record.*re-tune: python -m tvm_effconv.tune"):
        compile_model("tvm_effconv.models.examples:small_cnn", "host", tmp_path / "x", records=str(folder),
                      require_records=True, log=quiet)
    assert not (tmp_path / "x").exists()


def _copy(folder, tmp_path):
    """The tuned records, without the verdicts where the default schedule measured faster (which of the
    two wins a 2-trial run is a coin toss): every record applies."""
    copy = tmp_path / "host"
    shutil.copytree(folder, copy)
    (copy / DEFAULTS_FILE).unlink(missing_ok=True)
    return copy


def test_corrupt_lines_and_foreign_files_are_reported_and_skipped(tuned, tmp_path):
    folder = _copy(tuned[0], tmp_path)
    with open(folder / RECORD_FILE, "a") as f:
        f.write('{"truncated": \n')
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    found = load_records(folder, get_preset("host").target)
    assert found.database is not None and found.records >= 1
    text = " ".join(found.problems)
    assert "corrupt" in text and "notes.bin" in text
    out = compile_model(TINY, "host", tmp_path / "a", records=str(folder), require_records=True, log=quiet)
    assert json.loads((out / "manifest.json").read_text())["records"]["problems"]


def test_records_of_another_target_are_not_applied(tuned, tmp_path):
    folder = _copy(tuned[0], tmp_path)
    # Pretend the records were tuned for a Cortex-A72: same workload, another target. A record line is
    # [workload index, [trace, run times, target, argument info]].
    records = [json.loads(line) for line in (folder / RECORD_FILE).read_text().splitlines()]
    for _, (_, _, target, _) in records:
        target.update({"mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    (folder / RECORD_FILE).write_text("".join(json.dumps(record) + "\n" for record in records))
    found = load_records(folder, get_preset("host").target)
    assert found.database is None
    assert any("another target" in p for p in found.problems)


def test_one_folder_keeps_the_records_of_several_cpus(tuned, tmp_path):
    folder = _copy(tuned[0], tmp_path)
    target = get_preset("host").target
    ours = load_records(folder, target)
    # The same records as if tuned on another x86 CPU too: one folder serves both machines.
    records = [json.loads(line) for line in (folder / RECORD_FILE).read_text().splitlines()]
    for _, (_, _, other, _) in records:
        other["mcpu"] = "cascadelake"
    with (folder / RECORD_FILE).open("a") as file:
        file.write("".join(json.dumps(record) + "\n" for record in records))
    found = load_records(folder, target)
    assert found.records == ours.records and found.problems == []
    assert any("another target" in note and "cascadelake" in note for note in found.notes)
    prune(folder, target, quiet)  # keeps the best per workload *and target*
    assert len((folder / RECORD_FILE).read_text().splitlines()) == 2 * ours.workloads
    cascadelake = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    assert load_records(folder, cascadelake).records == ours.workloads
    out = compile_model(TINY, "host", tmp_path / "a", records=str(folder), require_records=True, log=quiet)
    assert json.loads((out / "manifest.json").read_text())["records"]["notes"]


def test_a_default_schedule_that_measured_faster_is_kept_and_counts_as_covered(tuned, tmp_path):
    from tvm_effconv.tuning import target_identity, workload_key

    folder = _copy(tuned[0], tmp_path)
    target = get_preset("host").target
    before = load_records(folder, target)
    (record, *_) = before.database.get_all_tuning_records()
    key = workload_key(record.workload.mod)
    entry = {"workload_key": key, "task": "t", "target": target_identity(target), "default_ms": 0.01, "tuned_ms": 0.02}
    merge_into_records(folder, None, target, quiet, verdicts={key: entry})
    found = load_records(folder, target)
    assert set(found.defaults) == {key} and found.records == before.records - 1
    assert found.superseded is not None  # MetaSchedule's record is kept for comparisons, not applied
    assert len(tuned_database(found).get_all_tuning_records()) == before.records

    out = compile_model(TINY, "host", tmp_path / "a", records=str(folder), require_records=True, log=quiet)
    records = json.loads((out / "manifest.json").read_text())["records"]
    assert records["missing"] == [] and records["default_by_measurement"]
    assert not set(records["default_by_measurement"]) & set(records["applied"])

    merge_into_records(folder, None, target, quiet, verdicts={key: None})  # a later run's tuning won
    assert not (folder / DEFAULTS_FILE).exists() and load_records(folder, target).records == before.records


def test_a_records_folder_of_garbage_never_crashes_compile(tmp_path):
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / WORKLOAD_FILE).write_text("not json\n[1, 2]\n")
    (folder / RECORD_FILE).write_text("[0, [1]]\n[7, []]\n")
    out = compile_model(TINY, "host", tmp_path / "a", records=str(folder), log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"]["applied"] == [] and len(manifest["records"]["problems"]) >= 3
    assert manifest["verification"]["status"] == "passed"


def test_prune_keeps_the_best_record_per_workload(tuned, tmp_path):
    folder = _copy(tuned[0], tmp_path)
    target = get_preset("host").target
    lines = (folder / RECORD_FILE).read_text().splitlines()
    (folder / RECORD_FILE).write_text("\n".join(lines + lines) + "\n")  # duplicates: twice the records
    before = load_records(folder, target)
    prune(folder, target, quiet)
    after = load_records(folder, target)
    assert after.records == after.workloads <= before.workloads < before.records
    assert not list(tmp_path.glob(".host.*"))  # no staging folder left


@pytest.mark.emulated
def test_tuning_through_a_tracker_on_the_emulated_device(rpc_tracker, tmp_path):
    folder, lines = tmp_path / "arm-a72", []
    with emulator.start("cortex-a72", tracker=rpc_tracker, key="tune-a72"):
        report = tune_model(TINY, "arm-a72", trials=2, records=str(folder), tracker=rpc_tracker, key="tune-a72",
                            log=lines.append)
    assert report.emulated and any("mean nothing" in line for line in lines)
    assert report.tasks and all(t.trials >= 2 and t.tuned_ms for t in report.tasks)
    found = load_records(folder, get_preset("arm-a72").target)
    # Every task ends as a record, or as the verdict that the default measured faster (record kept aside).
    assert found.records + len(found.defaults) >= len(report.tasks) and found.problems == []


def test_tuning_an_arm_preset_needs_a_tracker():
    with pytest.raises(EffconvError, match="--rpc-tracker"):
        tune_model(TINY, "arm-a72", trials=1, log=quiet)


def test_tuning_cuda_without_a_gpu_names_the_ways_out():
    if __import__("tvm").cuda(0).exist:
        pytest.skip("this machine has a GPU: tuning for cuda measures on it")
    with pytest.raises(EffconvError, match="--builder-only"):
        tune_model(TINY, "cuda", trials=1, log=quiet)


def test_cpu_builder_only_entries_keep_the_default_and_say_it_was_not_measured(tmp_path):
    folder, lines = tmp_path / "arm", []
    report = record_default_schedules(TINY, "arm-a72", records=str(folder), log=lines.append)
    assert report.tasks and all("builder-only" in t.note for t in report.tasks)
    found = load_records(folder, get_preset("arm-a72").target)
    assert len(found.defaults) == len(report.tasks) and found.problems == []
    assert all(e["default_ms"] is None and e["tuned_ms"] is None for e in found.defaults.values())

    out = compile_model(TINY, "arm-a72", tmp_path / "a", records=str(folder), require_records=True,
                        run_verify=False, log=lines.append)
    records = json.loads((out / "manifest.json").read_text())["records"]
    assert records["missing"] == [] and records["default_by_measurement"] == []
    assert len(records["default_builder_only"]) == len(report.tasks)
    assert any("builder-only" in line and "tune on a device" in line for line in lines)
    # Another run keeps what is there rather than building it again.
    again = record_default_schedules(TINY, "arm-a72", records=str(folder), log=lines.append)
    assert all(t.note == "has a record (kept)" for t in again.tasks)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA candidates cannot be built")
def test_builder_only_records_apply_and_lose_to_measured_ones(tmp_path):
    folder, lines = tmp_path / "cuda", []
    report = record_default_schedules(TINY, "cuda", records=str(folder), log=lines.append)
    assert report.tasks and all("builder-only" in t.note for t in report.tasks)
    target = get_preset("cuda").target
    found = load_records(folder, target)
    assert found.records == found.unmeasured == len(report.tasks)

    out = compile_model(TINY, "cuda", tmp_path / "a", records=str(folder), require_records=True, log=lines.append)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"]["missing"] == [] and manifest["records"]["applied"]
    assert manifest["records"]["unmeasured"] == len(report.tasks)
    assert any("builder-only" in line and "tune on a device" in line for line in lines)

    # A measured record of the same workload (here: the same trace with a real time) replaces it on merge.
    from tvm.s_tir import meta_schedule as ms

    (record, *_) = found.database.get_all_tuning_records()
    measured = ms.database.MemoryDatabase()
    measured.commit_tuning_record(ms.database.TuningRecord(
        record.trace, measured.commit_workload(record.workload.mod), [__import__("tvm").tirx.FloatImm("float64", 1e-4)],
        record.target, record.args_info))
    merge_into_records(folder, None, target, quiet, extra=[measured])
    merged = load_records(folder, target)
    assert merged.records == found.records and merged.unmeasured == found.unmeasured - 1
    assert min(mean_seconds(r.run_secs) for r in merged.database.get_all_tuning_records()) < UNMEASURED_SECONDS


def test_one_workload_spelled_with_other_block_names_keeps_both_records_valid(tmp_path):
    """TOPI names a reduction after its input (lv69_red, lv96_red): two models' means are one workload by
    structural hash, which ignores names, and the database stores it once; the second model's record must
    still replay (its trace, rfactor's new block included, refers to the stored names)."""
    from tvm import te, topi
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir import Schedule

    from tvm_effconv.tuning import write_records

    def mean_module(name):
        x = te.placeholder((1, 64, 7, 7), name=name)
        return tvm.IRModule({"main": te.create_prim_func([x, topi.sum(x, axis=[2, 3], keepdims=True)])})

    target = get_preset("host").target
    records = []
    for name, seconds in (("lv96", 2e-6), ("lv69", 1e-6)):
        mod = mean_module(name)
        sch = Schedule(mod)
        block = sch.get_sblock(f"{name}_red")
        inner, = sch.split(sch.get_loops(block)[-1], [None, 7])[1:]
        sch.get_sblock(sch.get(sch.rfactor(inner, 0)).name_hint)  # a block the trace creates, found by name
        records.append(ms.database.TuningRecord(
            sch.trace, ms.database.Workload(mod), [tvm.tirx.FloatImm("float64", seconds)], target,
            ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    assert "lv69_red_rf" in str(records[1].trace)
    write_records(tmp_path / "host", sorted(records, key=lambda r: mean_seconds(r.run_secs), reverse=True))
    found = load_records(tmp_path / "host", target)
    assert found.problems == [] and found.records == 2 and found.workloads == 1
    best = min(found.database.get_all_tuning_records(), key=lambda r: mean_seconds(r.run_secs))
    assert "lv96_red_rf" in str(best.trace)  # the lv69 record, now naming the stored workload's blocks
    sch = Schedule(best.workload.mod)
    best.trace.apply_to_schedule(sch, remove_postproc=False)
    sch.get_sblock("lv96_red_rf")  # replayed: rfactor made it


# --- custom schedule rules: the mechanism the op issues plug into ----------------------------------


def _tagged_matmul(n=32):
    from tvm import te

    a = te.placeholder((n, n), name="A")
    b = te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C",
                   attrs={"schedule_rule": "effconv_test_matmul"})
    return te.create_prim_func([a, b, c])


@pytest.fixture(scope="module")
def matmul_rule():
    if ("effconv_test_matmul", "cpu") not in RULES:

        @register_rule("effconv_test_matmul", ["cpu"], variants=("row_major", "col_split"))
        def schedule_matmul(sch, block, knobs, variant):
            i, j, k = sch.get_loops(block)
            i0, i1 = sch.split(i, knobs.tile(i, 2, default=[4, 8]))
            j0, j1 = sch.split(j, knobs.tile(j, 2, default=[2, 16]))
            if variant == "row_major":
                sch.reorder(i0, j0, k, i1, j1)
            else:
                sch.reorder(j0, i0, k, i1, j1)
            sch.vectorize(j1)

    return RULES[("effconv_test_matmul", "cpu")]


def test_default_rule_schedules_and_computes_correctly(matmul_rule):
    import tvm

    target = get_preset("host").target
    mod, scheduled = apply_default_rules(tvm.IRModule({"main": _tagged_matmul()}), target)
    assert scheduled == ["main"] and mod["main"].attrs["tirx.is_scheduled"]
    assert "T.vectorized(16)" in mod["main"].script()
    lib = tvm.compile(mod, target=target)
    a, b = np.random.rand(32, 32).astype("float32"), np.random.rand(32, 32).astype("float32")
    c = tvm.runtime.tensor(np.zeros((32, 32), "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-5)


def test_rule_knobs_are_sampled_in_the_design_space(matmul_rule):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mod = tvm.IRModule({"main": _tagged_matmul()})
    context = ms.TuneContext(mod=mod, target=get_preset("host").target, space_generator="post-order-apply",
                             task_name="mm")
    spaces = context.generate_design_space()
    assert len(spaces) == 2  # one sketch per variant
    for space in spaces:
        kinds = [inst.kind.name for inst in space.trace.insts]
        assert kinds.count("SamplePerfectTile") >= 2
