"""Benchmark a compiled artifact on this machine, on an RPC device, or on the emulated ARM device.

    python -m tvm_effconv.bench ARTIFACT_DIR [--rpc HOST:PORT | --rpc-tracker HOST:PORT [--rpc-key KEY]
                                | --emulate [PRESET]] [--repeat N] [--number N] [--warmup N]
                                [--inputs FILE.npz] [--profile] [--compare-torch] [--json OUT]

The artifact (a folder from ``python -m tvm_effconv.compile``) is checked before anything runs: its
manifest, the sha256 of ``model.so``, the architecture of its code against the device's, and on aarch64
the CPU features it needs against those the device reports. The model then runs in the Relax VM with
random inputs (seeded) or those of an ``.npz``, timed with TVM's ``time_evaluator``.
"""

import argparse
import gc
import hashlib
import json
import os
import platform
import socket
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .compile import MANIFEST_FILE
from .device import emulator, rpc
from .errors import ArtifactError, DeviceError, EffconvError, ModelLoadError, run_cli
from .targets import get_preset
from .verify import flatten_outputs

DEFAULT_TIMEOUT = 300.0
# e_machine of an ELF header -> the architecture name used here (platform.machine() spelling).
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}
EMULATION_NOTE = ("timings under emulation are not meaningful (qemu translates every instruction): this run "
                  "checks correctness and plumbing only; benchmark on the real board with --rpc or --rpc-tracker")
PROFILE_NO_KERNELS_NOTE = ("this artifact has no kernels.so to profile over RPC (it predates it): recompile it with "
                           "`python -m tvm_effconv.compile`, or run --profile on the device itself")
PROFILE_EMULATION_NOTE = "no per-kernel profile under emulation: its timings are not meaningful"


# --- the artifact ---

@dataclass
class Artifact:
    path: Path
    manifest: dict
    library: Path
    arch: str  # of the code in model.so, from its ELF header

    @property
    def preset(self) -> str:
        return self.manifest["preset"]

    @property
    def is_cuda(self) -> bool:
        return self.manifest["target"].get("kind") == "cuda"

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]


def elf_arch(header: bytes) -> str | None:
    """The architecture an ELF file is built for, from its first 20 bytes; None if it is not ELF."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return ELF_MACHINES.get(machine, f"ELF machine {machine}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_artifact(folder) -> Artifact:
    """Read and check an artifact folder: a complete manifest, and a model.so that matches its sha256."""
    path = Path(folder)
    recompile = "recompile it with `python -m tvm_effconv.compile MODEL --target PRESET -o FOLDER`"
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} not found; {recompile}")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST_FILE}: it is not an artifact of tvm_effconv.compile, or was "
                            f"copied incompletely; copy the whole folder again or {recompile}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ArtifactError(f"{manifest_path} is corrupt ({err}); copy the artifact again or {recompile}") from None
    missing = _missing_manifest_fields(manifest)
    if missing:
        raise ArtifactError(f"{manifest_path} lacks or mangles the field(s) {', '.join(missing)}; copy the artifact "
                            f"again or {recompile}")
    library = path / manifest["library"]["file"]
    if not library.is_file():
        raise ArtifactError(f"{library} is missing; copy the whole artifact folder again or {recompile}")
    if _file_sha256(library) != manifest["library"]["sha256"]:
        raise ArtifactError(f"{library} does not match the sha256 in {MANIFEST_FILE}: it was modified or copied "
                            f"incompletely; copy the whole artifact folder again or {recompile}")
    with open(library, "rb") as f:
        arch = elf_arch(f.read(20))
    if arch is None:
        raise ArtifactError(f"{library} is not an ELF shared library; {recompile}")
    return Artifact(path=path, manifest=manifest, library=library, arch=arch)


def _missing_manifest_fields(manifest) -> list[str]:
    if not isinstance(manifest, dict):
        return ["(the whole manifest: not a JSON object)"]
    checks = {
        "preset": lambda m: isinstance(m["preset"], str),
        "target": lambda m: isinstance(m["target"], dict),
        "library.file/sha256": lambda m: isinstance(m["library"]["file"], str) and len(m["library"]["sha256"]) == 64,
        "inputs": lambda m: m["inputs"] and all(isinstance(i["name"], str) and all(int(d) > 0 for d in i["shape"])
                                                and isinstance(i["dtype"], str) for i in m["inputs"]),
        "outputs": lambda m: all(isinstance(o["shape"], list) and isinstance(o["dtype"], str) for o in m["outputs"]),
    }
    missing = []
    for name, check in checks.items():
        try:
            if not check(manifest):
                missing.append(name)
        except (KeyError, TypeError, ValueError):
            missing.append(name)
    return missing


# --- the device ---

@dataclass
class Device:
    """Where the artifact runs: this process (``session`` None) or an RPC device."""

    kind: str  # "local", "rpc", "tracker" or "emulated"
    description: str
    address: str  # for messages: HOST:PORT, "--tracker HOST:PORT --key KEY", or "this machine"
    arch: str
    session: object = None
    workdir: str | None = None  # the RPC session's working folder on the device
    features: list[str] | None = None  # aarch64 CPU features (TVM's has_* flags), when probed

    def runtime_device(self, cuda: bool):
        import tvm

        if self.session is None:
            return tvm.cuda(0) if cuda else tvm.cpu(0)
        return self.session.cuda(0) if cuda else self.session.cpu(0)

    def load(self, library: Path):
        """The library loaded where the device runs it."""
        import tvm

        if self.session is None:
            return tvm.runtime.load_module(str(library))
        # A fresh remote name: uploading under a name the server has already loaded crashes it.
        remote_name = f"{library.stem}-{uuid.uuid4().hex}.so"
        self.session.upload(str(library), target=remote_name)
        return self.session.load_module(remote_name)

    def tvm_threads(self) -> int:
        import tvm

        get_function = tvm.get_global_func if self.session is None else self.session.get_function
        return int(get_function("runtime.NumThreads")())

    def to_json(self) -> dict:
        return {"kind": self.kind, "description": self.description, "address": self.address, "arch": self.arch,
                "session_workdir": self.workdir, "cpu_features": self.features}


def machine_info() -> dict:
    """This machine: the one that ran the command (and the device, for local runs)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "arch": _this_arch(),
            "os": platform.platform()}


