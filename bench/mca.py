"""Static estimates for the ARM kernels: cycles per iteration of each kernel's hot loop from LLVM's machine-code
analyser, converted to multiply-accumulates per cycle. ESTIMATES, not measurements: no ARM hardware ran them.

For each op and each ARM preset (arm-a53, arm-a72, arm-a76) a one-layer network is compiled by the project's
build for that preset (default schedules: the knobs a user gets without records), the assembly of the op's
kernel is taken from the build, and its innermost loop with the most multiply-accumulate instructions is
extracted. ``llvm-mca`` runs that loop body in steady state on LLVM's scheduling model of the core; the MACs
of one iteration are counted from its instructions (``fmla`` .4s: 4, ``sdot`` .4s: 16, ``smull``/``smull2``
.8h: 8, ``cnt`` .16b: 128 one-bit products). The core's peak is the same model's rate for a loop of 12
independent copies of that MAC instruction alone, so the fraction compares like with like.

Which LLVM model: ``cortex-a53`` uses LLVM's Cortex-A53 model; LLVM has no Cortex-A72 model and uses its
Cortex-A57 model (the A72 derives from the A57); for Cortex-A76 LLVM's ``cortex-a76`` entry also maps to the
A57 model, so the estimate uses ``neoverse-n1`` (LLVM 17+ has a Neoverse N1 model; the N1 derives from the
A76: same out-of-order core with two 128-bit FP/ASIMD pipelines). The report names the model each figure
came from, read back from llvm-mca's resource names.

llvm-mca models the core alone: a loop that waits on memory runs slower than estimated, the estimate is
an upper bound for a kernel limited by loads from beyond L1.
"""

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PRESETS = {  # preset -> (llvm-mca -mcpu, why that model)
    "arm-a53": ("cortex-a53", "LLVM's Cortex-A53 model"),
    "arm-a72": ("cortex-a72", "LLVM's Cortex-A57 model (LLVM has none for the A72, an A57 derivative)"),
    "arm-a76": ("neoverse-n1", "LLVM's Neoverse N1 model (N1 derives from the A76; LLVM's cortex-a76 entry "
                               "uses the A57 model)"),
}
# Where each core's pipes come from (the llvm-mca model gives the numbers used; this says what Arm documents).
DATASHEETS = {
    "arm-a53": ("in-order, dual-issue; one 128-bit NEON fmla per cycle (4 fp32 MAC/cycle) in Tencent ncnn's "
                "measurements (docs/developer-guide/arm-a53-a55-dual-issue.md); no dotprod"),
    "arm-a72": ("out-of-order, 3-wide; two FP/ASIMD pipelines F0 and F1 (Arm Cortex-A72 Software Optimization "
                "Guide, UAN 0016A, section 2); no dotprod"),
    "arm-a76": ("out-of-order, 4-wide; two 128-bit FP/ASIMD pipelines V0 and V1, both executing fmla and sdot "
                "(Arm Cortex-A76 Software Optimization Guide): up to 8 fp32 or 32 int8 (sdot) MAC/cycle"),
}

# mnemonic -> MACs per lane (sdot: 4 products per 32-bit lane; cnt: one-bit products per byte lane)
MAC_INSTRUCTIONS = {
    "fmla": 1, "fmls": 1, "fmadd": 1, "mla": 1, "mls": 1,
    "sdot": 4, "udot": 4,
    "smull": 1, "smull2": 1, "umull": 1, "umull2": 1, "smlal": 1, "smlal2": 1, "umlal": 1, "umlal2": 1,
    "cnt": 8,
}
LANES = {"16b": 16, "8b": 8, "8h": 8, "4h": 4, "4s": 4, "2s": 2, "2d": 2}
# The instruction whose peak a kernel is compared with: the one that does most of its MACs.
PEAK_LOOPS = {
    "fmla": "fmla v{i}.4s, v30.4s, v31.4s",
    "sdot": "sdot v{i}.4s, v30.16b, v31.16b",
    "smull": "smull v{i}.8h, v30.8b, v31.8b",
    "cnt": "cnt v{i}.16b, v30.16b",
}
PEAK_FAMILY = {"fmla": "fmla", "fmls": "fmla", "fmadd": "fmla", "mla": "fmla", "mls": "fmla", "sdot": "sdot",
               "udot": "sdot", "cnt": "cnt"}  # everything else: the smull family


class ToolMissing(RuntimeError):
    pass


LLVM_ROOT = Path("/usr/lib")  # Debian's llvm-N packages install /usr/lib/llvm-N/bin/llvm-mca


def find_llvm_mca() -> str:
    """The newest llvm-mca installed (LLVM 17+ has the Neoverse N1 model the A76 estimate uses)."""
    versions = {int(p.parent.parent.name.split("-")[1]): p for p in LLVM_ROOT.glob("llvm-*/bin/llvm-mca")
                if p.parent.parent.name.split("-")[1].isdigit()}
    if versions:
        return str(versions[max(versions)])
    if shutil.which("llvm-mca"):
        return shutil.which("llvm-mca")
    raise ToolMissing("llvm-mca not found: install it with `apt-get install llvm-19` (or run `bash scripts/install.sh`)")


