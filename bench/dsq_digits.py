"""DSQ training on real data: a small CNN on scikit-learn's 8x8 handwritten digits, fp32 and DSQ 4/4, 3/3, 2/2.

The data set ships with scikit-learn (``sklearn.datasets.load_digits``: 1797 images of 8x8 pixels, values
0..16, scaled here to [0, 1]); a fixed stratified split keeps 25% (450 images) for testing. The network:

    conv 1->16 3x3, ReLU, conv 16->32 3x3 stride 2, ReLU, conv 32->64 3x3 stride 2, ReLU,
    flatten (64 x 2 x 2), Linear 256->64, ReLU, Linear 64->10

1. fp32: trained from random initialisation (Adam, cosine learning rate, ``--fp32-epochs``).
2. For each bit width b (weights/activations b/b): a copy of the fp32 model goes through
   ``convert_to_dsq(model, b, b, linear=True)``, which (as the paper) keeps the first conv and the last
   Linear in float and converts conv2, conv3 and the first Linear (DSQConv2d, DSQConv2d, DSQLinear).
   - "no fine-tuning": only the activation ranges are set, from one training-mode pass over the training
     set (min and max of each DSQ layer's input); weight ranges are each output channel's min and max.
   - "fine-tuned": that model trained with DSQ for ``--dsq-epochs`` (weights, biases, clip ranges and
     alphas all learn), starting from the fp32 weights. Fine-tuning a trained float model is the usual
     practice for quantization-aware training and what this project's conversion API is for; from
     scratch would also work on this data.
   Test accuracy is measured twice: in training mode (DSQ's hard-quantized values through float conv and
   linear) and in eval mode, where every DSQ layer calls ``effconv::qconv2d`` with integer codes: the
   path that is exported and compiled. The script also exports each eval model with ``torch.export`` and
   counts the op's nodes (one per DSQ layer; no float conv or matmul left for them).

Fixed seeds, fixed split, CPU, ``torch.set_num_threads(--threads)``. Writes a markdown report and a JSON
document (defaults: bench/results/dsq-digits.md and .json).

    python bench/dsq_digits.py [--fp32-epochs 30] [--dsq-epochs 15] [--bits 4 3 2] [--seed 0] [--threads 2]
"""

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import sklearn
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from tvm_effconv.nn.dsq import DSQConv2d, DSQLinear, convert_to_dsq

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZE = 64
TEST_FRACTION = 0.25
# Deprecation noise from inside torch.export (as in pyproject's pytest filters).
warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
warnings.filterwarnings("ignore", message=".*is deprecated. Please switch to", category=DeprecationWarning)


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def load_split(seed: int):
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=TEST_FRACTION, random_state=seed, stratify=digits.target
    )

    def tensors(images, labels):
        return torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16, torch.tensor(labels)

    return tensors(train_x, train_y), tensors(test_x, test_y)


def train(model: nn.Module, data, epochs: int, lr: float, seed: int) -> list[float]:
    """Adam with a cosine learning rate; returns the mean training loss of each epoch."""
    images, labels = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(labels) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    model.train()
    epoch_losses = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(labels), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        epoch_losses.append(total / len(labels))
    return epoch_losses


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, training_mode: bool) -> torch.Tensor:
    model.train(training_mode)  # DSQ layers: False calls effconv::qconv2d (and refreshes the codes)
    return model(images).argmax(1)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return (predicted == labels).float().mean().item()


def dsq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, (DSQConv2d, DSQLinear))]


def layer_state(model: nn.Module) -> dict:
    """Each DSQ layer's activation range and alphas (what training learns besides the weights)."""
    return {
        path: {
            "act_range": [layer.act_lower.item(), layer.act_upper.item()],
            "act_alpha": layer.act_alpha.item(),
            "weight_alpha": layer.weight_alpha.item(),
            "mean_weight_range": (layer.weight_upper - layer.weight_lower).mean().item(),
        }
        for path, layer in dsq_layers(model)
    }


def count_op_nodes(model: nn.Module, example: torch.Tensor) -> dict:
    """Export the eval model; count effconv::qconv2d nodes and the float convs and matmuls left."""
    model.eval()
    graph = torch.export.export(model, (example,)).run_decompositions().graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    return {
        "qconv2d": targets.count(str(torch.ops.effconv.qconv2d.default)),
        "float_conv": sum("convolution" in t for t in targets),
        "float_matmul": sum(any(name in t for name in ("addmm", "aten.mm", "aten.linear")) for t in targets),
    }


