"""The emulated aarch64 device: TVM's RPC server in Debian's arm64 CPython under qemu-user.

``ensure_sysroot()`` builds, once per TVM version, a sysroot with Debian's arm64 CPython 3.11 and the
aarch64 wheels of the TVM runtime at exactly the host's versions (both RPC ends must match).
``start(cpu)`` runs ``python -m tvm.exec.rpc_server`` in it under ``qemu-aarch64-static -cpu CPU``.

The emulated CPU checks the ISA (an ``sdot`` on ``cortex-a53`` dies with SIGILL), which makes it a
device for correctness and ISA legality. Its timings mean nothing for real hardware.
"""

import fcntl
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

import psutil

from ..errors import DeviceError, EffconvError, ToolMissingError

QEMU = "qemu-aarch64-static"
CROSS_CXX = "aarch64-linux-gnu-g++"
# Host tools the emulated device needs -> the Debian package that provides each.
HOST_TOOLS = {QEMU: "qemu-user-static", CROSS_CXX: "g++-aarch64-linux-gnu", "apt-get": "apt", "dpkg": "dpkg"}
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBIAN_SOURCES = (
    "deb [signed-by={keyring}] http://deb.debian.org/debian bookworm bookworm-updates main\n"
    "deb [signed-by={keyring}] http://deb.debian.org/debian-security bookworm-security main\n"
)
# Debian arm64 packages that make a working python3.11 (the closure of python3.11-minimal and
# libpython3.11-stdlib, without what the RPC server never loads).
DEBIAN_PACKAGES = """
    libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libzstd1 libuuid1
    libcrypt1 libsqlite3-0 libdb5.3 libtinfo6 libncursesw6 libreadline8 readline-common libnsl2
    libtirpc3 libtirpc-common libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2
    libkeyutils1 media-types python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
""".split()
# Python distributions the RPC server imports, installed at the host's versions.
DEVICE_DISTRIBUTIONS = [
    "apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions", "psutil", "cloudpickle",
]
# Debian 12 has glibc 2.36, so any manylinux wheel up to 2.36 runs; pip needs each tag spelled out.
WHEEL_PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)] + ["manylinux2014_aarch64"]
DEVICE_PYTHON = "3.11"
SITE_PACKAGES = f"usr/local/lib/python{DEVICE_PYTHON}/dist-packages"  # on the path of Debian's `site`
LAUNCHER = "usr/bin/python3"
STAMP = "sysroot.json"

# The launcher: runs the sysroot's CPython under qemu. `-0` makes this script argv[0], so that
# sys.executable (which TVM's RPC server re-executes for its workers) is this script, not an aarch64
# ELF the host kernel cannot run. qemu reads QEMU_CPU and it is inherited by those workers. The host's
# library paths would make the aarch64 loader try x86 libraries.
LAUNCHER_SCRIPT = f"""#!/bin/sh
unset PYTHONHOME PYTHONPATH LD_LIBRARY_PATH LD_PRELOAD
export PYTHONNOUSERSITE=1
sysroot=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
exec {QEMU} -cpu "${{QEMU_CPU:?set QEMU_CPU to the CPU to emulate, e.g. cortex-a53}}" \\
    -L "$sysroot" -0 "$0" "$sysroot/usr/bin/python{DEVICE_PYTHON}" "$@"
"""

STOP_GRACE_S = 5.0
LOG_KEEP_S = 7 * 24 * 3600  # the log of a stopped device is kept this long, for post-mortems


def cache_dir() -> Path:
    return Path(os.environ.get("TVM_EFFCONV_CACHE", "~/.cache/tvm-effconv")).expanduser()


def devices_dir() -> Path:
    return cache_dir() / "devices"


def require_tools(*tools: str) -> None:
    """Raise ToolMissingError naming the Debian package of each missing host tool."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        packages = " ".join(dict.fromkeys(HOST_TOOLS[tool] for tool in missing))
        raise ToolMissingError(
            f"the emulated aarch64 device needs {' and '.join(missing)}, missing from PATH: install the Debian "
            f"package(s) {packages} (`apt-get install {packages}`; `bash scripts/install.sh` installs them)"
        )


def _host_versions() -> dict[str, str]:
    try:
        return {name: importlib.metadata.version(name) for name in DEVICE_DISTRIBUTIONS}
    except importlib.metadata.PackageNotFoundError as err:
        raise ToolMissingError(
            f"the Python package {err.name} is not installed on the host; the device gets the host's "
            "versions: install the project (`pip install -e .`)"
        ) from None


def sysroot_path() -> Path:
    return cache_dir() / f"aarch64-{importlib.metadata.version('apache-tvm')}"


def _is_complete(sysroot: Path, versions: dict[str, str]) -> bool:
    """Whether the sysroot's stamp says it was fully built for these host versions."""
    try:
        return json.loads((sysroot / STAMP).read_text())["versions"] == versions
    except (OSError, ValueError, KeyError):
        return False