def llvm_mca_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"LLVM version (\S+)", out)
    return match.group(1) if match else "unknown"


@dataclass
class Loop:
    label: str
    body: list[str]  # instructions, label and directives removed

    def macs(self) -> dict:
        """MACs of one iteration per mnemonic (``cnt``: one-bit products)."""
        counts: dict = {}
        for line in self.body:
            count = instruction_macs(line)
            if count:
                mnemonic = line.split()[0]
                counts[mnemonic] = counts.get(mnemonic, 0) + count
        return counts


def instruction_macs(line: str) -> int:
    parts = line.replace(",", " ").split()
    if not parts or parts[0] not in MAC_INSTRUCTIONS:
        return 0
    destination = parts[1]
    if "." not in destination:  # scalar form (fmadd s0, ..., fmla s0, s1, v2.s[1])
        return MAC_INSTRUCTIONS[parts[0]]
    arrangement = destination.split(".", 1)[1]
    if parts[0] in ("smull", "umull", "smlal", "umlal", "smull2", "umull2", "smlal2", "umlal2"):
        return LANES.get(arrangement, 0)  # the widened destination: one product per lane
    return LANES.get(arrangement, 0) * MAC_INSTRUCTIONS[parts[0]]


BRANCH = re.compile(r"^\s*(b\.\w+|b|cbn?z|tbn?z)\s+(?:[^,]+,\s*)*(\.LBB\w+)\s*$")
LABEL = re.compile(r"^(\.LBB\w+):")
FUNCTION = re.compile(r"^([A-Za-z_][\w.$]*):")


def functions(assembly: str) -> dict[str, list[str]]:
    """Function symbol -> its lines."""
    result, current = {}, None
    for line in assembly.splitlines():
        match = FUNCTION.match(line)
        if match:
            current = match.group(1)
            result[current] = []
        elif current is not None:
            result[current].append(line)
    return result


def innermost_loops(lines: list[str]) -> list[Loop]:
    """Loops closed by a backward branch that contain no other loop's head."""
    labels = {}
    spans = []
    for index, line in enumerate(lines):
        label = LABEL.match(line)
        if label:
            labels[label.group(1)] = index
        branch = BRANCH.match(line)
        if branch and branch.group(2) in labels:
            spans.append((labels[branch.group(2)], index, branch.group(2)))
    loops = []
    for start, end, label in spans:
        if any(start < other_start and other_end <= end for other_start, other_end, _ in spans):
            continue
        body = [_instruction(line) for line in lines[start + 1:end + 1]]
        loops.append(Loop(label, [b for b in body if b]))
    return loops


def _instruction(line: str) -> str:
    text = line.split("//")[0].strip()
    if not text or text.startswith(".") or LABEL.match(text):
        return ""
    return text.replace("\t", " ")


def hot_loop(assembly: str, function_names: list[str]) -> Loop | None:
    """The innermost loop with the most MACs per iteration among the kernel's functions."""
    loops = [loop for symbol, lines in functions(assembly).items() if any(n in symbol for n in function_names)
             for loop in innermost_loops(lines)]
    loops = [loop for loop in loops if loop.macs()]
    return max(loops, key=lambda loop: sum(loop.macs().values()), default=None)