def _this_arch() -> str:
    machine = platform.machine().lower()
    return MACHINE_ALIASES.get(machine, machine)


@contextmanager
def open_device(artifact: Artifact, rpc_address: str | None = None, tracker: str | None = None,
                key: str | None = None, emulate: str | None = None, timeout: float = DEFAULT_TIMEOUT, log=print):
    """Yield the Device to run ``artifact`` on, checked to fit it (architecture, CPU features, GPU).

    ``emulate`` ("" for the artifact's own preset) starts the emulated device with that preset's CPU and
    stops it on exit. Every wait (connecting, a free device at the tracker) and every RPC session is
    bounded by ``timeout`` seconds.
    """
    if emulate is not None:
        preset = get_preset(emulate or artifact.preset)
        if not preset.qemu_cpu:
            raise EffconvError(f"--emulate emulates aarch64 CPUs and preset {preset.name} has none to emulate; "
                               "pass an ARM preset (e.g. --emulate arm-a53) or run an ARM artifact")
        log(f"starting the emulated device (qemu -cpu {preset.qemu_cpu})")
        with emulator.start(preset.qemu_cpu, timeout=timeout) as emulated:
            session = rpc.connect(emulated.address, timeout, session_timeout=timeout)
            description = f"the emulated aarch64 device (qemu -cpu {preset.qemu_cpu}) at {emulated.address}"
            yield _checked(artifact, _rpc_device("emulated", description, emulated.address, session), log)
        return
    if rpc_address is not None or tracker is not None:
        if tracker is not None:
            key = key or get_preset(artifact.preset).rpc_key
            log(f"requesting a device with key {key!r} from the RPC tracker {tracker}")
            kind, address = "tracker", f"--tracker {tracker} --key {key}"
            description = f"the RPC device with key {key!r} from the tracker at {tracker}"
        else:
            kind, address, description = "rpc", rpc_address, f"the RPC device at {rpc_address}"
        session = rpc.open_session(rpc_address, tracker, key, timeout=timeout, session_timeout=timeout)
        yield _checked(artifact, _rpc_device(kind, description, address, session), log)
        return
    machine = machine_info()
    yield _checked(artifact, Device("local", f"this machine ({machine['cpu']}, {machine['cores']} cores)",
                                    "this machine", machine["arch"]), log)


