"""Compile a PyTorch model for a target preset, and verify the result against PyTorch.

    python -m tvm_effconv.compile MODEL --target PRESET [-o OUTDIR] [--input-shape 1,3,224,224] ...

MODEL is a torch.export archive (any file name), a TorchScript archive, a pickled nn.Module (only with
--trust-pickle: unpickling runs code) or ``package.module:factory``. The output directory holds
``model.so`` and ``manifest.json``; it appears only once everything, verification included, succeeded.
"""

import argparse
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from . import __version__, frontend, verify
from .build import build, check_cross_compiler, export_kernels, export_library, generated_source
from .errors import EffconvError, ToolMissingError, VerificationError, run_cli
from .targets import get_preset
from .tuning import DEFAULTS_FILE, load_records, records_dir

LIBRARY_FILE = "model.so"
# The kernels alone, for `bench --profile` over RPC (the Relax VM cannot be instrumented remotely).
KERNELS_FILE = "kernels.so"
MANIFEST_FILE = "manifest.json"


def _tensor_info(names, tensors) -> list[dict]:
    return [
        {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        for name, t in zip(names, tensors)
    ]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify_arm(preset, library: Path, inputs, expected, rtol, device_address, log) -> dict:
    from .device import emulator

    if device_address:
        return _verify_on_device(preset, library, inputs, expected, rtol, device_address, f"device {device_address}")
    log(f"starting the emulated device (qemu -cpu {preset.qemu_cpu})")
    with emulator.start(preset.qemu_cpu) as device:
        where = f"emulated aarch64 device (qemu -cpu {preset.qemu_cpu}) at {device.address}"
        result = _verify_on_device(preset, library, inputs, expected, rtol, device.address, where)
    result["note"] = "emulated device: checks correctness and ISA legality, not speed"
    return result


def _verify_on_device(preset, library: Path, inputs, expected, rtol, address, where) -> dict:
    from .device import rpc

    session = rpc.connect(address)
    features = rpc.device_features(session, address)
    rpc.check_features(preset.required_cpu_features(), features, f"preset {preset.name}")
    # A fresh remote name: replacing a library the server has already loaded crashes it.
    remote_name = f"model-{uuid.uuid4().hex}.so"
    with rpc.device_errors(f"running {library.name} on {where}", address):
        session.upload(str(library), target=remote_name)
        outputs = verify.run_vm(session.load_module(remote_name), session.cpu(), inputs)
    comparison = verify.compare(outputs, expected, rtol)
    return {"where": where, "device_features": features["features"], **_comparison_dict(comparison)}


def _verify_cuda(executable, preset, library: Path, inputs, expected, rtol, log) -> dict:
    import tvm
    from tvm.support import nvcc

    result = {}
    if shutil.which("nvcc"):
        source = generated_source(executable)
        with preset.target:
            fatbin = nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")
        result["nvcc"] = f"CUDA source ({len(source)} chars) compiled to a {len(fatbin)}-byte fatbin for {preset.target.attrs['arch']}"
        log(result["nvcc"])
    else:
        result["nvcc"] = "skipped: nvcc not found (install the CUDA toolkit to check the kernels compile)"
    if tvm.cuda(0).exist:
        outputs = verify.run_vm(tvm.runtime.load_module(str(library)), tvm.cuda(0), inputs)
        result.update(where=f"local GPU {tvm.cuda(0).device_name}", **_comparison_dict(verify.compare(outputs, expected, rtol)))
    else:
        result.update(where="no GPU on this machine: kernels compiled, not run", status="compiled")
    return result


def _comparison_dict(comparison: verify.Comparison) -> dict:
    return {
        "status": "passed" if comparison.passed else "failed",
        "max_abs_error": comparison.max_abs_error,
        "tolerance": comparison.tolerance,
    }


def compile_model(
    model: str,
    target: str,
    output: str | None = None,
    input_shapes: list[str] = (),
    trust_pickle: bool = False,
    records: str | None = None,
    run_verify: bool = True,
    device: str | None = None,
    require_records: bool = False,
    log=print,
) -> Path:
    """Compile ``model`` for preset ``target`` into ``output``; returns the artifact directory."""
    import numpy as np
    import tvm

    started = time.time()
    preset = get_preset(target)
    check_cross_compiler(preset)
    if run_verify and preset.family == "arm" and not device and shutil.which("qemu-aarch64-static") is None:
        raise ToolMissingError(
            "verifying an ARM build needs qemu-aarch64-static for the emulated device; install it with "
            "`apt-get install qemu-user-static` (or `bash scripts/install.sh`), give a real device with "
            "--device HOST:PORT, or skip with --no-verify"
        )
    specs = [frontend.InputSpec.parse(s) for s in input_shapes]

    log(f"loading {model}")
    loaded = frontend.load_model(model, specs, trust_pickle)
    inputs = [t.detach().numpy() for t in loaded.example_inputs]
    expected = verify.reference_outputs(loaded.reference, loaded.example_inputs)
    log(f"importing {loaded.kind} model {loaded.name!r} into Relax")
    mod = frontend.to_relax(loaded.exported, preset.target)

    folder = records_dir(preset.name, records)
    found = load_records(folder, preset.target)
    for problem in found.problems:
        log(f"warning: {problem}")
    for note in found.notes:
        log(f"note: {note}")
    if found.unmeasured:
        log(f"note: {found.unmeasured} of the {found.records} records in {folder} are builder-only (default schedules, "
            f"never measured on a device); tune on a device to replace them: python -m tvm_effconv.tune {model} "
            f"--target {preset.name}")
    log(f"compiling for {preset.name}: {json.dumps(preset.target_dict)}")
    executable, report = build(mod, preset, found.database, found.defaults)
    kept = report.default_by_measurement + report.default_builder_only
    untuned = [name for name in report.default_schedule if name not in kept]
    total = len(report.default_schedule) + len(report.from_records) + len(report.unscheduled)
    if report.default_by_measurement:
        log(f"{len(report.default_by_measurement)} of {total} workloads keep the default schedule, which measured faster "
            f"than tuning ({folder / DEFAULTS_FILE}): " + ", ".join(report.default_by_measurement))
    if report.default_builder_only:
        log(f"note: {len(report.default_builder_only)} of {total} workloads have builder-only entries in "
            f"{folder / DEFAULTS_FILE} (the default schedule, built, never measured on a device); tune on a device "
            f"to measure them: python -m tvm_effconv.tune {model} --target {preset.name} --rpc-tracker HOST:PORT "
            "--rpc-key KEY: " + ", ".join(report.default_builder_only))
    if untuned:
        log(f"{len(untuned)} of {total} workloads had no tuning record in {folder} and use the default schedule: "
            + ", ".join(untuned))
        log(f"  to tune them: python -m tvm_effconv.tune {model} --target {preset.name}")
    if report.unscheduled:
        log("warning: no schedule could be applied to: " + ", ".join(report.unscheduled))
    if require_records and (untuned or report.unscheduled):
        missing = untuned + report.unscheduled
        raise EffconvError(
            f"--require-records: {len(missing)} workload(s) have no applicable record in {folder}: {', '.join(missing)}. "
            "If the model changed, or a TVM upgrade changed the workload hashes, re-tune: "
            f"python -m tvm_effconv.tune {model} --target {preset.name}"
        )

    out_dir = Path(output) if output else Path("build") / f"{loaded.name}-{preset.name}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        library = staging / LIBRARY_FILE
        export_library(executable, preset, library)
        export_kernels(executable, preset, staging / KERNELS_FILE)
        verification = {"status": "skipped", "reason": "--no-verify"}
        if run_verify:
            quantized = frontend.quantized_ops(loaded.exported)
            rtol = verify.QUANTIZED_RTOL if quantized else verify.RTOL
            log("verifying against PyTorch" + (f" (relative tolerance {rtol:g}: the model quantizes activations in "
                                               f"{', '.join(quantized)})" if quantized else ""))
            if preset.family == "host":
                outputs = verify.run_vm(tvm.runtime.load_module(str(library)), tvm.cpu(), inputs)
                verification = {"where": "this machine", **_comparison_dict(verify.compare(outputs, expected, rtol))}
            elif preset.family == "arm":
                verification = _verify_arm(preset, library, inputs, expected, rtol, device, log)
            else:
                verification = _verify_cuda(executable, preset, library, inputs, expected, rtol, log)
            if "max_abs_error" in verification:
                log(f"verification on {verification['where']}: "
                    f"max abs error {verification['max_abs_error']:.3g} (tolerance {verification['tolerance']:.3g}): "
                    + ("PASS" if verification["status"] == "passed" else "FAIL"))
            if verification["status"] == "failed":
                raise VerificationError(
                    f"the compiled model differs from PyTorch on {verification['where']}: max abs error "
                    f"{verification['max_abs_error']:.3g} > tolerance {verification['tolerance']:.3g}; no artifact written"
                )
        manifest = {
            "model": {"source": model, "kind": loaded.kind, "name": loaded.name},
            "preset": preset.name,
            "target": preset.target_dict,
            "target_host": preset.host_config,
            "required_cpu_features": preset.required_cpu_features(),
            "library": {"file": LIBRARY_FILE, "sha256": _sha256(library), "bytes": library.stat().st_size},
            "kernels": {
                "file": KERNELS_FILE, "sha256": _sha256(staging / KERNELS_FILE), "calls": report.kernel_calls,
                "variants": report.kernel_variants,
            },
            "inputs": _tensor_info(loaded.input_names, loaded.example_inputs),
            "outputs": _tensor_info([f"output{i}" for i in range(len(expected))], [np.asarray(e) for e in expected]),
            "records": {
                "directory": str(folder),
                "files": found.files,
                "problems": found.problems,
                "notes": found.notes,
                "unmeasured": found.unmeasured,
                "applied": report.from_records,
                "default_by_measurement": report.default_by_measurement,
                "default_builder_only": report.default_builder_only,
                "missing": untuned,
            },
            "unscheduled": report.unscheduled,
            "verification": verification,
            "versions": {"tvm": tvm.__version__, "tvm_effconv": __version__, "torch": _torch_version()},
            "compile_seconds": round(time.time() - started, 1),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"artifact: {out_dir.resolve()} ({LIBRARY_FILE}, {MANIFEST_FILE})")
    return out_dir


def _torch_version() -> str:
    import torch

    return torch.__version__


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder to out_dir, replacing an older artifact only at the end."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    if not (out_dir / MANIFEST_FILE).is_file():
        raise EffconvError(f"{out_dir} exists and is not an artifact of this tool; choose another -o folder")
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_effconv.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model file or package.module:factory")
    parser.add_argument("--target", required=True, help="target preset (python -m tvm_effconv.targets lists them)")
    parser.add_argument("-o", "--output", help="artifact folder (default build/<model>-<preset>)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="N,C,H,W[:DTYPE]",
                        help="input shape, once per model input (default: the model's example inputs)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled nn.Module (runs code)")
    parser.add_argument("--records", help="tuning records folder (default schedules/<preset>)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the comparison with PyTorch")
    parser.add_argument("--require-records", action="store_true",
                        help="fail unless every workload has a tuning record (CI uses this)")
    parser.add_argument("--device", metavar="HOST:PORT",
                        help="verify ARM builds on this running RPC device instead of a freshly started emulated one")
    args = parser.parse_args(argv)
    compile_model(
        args.model, args.target, args.output, args.input_shape, args.trust_pickle, args.records,
        args.verify, args.device, args.require_records, log=lambda msg: print(msg, flush=True),
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
