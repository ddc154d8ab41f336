"""Default CPU schedules: correctness against PyTorch on the host, and aarch64 cross builds."""

import os

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import legalize_passes
from tvm.relax.frontend.torch import from_exported_program
from tvm.s_tir import meta_schedule as ms

from tvm_effconv import default_schedule
from tvm_effconv.build import is_scheduled, prepare
from tvm_effconv.default_schedule import SimdProfile, apply_default_schedules

# One thread each (TVM reads its variable when its thread pool starts): the machine's cores are shared.
os.environ.setdefault("TVM_NUM_THREADS", "1")
torch.set_num_threads(1)

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
AARCH64 = tvm.target.Target(
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a72", "num-cores": 4}
)


def fused_module(model, x, keep_params_as_input=False, dynamic_shapes=None):
    exported = torch.export.export(model.eval(), (x,), dynamic_shapes=dynamic_shapes)
    mod = from_exported_program(exported, keep_params_as_input=keep_params_as_input, unwrap_unit_return_tuple=True)
    return prepare(mod, HOST)


def prim_funcs(mod):
    return {gvar.name_hint: func for gvar, func in mod.functions.items() if isinstance(func, tirx.PrimFunc)}


def run(mod, target, *inputs):
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs])
    return out.numpy()


def reference(model, x):
    with torch.no_grad():
        return model.eval()(x).numpy()