def _rpc_device(kind: str, description: str, address: str, session) -> Device:
    """An RPC device, with its architecture from the ELF header of its server's executable, and the working
    folder of this session there (the server logs it: it tells which of several servers served)."""
    with rpc.device_errors("asking the device about itself", address):
        header = bytes(session.download("/proc/self/exe")[:20])
        workdir = session.get_function("tvm.rpc.server.workpath")("")
    arch = elf_arch(header)
    if arch is None:
        raise DeviceError(f"cannot tell the architecture of {description}: the executable of its RPC server is not "
                          "an ELF file; benchmarks run on Linux devices")
    return Device(kind, description, address, arch, session, workdir=workdir)


def _checked(artifact: Artifact, device: Device, log) -> Device:
    """Raise DeviceError, before anything runs, if the device cannot run the artifact's code."""
    import tvm

    if artifact.arch != device.arch:
        where = ("an aarch64 device: --emulate, --rpc HOST:PORT or --rpc-tracker HOST:PORT" if artifact.arch == "aarch64"
                 else f"an {artifact.arch} machine: here without a device option if this is one, or an {artifact.arch} "
                      "RPC server")
        raise DeviceError(f"the artifact {artifact.path} holds {artifact.arch} code (preset {artifact.preset}) and "
                          f"{device.description} is {device.arch}: run it on {where}; or compile for a preset of "
                          "this device (`python -m tvm_effconv.targets` lists them)")
    if device.arch == "aarch64":
        session = device.session or tvm.rpc.LocalSession()
        features = rpc.device_features(session, device.address)
        device.features = features["features"]
        rpc.check_features(artifact.manifest.get("required_cpu_features", []), features, f"preset {artifact.preset}")
    if artifact.is_cuda:
        with rpc.device_errors("looking for a CUDA GPU", device.address):
            has_gpu = device.runtime_device(cuda=True).exist
        if not has_gpu:
            raise DeviceError(f"the artifact {artifact.path} is CUDA code (preset {artifact.preset}) and "
                              f"{device.description} has no CUDA GPU that TVM can use: run it on a machine with an "
                              "NVIDIA GPU and its driver, here or over --rpc")
    elif device.kind == "local" and artifact.manifest["target"].get("mcpu") not in (None, "native", _system_cpu()):
        log(f"warning: the artifact was compiled for CPU {artifact.manifest['target']['mcpu']} and this machine's "
            f"is {_system_cpu()}: if it lacks an instruction the code uses, the run dies with an illegal "
            "instruction; compile with --target host on this machine")
    return device


def _system_cpu() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


# --- inputs ---

def make_inputs(artifact: Artifact, npz: str | None = None, seed: int = 0) -> list[np.ndarray]:
    """The model's inputs: from an .npz keyed by the manifest's input names, or random (seeded)."""
    specs = artifact.inputs
    if npz is None:
        generator = np.random.default_rng(seed)
        return [_random_array(generator, tuple(spec["shape"]), np.dtype(spec["dtype"])) for spec in specs]
    try:
        with np.load(npz, allow_pickle=False) as archive:
            given = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as err:
        raise EffconvError(f"cannot read the inputs file {npz} ({err}); save it with numpy.savez(FILE, "
                           + ", ".join(f"{spec['name']}=..." for spec in specs) + ")") from None
    wanted = [spec["name"] for spec in specs]
    if set(given) != set(wanted):
        raise EffconvError(f"the inputs file {npz} holds arrays {', '.join(sorted(given)) or 'none'}; the model takes "
                           f"{', '.join(wanted)} (the manifest's input names): save it with numpy.savez(FILE, "
                           + ", ".join(f"{name}=..." for name in wanted) + ")")
    for spec in specs:
        array = given[spec["name"]]
        if list(array.shape) != list(spec["shape"]) or array.dtype != np.dtype(spec["dtype"]):
            raise EffconvError(f"input {spec['name']!r} in {npz} is {array.dtype}{list(array.shape)}; the artifact "
                               f"was compiled for {spec['dtype']}{list(spec['shape'])}: convert it (e.g. "
                               f".astype('{spec['dtype']}')) or compile with --input-shape for the new shape")
    return [given[name] for name in wanted]


