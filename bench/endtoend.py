"""End-to-end latency of the reference networks, ours against what a user would run instead, in one run.

Ours: each network through the build of ``python -m tvm_effconv.compile`` for the ``host`` preset (export,
the effconv frontend, the committed records of ``schedules/host`` where a workload has one, default schedules
elsewhere), run in the Relax VM and checked against the network's eager PyTorch output with the tolerances of
``tvm_effconv.verify``.

Peers run the network's float counterpart, what a user without our ops deploys: the float ResNet-18 the
DSQ, DSConv and LCCL networks were converted from (an effconv op's eager implementation is a reference, not
a deployment path), and VarGNet as its standard layers (grouped convs, batch norms, PReLUs):

- PyTorch fp32: eager, ``torch.inference_mode``;
- PyTorch int8: FX graph-mode post-training quantization (``prepare_fx``/``convert_fx``) with
  ``get_default_qconfig_mapping("x86")`` on the x86 quantized engine, calibrated on random images;
- ONNX Runtime fp32: the network exported with ``torch.onnx.export``, CPU execution provider;
- ONNX Runtime int8: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, MinMax calibration on the same images; ``reduce_range`` on CPUs without VNNI, where
  ``vpmaddubsw`` would saturate);
- TVM + MetaSchedule: the float network through TVM's own importer and ``compile_relax`` with the same
  records (MetaSchedule alone: no effconv op, no default schedule). Only measured when every workload has
  a record, i.e. the tuning budget is the one ours got; otherwise n/a, with the coverage.

A peer that cannot be built says so (n/a, with the reason) instead of disappearing.
"""

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common import Timed, measure

SYSTEMS = {
    "ours": "tvm-effconv (our build, records where present, default schedules elsewhere)",
    "torch_fp32": "PyTorch fp32 eager",
    "torch_int8": "PyTorch int8 (FX post-training quantization, x86 engine)",
    "ort_fp32": "ONNX Runtime fp32",
    "ort_int8": "ONNX Runtime int8 (quantize_static, QDQ)",
    "tvm_ms": "TVM + MetaSchedule alone (float network, same records)",
}
PEERS = [key for key in SYSTEMS if key != "ours"]

# --quick: narrow, 32x32 networks; the ResNets keep their first blocks only (stage 1 and the strided first
# block of stage 2, with its downsample), so that every layer type compiles in seconds.
QUICK_RESNET = {"size": 32, "width": 16, "num_classes": 10}
QUICK_BLOCKS = 3
CALIBRATION_BATCHES = {True: 2, False: 8}


@dataclass(frozen=True)
class Network:
    key: str
    label: str
    build: Callable[[bool], tuple]  # quick -> (model, example inputs)
    counterpart: str  # key of FLOAT_NETWORKS


def _first_blocks(model, inputs):
    """The ResNet with only its first QUICK_BLOCKS basic blocks, and a classifier of the matching width."""
    import torch
    from torch import nn

    model.layers = model.layers[:QUICK_BLOCKS]
    with torch.no_grad():
        channels = model.layers(model.stem(inputs[0])).shape[1]
    torch.manual_seed(0)
    model.fc = nn.Linear(channels, model.fc.out_features)
    return model.eval(), inputs


def _resnet(factory, **options):
    def build(quick):
        if quick:
            return _first_blocks(*factory(**options, **QUICK_RESNET))
        return factory(**options)

    return build


def _vargnet(quick):
    from tvm_effconv.models import vargnet

    return vargnet.vargnet_small() if quick else vargnet.vargnet()


def _models():
    from tvm_effconv.models import lccl_resnet, resnet

    return {
        "resnet18_fp32": Network("resnet18_fp32", "ResNet-18 fp32", _resnet(resnet.resnet18), "resnet18"),
        "resnet18_dsq4": Network("resnet18_dsq4", "ResNet-18 DSQ 4/4", _resnet(resnet.resnet18_dsq, bits=4), "resnet18"),
        "resnet18_dsq2": Network("resnet18_dsq2", "ResNet-18 DSQ 2/2", _resnet(resnet.resnet18_dsq, bits=2), "resnet18"),
        "resnet18_dsconv4": Network("resnet18_dsconv4", "ResNet-18 DSConv 4-bit (blocks of 64)",
                                    _resnet(resnet.resnet18_dsconv, bits=4, block=64), "resnet18"),
        "lccl_resnet18": Network("lccl_resnet18", "LCCL ResNet-18 (50% mask zeros)",
                                 _resnet(lccl_resnet.lccl_resnet18, sparsity=0.5), "resnet18"),
        "vargnet": Network("vargnet", "VarGNet", _vargnet, "vargnet"),
    }


