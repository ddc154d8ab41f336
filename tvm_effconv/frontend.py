"""PyTorch model -> torch.export ExportedProgram -> Relax IRModule.

Models arrive in four forms (see :func:`load_model`); all end as an ExportedProgram, which TVM's
importer turns into Relax. Our own layers export as ``torch.ops.effconv.*`` custom ops; the table
:func:`effconv_convert_map` maps each of them to its Relax converter, the way TVM's
``create_convert_map()`` maps aten ops.
"""

import importlib
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError, UnsupportedOpsError

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


BATCH_NORM_OP = "_native_batch_norm_legit_no_training.default"


def effconv_convert_map(target, constants: dict) -> dict:
    """Custom op name (``<op>.default``, as the importer keys it) -> converter ``fn(node, importer)``
    emitting the op's kernel for ``target`` (the kernels' data layouts depend on it). ``constants``
    maps graph input names to the model's weights: converters pack them at compile time (the
    importer binds them only after the whole graph is translated).

    An eval-mode batch norm that directly follows an effconv op is folded into the op's per-channel
    output scale and bias by the op's converter, which adds it to ``folded``; the batch norm then
    converts to its input."""
    from .ops import dsconv, dsq, lccl, varg

    folded: set = set()

    def batch_norm(node, importer):
        if node in folded:
            return importer.env[node.args[0]]
        return type(importer)._batch_norm_legit_no_training(importer, node)

    return {
        dsconv.OP_NAME: dsconv.converter(target, constants, folded),
        dsq.OP_NAME: dsq.converter(target, constants, folded),
        varg.OP_NAME: varg.converter(target, constants, folded),  # grouped convs, 8/16/32 channels per group
        varg.SEPARABLE_OP_NAME: varg.separable_converter(target, constants),  # the fused separable unit
        varg.QCONV_OP_NAME: varg.qconv_converter(target, constants, folded),  # int8 VarG convs
        lccl.OP_NAME: lccl.converter(target, constants, folded),
        BATCH_NORM_OP: batch_norm,
        PRELU_OP: prelu,
    }


PRELU_OP = "prelu.default"


def prelu(node, importer):
    """PyTorch's PReLU as max(x, 0) + slope * min(x, 0), exactly its x > 0 ? x : slope * x: TVM's
    importer emits a select, which becomes a branch per element (mispredicted at random signs) where it
    fuses into a kernel's unrolled write-out; this form stays branch-free."""
    from tvm import relax

    x, slope = importer.env[node.args[0]], importer.env[node.args[1]]
    rank = x.ty.ndim
    if rank >= 2:  # one slope per channel (dim 1), or a single one
        slope = relax.op.reshape(slope, [1, slope.ty.shape[0]] + [1] * (rank - 2))
    zero = relax.const(0.0, x.ty.dtype)
    positive, negative = relax.op.maximum(x, zero), relax.op.minimum(x, zero)
    return importer.block_builder.emit(relax.op.add(positive, relax.op.multiply(slope, negative)))


def constant_argument(constants: dict, arg, op: str, name: str):
    """The model weight that graph argument ``arg`` of ``op`` names (numpy), None for a None argument;
    an argument computed in the graph is refused: the kernels pack their weights at compile time."""
    if arg is None:
        return None
    if getattr(arg, "name", None) not in constants:
        raise UnsupportedOpsError(
            f"{op}'s {name} is computed in the graph, not a weight of the model; {op} layers compile with their "
            "weights as constants (export the model in eval mode and do not compute them)"
        )
    return constants[arg.name]


# effconv ops that quantize their input activations (verification allows rounding flips, see verify.py)
QUANTIZING_OPS = ("dsconv2d.default", "qconv2d.default", "varg_qconv2d.default")


def quantized_ops(exported) -> list[str]:
    """The activation-quantizing effconv ops the model calls, by name."""
    names = {node.target.__name__ for node in exported.graph.nodes if node.op == "call_function"}
    return sorted(names & set(QUANTIZING_OPS))


def foldable_batch_norm(node, constants: dict):
    """The eval-mode batch norm that is ``node``'s only user, as (node, scale, shift) with
    y = scale * x + shift per channel, or None when there is none or its statistics are not constants."""
    import numpy as np

    users = list(node.users)
    if len(users) != 1 or getattr(users[0].target, "__name__", "") != BATCH_NORM_OP:
        return None
    norm = users[0]
    weight, bias, mean, var = norm.args[1:5]
    eps = norm.args[6] if len(norm.args) > 6 else norm.kwargs.get("eps", 1e-5)
    if any(arg is not None and getattr(arg, "name", None) not in constants for arg in (weight, bias, mean, var)):
        return None
    mean, var = constants[mean.name].astype(np.float64), constants[var.name].astype(np.float64)
    gamma = constants[weight.name].astype(np.float64) if weight is not None else np.ones_like(mean)
    beta = constants[bias.name].astype(np.float64) if bias is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + eps)
    return norm, scale, beta - mean * scale


