"""Sessions with a device over TVM RPC (a real board, or the emulated one), with errors a user can act on.

TVM's own calls wait without limit on an unreachable host, a dead server or a busy tracker, and report
a dead device as a raw check failure; these helpers bound every wait and raise DeviceError naming the fix.
"""

import importlib.metadata
import os
import socket
import struct
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import DeviceError, EffconvError
from ..targets import AARCH64_HWCAPS, list_presets
from . import emulator

RPC_MAGIC = 0xFF271  # the first word of TVM's RPC handshake (tvm.rpc.base.RPC_MAGIC)
AT_HWCAP, AT_HWCAP2 = 16, 26  # getauxval() keys on Linux
SERVER_HINT = ("start one with `python -m tvm_effconv.device emulate --cpu cortex-a53`, or on a board "
               "`python -m tvm.exec.rpc_server --host BOARD_ADDRESS --port 9090 --port-end 9091`")
TRACKER_HINT = ("start one with `python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190 --port-end 9191` "
                "(with the host's network address instead of 127.0.0.1 when real boards register)")
# Text of TVM errors that mean the connection to the device is gone (TVM raises them as InternalError).
CONNECTION_LOST = ("kshutdown", "connection", "channel closes", "sockchannel", "broken pipe")


def parse_address(address: str) -> tuple[str, int]:
    """Split "HOST:PORT" (an IPv6 host in brackets) into (host, port)."""
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    if sep and host and port.isdigit() and 0 < int(port) < 65536:
        return host, int(port)
    raise EffconvError(f"invalid device address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9090")


def _open_socket(host: str, port: int, timeout: float, what: str, hint: str) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise DeviceError(f"cannot reach the {what} at {host}:{port} ({reason}): is it running? {hint}") from None


def probe_server(host: str, port: int, timeout: float) -> None:
    """Check within ``timeout`` s that an RPC server accepts a connection and answers its handshake.

    The probe offers a key no server expects: the server answers "mismatch" and closes without starting
    a session. This tells a live server from a dead or busy one (a TVM server serves one session at a
    time and answers nothing meanwhile) without the unbounded wait of ``tvm.rpc.connect``.
    """
    key = b"client:tvm-effconv-probe"
    with _open_socket(host, port, timeout, "RPC server", SERVER_HINT) as sock:
        try:
            sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
            answer = sock.recv(4)
        except TimeoutError:
            raise DeviceError(
                f"the RPC server at {host}:{port} accepted the connection but did not answer within {timeout:g} s: "
                "it is busy with another session, or stopped serving after a crashed session (restart it; for "
                f"an emulated device: `python -m tvm_effconv.device stop --port {port}`, then `emulate` again)"
            ) from None
        except OSError:
            answer = b""
    if len(answer) != 4:
        raise DeviceError(f"{host}:{port} closed the connection without answering: it is not a TVM RPC server")


def server_answers(host: str, port: int, timeout: float) -> bool:
    try:
        probe_server(host, port, timeout)
        return True
    except DeviceError:
        return False


def connect(address: str, timeout: float = 30, session_timeout: float = 600):
    """An RPC session with the server at "HOST:PORT"; the server ends it after ``session_timeout`` s.

    A server serves one session at a time: drop the session (``del``) before opening the next.
    """
    host, port = parse_address(address)
    probe_server(host, port, timeout)
    from tvm import rpc  # after the probe: a dead device is reported without the import's seconds

    try:
        return rpc.connect(host, port, session_timeout=session_timeout)
    except Exception as err:  # noqa: BLE001 - TVM raises bare RuntimeErrors here
        if "matches key" in str(err):  # the server waits for the key a tracker hands out
            raise DeviceError(
                f"the RPC server at {address} refused a direct session: it is registered with a tracker, which "
                "hands it out; request it from the tracker with its key (--tracker HOST:PORT --key KEY)"
            ) from None
        raise DeviceError(f"cannot open an RPC session with {address} ({_first_line(err)}); {SERVER_HINT}") from None