NETWORK_KEYS = ["resnet18_fp32", "resnet18_dsq4", "resnet18_dsq2", "resnet18_dsconv4", "lccl_resnet18", "vargnet"]
FLOAT_NETWORKS = {"resnet18": "ResNet-18 fp32 (float network of the ResNet rows)", "vargnet": "VarGNet fp32, standard layers"}


def _float_network(key, quick, stack: contextlib.ExitStack):
    from tvm_effconv.models import resnet
    from tvm_effconv.nn.varg import standard_layers

    if key == "resnet18":
        return _resnet(resnet.resnet18)(quick)
    model, inputs = _vargnet(quick)
    stack.enter_context(standard_layers(model))  # for as long as the suite runs
    return model, inputs


def count_macs(model, inputs) -> int:
    """Multiply-accumulates of one forward pass: every nn.Conv2d and nn.Linear, from their output shapes."""
    import torch
    from torch import nn

    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        total += output.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


@dataclass
class System:
    """One system's result for one network: a Timed measurement, or why there is none."""

    status: str  # "measured", "n/a" or "failed"
    detail: str = ""
    timed: Timed | None = None
    extra: dict = field(default_factory=dict)


def _not_available(err: Exception) -> System:
    lines = str(err).strip().splitlines()
    return System("n/a", f"{type(err).__name__}: {lines[0] if lines else ''}")


