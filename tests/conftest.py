import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tvm_effconv.models.examples import small_cnn


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    """The example model saved in every form the compile command reads, plus bad files."""
    folder = tmp_path_factory.mktemp("models")
    model, inputs = small_cnn()
    files = {
        "export": folder / "small_cnn.pt",
        "torchscript": folder / "small_cnn_ts.pt",
        "pickle": folder / "small_cnn_pickle.pt",
        "state_dict": folder / "small_cnn_weights.pt",
        "corrupt": folder / "corrupt.pt",
        "text": folder / "notes.txt",
    }
    torch.export.save(torch.export.export(model, inputs), files["export"])
    torch.jit.save(torch.jit.trace(model, inputs), files["torchscript"])
    torch.save(model, files["pickle"])
    torch.save(model.state_dict(), files["state_dict"])
    files["corrupt"].write_bytes(files["export"].read_bytes()[:2000])
    files["text"].write_text("not a model\n")
    return files


@pytest.fixture(scope="session")
def emulated_device():
    """``emulated_device(cpu)`` -> a running emulated aarch64 RPC device, one per CPU model per session."""
    from tvm_effconv.device import emulator

    devices = {}

    def get(cpu: str):
        if cpu not in devices:
            devices[cpu] = emulator.start(cpu)
        return devices[cpu]

    yield get
    for device in devices.values():
        device.stop()


TRACKER_PORT = 9390


@pytest.fixture(scope="session")
def rpc_tracker():
    """An RPC tracker on 127.0.0.1, in its own process group; yields its HOST:PORT."""
    from tvm_effconv.device import rpc
    from tvm_effconv.errors import DeviceError

    process = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(TRACKER_PORT),
         "--port-end", str(TRACKER_PORT + 1)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{TRACKER_PORT}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc.tracker_summary(address)
                break
            except DeviceError:
                assert process.poll() is None and time.monotonic() < deadline, "the RPC tracker did not start"
                time.sleep(0.2)
        yield address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