def evaluate_dsq(model, test, train_mode_too: bool) -> dict:
    images, labels = test
    evaluated = predictions(model, images, training_mode=False)
    result = {"accuracy_eval_op": accuracy(evaluated, labels)}
    if train_mode_too:
        trained = predictions(model, images, training_mode=True)
        result["accuracy_training_forward"] = accuracy(trained, labels)
        result["predictions_agree"] = (trained == evaluated).float().mean().item()
    return result


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    loadavg_start = os.getloadavg()
    started = time.perf_counter()
    train_data, test_data = load_split(args.seed)
    torch.manual_seed(args.seed)
    fp32 = DigitsNet()
    phase = time.perf_counter()
    fp32_losses = train(fp32, train_data, args.fp32_epochs, args.fp32_lr, args.seed)
    fp32.eval()
    with torch.no_grad():
        fp32_accuracy = accuracy(fp32(test_data[0]).argmax(1), test_data[1])
    rows = [{
        "model": "fp32", "weight_bits": 32, "act_bits": 32, "epochs": args.fp32_epochs, "fine_tuned": False,
        "accuracy_float": fp32_accuracy, "final_train_loss": fp32_losses[-1], "seconds": time.perf_counter() - phase,
    }]
    print(f"fp32: test accuracy {100 * fp32_accuracy:.2f}% after {args.fp32_epochs} epochs "
          f"({rows[0]['seconds']:.1f} s)", flush=True)

    conversion = None
    for bits in args.bits:
        model = copy.deepcopy(fp32)
        report = convert_to_dsq(model, weight_bits=bits, act_bits=bits, linear=True)
        conversion = conversion or str(report)
        # Calibration only: one training-mode pass sets each DSQ layer's activation range (min, max).
        predictions(model, train_data[0], training_mode=True)
        calibrated = evaluate_dsq(model, test_data, train_mode_too=True)
        rows.append({"model": f"DSQ {bits}/{bits}, no fine-tuning", "weight_bits": bits, "act_bits": bits,
                     "epochs": 0, "fine_tuned": False, **calibrated, "layers": layer_state(model)})
        phase = time.perf_counter()
        torch.manual_seed(args.seed)
        losses = train(model, train_data, args.dsq_epochs, args.dsq_lr, args.seed)
        tuned = evaluate_dsq(model, test_data, train_mode_too=True)
        tuned["export"] = count_op_nodes(model, test_data[0][:2])
        rows.append({"model": f"DSQ {bits}/{bits}, fine-tuned", "weight_bits": bits, "act_bits": bits,
                     "epochs": args.dsq_epochs, "fine_tuned": True, **tuned, "final_train_loss": losses[-1],
                     "seconds": time.perf_counter() - phase, "layers": layer_state(model)})
        print(f"DSQ {bits}/{bits}: no fine-tuning {100 * calibrated['accuracy_eval_op']:.2f}%, fine-tuned "
              f"{100 * tuned['accuracy_eval_op']:.2f}% (eval op), {100 * tuned['accuracy_training_forward']:.2f}% "
              f"(training forward), {rows[-1]['seconds']:.1f} s", flush=True)

    machine = {
        "loadavg_start": loadavg_start,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scikit_learn": sklearn.__version__,
        "python": platform.python_version(),
        "loadavg_end": os.getloadavg(),
    }
    settings = {
        "seed": args.seed, "fp32_epochs": args.fp32_epochs, "dsq_epochs": args.dsq_epochs,
        "fp32_lr": args.fp32_lr, "dsq_lr": args.dsq_lr, "batch_size": BATCH_SIZE, "bits": args.bits,
        "train_images": len(train_data[1]), "test_images": len(test_data[1]), "argv": sys.argv[1:],
    }
    return {"machine": machine, "settings": settings, "conversion": conversion, "rows": rows,
            "total_s": time.perf_counter() - started}


def percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def markdown(document: dict) -> str:
    machine, settings = document["machine"], document["settings"]
    fp32 = document["rows"][0]
    command = " ".join([".venv/bin/python", "bench/dsq_digits.py", *settings["argv"]])
    load_start, load_end = (", ".join(f"{v:.2f}" for v in machine[key]) for key in ("loadavg_start", "loadavg_end"))
    lines = ["# DSQ on handwritten digits (scikit-learn), CPU", ""]
    lines.append(f"`{command}`: {document['total_s']:.0f} s in all, {machine['date']}. Every figure is in "
                 "`dsq-digits.json`.")
    lines += ["", (
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs ({machine['affinity_cpus']} in this "
        f"process' affinity), {machine['torch_threads']} torch threads, load average {load_start} at the start and "
        f"{load_end} at the end; torch {machine['torch']}, scikit-learn {machine['scikit_learn']}, Python "
        f"{machine['python']}."
    ), "", (
        f"Data: `load_digits`, 8x8 images, stratified split with seed {settings['seed']}: "
        f"{settings['train_images']} train, {settings['test_images']} test (one test image is "
        f"{100 / settings['test_images']:.2f} points). Seed {settings['seed']} for initialisation and batch order."
    ), (
        f"Training: fp32 {settings['fp32_epochs']} epochs from random initialisation (Adam, lr {settings['fp32_lr']}, "
        f"cosine, batch {settings['batch_size']}); each DSQ model fine-tuned from the fp32 weights for "
        f"{settings['dsq_epochs']} epochs (Adam, lr {settings['dsq_lr']}, cosine; weights, biases, clip ranges and "
        "alphas all learn). DSQ layers: conv2, conv3 and the first Linear; the first conv and the last Linear stay "
        "float, as in the paper."
    ), ""]
    lines.append("| model (weights/activations) | epochs | test accuracy, eval mode | test accuracy, training-mode "
                 "forward | eval vs fp32 (points) | time |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    accuracy = percent(fp32["accuracy_float"])
    lines.append(f"| fp32 | {fp32['epochs']} | {accuracy} (float) | {accuracy} | | {fp32['seconds']:.0f} s |")
    for row in document["rows"][1:]:
        delta = 100 * (row["accuracy_eval_op"] - fp32["accuracy_float"])
        seconds = f"{row['seconds']:.0f} s" if "seconds" in row else ""
        lines.append(
            f"| {row['model']} | {row['epochs']} | {percent(row['accuracy_eval_op'])} | "
            f"{percent(row['accuracy_training_forward'])} | {delta:+.2f} | {seconds} |"
        )
    dsq_rows = document["rows"][1:]
    disagree = sum(round((1 - row["predictions_agree"]) * settings["test_images"]) for row in dsq_rows)
    exports = {tuple(row["export"].values()) for row in dsq_rows if row["fine_tuned"]}
    lines += [
        "",
        (
            "\"no fine-tuning\": converted from fp32, activation ranges calibrated (min and max over the training "
            "set), weight ranges at each output channel's min and max, no training."
        ),
        (
            "\"eval mode\" runs every DSQ layer through the `effconv::qconv2d` op on integer codes (the deployed "
            "path); \"training-mode forward\" is DSQ's hard-quantized values through float conv and linear (they "
            f"differ on {disagree} of {len(dsq_rows) * settings['test_images']} test predictions in all)."
        ),
        "Exported with `torch.export`, each fine-tuned model has "
        + "; ".join(f"{q} effconv::qconv2d nodes, float convs: {c}, float matmuls: {m}" for q, c, m in sorted(exports))
        + " (the float first conv and last Linear).",
        (
            "Times are wall-clock on a shared machine: with 2 torch threads on 2 cores, a busy neighbour can slow a "
            "phase many times over (the load averages above); the accuracies do not depend on it (same seeds, same "
            "thread count, same results), though a different thread count may change them slightly."
        ),
        "",
        "Activation clip ranges [lower, upper] at each DSQ layer's input, calibrated -> after fine-tuning:",
        "",
    ]
    for bits in settings["bits"]:
        before, after = (
            next(row for row in dsq_rows if row["weight_bits"] == bits and row["fine_tuned"] == fine_tuned)
            for fine_tuned in (False, True)
        )
        ranges = "; ".join(
            f"{path} [{', '.join(f'{v:.2f}' for v in before['layers'][path]['act_range'])}] -> "
            f"[{', '.join(f'{v:.2f}' for v in after['layers'][path]['act_range'])}]"
            for path in after["layers"]
        )
        lines.append(f"- {bits}/{bits}: {ranges}")
    lines += ["", f"Conversion ({settings['bits'][0]}/{settings['bits'][0]} shown; the same layers at every width):",
              "", "```", document["conversion"], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32-epochs", type=int, default=30)
    parser.add_argument("--dsq-epochs", type=int, default=15)
    parser.add_argument("--fp32-lr", type=float, default=3e-3)
    parser.add_argument("--dsq-lr", type=float, default=1e-3)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2, 1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--md", type=Path, default=RESULTS / "dsq-digits.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "dsq-digits.json")
    args = parser.parse_args(argv)
    document = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    text = markdown(document)
    args.md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
