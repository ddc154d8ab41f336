"""Set up, start, list, stop and probe devices (TVM RPC servers, emulated aarch64 ones included).

  python -m tvm_effconv.device setup                       build the emulated device's sysroot (once)
  python -m tvm_effconv.device emulate --cpu cortex-a53    start an emulated device in the background
  python -m tvm_effconv.device list                        the emulated devices running here
  python -m tvm_effconv.device stop --port 9090            stop one (or --all)
  python -m tvm_effconv.device features 127.0.0.1:9090     what the device's CPU supports
"""

import argparse
import json

from ..errors import EffconvError, run_cli
from . import emulator, rpc


def _setup(args) -> int:
    print(emulator.ensure_sysroot(verbose=True))
    return 0


def _emulate(args) -> int:
    cpu, key = args.cpu, args.key
    if args.preset:
        from ..targets import get_preset

        preset = get_preset(args.preset)
        if not preset.qemu_cpu:
            raise EffconvError(f"preset {preset.name} is not an aarch64 preset: it has no qemu CPU to emulate")
        cpu, key = cpu or preset.qemu_cpu, key or preset.rpc_key
    if not cpu:
        raise EffconvError(f"name the CPU to emulate with --cpu (one of {', '.join(emulator.qemu_cpus())}) or --preset")
    device = emulator.start(cpu, port=args.port, host=args.host, tracker=args.tracker,
                            key=key if args.tracker else None, timeout=args.timeout)
    where = f"registered at the tracker {device.tracker} under key {device.key}" if device.tracker else \
        f"ready at {device.address}"
    print(f"emulated {device.cpu} device {where} (pid {device.pid}, log {device.log_path})")
    print(f"stop it with: python -m tvm_effconv.device stop --port {device.port}")
    return 0


def _list(args) -> int:
    devices = emulator.running_devices()
    if not devices:
        print("no emulated device runs here; start one with `python -m tvm_effconv.device emulate --cpu cortex-a53`")
        return 0
    print(f"{'ADDRESS':<22}{'CPU':<12}{'PID':<9}{'STATE':<22}{'TRACKER / KEY':<28}LOG")
    for device in devices:
        state = "serving" if rpc.server_answers(*rpc.parse_address(device.address), timeout=1.0) \
            else "busy or not answering"
        registration = f"{device.tracker} / {device.key}" if device.tracker else "-"
        print(f"{device.address:<22}{device.cpu:<12}{device.pid:<9}{state:<22}{registration:<28}{device.log_path}")
    return 0


def _stop(args) -> int:
    devices = emulator.running_devices()
    if not args.all:
        devices = [device for device in devices if device.port == args.port]
        if not devices:
            running = ", ".join(str(device.port) for device in emulator.running_devices()) or "none"
            raise EffconvError(f"no emulated device runs on port {args.port} (ports in use by emulated devices: "
                               f"{running}; see `python -m tvm_effconv.device list`)")
    for device in devices:
        device.stop()
        print(f"stopped the emulated {device.cpu} device on port {device.port}")
    return 0


def _features(args) -> int:
    session = rpc.open_session(args.address, args.tracker, args.key, timeout=args.timeout)
    features = rpc.device_features(session, args.address or f"--tracker {args.tracker} --key {args.key}")
    if args.json:
        print(json.dumps(features))
        return 0
    print(f"arch:     {features['arch']}")
    print(f"HWCAP:    {features['hwcap']:#x}\nHWCAP2:   {features['hwcap2']:#x}")
    print(f"features: {', '.join(features['features']) or 'none of the optional ones'}")
    print(f"presets whose artifacts it runs: {', '.join(rpc.matching_presets(features)) or 'none'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_effconv.device", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    commands = parser.add_subparsers(dest="command", required=True)

    setup = commands.add_parser("setup", help="build the emulated device's aarch64 sysroot (once; idempotent)")
    setup.set_defaults(run=_setup)

    emulate = commands.add_parser("emulate", help="start an emulated aarch64 device (an RPC server under qemu)")
    emulate.add_argument("--cpu", help="qemu CPU model, e.g. cortex-a53, cortex-a72, cortex-a76")
    emulate.add_argument("--preset", help="take the CPU (and the tracker key) from this target preset")
    emulate.add_argument("--port", type=int, help="port to serve on (default: a free one)")
    emulate.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    emulate.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker")
    emulate.add_argument("--key", help="the key to register under at the tracker")
    emulate.add_argument("--timeout", type=float, default=60, help="seconds to wait for it to be ready")
    emulate.set_defaults(run=_emulate)

    commands.add_parser("list", help="list the emulated devices running here").set_defaults(run=_list)

    stop = commands.add_parser("stop", help="stop emulated devices")
    which = stop.add_mutually_exclusive_group(required=True)
    which.add_argument("--port", type=int, help="the port of the device to stop")
    which.add_argument("--all", action="store_true", help="stop every emulated device running here")
    stop.set_defaults(run=_stop)

    features = commands.add_parser("features", help="probe what the device's CPU supports")
    features.add_argument("address", nargs="?", metavar="HOST:PORT", help="the device's RPC server")
    features.add_argument("--tracker", metavar="HOST:PORT", help="request the device from this RPC tracker")
    features.add_argument("--key", help="the device's key at the tracker")
    features.add_argument("--timeout", type=float, default=30, help="seconds to wait for the device")
    features.add_argument("--json", action="store_true", help="print the result as JSON")
    features.set_defaults(run=_features)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    run_cli(main)