def _random_array(generator, shape, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return generator.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return generator.integers(0, 2, shape).astype(dtype)
    return generator.integers(0, 8, shape).astype(dtype)


# --- running and timing ---

@dataclass
class LoadedModel:
    """The artifact's Relax VM on the device, with its inputs set."""

    vm: object
    library: object
    device: object  # the TVM device (local or remote)
    args: list


def load_model(artifact: Artifact, device: Device, inputs: list[np.ndarray]) -> LoadedModel:
    import tvm
    from tvm import relax

    with rpc.device_errors(f"loading {artifact.library.name} on {device.description}", device.address):
        library = device.load(artifact.library)
        runtime_device = device.runtime_device(artifact.is_cuda)
        vm = relax.VirtualMachine(library, runtime_device)
        args = [tvm.runtime.tensor(np.ascontiguousarray(x), runtime_device) for x in inputs]
        vm.set_input("main", *args)
    return LoadedModel(vm, library, runtime_device, args)


def run_once(model: LoadedModel, device: Device) -> list[np.ndarray]:
    # Not vm.get_outputs: its recursive closure makes a reference cycle that keeps the VM, and with it the
    # RPC session, alive until the garbage collector runs.
    with rpc.device_errors(f"running the model on {device.description}", device.address):
        return [out.numpy() for out in flatten_outputs(model.vm["main"](*model.args))]


def check_outputs(outputs: list[np.ndarray], artifact: Artifact) -> dict:
    """Whether the outputs have the manifest's shapes and dtypes and hold only finite numbers."""
    expected = artifact.manifest["outputs"]
    problems = []
    if len(outputs) != len(expected):
        problems.append(f"{len(outputs)} outputs, the manifest lists {len(expected)}")
    for i, (out, spec) in enumerate(zip(outputs, expected)):
        if list(out.shape) != list(spec["shape"]) or str(out.dtype) != spec["dtype"]:
            problems.append(f"output {i} is {out.dtype}{list(out.shape)}, expected {spec['dtype']}{spec['shape']}")
        elif np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
            problems.append(f"output {i} holds NaN or infinite values")
    return {"passed": not problems, "problems": problems,
            "outputs": [{"shape": list(out.shape), "dtype": str(out.dtype)} for out in outputs]}


def summarize(per_run_seconds, batch: int) -> dict:
    """Statistics over the mean time of one inference in each repeat, in ms, and the throughput."""
    ms = np.asarray(per_run_seconds, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    return {"mean_ms": mean, "median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "std_ms": float(ms.std()), "inferences_per_s": batch * 1e3 / mean if mean > 0 else float("inf"),
            "repeats_ms": ms.tolist()}


def benchmark(model: LoadedModel, device: Device, warmup: int, number: int, repeat: int, batch: int) -> dict:
    """Time the model with TVM's time_evaluator: ``warmup`` runs, then ``repeat`` means of ``number`` runs."""
    with rpc.device_errors(f"timing the model on {device.description}", device.address):
        for _ in range(warmup):
            model.vm.invoke_stateful("main")
        timer = model.vm.time_evaluator("invoke_stateful", model.device, number=number, repeat=repeat,
                                        min_repeat_ms=0)
        result = timer("main")
    return summarize(result.results, batch)


def profile(model: LoadedModel, number: int, repeat: int) -> dict:
    """Per-kernel latency: each kernel call of one run of the model, timed alone, slowest first.

    TVM 0.27 has no VM profiler. The VM's instrument hook (called around every VM call) records one run's
    kernel calls with their arguments; each is then called ``repeat`` times ``number`` times with those
    arguments (the median of the repeats' means counts), with a device sync around each repeat so that GPU
    kernels are timed to completion. VM builtins (allocation, shape checks) are not kernels: their time is
    part of the end-to-end time only. Works in this process only (over RPC: :func:`profile_remote`).
    """
    from tvm import relax

    vm = relax.VirtualMachine(model.library, model.device)  # its own VM: the timed one stays uninstrumented
    calls = []  # (function name, function, arguments) of each kernel call in one run, in order

    def record(func, name, before_run, ret_value, *args):
        if before_run and not name.startswith("vm.builtin."):
            calls.append((name, func, args))
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    vm.set_instrument(record)
    vm["main"](*model.args)
    totals: dict[str, list] = {}  # function name -> [calls per run, seconds per run]
    for name, func, args in calls:
        per_repeat = []
        for _ in range(repeat):
            model.device.sync()
            start = time.perf_counter()
            for _ in range(number):
                func(*args)
            model.device.sync()
            per_repeat.append((time.perf_counter() - start) / number)
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += float(np.median(per_repeat))
    return _profile_table(totals, f"each kernel call timed alone, median of {repeat} repeats of {number} calls")


def profile_remote(artifact: Artifact, device: Device, number: int, repeat: int) -> dict:
    """Per-kernel latency on an RPC device: the artifact's kernels.so is uploaded and each kernel call the
    compiler listed in the manifest is timed alone with ``time_evaluator`` on random arguments of its shapes.

    TVM refuses to pass the VM's instrument hook over RPC, so the calls come from the manifest; kernels
    whose time depends on the data (LCCL's sparse conv) run at the sparsity of random inputs."""
    import tvm

    kernels = artifact.manifest.get("kernels")
    path = artifact.path / kernels["file"] if kernels else None
    if path is None or not path.is_file() or _file_sha256(path) != kernels["sha256"]:
        return {"available": False, "reason": PROFILE_NO_KERNELS_NOTE}
    generator = np.random.default_rng(0)
    totals: dict[str, list] = {}
    with rpc.device_errors(f"profiling the kernels on {device.description}", device.address):
        library = device.load(path)
        runtime_device = device.runtime_device(artifact.is_cuda)
        for call in kernels["calls"]:
            args = [tvm.runtime.tensor(_random_array(generator, arg["shape"], arg["dtype"]), runtime_device)
                    for arg in call["args"]]
            timer = library.time_evaluator(call["function"], runtime_device, number=number, repeat=repeat,
                                           min_repeat_ms=0)
            entry = totals.setdefault(call["function"], [0, 0.0])
            entry[0] += 1
            entry[1] += float(np.median(timer(*args).results))
    return _profile_table(totals, f"each kernel of kernels.so timed alone on the device with time_evaluator, "
                                  f"median of {repeat} repeats of {number} calls")


def _profile_table(totals: dict, method: str) -> dict:
    """``totals``: function name -> [calls per run, seconds per run]; slowest first, with shares."""
    total = sum(seconds for _, seconds in totals.values())
    layers = [{"function": name, "calls_per_run": calls_per_run, "ms_per_run": seconds * 1e3,
               "share": seconds / total if total else 0.0}
              for name, (calls_per_run, seconds) in sorted(totals.items(), key=lambda item: -item[1][1])]
    return {"available": True, "kernels_ms_per_run": total * 1e3, "layers": layers, "method": method}


def time_torch(artifact: Artifact, inputs: list[np.ndarray], warmup: int, number: int, repeat: int, batch: int,
               threads: int, trust_pickle: bool = False) -> dict:
    """Time the artifact's PyTorch model eagerly on ``threads`` threads of this machine, with the same inputs
    and warm-up/repeat scheme as TVM."""
    import torch

    from .frontend import InputSpec
    from .frontend import load_model as load_torch_model

    source = artifact.manifest.get("model", {}).get("source")
    if not source:
        raise ArtifactError(f"the manifest of {artifact.path} names no model.source; --compare-torch needs it")
    specs = [InputSpec(tuple(spec["shape"]), spec["dtype"]) for spec in artifact.inputs]
    try:
        model = load_torch_model(source, specs, trust_pickle).reference
    except ModelLoadError as err:
        raise ModelLoadError(f"--compare-torch rebuilds the PyTorch model from the manifest's model.source "
                             f"{source!r}: {err}") from None
    torch.set_num_threads(threads)
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    per_run = []
    with torch.no_grad():
        for _ in range(warmup + 1):  # +1: time_evaluator's own discarded first call
            model(*tensors)
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                model(*tensors)
            per_run.append((time.perf_counter() - start) / number)
    return {**summarize(per_run, batch), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "model": source}


# --- the command ---

def run(args, log=print) -> dict:
    """Benchmark as the command-line ``args`` say; returns the report (also what --json writes)."""
    artifact = load_artifact(args.artifact)
    on_device = args.rpc or args.rpc_tracker or args.emulate is not None
    if args.compare_torch and (on_device or artifact.is_cuda or artifact.arch != _this_arch()):
        raise EffconvError("--compare-torch times PyTorch on this machine's CPU, so it needs a host artifact run "
                           "locally (no --rpc/--rpc-tracker/--emulate); compile with --target host")
    if args.rpc_key and not args.rpc_tracker:
        raise EffconvError("--rpc-key names the device at a tracker: pass it with --rpc-tracker HOST:PORT")
    if args.threads:
        if on_device:
            raise EffconvError("--threads sets this machine's thread count; a device's server uses its own "
                               "(set TVM_NUM_THREADS where the RPC server starts)")
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts, on first use
    inputs = make_inputs(artifact, args.inputs, args.seed)
    batch = int(inputs[0].shape[0]) if inputs[0].ndim else 1
    report = {
        "artifact": {"path": str(artifact.path.resolve()), "preset": artifact.preset, "arch": artifact.arch,
                     "model": artifact.manifest.get("model"), "target": artifact.manifest["target"],
                     "sha256": artifact.manifest["library"]["sha256"]},
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"source": args.inputs or f"random, seed {args.seed}", "batch": batch,
                   "tensors": [{"name": s["name"], "shape": s["shape"], "dtype": s["dtype"]} for s in artifact.inputs]},
        "settings": {"warmup": args.warmup, "number": args.number, "repeat": args.repeat, "timeout_s": args.timeout},
    }
    try:
        _measure_on_device(report, artifact, inputs, batch, args, log)
    except BaseException as err:
        _release_frames(err)
        raise
    finally:
        gc.collect()  # remote objects in reference cycles would keep the RPC session, and the device, busy
    if args.compare_torch:
        # As many threads as TVM used: a ratio at unequal thread counts compares the thread counts.
        report["torch"] = time_torch(artifact, inputs, args.warmup, args.number, args.repeat, batch,
                                     report["threads"]["tvm"], args.trust_pickle)
        report["threads"]["torch"] = report["torch"]["threads"]
        report["tvm_time_over_torch_time"] = report["tvm"]["mean_ms"] / report["torch"]["mean_ms"]
    report["versions"] = {"tvm": _tvm_version(), "tvm_effconv": __version__}
    return report


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def _measure_on_device(report: dict, artifact: Artifact, inputs, batch: int, args, log) -> None:
    """Open the device, run, time and profile there, adding the results to ``report``."""
    with open_device(artifact, args.rpc, args.rpc_tracker, args.rpc_key, args.emulate, args.timeout, log) as device:
        report["device"] = device.to_json()
        with rpc.device_errors("reading the device's thread count", device.address):
            report["threads"] = {"tvm": device.tvm_threads(), "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS")
                                 if device.kind == "local" else None}
        if args.threads and report["threads"]["tvm"] != args.threads:
            raise EffconvError(f"TVM's thread pool already runs {report['threads']['tvm']} threads in this process: "
                               "--threads takes effect only before TVM first runs code (as from the command line)")
        log(f"running on {device.description}")
        model = load_model(artifact, device, inputs)
        report["outputs_check"] = check_outputs(run_once(model, device), artifact)
        if device.kind == "emulated":
            report["note"] = EMULATION_NOTE
            report["tvm"] = None
        else:
            report["tvm"] = benchmark(model, device, args.warmup, args.number, args.repeat, batch)
        if args.profile:
            if device.kind == "emulated":
                report["profile"] = {"available": False, "reason": PROFILE_EMULATION_NOTE}
            elif device.session is None:
                report["profile"] = profile(model, args.number, args.repeat)
            else:
                report["profile"] = profile_remote(artifact, device, args.number, args.repeat)