def analyse(tool: str, instructions: list[str], mcpu: str, mattr: str) -> dict:
    """llvm-mca's steady state for a loop body: cycles per iteration and the scheduling model it used."""
    with tempfile.NamedTemporaryFile("w", suffix=".s") as source:
        source.write("\n".join(instructions) + "\n")
        source.flush()
        result = subprocess.run([tool, "-mtriple=aarch64", f"-mcpu={mcpu}", f"-mattr={mattr}", "-iterations=200",
                                 source.name], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llvm-mca failed on the loop: {result.stderr.strip().splitlines()[0]}")
    out = result.stdout
    iterations = int(re.search(r"Iterations:\s+(\d+)", out).group(1))
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", out).group(1))
    resources = re.findall(r"^\[[\d.]+\]\s+-\s+(\w+)", out, re.MULTILINE)
    model = re.match(r"[A-Za-z]+\d+", resources[0]).group(0) if resources else "unknown"
    return {"cycles_per_iteration": cycles / iterations, "scheduling_model_units": model,
            "block_rthroughput": float(re.search(r"Block RThroughput:\s+([\d.]+)", out).group(1))}


def peak(tool: str, family: str, mcpu: str, mattr: str) -> dict:
    loop = [PEAK_LOOPS[family].format(i=i) for i in range(12)]
    analysis = analyse(tool, loop, mcpu, mattr)
    macs = 12 * instruction_macs(loop[0])
    return {"instruction": PEAK_LOOPS[family].format(i="N"), "macs_per_cycle": macs / analysis["cycles_per_iteration"],
            **analysis}


# --- the kernels ---

def _layer(op: str):
    """(model, input, bits per MAC for cnt kernels, context manager for the build) of a one-layer network."""
    import contextlib

    import torch
    from torch import nn

    from tvm_effconv.nn import DSConv2d, calibrate_activations
    from tvm_effconv.nn.dsq import DSQConv2d
    from tvm_effconv.nn.lccl import LCCLConv2d
    from tvm_effconv.ops import dsq

    torch.manual_seed(0)
    x = torch.randn(1, 128, 28, 28)
    conv = nn.Conv2d(128, 128, 3, 1, 1).eval()
    if op == "dsconv":
        layer = DSConv2d.from_conv(conv, 4, 64).eval()
        calibrate_activations(layer, [x])
        return nn.Sequential(layer, nn.ReLU()).eval(), x, 1, contextlib.nullcontext()
    if op == "dsq":
        x = torch.relu(x)
        layer = DSQConv2d.from_conv(conv, 2, 2)
        with torch.no_grad():
            layer.train()(x)
        return nn.Sequential(layer.eval(), nn.ReLU()).eval(), x, 4, dsq.forcing_path(dsq.BITSERIAL)
    if op == "varg":
        x = torch.randn(1, 128, 14, 14)
        return nn.Conv2d(128, 256, 3, 1, 1, groups=16, bias=False).eval(), x, 1, contextlib.nullcontext()
    if op == "lccl":
        return LCCLConv2d(128, 128, 3, 1, 1, "spatial").eval(), x, 1, contextlib.nullcontext()
    raise ValueError(op)


OPS = {
    "dsconv": "DSConv 3x3 128->128, 28x28, 4-bit weights, blocks of 64, int8 activations",
    "dsq": "DSQ 3x3 128->128, 28x28, A2W2, bit-serial path",
    "varg": "VarG grouped 3x3 128->256, 14x14, 16 groups of 8 channels",
    "lccl": "LCCL 3x3 128->128, 28x28, spatial mask",
}


def kernel_estimate(tool: str, op: str, preset_name: str) -> dict:
    import torch

    from tvm_effconv import build, frontend
    from tvm_effconv.targets import get_preset

    preset = get_preset(preset_name)
    model, x, plane_pairs, forcing = _layer(op)
    with forcing, torch.no_grad():
        exported = torch.export.export(model, (x,))
        executable, report = build.build(frontend.to_relax(exported, preset.target), preset)
    kernels = [v["function"] for v in report.kernel_variants]
    mcpu, model_note = PRESETS[preset_name]
    mattr = ",".join(preset.target_dict.get("mattr", []))
    result = {"op": op, "layer": OPS[op], "preset": preset_name, "llvm_mcpu": mcpu, "model": model_note,
              "kernel_functions": kernels, "variants": report.kernel_variants}
    loop = hot_loop(build.generated_source(executable, "llvm", "asm"), kernels)
    if loop is None:
        return {**result, "status": "n/a", "reason": "no loop with multiply-accumulate instructions in the kernel"}
    macs = loop.macs()
    dominant = max(macs, key=macs.get)
    family = PEAK_FAMILY.get(dominant, "smull")
    analysis = analyse(tool, loop.body, mcpu, mattr)
    loop_macs = sum(macs.values()) / plane_pairs  # cnt: one-bit products per full-precision MAC
    core_peak = peak(tool, family, mcpu, mattr)
    macs_per_cycle = loop_macs / analysis["cycles_per_iteration"]
    peak_per_cycle = core_peak["macs_per_cycle"] / plane_pairs
    return {
        **result, "status": "estimated", "loop_label": loop.label, "loop_instructions": len(loop.body),
        "loop_body": loop.body, "mac_instructions": macs, "macs_per_iteration": loop_macs,
        "bit_products_per_mac": plane_pairs, **analysis, "macs_per_cycle": macs_per_cycle,
        "peak": {**core_peak, "macs_per_cycle": peak_per_cycle}, "fraction_of_peak": macs_per_cycle / peak_per_cycle,
    }


def run(ops: list[str], presets: list[str], log=print) -> dict:
    tool = find_llvm_mca()
    rows = []
    for op in ops:
        for preset_name in presets:
            log(f"llvm-mca estimate: {op} for {preset_name}")
            try:
                rows.append(kernel_estimate(tool, op, preset_name))
            except Exception as err:  # reported in the table, not hidden
                rows.append({"op": op, "layer": OPS[op], "preset": preset_name, "status": "failed",
                             "reason": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"})
    return {
        "note": ("ESTIMATES from llvm-mca's scheduling models, not measurements: no ARM hardware ran these kernels, "
                 "and timings from the emulated device are never reported"),
        "llvm_mca": tool, "llvm_mca_version": llvm_mca_version(tool),
        "cores": {name: {"llvm_mcpu": mcpu, "model": note, "datasheet": DATASHEETS[name]}
                  for name, (mcpu, note) in PRESETS.items() if name in presets},
        "kernels": rows,
    }