@contextmanager
def _tracker_socket(address: str, timeout: float):
    """A connection to an RPC tracker whose every reply is awaited at most ``timeout`` s."""
    host, port = parse_address(address)
    with _open_socket(host, port, timeout, "RPC tracker", TRACKER_HINT) as sock:
        from tvm.rpc import base  # after connecting: an unreachable tracker is reported without the import

        try:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            answer = base.recvall(sock, 4)
        except OSError as err:
            raise DeviceError(f"{address} did not answer as a TVM RPC tracker ({err})") from None
        if answer != struct.pack("<i", base.RPC_TRACKER_MAGIC):
            raise DeviceError(f"{address} is not a TVM RPC tracker")
        yield sock


def _tracker_call(sock: socket.socket, message: list):
    from tvm.rpc import base

    base.sendjson(sock, message)
    return base.recvjson(sock)


def tracker_summary(address: str, timeout: float = 10) -> dict:
    """The tracker's state: {"server_info": [{"key": "server:KEY", "addr": [host, port]}], "queue_info": {...}}."""
    with _tracker_socket(address, timeout) as sock:
        from tvm.rpc import base

        try:
            code, summary = _tracker_call(sock, [base.TrackerCode.SUMMARY])
        except (OSError, ValueError) as err:
            raise DeviceError(f"the RPC tracker at {address} did not answer a summary request ({err})") from None
    if code != base.TrackerCode.SUCCESS:
        raise DeviceError(f"the RPC tracker at {address} refused a summary request")
    return summary


def tracker_lists(tracker_address: str, key: str, port: int) -> bool:
    """Whether the tracker has a free server on ``port`` registered under ``key``."""
    summary = tracker_summary(tracker_address)
    registered = any(info.get("key") == f"server:{key}" and info.get("addr", [None, None])[1] == port
                     for info in summary["server_info"])
    return registered and summary["queue_info"].get(key, {}).get("free", 0) > 0


def registered_keys(tracker_address: str, timeout: float = 10) -> list[str]:
    """The device keys that have at least one server registered at the tracker."""
    summary = tracker_summary(tracker_address, timeout)
    return sorted({info["key"].removeprefix("server:") for info in summary["server_info"]})


def request_from_tracker(tracker_address: str, key: str, timeout: float = 60, session_timeout: float = 600):
    """An RPC session with a device registered under ``key``, waiting at most ``timeout`` s for a free one."""
    registered = registered_keys(tracker_address, timeout)
    from tvm import rpc
    from tvm.rpc import base

    if key not in registered:
        raise DeviceError(
            f"no device is registered under key {key!r} at the RPC tracker {tracker_address} (registered keys: "
            f"{', '.join(registered) or 'none'}); start one with "
            f"`python -m tvm_effconv.device emulate --cpu CPU --tracker {tracker_address} --key {key}`"
        )
    with _tracker_socket(tracker_address, timeout) as sock:
        try:
            code, (host, port, matchkey) = _tracker_call(sock, [base.TrackerCode.REQUEST, key, "", 1])
        except TimeoutError:
            raise DeviceError(
                f"no device with key {key!r} became free at the RPC tracker {tracker_address} within {timeout:g} s: "
                "all are busy; wait, raise the timeout, or start another device with that key"
            ) from None
        except (OSError, ValueError) as err:
            raise DeviceError(f"the RPC tracker at {tracker_address} failed a request for {key!r} ({err})") from None
    if code != base.TrackerCode.SUCCESS:
        raise DeviceError(f"the RPC tracker at {tracker_address} refused a request for key {key!r}")
    probe_server(host, port, timeout)
    try:
        return rpc.connect(host, port, matchkey, session_timeout=session_timeout)
    except Exception as err:  # noqa: BLE001 - TVM raises bare RuntimeErrors here
        raise DeviceError(f"the device {host}:{port} that the tracker gave for key {key!r} did not open a "
                          f"session ({_first_line(err)}); restart it") from None


def open_session(address: str | None = None, tracker: str | None = None, key: str | None = None,
                 timeout: float = 30, session_timeout: float = 600):
    """A session with the device at ``address``, or with one registered under ``key`` at ``tracker``."""
    if (address is None) == (tracker is None) or (tracker is not None and not key):
        raise EffconvError("name the device either by its address (HOST:PORT) or by --tracker HOST:PORT with --key KEY")
    if address is not None:
        return connect(address, timeout, session_timeout)
    return request_from_tracker(tracker, key, timeout, session_timeout)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@contextmanager