def _release_frames(err: BaseException) -> None:
    """Clear the locals of the frames that ``err`` (and its causes) hold.

    They hold the RPC session and remote objects, and a session lives as long as any of them does, while a
    TVM RPC server serves one session at a time: a caller that keeps the exception would block the device.
    """
    while err is not None:
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


def format_report(report: dict) -> str:
    """The report as readable text."""
    artifact, machine, settings = report["artifact"], report["machine"], report["settings"]
    threads = report["threads"]
    features = report["device"]["cpu_features"]
    lines = [
        (f"artifact   {artifact['path']} ({(artifact['model'] or {}).get('name', 'model')}, preset "
         f"{artifact['preset']}, {artifact['arch']})"),
        f"device     {report['device']['description']} ({report['device']['arch']}); TVM threads {threads['tvm']}"
        + (f", CPU features {', '.join(features)}" if features else ""),
        f"machine    {machine['hostname']}: {machine['cpu']}, {machine['cores']} cores, {machine['arch']}",
        "inputs     " + ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in report["inputs"]["tensors"])
        + f" ({report['inputs']['source']}; batch {report['inputs']['batch']})",
    ]
    check = report["outputs_check"]
    shapes = ", ".join(f"{o['dtype']}{o['shape']}" for o in check["outputs"])
    lines.append(f"outputs    {shapes}: " + ("finite, shapes as in the manifest: OK" if check["passed"]
                                             else "FAIL: " + "; ".join(check["problems"])))
    if report.get("note"):
        lines.append(f"note       {report['note']}")
    if report["tvm"]:
        lines.append(f"runs       {settings['warmup']} warm-up, then {settings['repeat']} repeats of "
                     f"{settings['number']} runs (TVM time_evaluator; statistics over the repeats' means)")
        lines += ["", (f"{'':<9}{'mean ms':>10}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'std ms':>10}"
                       f"{'inferences/s':>14}")]
        rows = [("TVM", report["tvm"])] + ([("PyTorch", report["torch"])] if report.get("torch") else [])
        for name, t in rows:
            lines.append(f"{name:<9}{t['mean_ms']:>10.4g}{t['median_ms']:>11.4g}{t['min_ms']:>10.4g}"
                         f"{t['max_ms']:>10.4g}{t['std_ms']:>10.3g}{t['inferences_per_s']:>14.1f}")
    if report.get("torch"):
        ratio = report["tvm_time_over_torch_time"]
        faster = f"TVM {1 / ratio:.2f}x faster" if ratio <= 1 else f"TVM {ratio:.2f}x slower"
        lines.append(f"TVM time / PyTorch time = {ratio:.3f} ({faster}; threads: TVM {threads['tvm']}, PyTorch "
                     f"{threads['torch']}; PyTorch {report['torch']['torch']} eager, no_grad, same inputs)")
    if "profile" in report:
        lines.append("")
        lines += _format_profile(report["profile"], report["tvm"])
    return "\n".join(lines)