def graph_constants(exported) -> dict:
    """Graph input name -> numpy value, for every parameter, buffer and lifted constant."""
    values = {**dict(exported.named_parameters()), **dict(exported.named_buffers()), **exported.constants}
    return {
        spec.arg.name: values[spec.target].detach().numpy()
        for spec in exported.graph_signature.input_specs
        if spec.target in values
    }


@dataclass
class InputSpec:
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str) -> "InputSpec":
        """``1,3,224,224`` or ``1,3,224,224:float32``."""
        shape_text, _, dtype = text.partition(":")
        try:
            shape = tuple(int(d) for d in shape_text.split(","))
            if not shape or min(shape) < 1:
                raise ValueError
        except ValueError:
            raise ModelLoadError(
                f"bad --input-shape {text!r}: expected positive integers separated by commas, "
                "optionally with a dtype, e.g. 1,3,224,224 or 1,3,224,224:float32"
            ) from None
        return cls(shape, dtype or "float32")

    def random_tensor(self, generator):
        import torch

        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError(f"unknown input dtype {self.dtype!r}; use a torch dtype name such as float32")
        if dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator).to(dtype)
        return torch.randint(0, 8, self.shape, generator=generator, dtype=dtype)


@dataclass
class LoadedModel:
    """A model ready to import: its ExportedProgram, the inputs it was exported with, and a
    PyTorch callable that serves as the reference for verification."""

    name: str
    kind: str  # "export", "torchscript", "pickle" or "factory"
    exported: object  # torch.export.ExportedProgram
    example_inputs: tuple
    reference: object  # callable

    @property
    def input_names(self) -> list[str]:
        return list(self.exported.graph_signature.user_inputs)


