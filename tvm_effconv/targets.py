"""Target presets: one JSON file per preset in the top-level ``targets/`` folder.

A preset names the TVM target (a JSON dict), the host target for cross builds, the cross compiler,
the qemu CPU model that emulates it, the default RPC key, and the real boards it matches.
``python -m tvm_effconv.targets`` lists them.
"""

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .errors import EffconvError, UnknownPresetError

TARGETS_DIR = Path(os.environ.get("TVM_EFFCONV_TARGETS", Path(__file__).resolve().parent.parent / "targets"))

# Target feature flag (as TVM derives it from mcpu/mattr) -> (auxv vector, bit) that Linux on aarch64
# reports for it: AT_HWCAP (16) or AT_HWCAP2 (26). Used to check an artifact against a device.
AARCH64_HWCAPS = {
    "has_asimd": ("AT_HWCAP", 1),
    "has_fp16_simd": ("AT_HWCAP", 10),
    "has_dotprod": ("AT_HWCAP", 20),
    "has_sve": ("AT_HWCAP", 22),
    "has_matmul_i8": ("AT_HWCAP2", 13),
    "has_sme": ("AT_HWCAP2", 23),
}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "arm", "cuda" or "host"
    description: str
    boards: str
    target_config: dict
    host_config: dict | None = None
    cross_compiler: str | None = None
    cross_compiler_package: str | None = None
    qemu_cpu: str | None = None
    qemu_note: str | None = None
    rpc_key: str | None = None
    source: Path | None = field(default=None, compare=False)

    @cached_property
    def target_dict(self) -> dict:
        """The target dict with host-dependent values ("mcpu": "native", core count) resolved."""
        config = dict(self.target_config)
        if config.get("mcpu") == "native":
            from tvm.target import codegen

            config["mcpu"] = codegen.llvm_get_system_cpu()
        if config["kind"] == "llvm" and "num-cores" not in config:
            # MetaSchedule needs the core count; for the host it is this machine's.
            config["num-cores"] = os.cpu_count() or 1
        return config

    @cached_property
    def target(self):
        import tvm

        if self.host_config is not None:
            return tvm.target.Target(self.target_dict, host=self.host_config)
        return tvm.target.Target(self.target_dict)

    @property
    def is_cross(self) -> bool:
        return self.family == "arm"

    def required_cpu_features(self) -> list[str]:
        """aarch64 features the compiled code may use (TVM's feature.has_* flags that are set)."""
        if self.family != "arm":
            return []
        attrs = self.target.attrs
        return [flag for flag in AARCH64_HWCAPS if bool(attrs.get(f"feature.{flag}", False))]

    def summary(self) -> str:
        return f"{self.name:<10} {self.description}. Boards: {self.boards}"


def _load(path: Path) -> Preset:
    try:
        data = json.loads(path.read_text())
        return Preset(
            name=data["name"],
            family=data["family"],
            description=data["description"],
            boards=data["boards"],
            target_config=data["target"],
            host_config=data.get("host"),
            cross_compiler=data.get("cross_compiler"),
            cross_compiler_package=data.get("cross_compiler_package"),
            qemu_cpu=data.get("qemu_cpu"),
            qemu_note=data.get("qemu_note"),
            rpc_key=data.get("rpc_key"),
            source=path,
        )
    except (OSError, ValueError, KeyError) as err:
        raise EffconvError(f"target preset file {path} is invalid ({err!r}); fix or remove it") from None


def list_presets() -> list[Preset]:
    return [_load(p) for p in sorted(TARGETS_DIR.glob("*.json"))]


def get_preset(name: str) -> Preset:
    path = TARGETS_DIR / f"{name}.json"
    if not path.is_file():
        valid = ", ".join(p.name for p in list_presets())
        raise UnknownPresetError(f"unknown target preset {name!r}; valid presets: {valid}")
    return _load(path)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tvm_effconv.targets", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PRESET", help="print the full TVM target of one preset as JSON")
    args = parser.parse_args(argv)
    if args.json:
        preset = get_preset(args.json)
        print(json.dumps({"target": preset.target_dict, "host": preset.host_config}, indent=2))
        return 0
    for preset in list_presets():
        print(preset.summary())
    return 0


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(main)
