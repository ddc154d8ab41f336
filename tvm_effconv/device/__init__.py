"""Devices to run compiled artifacts on: TVM RPC sessions, and an emulated aarch64 device under qemu.

``python -m tvm_effconv.device`` sets up, starts, lists, stops and probes devices.
"""

from .emulator import EmulatedDevice, ensure_sysroot, find_device, qemu_cpus, running_devices, start
from .rpc import (
    check_features,
    connect,
    device_errors,
    device_features,
    matching_presets,
    open_session,
    parse_address,
    request_from_tracker,
    tracker_summary,
)

__all__ = [
    "EmulatedDevice",
    "check_features",
    "connect",
    "device_errors",
    "device_features",
    "ensure_sysroot",
    "find_device",
    "matching_presets",
    "open_session",
    "parse_address",
    "qemu_cpus",
    "request_from_tracker",
    "running_devices",
    "start",
    "tracker_summary",
]