class Suite:
    def __init__(self, quick: bool, threads: int, records: Path, log=print):
        import tvm

        from tvm_effconv.targets import get_preset
        from tvm_effconv.tuning import load_records

        self.quick, self.threads, self.log = quick, threads, log
        self.preset = get_preset("host")
        self.device = tvm.cpu()
        self.records = load_records(records, self.preset.target)
        self.records_dir = records
        self.stack = contextlib.ExitStack()
        self.work = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="tvm-effconv-bench-")))

    def close(self):
        self.stack.close()

    # --- ours ---

    def ours(self, network: Network) -> tuple[System, dict]:
        import torch
        import tvm
        from tvm import relax

        from tvm_effconv import build, frontend, verify

        model, inputs = network.build(self.quick)
        started = time.perf_counter()
        with torch.no_grad():
            exported = torch.export.export(model, inputs)
        executable, report = build.build(frontend.to_relax(exported, self.preset.target), self.preset,
                                         self.records.database, self.records.defaults)
        vm = relax.VirtualMachine(executable, self.device)
        quantized = frontend.quantized_ops(exported)
        rtol = verify.QUANTIZED_RTOL if quantized else verify.RTOL
        comparison = verify.compare(verify.run_vm(executable, self.device, [x.numpy() for x in inputs]),
                                    verify.reference_outputs(model, inputs), rtol)
        info = {
            "compile_s": time.perf_counter() - started,
            "workloads": len(report.from_records) + len(report.default_schedule) + len(report.unscheduled),
            "from_records": len(report.from_records),
            "default_schedule": len(report.default_schedule),
            "unscheduled": report.unscheduled,
            "kernel_variants": sorted({v["rule"] + (f" {v['intrinsic']}" if "intrinsic" in v else "")
                                       for v in report.kernel_variants}),
            "verification": {"max_abs_error": comparison.max_abs_error, "tolerance": comparison.tolerance,
                             "passed": comparison.passed, "against": "the network's eager PyTorch output"},
        }
        if not comparison.passed:
            return System("failed", f"compiled output differs from PyTorch: max abs error {comparison.max_abs_error:.3g} > "
                                    f"{comparison.tolerance:.3g}"), info
        data = tvm.runtime.tensor(inputs[0].numpy())
        timer = Timed(tvm_timer=lambda number: vm.time_evaluator("main", self.device, number=number, repeat=1,
                                                                 min_repeat_ms=0), tvm_args=(data,))
        detail = (f"records for {info['from_records']} of {info['workloads']} workloads, default schedules for "
                  f"{info['default_schedule']}; verified (max abs error {comparison.max_abs_error:.2g})")
        return System("measured", detail, timer), info

    # --- peers, on the float counterpart ---

    def peers(self, key: str) -> tuple[dict, dict]:
        """Every peer of float network ``key``: {peer: System}, and facts about the network."""
        import torch

        model, inputs = _float_network(key, self.quick, self.stack)
        generator = torch.Generator().manual_seed(11)
        calibration = [torch.randn(inputs[0].shape, generator=generator) for _ in range(CALIBRATION_BATCHES[self.quick])]
        with torch.no_grad():
            reference = model(*inputs).numpy()
        facts = {"label": FLOAT_NETWORKS[key], "macs": count_macs(model, inputs),
                 "input_shape": list(inputs[0].shape)}
        builders = {
            "torch_fp32": lambda: self._torch_fp32(model, inputs),
            "torch_int8": lambda: self._torch_int8(model, inputs, calibration),
            "ort_fp32": lambda: self._onnx_runtime(key, model, inputs, None),
            "ort_int8": lambda: self._onnx_runtime(key, model, inputs, calibration),
            "tvm_ms": lambda: self._tvm_metaschedule(model, inputs),
        }
        systems = {}
        for peer, make in builders.items():
            self.log(f"  peer {peer} on {key}")
            try:
                systems[peer] = make()
            except Exception as err:  # a peer that cannot be built is reported, not hidden
                systems[peer] = _not_available(err)
            if systems[peer].timed is not None:
                got = systems[peer].extra.pop("output")
                systems[peer].extra["max_rel_error_vs_fp32"] = float(abs(got - reference).max() / abs(reference).max())
        return systems, facts

    def _torch_fp32(self, model, inputs):
        import torch

        with torch.inference_mode():
            output = model(*inputs).numpy()
        return System("measured", "eager, torch.inference_mode", Timed(lambda: model(*inputs)), {"output": output})

    def _torch_int8(self, model, inputs, calibration):
        import copy
        import warnings

        import torch
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices: this is the peer
            prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), inputs)
            with torch.no_grad():
                for batch in calibration:
                    prepared(batch)
            quantized = convert_fx(prepared)
        with torch.inference_mode():
            output = quantized(*inputs).numpy()
        return System("measured", f"FX graph mode, x86 qconfig mapping, calibrated on {len(calibration)} random images",
                      Timed(lambda: quantized(*inputs)), {"output": output})

    def _onnx_runtime(self, key, model, inputs, calibration):
        import warnings

        import onnxruntime as ort
        import torch

        fp32_path = self.work / f"{key}-fp32.onnx"
        if not fp32_path.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated, not broken
                torch.onnx.export(model, inputs, str(fp32_path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["output"])
        path, detail = fp32_path, f"onnxruntime {ort.__version__}, CPU execution provider"
        if calibration is not None:
            path, quantization = self._quantize_onnx(key, fp32_path, calibration)
            detail += f"; {quantization}"
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"input": inputs[0].numpy()}
        output = session.run(None, feed)[0]
        return System("measured", detail, Timed(lambda: session.run(None, feed)), {"output": output})

    def _quantize_onnx(self, key, fp32_path, calibration):
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
        from peak import cpu_flags

        class Images(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"input": batch.numpy()} for batch in calibration])

            def get_next(self):
                return next(self.batches, None)

        prepared, int8_path = self.work / f"{key}-prepared.onnx", self.work / f"{key}-int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        reduce_range = not any("vnni" in flag for flag in cpu_flags())
        quantize_static(str(prepared), str(int8_path), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
        return int8_path, (f"QDQ, per-channel int8 weights, uint8 activations{', reduce_range' if reduce_range else ''}, "
                           f"MinMax calibration on {len(calibration)} random images")

    def _tvm_metaschedule(self, model, inputs):
        import torch
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program
        from tvm.s_tir import meta_schedule as ms

        from tvm_effconv.build import is_scheduled, prepare
        from tvm_effconv.tuning import tuned_database

        database = tuned_database(self.records)  # MetaSchedule's best, also where our default was faster
        if database is None:
            why = f": {self.records.problems[0]}" if self.records.problems else ""
            return System("n/a", f"no usable MetaSchedule records in {self.records_dir}{why}")
        with torch.no_grad():
            exported = torch.export.export(model, inputs).run_decompositions()
        mod = from_exported_program(exported, keep_params_as_input=False, unwrap_unit_return_tuple=True)
        target = self.preset.target
        with target, database:
            applied = relax.transform.MetaScheduleApplyDatabase()(prepare(mod, target))
        functions = [f for f in applied.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
        covered = sum(is_scheduled(f) for f in functions)
        coverage = f"records for {covered} of {len(functions)} workloads"
        if covered < len(functions):
            return System("n/a", f"{coverage} in {self.records_dir}: MetaSchedule alone leaves the rest unscheduled "
                                 "(TVM's CPU pipeline schedules nothing), so it did not get the tuning budget ours got; "
                                 "tune the float network to measure it", extra={"coverage": [covered, len(functions)]})
        executable = ms.relax_integration.compile_relax(database, mod, target, params=None)
        vm = relax.VirtualMachine(executable, self.device)
        data = tvm.runtime.tensor(inputs[0].numpy())
        output = vm["main"](data).numpy()
        timer = Timed(tvm_timer=lambda number: vm.time_evaluator("main", self.device, number=number, repeat=1,
                                                                 min_repeat_ms=0), tvm_args=(data,))
        return System("measured", f"compile_relax, {coverage}", timer,
                      {"output": output, "coverage": [covered, len(functions)]})


def run(quick: bool, threads: int, records: Path, networks: list[str], repeat: int, repeat_ms: float, log=print) -> dict:
    """Build every system for ``networks``, time them all interleaved, return the section's results."""
    import torch

    models = _models()
    unknown = [key for key in networks if key not in models]
    if unknown:
        raise ValueError(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(NETWORK_KEYS)}")
    suite = Suite(quick, threads, records, log)
    try:
        ours, builds = {}, {}
        for key in networks:
            log(f"building ours: {models[key].label}")
            try:
                ours[key], builds[key] = suite.ours(models[key])
            except Exception as err:  # recorded as a failure of ours: the suite reports it and exits non-zero
                ours[key], builds[key] = System("failed", f"{type(err).__name__}: {err}"), {}
        float_keys = sorted({models[key].counterpart for key in networks})
        peers, float_facts = {}, {}
        for key in float_keys:
            log(f"building the peers on the float network {key}")
            peers[key], float_facts[key] = suite.peers(key)
        measurements = {f"ours/{key}": s.timed for key, s in ours.items() if s.timed is not None}
        measurements.update({f"{peer}/{key}": s.timed for key, systems in peers.items() for peer, s in systems.items()
                             if s.timed is not None})
        log(f"timing {len(measurements)} systems interleaved: {repeat} repeats of ~{repeat_ms:g} ms")
        with torch.inference_mode():
            measure(measurements, repeat, repeat_ms / 1e3)
        rows = [_row(models[key], ours[key], builds[key], peers[models[key].counterpart],
                     float_facts[models[key].counterpart]) for key in networks]
        return {
            "networks": rows,
            "float_networks": float_facts,
            "systems": SYSTEMS,
            "records": {"directory": str(records), "records": suite.records.records,
                        "problems": suite.records.problems},
            "timing": {"repeat": repeat, "repeat_ms": repeat_ms, "method": (
                "all systems of all networks interleaved, one repeat of each in turn; each repeat averages enough calls "
                "to last repeat_ms; warm-up of about two repeats first; median over the repeats")},
        }
    finally:
        suite.close()


def _system_result(system: System) -> dict:
    result = {"status": system.status, "detail": system.detail, **system.extra}
    if system.timed is not None:
        timed = system.timed
        result.update(median_ms=timed.median_ms(), min_ms=min(timed.results) * 1e3, number=timed.number,
                      repeats_ms=[s * 1e3 for s in timed.results])
    return result


def _row(network: Network, ours: System, build: dict, peers: dict, facts: dict) -> dict:
    systems = {"ours": _system_result(ours), **{peer: _system_result(s) for peer, s in peers.items()}}
    ours_ms = systems["ours"].get("median_ms")
    for result in systems.values():
        if "median_ms" in result:
            result["gmacs"] = facts["macs"] / (result["median_ms"] * 1e-3) / 1e9
            if ours_ms:
                result["ratio_to_ours"] = result["median_ms"] / ours_ms  # > 1: ours is faster
    return {"network": network.key, "label": network.label, "float_network": network.counterpart,
            "macs": facts["macs"], "input_shape": facts["input_shape"], "systems": systems, "build": build}