def ensure_sysroot(verbose: bool = True) -> Path:
    """Return the aarch64 sysroot for this TVM version, building it first if it is missing or stale.

    The build runs in a temporary folder renamed into place with its stamp file, so an interrupted
    build never looks complete; a lock file serialises concurrent callers.
    """
    require_tools(QEMU, CROSS_CXX)
    versions = _host_versions()
    sysroot = sysroot_path()
    if _is_complete(sysroot, versions):
        _write_launcher(sysroot)  # keeps a sysroot built by an older tvm_effconv current
        return sysroot
    require_tools("apt-get", "dpkg")
    if not DEBIAN_KEYRING.is_file():
        raise ToolMissingError(
            f"{DEBIAN_KEYRING} is missing; it verifies the Debian arm64 packages of the emulated device: "
            "install the Debian package debian-archive-keyring"
        )
    started = time.monotonic()
    sysroot.parent.mkdir(parents=True, exist_ok=True)
    with open(sysroot.parent / f"{sysroot.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(sysroot, versions):
            return sysroot  # another process built it while we waited
        for leftover in sysroot.parent.glob(f".{sysroot.name}.*"):
            shutil.rmtree(leftover)  # from an interrupted build: we hold the lock, nobody uses it
        build = Path(tempfile.mkdtemp(prefix=f".{sysroot.name}.partial-", dir=sysroot.parent))
        try:
            _build_sysroot(build, versions, _progress if verbose else lambda message: None)
            (build / STAMP).write_text(json.dumps({"versions": versions, "built": time.time()}, indent=2))
            if sysroot.exists():  # stale: built for other versions of the host's packages
                sysroot.rename(sysroot.parent / f".{sysroot.name}.old")
            build.rename(sysroot)
            shutil.rmtree(sysroot.parent / f".{sysroot.name}.old", ignore_errors=True)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    if verbose:
        _progress(f"sysroot ready in {time.monotonic() - started:.0f} s: {sysroot}")
    return sysroot


def _progress(message: str) -> None:
    print(f"[emulated device] {message}", file=sys.stderr, flush=True)


def _run_step(command: list, what: str, fix: str, **kwargs) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise EffconvError(f"setting up the emulated aarch64 device failed while {what}: {fix}\n{tail}")


def _build_sysroot(root: Path, versions: dict[str, str], progress) -> None:
    work = root / ".setup"  # apt state, package lists and downloads: deleted at the end
    _fetch_debian_packages(work / "apt", root, progress)
    progress("byte-compiling the standard library with the host's CPython")
    stdlib = f"usr/lib/python{DEVICE_PYTHON}"
    _run_step(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", "-d", f"/{stdlib}", str(root / stdlib)],
        "byte-compiling the standard library", "check that the host Python is CPython 3.11",
    )
    _install_wheels(work / "wheels", root / SITE_PACKAGES, versions, progress)
    shutil.rmtree(work)
    _write_launcher(root)


def _write_launcher(root: Path) -> None:
    launcher = root / LAUNCHER
    if launcher.is_file() and launcher.read_text() == LAUNCHER_SCRIPT:
        return
    partial = launcher.with_name(f".{launcher.name}.{os.getpid()}")
    partial.write_text(LAUNCHER_SCRIPT)
    partial.chmod(0o755)
    partial.replace(launcher)  # atomic: a device starting meanwhile never runs half a script


def _fetch_debian_packages(apt: Path, root: Path, progress) -> None:
    """Download the arm64 packages with a private apt configuration and unpack them into root."""
    for folder in ("state/lists/partial", "cache/archives/partial", "etc/apt.conf.d",
                   "etc/preferences.d", "etc/sources.list.d", "etc/trusted.gpg.d", "debs"):
        (apt / folder).mkdir(parents=True)
    (apt / "status").touch()  # an empty dpkg status: no host package is assumed installed
    (apt / "etc/sources.list").write_text(DEBIAN_SOURCES.format(keyring=DEBIAN_KEYRING))
    config = apt / "apt.conf"
    config.write_text(
        'APT::Architecture "arm64";\nAPT::Architectures { "arm64"; };\n'
        f'Dir::State "{apt}/state";\nDir::State::status "{apt}/status";\n'
        f'Dir::Cache "{apt}/cache";\nDir::Etc "{apt}/etc";\n'
        'Debug::NoLocking "true";\nAPT::Sandbox::User "root";\nAcquire::Languages "none";\n'
    )
    env = {**os.environ, "APT_CONFIG": str(config)}
    fix = "check that deb.debian.org is reachable"
    progress("downloading Debian's arm64 package lists")
    _run_step(["apt-get", "update"], "downloading Debian's arm64 package lists", fix, env=env)
    progress(f"downloading {len(DEBIAN_PACKAGES)} arm64 packages (python3.11 and its libraries)")
    _run_step(["apt-get", "download", *DEBIAN_PACKAGES], "downloading the arm64 packages", fix,
              env=env, cwd=apt / "debs")
    for deb in sorted((apt / "debs").glob("*.deb")):
        _run_step(["dpkg", "-x", str(deb), str(root)], f"unpacking {deb.name}", "delete the cache and retry")


def _install_wheels(wheels: Path, site: Path, versions: dict[str, str], progress) -> None:
    progress("downloading the aarch64 wheels: " + " ".join(f"{n}=={v}" for n, v in versions.items()))
    platform = ["--only-binary=:all:", *(f"--platform={tag}" for tag in WHEEL_PLATFORMS),
                "--python-version", DEVICE_PYTHON, "--implementation", "cp",
                "--abi", f"cp{DEVICE_PYTHON.replace('.', '')}", "--no-deps"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run_step(
        [*pip, "download", *platform, "-d", str(wheels), *(f"{n}=={v}" for n, v in versions.items())],
        "downloading the aarch64 wheels", "check that PyPI is reachable and has aarch64 wheels of these versions",
    )
    _run_step(
        [*pip, "install", *platform, "--no-index", "--target", str(site), *map(str, wheels.glob("*.whl"))],
        "installing the aarch64 wheels", "delete the cache and retry",
    )


@cache
def qemu_cpus() -> tuple[str, ...]:
    """The CPU models qemu-aarch64-static emulates (`qemu-aarch64-static -cpu help`)."""
    require_tools(QEMU)
    listing = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True).stdout
    return tuple(line.strip() for line in listing.splitlines()[1:] if line.strip())


def check_cpu(cpu: str) -> None:
    if cpu not in qemu_cpus():
        raise EffconvError(
            f"qemu-aarch64-static cannot emulate CPU {cpu!r}; valid CPUs: {', '.join(qemu_cpus())} "
            "(the `qemu_cpu` of a target preset names the one matching its ISA)"
        )


def port_is_free(host: str, port: int) -> bool:
    """Whether TVM's server could bind the port."""
    with socket.socket() as probe:
        # As TVM's server does, so that a port in TIME_WAIT after a stopped device counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _device_path(port: int, suffix: str) -> Path:
    """A device's files, named by its port: .json (its state), .log (its server's output), .tmp (its TMPDIR)."""
    return devices_dir() / f"{port}{suffix}"


@dataclass
class EmulatedDevice:
    """A running emulated device: an RPC server under qemu, the leader of its own process group."""

    cpu: str
    host: str
    port: int
    pid: int
    log_path: Path
    tracker: str | None = None
    key: str | None = None
    started_at: float = 0.0  # the process's create time, to tell it from a later process with its pid
    _process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        """Where clients connect: a server bound to all interfaces is reached on loopback."""
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    def is_running(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.started_at and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server and every process of its group (its workers), then forget the device.

        Returns once the port can be bound again, so a new device can start on it at once.
        """
        if self._owns_group():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                if self._wait_group_gone(STOP_GRACE_S):
                    break
            else:
                raise DeviceError(f"the emulated device on port {self.port} (process group {self.pid}) "
                                  f"survived SIGKILL; check `ps -g {self.pid}`")
        self._forget()
        # The kernel closes the killed server's connections for a moment after; until then, bind fails.
        deadline = time.monotonic() + STOP_GRACE_S
        while not port_is_free(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _owns_group(self) -> bool:
        """Whether process group ``pid`` is still this device's (and not a later process's with that pid)."""
        try:
            return psutil.Process(self.pid).create_time() == self.started_at
        except psutil.NoSuchProcess:
            return True  # the leader is gone; Linux does not reuse its pid while its group has members

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None:
                self._process.poll()  # reap our child, or it stays a zombie in the group
            if not group_processes(self.pid):
                return True
            time.sleep(0.05)
        return False

    def _forget(self) -> None:
        _device_path(self.port, ".json").unlink(missing_ok=True)
        shutil.rmtree(_device_path(self.port, ".tmp"), ignore_errors=True)

    def _save(self) -> None:
        state = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        _device_path(self.port, ".json").write_text(json.dumps({**state, "log_path": str(self.log_path)}))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def group_processes(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def running_devices() -> list[EmulatedDevice]:
    """Devices started by any process on this machine, from their state files; stale files are removed."""
    now = time.time()
    for log in devices_dir().glob("*.log"):
        if not _device_path(int(log.stem), ".json").exists() and now - log.stat().st_mtime > LOG_KEEP_S:
            log.unlink(missing_ok=True)
    devices = []
    for path in sorted(devices_dir().glob("*.json"), key=lambda p: p.stem):
        try:
            state = json.loads(path.read_text())
            device = EmulatedDevice(**{**state, "log_path": Path(state["log_path"])})
        except (OSError, ValueError, TypeError, KeyError):
            path.unlink(missing_ok=True)
            continue
        if device.is_running():
            devices.append(device)
        else:
            device._forget()
    return devices


def find_device(port: int) -> EmulatedDevice | None:
    return next((device for device in running_devices() if device.port == port), None)


def start(cpu: str, port: int | None = None, host: str = "127.0.0.1", tracker: str | None = None,
          key: str | None = None, timeout: float = 60) -> EmulatedDevice:
    """Start an emulated aarch64 device running TVM's RPC server and wait until it serves.

    With ``tracker`` ("HOST:PORT") the server registers there under ``key`` and is ready once the
    tracker lists it; otherwise it is ready once ``tvm_effconv.device.rpc.connect`` succeeds.
    """
    from . import rpc  # the device's readiness check is an RPC session

    if tracker is not None and not key:
        raise EffconvError("a device registered with a tracker needs a key: pass --key (e.g. the preset's rpc_key)")
    port = free_port(host) if port is None else port
    if find_device(port) is not None:
        raise DeviceError(f"an emulated device already runs on port {port}: stop it with "
                          f"`python -m tvm_effconv.device stop --port {port}`")
    if not port_is_free(host, port):  # refused here, rather than by the server with a trace in its log
        raise DeviceError(f"port {port} on {host} is busy: pick another port (or none, for a free one), "
                          "or stop what listens there")
    check_cpu(cpu)
    if tracker is not None:
        rpc.tracker_summary(tracker)  # fail now, not after the device started, if it is unreachable
    sysroot = ensure_sysroot()

    devices_dir().mkdir(parents=True, exist_ok=True)
    log_path, tmp_dir = _device_path(port, ".log"), _device_path(port, ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    site = sysroot / SITE_PACKAGES
    command = [str(sysroot / LAUNCHER), "-m", "tvm.exec.rpc_server", "--host", host,
               "--port", str(port), "--port-end", str(port + 1),
               # MetaSchedule's RPCRunner needs tvm.contrib.random, which this library holds.
               "--load-library", str(site / "tvm/lib/libtvm_runtime_extra.so")]
    if tracker is not None:
        command += ["--tracker", tracker, "--key", key]
    env = {**os.environ, "QEMU_CPU": cpu, "TVM_USE_RUNTIME_LIB": "1", "CXX": CROSS_CXX, "TMPDIR": str(tmp_dir)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    device = EmulatedDevice(cpu=cpu, host=host, port=port, pid=process.pid, log_path=log_path,
                            tracker=tracker, key=key, started_at=psutil.Process(process.pid).create_time(),
                            _process=process)
    try:
        device._save()
        _wait_ready(device, timeout)
    except BaseException:
        device.stop()
        raise
    return device


def _wait_ready(device: EmulatedDevice, timeout: float) -> None:
    from . import rpc

    deadline = time.monotonic() + timeout
    while True:
        if not device.is_running():
            raise DeviceError(f"the emulated {device.cpu} device exited while starting; "
                              f"its log ({device.log_path}) ends with:\n{device.log_tail()}")
        if device.tracker is None:
            ready = rpc.server_answers(*rpc.parse_address(device.address), timeout=1.0)
        else:
            ready = rpc.tracker_lists(device.tracker, device.key, device.port)
        if ready:
            break
        if time.monotonic() > deadline:
            raise DeviceError(f"the emulated {device.cpu} device did not get ready within {timeout:g} s; "
                              f"its log ({device.log_path}) ends with:\n{device.log_tail()}")
        time.sleep(0.25)
    if device.tracker is None:
        rpc.connect(device.address, timeout=max(deadline - time.monotonic(), 5))
