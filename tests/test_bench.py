"""The bench command: artifact checks, local runs (timings, profile, PyTorch ratio), RPC devices (direct, via a
tracker, emulated) and their failures.

Native RPC servers (``python -m tvm.exec.rpc_server`` on this machine) stand in for devices wherever the
architecture does not matter; the tests marked `emulated` run aarch64 code under qemu. Ports 9400-9499 on
127.0.0.1 only; every process a test starts runs in its own process group, killed by a fixture finalizer.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tvm_effconv import bench
from tvm_effconv.bench import main
from tvm_effconv.compile import compile_model
from tvm_effconv.device import emulator, rpc
from tvm_effconv.errors import ArtifactError, DeviceError, EffconvError, run_cli

EXAMPLE = "tvm_effconv.models.examples:small_cnn"
TRACKER_PORT, TRACKED_PORTS, DYING_PORT, DIRECT_PORT, UNUSED_PORT = 9490, (9492, 9494), 9496, 9497, 9499
# The host preset's rpc_key: the tracked servers use it, so the command finds them without --rpc-key.
HOST_KEY = "host"
QUICK = ["--warmup", "1", "--number", "2", "--repeat", "2"]


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory) -> Path:
    return compile_model(EXAMPLE, "host", tmp_path_factory.mktemp("bench") / "host", run_verify=False, log=quiet)


@pytest.fixture(scope="module")
def arm_artifact(tmp_path_factory) -> Path:
    return compile_model(EXAMPLE, "arm", tmp_path_factory.mktemp("bench") / "arm", run_verify=False, log=quiet)


def altered_copy(artifact: Path, folder: Path, **manifest_changes) -> Path:
    """A copy of ``artifact`` whose manifest has ``manifest_changes``."""
    copy = Path(shutil.copytree(artifact, folder))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return copy


# --- processes: an RPC tracker and native RPC servers ---

class ProcessGroups:
    """Processes started in their own process groups, all killed by ``stop_all``."""

    def __init__(self):
        self.processes = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        # TVM's runtime alone is all a server or tracker needs, and it imports faster.
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
        self.processes.append(process)
        return process

    def stop_all(self):
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the server's session workers are in its group
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def module_processes():
    groups = ProcessGroups()
    yield groups
    groups.stop_all()


@pytest.fixture
def processes():
    groups = ProcessGroups()
    yield groups
    groups.stop_all()


def wait_until(ready, what: str, process: subprocess.Popen, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"{what} exited with status {process.returncode}"
        assert time.monotonic() < deadline, f"{what} did not get ready within {timeout} s"
        time.sleep(0.2)


def start_server(groups: ProcessGroups, port: int, log: Path, tracker: str | None = None) -> subprocess.Popen:
    """A native TVM RPC server on 127.0.0.1:port, registered at ``tracker`` under HOST_KEY if given."""
    args = ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    return groups.start(args + (["--tracker", tracker, "--key", HOST_KEY] if tracker else []), log)


@pytest.fixture(scope="module")
def tracked_servers(module_processes, tmp_path_factory):
    """An RPC tracker with two native RPC servers registered under HOST_KEY: (tracker address, {port: log})."""
    logs_dir = tmp_path_factory.mktemp("tracked")
    tracker = f"127.0.0.1:{TRACKER_PORT}"
    process = module_processes.start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(TRACKER_PORT),
                                      "--port-end", str(TRACKER_PORT + 1)], logs_dir / "tracker.log")

    def tracker_answers():
        try:
            return rpc.tracker_summary(tracker, timeout=1) is not None
        except DeviceError:
            return False

    wait_until(tracker_answers, "the RPC tracker", process)
    logs = {port: logs_dir / f"server-{port}.log" for port in TRACKED_PORTS}
    servers = {port: start_server(module_processes, port, log, tracker) for port, log in logs.items()}
    for port, server in servers.items():
        wait_until(lambda port=port: rpc.tracker_lists(tracker, HOST_KEY, port), f"the RPC server on port {port}",
                   server)
    return tracker, logs


def wait_all_free(tracker: str, count: int):
    """Wait until ``count`` servers are free at the tracker (a server re-registers after each session)."""
    deadline = time.monotonic() + 30
    while rpc.tracker_summary(tracker)["queue_info"].get(HOST_KEY, {}).get("free", 0) < count:
        assert time.monotonic() < deadline, "the tracked RPC servers did not become free again"
        time.sleep(0.2)


# --- the artifact ---

def test_load_artifact_reads_the_manifest_and_the_code_architecture(host_artifact):
    artifact = bench.load_artifact(host_artifact)
    assert artifact.preset == "host" and artifact.arch == "x86_64" and not artifact.is_cuda
    assert artifact.inputs == [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]


def break_manifest(folder: Path):
    (folder / "manifest.json").write_text('{"preset": "host", "target": ')


def drop_input_shapes(folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["inputs"][0]["shape"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def tamper_library(folder: Path):
    with open(folder / "model.so", "ab") as library:
        library.write(b"\0")


@pytest.mark.parametrize("damage, message", [
    (lambda folder: shutil.rmtree(folder), "artifact folder .* not found; recompile"),
    (lambda folder: (folder / "manifest.json").unlink(), "has no manifest.json: .*copy the whole folder again"),
    (break_manifest, "manifest.json is corrupt"),
    (drop_input_shapes, "lacks or mangles the field.* inputs"),
    (lambda folder: (folder / "model.so").unlink(), "model.so is missing; copy the whole artifact folder"),
    (tamper_library, "model.so does not match the sha256 in manifest.json: it was modified or copied incompletely"),
], ids=["no-folder", "no-manifest", "corrupt-manifest", "incomplete-manifest", "no-library", "tampered-library"])
def test_damaged_artifacts_are_refused(host_artifact, tmp_path, damage, message):
    folder = Path(shutil.copytree(host_artifact, tmp_path / "copy"))
    damage(folder)
    with pytest.raises(ArtifactError, match=message):
        bench.load_artifact(folder)


def test_cli_reports_a_bad_artifact_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        run_cli(main, [str(tmp_path / "missing")])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: artifact folder") and "Traceback" not in error


# --- inputs ---

def test_random_inputs_are_seeded(host_artifact):
    artifact = bench.load_artifact(host_artifact)
    first, again, other = (bench.make_inputs(artifact, seed=seed)[0] for seed in (0, 0, 1))
    assert first.shape == (1, 3, 32, 32) and first.dtype == np.float32
    assert np.array_equal(first, again) and not np.array_equal(first, other)


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((1, 3, 32, 32), "float32")}, "holds arrays image; the model takes x .*numpy.savez"),
    ({"x": np.zeros((1, 3, 64, 64), "float32")}, r"'x' in .* is float32\[1, 3, 64, 64\]; .*compiled for float32\[1, 3, 32, 32\]"),
    ({"x": np.zeros((1, 3, 32, 32))}, r"is float64\[1, 3, 32, 32\]; .*astype\('float32'\)"),
], ids=["wrong-name", "wrong-shape", "wrong-dtype"])
def test_wrong_npz_inputs_are_refused(host_artifact, tmp_path, arrays, message):
    np.savez(tmp_path / "inputs.npz", **arrays)
    with pytest.raises(EffconvError, match=message):
        bench.make_inputs(bench.load_artifact(host_artifact), str(tmp_path / "inputs.npz"))


def test_npz_inputs_are_used(host_artifact, tmp_path):
    given = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype("float32")
    np.savez(tmp_path / "inputs.npz", x=given)
    assert np.array_equal(bench.make_inputs(bench.load_artifact(host_artifact), str(tmp_path / "inputs.npz"))[0], given)
    assert main([str(host_artifact), "--inputs", str(tmp_path / "inputs.npz"), "--json", str(tmp_path / "r.json"),
                 *QUICK]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["inputs"]["source"] == str(tmp_path / "inputs.npz")


# --- local runs ---

def test_local_run_times_profiles_and_compares_with_pytorch(host_artifact, tmp_path, capsys):
    out = tmp_path / "report" / "bench.json"
    assert main([str(host_artifact), "--warmup", "1", "--number", "5", "--repeat", "3", "--profile",
                 "--compare-torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("mean ms", "median ms", "std ms", "inferences/s", "TVM time / PyTorch time", "per-kernel profile",
                 "finite, shapes as in the manifest: OK"):
        assert text in printed
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] == os.cpu_count() and report["machine"]["cpu"]
    assert report["device"]["kind"] == "local" and report["device"]["arch"] == "x86_64"
    timings = report["tvm"]
    assert len(timings["repeats_ms"]) == 3
    assert timings["min_ms"] <= timings["median_ms"] <= timings["max_ms"]
    assert timings["inferences_per_s"] == pytest.approx(1e3 / timings["mean_ms"])  # batch 1
    assert report["threads"]["torch"] == report["threads"]["tvm"] >= 1
    assert report["tvm_time_over_torch_time"] == pytest.approx(timings["mean_ms"] / report["torch"]["mean_ms"])
    layers = report["profile"]["layers"]
    assert any("conv2d" in layer["function"] for layer in layers)  # names depend on the schedules
    assert not any(layer["function"].startswith("vm.builtin.") for layer in layers)
    assert [layer["ms_per_run"] for layer in layers] == sorted((layer["ms_per_run"] for layer in layers), reverse=True)
    assert sum(layer["share"] for layer in layers) == pytest.approx(1.0)


def test_command_line_with_threads(host_artifact, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "tvm_effconv.bench", str(host_artifact), "--threads", "2", "--json",
                           str(out), *QUICK], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "inferences/s" in done.stdout
    assert json.loads(out.read_text())["threads"] == {"tvm": 2, "TVM_NUM_THREADS": "2"}


def test_arm_artifact_run_locally_is_refused_before_running(arm_artifact):
    with pytest.raises(DeviceError, match="holds aarch64 code .* this machine .* is x86_64: run it on an aarch64 "
                                          "device: --emulate"):
        main([str(arm_artifact)])


def test_cuda_artifact_without_a_gpu_is_refused(host_artifact, tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")
    cuda = altered_copy(host_artifact, tmp_path / "cuda", preset="cuda", target={"kind": "cuda", "arch": "sm_80"})
    with pytest.raises(DeviceError, match="is CUDA code .* has no CUDA GPU"):
        main([str(cuda)])


@pytest.mark.parametrize("options, message", [
    (["--rpc", "127.0.0.1:9499", "--compare-torch"], "--compare-torch times PyTorch on this machine"),
    (["--rpc-key", "rpi4"], "--rpc-key names the device at a tracker"),
    (["--rpc", "127.0.0.1:9499", "--threads", "2"], "--threads sets this machine's thread count"),
    (["--emulate"], "preset host has none to emulate"),
], ids=["compare-torch-remote", "key-without-tracker", "threads-remote", "emulate-host"])
def test_conflicting_options_are_refused(host_artifact, options, message):
    with pytest.raises(EffconvError, match=message):
        main([str(host_artifact), *options])


# --- RPC devices ---

def test_unreachable_server_fails_fast(host_artifact):
    started = time.monotonic()
    with pytest.raises(DeviceError, match=f"cannot reach the RPC server at 127.0.0.1:{UNUSED_PORT}"):
        main([str(host_artifact), "--rpc", f"127.0.0.1:{UNUSED_PORT}"])
    assert time.monotonic() - started < 3


def serving_interval(log: Path, workdir: str) -> tuple[datetime, datetime]:
    """When the server that logged it started and finished serving the session with this working folder."""
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if f"start serving at {workdir.rstrip('/')}" in line)
    finish = next(line for line in lines[start:] if "finish serving" in line)
    return tuple(datetime.strptime(" ".join(line.split()[:2]), "%Y-%m-%d %H:%M:%S.%f") for line in (lines[start], finish))


def test_two_clients_at_once_are_served_by_different_devices(host_artifact, tracked_servers, tmp_path):
    tracker, logs = tracked_servers
    wait_all_free(tracker, len(logs))
    outs = [tmp_path / f"client{i}.json" for i in range(2)]
    results = {}

    def client(out: Path):
        try:  # runs long enough (about 0.3 s timed) for the two sessions to overlap
            results[out] = main([str(host_artifact), "--rpc-tracker", tracker, "--warmup", "1", "--number", "300",
                                 "--repeat", "10", "--timeout", "60", "--profile", "--json", str(out)])
        except EffconvError as err:  # reported by the assertion below
            results[out] = err

    clients = [threading.Thread(target=client, args=(out,)) for out in outs]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=120)
    assert results == {out: 0 for out in outs}
    wait_all_free(tracker, len(logs))  # the servers have logged the end of their sessions
    reports = [json.loads(out.read_text()) for out in outs]
    assert all(report["device"]["kind"] == "tracker" and report["tvm"]["mean_ms"] > 0 for report in reports)
    # per-kernel profiles over RPC, from the artifact's kernels.so and the manifest's kernel calls
    assert all(report["profile"]["available"] and report["profile"]["layers"] for report in reports)
    assert all("on the device" in report["profile"]["method"] for report in reports)
    workdirs = [report["device"]["session_workdir"] for report in reports]
    served_by = [next(port for port, log in logs.items() if f"start serving at {workdir.rstrip('/')}" in log.read_text())
                 for workdir in workdirs]
    assert sorted(served_by) == sorted(logs)  # one client on each device
    (start_a, end_a), (start_b, end_b) = (serving_interval(logs[port], workdir)
                                          for port, workdir in zip(served_by, workdirs))
    assert start_a < end_b and start_b < end_a  # at the same time


def test_tracker_without_a_free_device_waits_for_the_timeout(host_artifact, tracked_servers):
    tracker, logs = tracked_servers
    wait_all_free(tracker, len(logs))
    with pytest.raises(DeviceError, match="no device is registered under key 'rpi4' .*registered keys: host"):
        main([str(host_artifact), "--rpc-tracker", tracker, "--rpc-key", "rpi4", "--timeout", "2"])
    held = [rpc.request_from_tracker(tracker, HOST_KEY, timeout=30) for _ in logs]  # every device busy
    started = time.monotonic()
    with pytest.raises(DeviceError, match="no device with key 'host' became free .* within 2 s"):
        main([str(host_artifact), "--rpc-tracker", tracker, "--timeout", "2"])
    assert 2 <= time.monotonic() - started < 8
    del held


def test_direct_rpc_run_times_the_model_on_the_server(host_artifact, processes, tmp_path):
    server = start_server(processes, DIRECT_PORT, tmp_path / "server.log")
    wait_until(lambda: rpc.server_answers("127.0.0.1", DIRECT_PORT, timeout=1), "the RPC server", server)
    report = tmp_path / "r.json"
    assert main([str(host_artifact), "--rpc", f"127.0.0.1:{DIRECT_PORT}", *QUICK, "--profile", "--json",
                 str(report)]) == 0
    result = json.loads(report.read_text())
    assert f"127.0.0.1:{DIRECT_PORT}" in json.dumps(result)
    layers = result["profile"]["layers"]
    assert layers and abs(sum(layer["share"] for layer in layers) - 1) < 1e-6
    assert [layer["ms_per_run"] for layer in layers] == sorted((layer["ms_per_run"] for layer in layers), reverse=True)
    assert "load_module" in (tmp_path / "server.log").read_text()  # it ran there, not here


def test_device_dying_mid_run_fails_within_a_bounded_time(host_artifact, processes, tmp_path):
    log = tmp_path / "server.log"
    server = start_server(processes, DYING_PORT, log)
    wait_until(lambda: rpc.server_answers("127.0.0.1", DYING_PORT, timeout=1), "the RPC server", server)
    killed_at = []

    def kill_during_timing():
        deadline = time.monotonic() + 60
        while "load_module" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # past the first run and the warm-up: inside time_evaluator
        os.killpg(server.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_during_timing)
    killer.start()
    try:  # about 100 s of timing if nothing stopped it
        with pytest.raises(DeviceError, match="the device died while timing the model on the RPC device at"):
            main([str(host_artifact), "--rpc", f"127.0.0.1:{DYING_PORT}", "--number", "100000", "--repeat", "10",
                  "--timeout", "120"])
    finally:
        killer.join()
    assert killed_at and time.monotonic() - killed_at[0] < 10


# --- the emulated aarch64 device ---

@pytest.mark.emulated
def test_emulate_runs_once_and_says_timings_mean_nothing(arm_artifact, tmp_path, capsys):
    before = {device.port for device in emulator.running_devices()}
    assert main([str(arm_artifact), "--emulate", "--profile", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "timings under emulation are not meaningful" in printed and "mean ms" not in printed
    assert "no per-kernel profile under emulation" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["device"]["kind"] == "emulated" and "cortex-a53" in report["device"]["description"]
    assert report["device"]["arch"] == "aarch64" and report["device"]["cpu_features"] == ["has_asimd"]
    assert report["tvm"] is None and report["outputs_check"]["passed"]
    assert report["outputs_check"]["outputs"] == [{"shape": [1, 10], "dtype": "float32"}]
    assert {device.port for device in emulator.running_devices()} == before  # stopped again


@pytest.mark.emulated
def test_x86_artifact_on_the_emulated_device_is_refused_before_running(host_artifact, emulated_device):
    device = emulated_device("cortex-a53")
    loads_before = device.log_path.read_text().count("load_module")
    with pytest.raises(DeviceError, match="holds x86_64 code .* the RPC device at .* is aarch64"):
        main([str(host_artifact), "--rpc", device.address])
    assert device.log_path.read_text().count("load_module") == loads_before  # nothing was loaded
    assert rpc.connect(device.address, timeout=10)  # the failed run released its session: the device serves