def _archive_kind(path: Path) -> str:
    """Tell a torch.export archive, a TorchScript archive and a torch.save pickle apart."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        # torch.save's legacy (non-zip) format is a plain pickle stream: protocol 2+ starts with 0x80.
        return "pickle" if head[:1] == b"\x80" else "unknown"
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelLoadError(f"model file {path} is corrupt or truncated ({err}); re-save it") from None
    if any(n.endswith("/archive_format") or n.endswith("serialized_exported_program.json") for n in names):
        return "export"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "pickle"
    return "unknown"


def _example_inputs(input_specs, given, what: str) -> tuple:
    import torch

    if input_specs:
        generator = torch.Generator().manual_seed(0)
        return tuple(spec.random_tensor(generator) for spec in input_specs)
    if given is not None:
        return tuple(given)
    raise ModelLoadError(
        f"missing input shape: {what} carries no example inputs; pass --input-shape N,C,H,W "
        "(repeat it once per model input)"
    )


def _export(module, inputs: tuple, name: str):
    import torch

    try:
        return torch.export.export(module.eval(), inputs)
    except Exception as err:  # torch.export raises many kinds; all mean the same to the user
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"torch.export could not trace model {name!r}: {first_line}. Check that --input-shape "
            "matches what the model expects and that forward() has no data-dependent Python control flow"
        ) from None


def _load_export_archive(path: Path, input_specs):
    import torch

    from . import nn  # noqa: F401 - registers torch.ops.effconv.*, which saved programs may call

    # torch warns about any extension other than .pt2; the brief allows any file name.
    logging.getLogger("torch.export.pt2_archive._package").setLevel(logging.ERROR)
    try:
        exported = torch.export.load(str(path))
    except Exception as err:
        raise ModelLoadError(f"model file {path} looks like a torch.export archive but cannot be loaded: {err}") from None
    args, _ = exported.example_inputs or ((), {})
    if input_specs:
        want = [tuple(spec.shape) for spec in input_specs]
        have = [tuple(a.shape) for a in args]
        if args and want != have:
            raise ModelLoadError(
                f"--input-shape {want} differs from the shapes {have} that {path.name} was exported with; "
                "re-export the model with the new shape, or drop --input-shape"
            )
    inputs = _example_inputs(input_specs, args or None, f"the archive {path.name}")
    return exported, inputs, exported.module()


def _load_torchscript(path: Path, input_specs):
    import torch
    from torch._export.converter import TS2EPConverter

    scripted = torch.jit.load(str(path), map_location="cpu")
    inputs = _example_inputs(input_specs, None, f"the TorchScript archive {path.name}")
    try:
        exported = TS2EPConverter(scripted, inputs).convert()
    except Exception as err:
        raise ModelLoadError(
            f"the TorchScript archive {path.name} could not be converted to torch.export ({err}); "
            "export the original model with torch.export.save instead"
        ) from None
    return exported, inputs, scripted


def _load_pickle(path: Path, input_specs, trust_pickle: bool):
    import torch

    if not trust_pickle:
        try:
            torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ModelLoadError(
                f"{path} is a pickled Python object: loading it runs code from the file. If you trust it, "
                "pass --trust-pickle; better, save the model with torch.export.save"
            ) from None
        raise ModelLoadError(
            f"{path} holds only tensors (a state_dict?), not a model; give a factory instead "
            "(package.module:function returning the model with these weights loaded)"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:
        raise ModelLoadError(f"cannot unpickle {path}: {err}") from None
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    inputs = _example_inputs(input_specs, None, f"the pickled model {path.name}")
    return _export(obj, inputs, path.name), inputs, obj.eval()


def _load_factory(spec: str, input_specs):
    import torch

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelLoadError(f"cannot import {module_name!r} for model factory {spec!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{module_name} has no function {attr!r} (model factory {spec!r})")
    made = factory()
    model, given = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(
            f"model factory {spec!r} returned {type(model).__name__}; it must return an nn.Module, "
            "or (nn.Module, example_inputs)"
        )
    inputs = _example_inputs(input_specs, given, f"the factory {spec!r}")
    return _export(model, inputs, spec), inputs, model.eval()


def load_model(spec: str, input_specs: list[InputSpec] = (), trust_pickle: bool = False) -> LoadedModel:
    """Load a model given as a file (torch.export archive, TorchScript archive, pickled nn.Module with
    ``trust_pickle``) or as ``package.module:factory`` (a function returning the model, or the model and
    its example inputs)."""
    path = Path(spec)
    if path.is_file():
        kind = _archive_kind(path)
        name = path.stem
        if kind == "export":
            exported, inputs, reference = _load_export_archive(path, input_specs)
        elif kind == "torchscript":
            exported, inputs, reference = _load_torchscript(path, input_specs)
        elif kind == "pickle":
            exported, inputs, reference = _load_pickle(path, input_specs, trust_pickle)
        else:
            raise ModelLoadError(
                f"{path} is not a model file this tool reads: expected a torch.export archive "
                "(torch.export.save), a TorchScript archive (torch.jit.save) or a pickled nn.Module (torch.save)"
            )
    elif FACTORY_SPEC.match(spec):
        kind, name = "factory", spec.rpartition(":")[2]
        exported, inputs, reference = _load_factory(spec, input_specs)
    else:
        raise ModelLoadError(f"model file {spec} not found (a factory is written package.module:function)")
    return LoadedModel(name=name, kind=kind, exported=exported, example_inputs=inputs, reference=reference)


def _decompositions() -> dict:
    """torch.export's default decompositions, less the aten ops that :func:`effconv_convert_map` converts
    itself (PReLU would arrive as greater/multiply/where)."""
    import torch

    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.prelu.default)
    return table


def to_relax(exported, target):
    """Import an ExportedProgram into a Relax IRModule for ``target`` (parameters bound as constants)."""
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    exported = exported.run_decompositions(_decompositions())
    custom = effconv_convert_map(target, graph_constants(exported))
    known = set(ExportedProgramImporter().create_convert_map()) | set(custom)
    missing: dict[str, int] = {}
    for node in exported.graph.nodes:
        if node.op == "call_function" and node.target.__name__ not in known:
            missing[node.target.__name__] = missing.get(node.target.__name__, 0) + 1
    if missing:
        listed = ", ".join(f"{op} (x{n})" for op, n in sorted(missing.items()))
        raise UnsupportedOpsError(
            f"the model uses {len(missing)} PyTorch op(s) that cannot be compiled: {listed}. "
            "Replace them in the model, or add a converter to tvm_effconv.frontend.effconv_convert_map()"
        )
    return from_exported_program(
        exported,
        keep_params_as_input=False,
        unwrap_unit_return_tuple=True,
        custom_convert_map=custom,
        run_ep_decomposition=False,
    )