def randomize_batch_norms(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return model


class ConvBnRelu(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, groups=1, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class SmallNet(nn.Module):
    """Every op kind of a CNN classifier, with odd sizes."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBnRelu(3, 13, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.depthwise = ConvBnRelu(13, 13, 3, groups=13)
        self.pointwise = ConvBnRelu(13, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, 1, 1, groups=4)
        self.head = nn.Linear(16, 17)

    def forward(self, x):
        x = self.grouped(self.pointwise(self.depthwise(self.pool(self.stem(x)))))
        return torch.softmax(self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)), dim=1)


CASES = {
    "conv3x3 s1": (nn.Conv2d(16, 32, 3, 1, 1), (1, 16, 14, 14)),
    "conv3x3 s2 +bias": (nn.Conv2d(16, 24, 3, 2, 1), (1, 16, 15, 15)),
    "conv3x3 bn relu": (ConvBnRelu(32, 64, 3), (1, 32, 28, 28)),
    "conv residual relu": (Residual(24), (1, 24, 10, 10)),
    "grouped conv": (nn.Conv2d(16, 32, 3, 1, 1, groups=4), (1, 16, 12, 12)),
    "depthwise conv s2": (nn.Conv2d(24, 24, 3, 2, 1, groups=24), (1, 24, 17, 17)),
    "conv1x1": (nn.Conv2d(32, 64, 1), (1, 32, 14, 14)),
    "conv1x1 s2": (nn.Conv2d(32, 64, 1, 2), (1, 32, 14, 14)),
    "conv7x7 s2 3ch": (nn.Conv2d(3, 16, 7, 2, 3), (1, 3, 32, 32)),
    "odd channels 3->13->17": (nn.Sequential(ConvBnRelu(3, 13, 3), ConvBnRelu(13, 17, 3)), (1, 3, 9, 9)),
    "batch 2": (ConvBnRelu(8, 16, 3), (2, 8, 10, 10)),
    "dense": (nn.Linear(512, 1000), (1, 512)),
    "dense batch 2 odd": (nn.Linear(13, 17), (2, 13)),
    "maxpool 3x3 s2": (nn.MaxPool2d(3, 2, 1), (1, 16, 28, 28)),
    "maxpool 2x2 odd": (nn.MaxPool2d(2), (2, 13, 9, 9)),
    "avgpool 3x3 s1": (nn.AvgPool2d(3, 1, 1), (1, 8, 14, 14)),
    "global avgpool": (nn.AdaptiveAvgPool2d(1), (1, 64, 7, 7)),
    "softmax": (nn.Softmax(dim=1), (2, 1000)),
    "small classifier": (SmallNet(), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_pytorch_and_schedules_everything(name):
    torch.manual_seed(0)
    model, shape = CASES[name]
    model = randomize_batch_norms(model)
    x = torch.randn(*shape)
    scheduled, failed = apply_default_schedules(fused_module(model, x), HOST)
    assert failed == []
    unscheduled = [name for name, func in prim_funcs(scheduled).items() if not is_scheduled(func)]
    assert unscheduled == []
    np.testing.assert_allclose(run(scheduled, HOST, x.numpy()), reference(model, x), rtol=1e-4, atol=1e-4)


def test_dynamic_shapes():
    """Symbolic batch and image sizes: loops with static extents are still tiled and vectorized."""
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(ConvBnRelu(3, 16, 3), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, 1, 1)))
    dims = {0: torch.export.Dim("batch", max=8), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    scheduled, failed = apply_default_schedules(
        fused_module(model, torch.randn(2, 3, 16, 16), dynamic_shapes=[dims]), HOST
    )
    assert failed == [] and all(is_scheduled(f) for f in prim_funcs(scheduled).values())
    x = torch.randn(3, 3, 12, 20)
    np.testing.assert_allclose(run(scheduled, HOST, x.numpy()), reference(model, x), rtol=1e-4, atol=1e-4)


def test_weights_as_inputs_are_not_repacked():
    """Without constant weights nothing can be packed: the conv vectorizes along the image width."""
    torch.manual_seed(0)
    model, x = nn.Conv2d(16, 32, 3, 1, 1), torch.randn(1, 16, 20, 20)
    mod = fused_module(model, x, keep_params_as_input=True)
    scheduled, failed = apply_default_schedules(mod, HOST)
    assert failed == [] and all(is_scheduled(f) for f in prim_funcs(scheduled).values())
    assert not any("prepack" in name for name in prim_funcs(scheduled))
    params = [p.detach().numpy() for p in model.parameters()]
    np.testing.assert_allclose(run(scheduled, HOST, x.numpy(), *params), reference(model, x), rtol=1e-4, atol=1e-4)


def test_constant_weights_are_packed_at_compile_time():
    model, x = nn.Conv2d(16, 32, 3, 1, 1), torch.randn(1, 16, 20, 20)
    scheduled, _ = apply_default_schedules(fused_module(model, x), HOST)
    (conv,) = prim_funcs(scheduled).values()  # the weight transform was folded into the constant
    # [O/(k*v), I, kh, kw, k, v]: v output channels per vector register (a unit O/(k*v) is dropped)
    shape = [int(d) for d in conv.params[1].ty.shape]
    assert len(shape) in (5, 6) and shape[-1] == SimdProfile.of(HOST).lanes("float32")
    assert shape[-5:-2] == [16, 3, 3] and np.prod(shape) >= 32 * 16 * 9


def test_deterministic():
    model, x = SmallNet(), torch.randn(1, 3, 32, 32)
    mod = fused_module(model, x)
    first, _ = apply_default_schedules(mod, HOST)
    second, _ = apply_default_schedules(mod, HOST)
    assert tvm_ffi.structural_equal(first, second)
    assert not any(is_scheduled(f) for f in prim_funcs(mod).values())  # the input module is not modified


def test_build_pipeline_keeps_the_schedules():
    """tvm.compile reruns LegalizeOps..FuseTIR: our functions must come out of it untouched."""
    model, x = nn.Sequential(ConvBnRelu(8, 8, 3), nn.Conv2d(8, 8, 1), nn.ReLU()), torch.randn(1, 8, 8, 8)
    scheduled, _ = apply_default_schedules(fused_module(randomize_batch_norms(model), x), HOST)
    with HOST:
        rebuilt = tvm.transform.Sequential(legalize_passes(HOST))(scheduled)
    before, after = prim_funcs(scheduled), prim_funcs(rebuilt)
    assert before.keys() == after.keys()
    for name, func in before.items():
        assert tvm_ffi.structural_equal(func, after[name]), name


def test_already_scheduled_functions_are_left_alone():
    model, x = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.MaxPool2d(2)), torch.randn(1, 4, 8, 8)
    mod = fused_module(model, x)
    marked = prim_funcs(mod)["max_pool2d"].with_attr("tirx.is_scheduled", True)
    mod["max_pool2d"] = marked
    scheduled, failed = apply_default_schedules(mod, HOST)
    assert failed == [] and scheduled["max_pool2d"].same_as(marked)
    np.testing.assert_allclose(run(scheduled, HOST, x.numpy()), reference(model, x), rtol=1e-4, atol=1e-4)


def test_tuning_records_take_precedence():
    model, x = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.MaxPool2d(2)), torch.randn(1, 4, 8, 8)
    mod = fused_module(model, x)
    pool = prim_funcs(mod)["max_pool2d"]
    workload_mod = tvm.IRModule({"main": pool.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)})
    record = tvm.s_tir.Schedule(workload_mod)
    record.parallel(record.get_loops(record.get_sblock("pool_max"))[1])
    database = ms.database.MemoryDatabase()
    workload = database.commit_workload(workload_mod)
    args = ms.arg_info.ArgInfo.from_prim_func(pool)
    database.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, [1e-3], HOST, args))

    scheduled, failed = apply_default_schedules(mod, HOST, database=database)
    assert failed == []
    assert tvm_ffi.structural_equal(scheduled["max_pool2d"].body, record.mod["main"].body)
    assert all(is_scheduled(f) for name, f in prim_funcs(scheduled).items() if name != "max_pool2d")
    np.testing.assert_allclose(run(scheduled, HOST, x.numpy()), reference(model, x), rtol=1e-4, atol=1e-4)


def test_a_failing_function_is_reported_and_left_unscheduled(monkeypatch):
    model, x = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.MaxPool2d(2)), torch.randn(1, 4, 8, 8)
    mod = fused_module(model, x)
    real = default_schedule.default_schedule

    def fail_on_pool(func, target, constant_params=()):
        if "pool_max" in func.script():
            raise tvm.s_tir.ScheduleError("injected")
        return real(func, target, constant_params)

    monkeypatch.setattr(default_schedule, "default_schedule", fail_on_pool)
    scheduled, failed = apply_default_schedules(mod, HOST)
    assert failed == ["max_pool2d"]
    assert scheduled["max_pool2d"].same_as(mod["max_pool2d"])
    np.testing.assert_allclose(run(scheduled, HOST, x.numpy()), reference(model, x), rtol=1e-4, atol=1e-4)


def test_module_of_one_prim_func():
    """MetaSchedule tasks are modules holding one private PrimFunc "main" and no Relax function."""
    (conv,) = prim_funcs(fused_module(nn.Conv2d(8, 16, 3, 1, 1), torch.randn(1, 8, 10, 10))).values()
    scheduled, failed = apply_default_schedules(tvm.IRModule({"main": conv}), HOST)
    assert failed == [] and is_scheduled(scheduled["main"])


def test_rejects_non_cpu_targets():
    model, x = nn.Conv2d(4, 8, 3), torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="llvm target"):
        apply_default_schedules(fused_module(model, x), tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))


@pytest.mark.parametrize("name", ["small classifier", "conv3x3 bn relu", "dense batch 2 odd", "softmax"])
def test_aarch64_builds(name):
    model, shape = CASES[name]
    scheduled, failed = apply_default_schedules(fused_module(model, torch.randn(*shape)), AARCH64)
    assert failed == []
    assert all(is_scheduled(f) for f in prim_funcs(scheduled).values())
    tvm.compile(scheduled, target=AARCH64)
