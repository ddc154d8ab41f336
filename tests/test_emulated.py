"""ARM builds run on the emulated aarch64 device (qemu-user with the preset's exact CPU model)."""

import json

import pytest

from tvm_effconv.compile import compile_model
from tvm_effconv.device import emulator
from tvm_effconv.errors import DeviceError

EXAMPLE = "tvm_effconv.models.examples:small_cnn"


def quiet(_msg):
    pass


@pytest.mark.emulated
@pytest.mark.parametrize("preset, cpu", [("arm-a53", "cortex-a53"), ("arm-a76", "cortex-a76")])
def test_small_cnn_matches_pytorch_on_the_matching_cpu(preset, cpu, emulated_device, tmp_path):
    device = emulated_device(cpu)
    out = compile_model(EXAMPLE, preset, tmp_path / preset, ["2,3,36,36"], device=device.address, log=quiet)
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    assert verification["status"] == "passed", verification
    assert device.address in verification["where"]
    assert ("has_dotprod" in verification["device_features"]) == (cpu == "cortex-a76")


@pytest.mark.emulated
def test_compile_starts_and_stops_its_own_emulated_device(tmp_path):
    before = {d.port for d in emulator.running_devices()}
    out = compile_model(EXAMPLE, "arm", tmp_path / "arm", log=quiet)
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    assert verification["status"] == "passed" and "cortex-a53" in verification["where"]
    assert "not speed" in verification["note"]
    assert {d.port for d in emulator.running_devices()} == before


@pytest.mark.emulated
def test_dotprod_build_on_a_cpu_without_dotprod_fails_clearly(emulated_device, tmp_path):
    device = emulated_device("cortex-a53")
    with pytest.raises(DeviceError, match=r"arm-a76 needs CPU features.*has_dotprod.*lacks"):
        compile_model(EXAMPLE, "arm-a76", tmp_path / "x", device=device.address, log=quiet)
    assert not (tmp_path / "x").exists()
    assert device.is_running()


def test_unreachable_device_is_reported(tmp_path):
    with pytest.raises(DeviceError, match="cannot reach"):
        compile_model(EXAMPLE, "arm-a72", tmp_path / "x", device="127.0.0.1:9", log=quiet)
    assert not (tmp_path / "x").exists()