def device_errors(what: str, address: str = "ADDRESS"):
    """Turn failures of remote work (``what``, e.g. "running resnet18") into DeviceError.

    A device that dies mid-call (SIGILL from an instruction its CPU lacks, out of memory, reboot)
    reaches TVM as a closed connection; a session past its time limit as RPCSessionTimeoutError; an
    exception raised on the device as RPCError. Other errors are bugs on this side and pass unchanged.
    """
    from tvm import error

    try:
        yield
    except error.RPCSessionTimeoutError as err:
        raise DeviceError(f"the device session expired while {what}: pass a longer session timeout") from err
    except error.RPCError as err:
        remote = " ".join(str(err).removeprefix("RPCError: ").removeprefix("Error caught from RPC call:").split())
        raise DeviceError(f"the device reported an error while {what}: {remote}") from err
    except (ConnectionError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(word in str(err).lower() for word in CONNECTION_LOST):
            raise
        raise DeviceError(
            f"the device died while {what} ({_first_line(err)}); if it is an emulated or real CPU older than the "
            "target preset, an illegal instruction is the likely cause: check "
            f"`python -m tvm_effconv.device features {address}`. A TVM RPC server stops serving after a crashed "
            "session: restart it"
        ) from err


def _probe_library() -> Path:
    """The aarch64 library of the CPU features probe, compiled once per TVM version."""
    path = emulator.cache_dir() / "probes" / f"hwcap-probe-{importlib.metadata.version('apache-tvm')}.so"
    if path.is_file():
        return path
    emulator.require_tools(emulator.CROSS_CXX)
    import tvm
    from tvm.script import tirx as T
    from tvm.support import cc

    @T.prim_func
    def hwcap_probe(out: T.Buffer((2,), "int64")):
        out[0] = T.call_extern("int64", "getauxval", T.int64(AT_HWCAP))
        out[1] = T.call_extern("int64", "getauxval", T.int64(AT_HWCAP2))

    executable = tvm.compile(hwcap_probe, target=tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    executable.export_library(str(partial), fcompile=cc.cross_compiler(emulator.CROSS_CXX))
    partial.rename(path)  # atomic: a concurrent caller never loads half a library
    return path


def device_features(session, address: str = "ADDRESS") -> dict:
    """What the remote aarch64 CPU supports, from the kernel's HWCAP words read by a probe run on it.

    Returns {"arch": "aarch64", "hwcap": int, "hwcap2": int, "features": [TVM feature flags present]}.
    """
    import numpy as np
    import tvm

    library = _probe_library()
    # A fresh name per call: overwriting a library the server has loaded crashes it.
    remote_name = f"{library.stem}-{uuid.uuid4().hex}.so"
    with device_errors("running the CPU features probe", address):
        session.upload(str(library), target=remote_name)
        probe = session.load_module(remote_name)["hwcap_probe"]
        words = tvm.runtime.tensor(np.zeros(2, dtype="int64"), device=session.cpu())
        probe(words)
        hwcap, hwcap2 = (int(word) & (2**64 - 1) for word in words.numpy())
    vectors = {"AT_HWCAP": hwcap, "AT_HWCAP2": hwcap2}
    features = [flag for flag, (vector, bit) in AARCH64_HWCAPS.items() if vectors[vector] >> bit & 1]
    return {"arch": "aarch64", "hwcap": hwcap, "hwcap2": hwcap2, "features": features}


def matching_presets(device_features: dict) -> list[str]:
    """The ARM target presets whose every required CPU feature the device has."""
    have = set(device_features["features"])
    return [preset.name for preset in list_presets()
            if preset.family == "arm" and set(preset.required_cpu_features()) <= have]


def check_features(required: list[str], device_features: dict, artifact_desc: str) -> None:
    """Raise DeviceError if the device lacks a CPU feature that the artifact (e.g. "preset arm-a76") needs."""
    have = device_features["features"]
    missing = [flag for flag in required if flag not in have]
    if missing:
        raise DeviceError(
            f"the artifact for {artifact_desc} needs CPU features {', '.join(missing)} which the device "
            f"({device_features['arch']} with {', '.join(have) or 'no optional features'}) lacks; compile for a "
            f"preset matching the device, e.g. {' / '.join(matching_presets(device_features)) or 'arm'}"
        )