def _format_profile(result: dict, end_to_end: dict | None) -> list[str]:
    if not result["available"]:
        return [f"profile: {result['reason']}"]
    whole = f" of {end_to_end['median_ms']:.4g} ms end to end (median); the rest is the VM's own work" \
        if end_to_end else ""
    lines = [f"per-kernel profile ({result['method']}): kernels {result['kernels_ms_per_run']:.4g} ms per run{whole}",
             f"{'kernel':<40}{'calls/run':>10}{'ms/run':>10}{'share':>8}"]
    for layer in result["layers"]:
        lines.append(f"{layer['function'][:39]:<40}{layer['calls_per_run']:>10}{layer['ms_per_run']:>10.4f}"
                     f"{layer['share']:>8.1%}")
    return lines


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_effconv.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="artifact folder from python -m tvm_effconv.compile")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--rpc", metavar="HOST:PORT", help="run on the TVM RPC server at this address")
    where.add_argument("--rpc-tracker", metavar="HOST:PORT", help="run on a device requested from this RPC tracker")
    where.add_argument("--emulate", nargs="?", const="", metavar="PRESET",
                       help="run on a freshly started emulated aarch64 device with the CPU of PRESET (default: the "
                            "artifact's); checks correctness only, timings under emulation mean nothing")
    parser.add_argument("--rpc-key", help="the device's key at the tracker (default: the preset's rpc_key)")
    parser.add_argument("--repeat", type=_positive, default=10, help="timed repeats (default 10)")
    parser.add_argument("--number", type=_positive, default=10, help="runs per repeat, averaged (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--inputs", metavar="FILE.npz", help="inputs keyed by the manifest's input names "
                                                             "(default: random, seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--threads", type=_positive,
                        help="threads for TVM (and PyTorch) on this machine (default: TVM's own: TVM_NUM_THREADS, "
                             "else its count of physical cores; --compare-torch gives PyTorch as many as TVM)")
    parser.add_argument("--profile", action="store_true", help="per-layer (per VM call) latency table")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also time the PyTorch model eagerly on this machine and print the ratio")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow --compare-torch to unpickle a pickled model (runs code from the file)")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON to this file")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the device and that an RPC session may last (default "
                             f"{DEFAULT_TIMEOUT:g})")
    args = parser.parse_args(argv)
    report = run(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_report(report), flush=True)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["outputs_check"]["passed"] else 1


if __name__ == "__main__":
    run_cli(main)
