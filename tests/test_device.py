"""Tests of tvm_effconv.device: RPC helpers, the emulated aarch64 device and its CLI.

The tests marked `emulated` run aarch64 code under qemu (one device per CPU, module-scoped); the others
need neither qemu nor a device. Ports 9300-9399 on 127.0.0.1 only.
"""

import json
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tvm import error as tvm_error

from tvm_effconv.device import emulator, rpc
from tvm_effconv.device.__main__ import main as cli_main
from tvm_effconv.errors import DeviceError, EffconvError, ToolMissingError
from tvm_effconv.targets import get_preset

A53_PORT, A76_PORT, DYING_PORT, CLI_PORT, TRACKED_PORT, BUSY_PORT = 9301, 9302, 9303, 9304, 9305, 9350
UNUSED_PORT = 9399
needs_qemu = pytest.mark.skipif(shutil.which(emulator.QEMU) is None, reason="qemu-user-static is not installed")


def listening_socket(port: int) -> socket.socket:
    """A socket that listens on 127.0.0.1:port and never accepts: a hung server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(8)
    return sock


# --- addresses and unreachable devices ---

@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:9090", ("127.0.0.1", 9090)),
    ("board.local:1", ("board.local", 1)),
    ("[::1]:9190", ("::1", 9190)),
])
def test_parse_address(address, expected):
    assert rpc.parse_address(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", ":9090", "host:port", "host:70000", "host:0"])
def test_parse_address_rejects_malformed(address):
    with pytest.raises(EffconvError, match="expected HOST:PORT"):
        rpc.parse_address(address)


def test_unreachable_server_fails_fast():
    started = time.monotonic()
    with pytest.raises(DeviceError, match="cannot reach the RPC server at 127.0.0.1:9399.*device emulate"):
        rpc.connect(f"127.0.0.1:{UNUSED_PORT}")
    assert time.monotonic() - started < 2


def test_silent_server_fails_within_timeout():
    with listening_socket(BUSY_PORT):
        started = time.monotonic()
        with pytest.raises(DeviceError, match="did not answer within 0.5 s"):
            rpc.connect(f"127.0.0.1:{BUSY_PORT}", timeout=0.5)
        assert time.monotonic() - started < 2


def test_unreachable_tracker_fails_fast():
    started = time.monotonic()
    with pytest.raises(DeviceError, match="cannot reach the RPC tracker.*rpc_tracker"):
        rpc.request_from_tracker(f"127.0.0.1:{UNUSED_PORT}", "arm-a53", timeout=30)
    assert time.monotonic() - started < 2


def test_open_session_needs_address_or_tracker_and_key():
    with pytest.raises(EffconvError, match="either by its address"):
        rpc.open_session(tracker="127.0.0.1:9190")


# --- converting remote failures ---

@pytest.mark.parametrize("failure, message", [
    (tvm_error.InternalError("Check failed: (code == RPCCode::kReturn) is false: code=kShutdown"), "died while"),
    (ConnectionResetError(104, "Connection reset by peer"), "died while"),
    (tvm_error.RPCSessionTimeoutError("RPCSessionTimeoutError: Your 2.0s session has expired"), "expired"),
    (tvm_error.RPCError("RPCError: Error caught from RPC call:\nExpected 1 arguments"),
     "reported an error while running x: Expected 1 arguments"),
], ids=["shutdown", "reset", "expired", "remote-exception"])
def test_device_errors_converts_remote_failures(failure, message):
    with pytest.raises(DeviceError, match=message):
        with rpc.device_errors("running x", "127.0.0.1:9090"):
            raise failure


def test_device_death_message_names_the_likely_cause_and_the_check():
    with pytest.raises(DeviceError) as caught:
        with rpc.device_errors("running x", "127.0.0.1:9090"):
            raise tvm_error.InternalError("code=kShutdown")
    assert "illegal instruction" in str(caught.value)
    assert "python -m tvm_effconv.device features 127.0.0.1:9090" in str(caught.value)


@pytest.mark.parametrize("failure", [ValueError("bad shape"), RuntimeError("unrelated bug")])
def test_device_errors_passes_local_errors(failure):
    with pytest.raises(type(failure)):
        with rpc.device_errors("running x"):
            raise failure


# --- CPU features ---

def test_check_features_names_missing_features_and_fitting_presets():
    a53_like = {"arch": "aarch64", "hwcap": 0x8FB, "hwcap2": 0, "features": ["has_asimd"]}
    required = get_preset("arm-a76").required_cpu_features()
    assert "has_dotprod" in required
    with pytest.raises(DeviceError, match="preset arm-a76 needs CPU features .*has_dotprod.*e.g. arm-a53"):
        rpc.check_features(required, a53_like, "preset arm-a76")
    rpc.check_features(get_preset("arm-a53").required_cpu_features(), a53_like, "preset arm-a53")


# --- the emulated device without qemu ---

def test_missing_tools_name_their_debian_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match="qemu-user-static g\\+\\+-aarch64-linux-gnu.*scripts/install.sh"):
        emulator.ensure_sysroot(verbose=False)


def test_busy_port_is_refused():
    with listening_socket(BUSY_PORT):
        with pytest.raises(DeviceError, match=f"port {BUSY_PORT} on 127.0.0.1 is busy"):
            emulator.start("cortex-a53", port=BUSY_PORT)


@needs_qemu
def test_unknown_cpu_lists_the_valid_ones():
    with pytest.raises(EffconvError, match="cannot emulate CPU 'cortex-a99'; valid CPUs: .*cortex-a53.*cortex-a76"):
        emulator.start("cortex-a99", port=BUSY_PORT)


@needs_qemu
def test_interrupted_sysroot_build_never_looks_complete(monkeypatch, tmp_path):
    monkeypatch.setenv("TVM_EFFCONV_CACHE", str(tmp_path))

    def interrupted_build(root, versions, progress):
        (root / "half").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr(emulator, "_build_sysroot", interrupted_build)
    with pytest.raises(KeyboardInterrupt):
        emulator.ensure_sysroot(verbose=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    def complete_build(root, versions, progress):
        (root / "usr/bin").mkdir(parents=True)  # where the launcher goes
        (root / "whole").write_text("")

    monkeypatch.setattr(emulator, "_build_sysroot", complete_build)
    sysroot = emulator.ensure_sysroot(verbose=False)
    assert (sysroot / "whole").is_file() and (sysroot / emulator.STAMP).is_file()
    monkeypatch.setattr(emulator, "_build_sysroot", interrupted_build)
    assert emulator.ensure_sysroot(verbose=False) == sysroot  # complete: not rebuilt


def test_stale_state_files_are_cleaned(monkeypatch, tmp_path):
    monkeypatch.setenv("TVM_EFFCONV_CACHE", str(tmp_path))
    finished = subprocess.Popen(["true"])
    finished.wait()
    emulator.devices_dir().mkdir(parents=True)
    state = emulator.devices_dir() / "9397.json"
    state.write_text(json.dumps({"cpu": "cortex-a53", "host": "127.0.0.1", "port": 9397, "pid": finished.pid,
                                 "log_path": str(tmp_path / "9397.log"), "started_at": 1.0}))
    assert emulator.running_devices() == []
    assert not state.exists()


def test_cli_reports_user_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TVM_EFFCONV_CACHE", str(tmp_path))
    with pytest.raises(EffconvError, match="no emulated device runs on port 9396"):
        cli_main(["stop", "--port", "9396"])
    with pytest.raises(EffconvError, match="either by its address"):
        cli_main(["features"])
    assert cli_main(["list"]) == 0
    assert "no emulated device runs here" in capsys.readouterr().out


# --- emulated devices ---

@pytest.fixture(scope="module")
def a53():
    with emulator.start("cortex-a53", port=A53_PORT) as device:
        yield device


@pytest.fixture(scope="module")
def a76():
    with emulator.start("cortex-a76", port=A76_PORT) as device:
        yield device


def probe_features(device) -> dict:
    session = rpc.connect(device.address)
    return rpc.device_features(session, device.address)  # the session closes when dropped


@pytest.fixture(scope="module")
def a53_features(a53):
    return probe_features(a53)


@pytest.fixture(scope="module")
def a76_features(a76):
    return probe_features(a76)


@pytest.mark.emulated
def test_cortex_a53_has_no_dotprod(a53_features):
    assert a53_features["arch"] == "aarch64"
    assert a53_features["features"] == ["has_asimd"]


@pytest.mark.emulated
def test_cortex_a76_has_dotprod_and_fp16(a76_features):
    assert {"has_asimd", "has_dotprod", "has_fp16_simd"} <= set(a76_features["features"])
    assert "has_matmul_i8" not in a76_features["features"]


@pytest.mark.emulated
def test_check_features_against_emulated_devices(a53_features, a76_features):
    a76_needs = get_preset("arm-a76").required_cpu_features()
    with pytest.raises(DeviceError, match="needs CPU features .*has_dotprod"):
        rpc.check_features(a76_needs, a53_features, "preset arm-a76")
    rpc.check_features(a76_needs, a76_features, "preset arm-a76")
    assert "arm-a76" not in rpc.matching_presets(a53_features)
    assert {"arm", "arm-a53", "arm-a76"} <= set(rpc.matching_presets(a76_features))


@pytest.mark.emulated
def test_running_devices_are_listed_and_their_ports_refused(a53, a76):
    assert emulator.find_device(A53_PORT).cpu == "cortex-a53"
    assert emulator.find_device(A76_PORT).address == f"127.0.0.1:{A76_PORT}"
    with pytest.raises(DeviceError, match=f"already runs on port {A53_PORT}"):
        emulator.start("cortex-a53", port=A53_PORT)


def sdot_library(tmp_path):
    """A kernel with an `sdot` instruction (dotprod, ARMv8.2), compiled for preset arm-a76."""
    import tvm
    from tvm.script import tirx as T
    from tvm.support import cc

    @T.prim_func
    def sdot(a: T.Buffer((16,), "int8"), b: T.Buffer((16,), "int8"), c: T.Buffer((4,), "int32")):
        c[T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            T.broadcast(T.int32(0), 4), a.vload([0], "int8x16"), b.vload([0], "int8x16"), dtype="int32x4")

    path = tmp_path / "sdot.so"
    executable = tvm.compile(sdot, target=tvm.target.Target(get_preset("arm-a76").target_dict))
    executable.export_library(str(path), fcompile=cc.cross_compiler(emulator.CROSS_CXX))
    return path


def run_sdot(device, library) -> np.ndarray:
    import tvm

    a, b = np.arange(-8, 8, dtype="int8"), np.arange(16, dtype="int8")
    session = rpc.connect(device.address)
    with rpc.device_errors("running the sdot kernel", device.address):
        session.upload(str(library))
        kernel = session.load_module(library.name)["sdot"]
        out = tvm.runtime.tensor(np.zeros(4, "int32"), device=session.cpu())
        kernel(tvm.runtime.tensor(a, device=session.cpu()), tvm.runtime.tensor(b, device=session.cpu()), out)
        np.testing.assert_array_equal(out.numpy(), (a.astype("int32") * b).reshape(4, 4).sum(axis=1))


@pytest.mark.emulated
def test_illegal_instruction_kills_the_device_with_a_clear_error(a76, tmp_path):
    library = sdot_library(tmp_path)
    run_sdot(a76, library)  # the kernel is right where the CPU has dotprod
    with emulator.start("cortex-a53", port=DYING_PORT) as dying:
        started = time.monotonic()
        with pytest.raises(DeviceError, match="the device died while running the sdot kernel.*illegal instruction"):
            run_sdot(dying, library)
        assert time.monotonic() - started < 30
        assert "exited unsuccessfully with error code -4" in dying.log_tail()  # SIGILL
        # TVM's server stops serving after a crashed session; connecting says so within the timeout.
        with pytest.raises(DeviceError, match="did not answer within 2 s"):
            rpc.connect(dying.address, timeout=2)
    assert not emulator.group_processes(dying.pid)
    assert emulator.find_device(DYING_PORT) is None


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvm_effconv.device", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture
def cli_device_port():
    yield CLI_PORT
    leftover = emulator.find_device(CLI_PORT)
    if leftover is not None:
        leftover.stop()


@pytest.mark.emulated
def test_cli_emulate_features_stop(cli_device_port):
    started = run_cli("emulate", "--preset", "arm-a72", "--port", str(cli_device_port))
    assert started.returncode == 0, started.stderr
    assert f"ready at 127.0.0.1:{cli_device_port}" in started.stdout
    assert f"stop --port {cli_device_port}" in started.stdout
    device = emulator.find_device(cli_device_port)  # runs on after the CLI exited
    assert device.cpu == "cortex-a72"
    assert f"127.0.0.1:{cli_device_port}" in run_cli("list").stdout

    features = run_cli("features", f"127.0.0.1:{cli_device_port}", "--json")
    assert features.returncode == 0, features.stderr
    assert json.loads(features.stdout)["features"] == ["has_asimd"]

    stopped = run_cli("stop", "--port", str(cli_device_port))
    assert stopped.returncode == 0, stopped.stderr
    assert not emulator.group_processes(device.pid)
    assert emulator.find_device(cli_device_port) is None


@pytest.mark.emulated
def test_device_registered_with_a_tracker(rpc_tracker):
    tracker = rpc_tracker
    with emulator.start("cortex-a53", port=TRACKED_PORT, tracker=tracker, key="effconv-test") as device:
        assert rpc.tracker_lists(tracker, "effconv-test", TRACKED_PORT)
        session = rpc.request_from_tracker(tracker, "effconv-test", timeout=10)
        assert rpc.device_features(session)["features"] == ["has_asimd"]

        started = time.monotonic()
        with pytest.raises(DeviceError, match="no device with key 'effconv-test' became free .* within 1 s"):
            rpc.request_from_tracker(tracker, "effconv-test", timeout=1)
        assert time.monotonic() - started < 5
        with pytest.raises(DeviceError, match="registered keys: effconv-test"):
            rpc.request_from_tracker(tracker, "arm-a76", timeout=1)
        del session

        with pytest.raises(DeviceError, match="registered with a tracker"):
            rpc.connect(device.address, timeout=10)
        assert rpc.request_from_tracker(tracker, "effconv-test", timeout=30) is not None  # free again
