"""The compile command on the host and for cross targets: model forms, artifact, manifest, errors."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tvm_effconv import build as build_module
from tvm_effconv import compile as compile_module
from tvm_effconv.compile import compile_model
from tvm_effconv.errors import EffconvError, ModelLoadError, ToolMissingError, UnknownPresetError, UnsupportedOpsError
from tvm_effconv.targets import list_presets

EXAMPLE = "tvm_effconv.models.examples:small_cnn"
REQUIRED_PRESETS = {"arm", "arm-a53", "arm-a55", "arm-a72", "arm-a76", "cuda", "cuda-sm87", "cuda-sm90", "host"}


def quiet(_msg):
    pass


def test_presets_cover_the_required_boards():
    presets = {p.name: p for p in list_presets()}
    assert REQUIRED_PRESETS <= set(presets)
    for preset in presets.values():
        assert preset.target.kind.name in ("llvm", "cuda")
        assert preset.rpc_key and preset.boards
        if preset.family == "arm":
            assert preset.cross_compiler and preset.qemu_cpu
            assert "has_asimd" in preset.required_cpu_features()
    assert "has_dotprod" in presets["arm-a76"].required_cpu_features()
    assert "has_dotprod" not in presets["arm"].required_cpu_features()
    assert presets["cuda-sm87"].target.attrs["arch"] == "sm_87"


def test_targets_command_lists_one_line_per_preset():
    out = subprocess.run([sys.executable, "-m", "tvm_effconv.targets"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(list_presets())
    assert {line.split()[0] for line in lines} >= REQUIRED_PRESETS


@pytest.mark.parametrize("form", ["export", "torchscript", "pickle", "factory"])
def test_every_model_form_compiles_and_verifies_on_host(form, model_files, tmp_path):
    model = EXAMPLE if form == "factory" else str(model_files[form])
    shapes = ["1,3,32,32"] if form in ("torchscript", "pickle") else []
    out = compile_model(model, "host", tmp_path / "art", shapes, trust_pickle=form == "pickle", log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "passed"
    assert manifest["verification"]["max_abs_error"] <= manifest["verification"]["tolerance"]
    assert manifest["inputs"][0]["shape"] == [1, 3, 32, 32] and manifest["inputs"][0]["dtype"] == "float32"
    assert manifest["outputs"] == [{"name": "output0", "shape": [1, 10], "dtype": "float32"}]
    assert manifest["preset"] == "host" and manifest["versions"]["tvm"].startswith("0.27")
    assert len(manifest["library"]["sha256"]) == 64 and (out / "model.so").stat().st_size == manifest["library"]["bytes"]
    assert manifest["unscheduled"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging folder left behind


def test_batch_and_input_shape_from_the_command_line(model_files, tmp_path):
    out = compile_model(str(model_files["pickle"]), "host", tmp_path / "b3", ["3,3,40,40"], trust_pickle=True, log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [3, 3, 40, 40] and manifest["outputs"][0]["shape"] == [3, 10]


@pytest.mark.parametrize("preset", sorted(REQUIRED_PRESETS - {"host"}))
def test_example_cross_compiles_for_every_preset(preset, tmp_path):
    out = compile_model(EXAMPLE, preset, tmp_path / preset, run_verify=False, log=quiet)
    library = (out / "model.so").read_bytes()
    assert library[:4] == b"\x7fELF"
    machine = int.from_bytes(library[18:20], "little")
    assert machine == (183 if preset.startswith("arm") else 62)  # EM_AARCH64 / EM_X86_64


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_to_a_fatbin(tmp_path):
    out = compile_model(EXAMPLE, "cuda-sm87", tmp_path / "cuda", log=quiet)
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    assert "fatbin for sm_87" in verification["nvcc"]


# --- bad input gets a clear error and leaves nothing behind ---------------------------------------


def test_unknown_preset_lists_the_valid_ones(tmp_path):
    with pytest.raises(UnknownPresetError, match=r"'arm-a99'.*valid presets: .*arm-a76.*host"):
        compile_model(EXAMPLE, "arm-a99", tmp_path / "x", log=quiet)


@pytest.mark.parametrize(
    "form, message",
    [
        ("missing", "not found"),
        ("corrupt", "cannot be loaded|corrupt"),
        ("text", "not a model file"),
        ("state_dict", "only tensors"),
        ("pickle", "--trust-pickle"),
    ],
)
def test_bad_model_files(form, message, model_files, tmp_path):
    path = tmp_path / "nope.pt" if form == "missing" else model_files[form]
    with pytest.raises(ModelLoadError, match=message):
        compile_model(str(path), "host", tmp_path / "x", ["1,3,32,32"], log=quiet)
    assert not (tmp_path / "x").exists()


def test_missing_input_shape_is_asked_for(model_files, tmp_path):
    with pytest.raises(ModelLoadError, match="missing input shape.*--input-shape"):
        compile_model(str(model_files["pickle"]), "host", tmp_path / "x", trust_pickle=True, log=quiet)


@pytest.mark.parametrize("shape", ["1,x,3", "0,3,8,8", ""])
def test_malformed_input_shape(shape, tmp_path):
    with pytest.raises(ModelLoadError, match="bad --input-shape"):
        compile_model(EXAMPLE, "host", tmp_path / "x", [shape], log=quiet)


def test_bad_factories(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot import"):
        compile_model("no_such_package.models:net", "host", tmp_path / "x", log=quiet)
    with pytest.raises(ModelLoadError, match="has no function 'nothing'"):
        compile_model("tvm_effconv.models.examples:nothing", "host", tmp_path / "x", log=quiet)


class UsesUnsupportedOps(torch.nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x) + torch.special.i1e(x) + torch.relu(x)


def unsupported_model():
    return UsesUnsupportedOps(), (torch.randn(2, 8),)


def test_unsupported_ops_are_all_named(tmp_path):
    with pytest.raises(UnsupportedOpsError, match=r"2 PyTorch op\(s\).*special_bessel_j0.*special_i1e"):
        compile_model(f"{__name__}:unsupported_model", "host", tmp_path / "x", log=quiet)


def test_missing_cross_compiler_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(build_module.shutil, "which", lambda _name: None)
    with pytest.raises(ToolMissingError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        compile_model(EXAMPLE, "arm-a72", tmp_path / "x", log=quiet)


def test_missing_qemu_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None if "qemu" in name else "/usr/bin/" + name)
    with pytest.raises(ToolMissingError, match="apt-get install qemu-user-static"):
        compile_model(EXAMPLE, "arm", tmp_path / "x", log=quiet)


def test_failed_verification_keeps_the_old_artifact(monkeypatch, tmp_path):
    out = compile_model(EXAMPLE, "host", tmp_path / "art", log=quiet)
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(compile_module.verify, "RTOL", -1.0)  # every comparison fails
    with pytest.raises(EffconvError, match="differs from PyTorch"):
        compile_model(EXAMPLE, "host", tmp_path / "art", log=quiet)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_output_folder_that_is_not_an_artifact_is_not_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(EffconvError, match="not an artifact"):
        compile_model(EXAMPLE, "host", tmp_path / "mine", log=quiet)
    assert (tmp_path / "mine" / "keep.txt").exists()


def test_cli_prints_one_line_error_without_traceback(model_files, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tvm_effconv.compile", str(model_files["pickle"]), "--target", "host",
         "-o", str(tmp_path / "x")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "--trust-pickle" in result.stderr


def _effconv_layers():
    from tvm_effconv.nn import DSQConv2d, LCCLConv2d, VarGSeparable

    return {
        "dsq": DSQConv2d(8, 8, 3, padding=1, weight_bits=2, act_bits=2),
        "lccl": LCCLConv2d(8, 8, 3, padding=1),
        "varg": VarGSeparable(8, 8),
    }


@pytest.mark.parametrize("op", ["dsq", "lccl", "varg"])
def test_saved_archives_of_effconv_ops_load_in_a_fresh_process(op, tmp_path):
    """Loading registers every effconv op first: a fresh process has imported none of the layers."""
    layer = _effconv_layers()[op].eval()
    path = tmp_path / f"{op}.pt2"
    torch.export.save(torch.export.export(layer, (torch.rand(1, 8, 6, 6),)), str(path))
    script = f"from tvm_effconv import frontend; print(frontend.load_model({str(path)!r}, [], False).kind)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("model, shape", [
    (torch.nn.PReLU(6), (2, 6, 5, 7)),  # one slope per channel
    (torch.nn.PReLU(), (3, 10)),  # one slope for all
    (torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.PReLU(6)), (1, 3, 9, 9)),  # fused epilogue
])
def test_prelu_converts_branch_free_and_matches_pytorch_exactly(model, shape):
    import numpy as np
    import tvm
    from tvm import relax

    from tvm_effconv import frontend
    from tvm_effconv.targets import get_preset

    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.PReLU):
            with torch.no_grad():
                module.weight.uniform_(-0.5, 0.5)  # negative slopes too
    model.eval()
    x = torch.randn(*shape)
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-38, -1e-38])  # zeros and denormals take the right branch
    preset = get_preset("host")
    with torch.no_grad():
        expected = model(x).numpy()
        mod = frontend.to_relax(torch.export.export(model, (x,)), preset.target)
    script = mod.script()
    assert "R.maximum" in script and not any(op in script for op in ("nn.prelu", "R.where", "R.greater"))
    executable, _ = build_module.build(mod, preset)
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    if isinstance(model, torch.nn.PReLU):
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
