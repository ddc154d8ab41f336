"""The suite's outputs: the results page (markdown), the plots (PNG) and the flat list of every figure with the
machine and thread count it was measured on."""

from pathlib import Path

import ops
from endtoend import SYSTEMS

# --- figures: one entry per number, each with where it came from ---


def figures(results: dict) -> list[dict]:
    host = {"machine": results["context"]["machine"], "threads": results["context"]["threads"]}
    found = []

    def add(section, name, value, unit, context, source):
        found.append({"section": section, "name": name, "value": value, "unit": unit, **context, "source": source})

    peak = results.get("peak")
    if peak:
        for kind in ("fp32", "int8"):
            for threads, rate in peak[kind]["macs_per_s"].items():
                add("peak", f"{kind} peak ({peak[kind]['instruction']})", rate / 1e9, "GMAC/s",
                    {"machine": host["machine"], "threads": int(threads)}, "measured: bench/peak.py tight loop")
    for row in results.get("end_to_end", {}).get("networks", []):
        for system, result in row["systems"].items():
            if "median_ms" not in result:
                continue
            source = f"measured: end to end, {SYSTEMS[system]}"
            add("end_to_end", f"{row['label']}: {system} median latency", result["median_ms"], "ms", host, source)
            add("end_to_end", f"{row['label']}: {system} throughput", result["gmacs"], "GMAC/s", host, source)
            if system != "ours" and "ratio_to_ours" in result:
                add("end_to_end", f"{row['label']}: {system} time / ours", result["ratio_to_ours"], "ratio", host, source)
    for op, entry in results.get("ops", {}).items():
        if "document" not in entry:
            continue
        context = ops.context(entry["document"])
        where = {"machine": f"{context['cpu']} ({context['llvm_mcpu']})", "threads": context["threads"]}
        source = f"measured: bench/{ops.OP_BENCHMARKS[op]['script']} in this run ({context['date']})"
        for row in ops.ROWS[op](entry["document"]):
            add("ops", f"{op} {row['layer']}: ours", row["ours_ms"], "ms", where, source)
            for peer, ms in row["peers"].items():
                add("ops", f"{op} {row['layer']}: {peer} / ours", ms / row["ours_ms"], "ratio", where, source)
    arm = results.get("arm_estimates")
    if arm:
        for row in arm["kernels"]:
            if row["status"] != "estimated":
                continue
            where = {"machine": f"{row['preset']} (llvm-mca model of {row['llvm_mcpu']})", "threads": 1}
            source = f"ESTIMATE: llvm-mca {arm['llvm_mca_version']}, not a measurement"
            add("arm_estimates", f"{row['op']} on {row['preset']}: MAC/cycle", row["macs_per_cycle"], "MAC/cycle",
                where, source)
            add("arm_estimates", f"{row['op']} on {row['preset']}: fraction of peak", row["fraction_of_peak"], "fraction",
                where, source)
    return found


# --- the page ---

def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def _ms(value) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def peak_rate(results: dict, kind: str, threads: int) -> float | None:
    peak = results.get("peak")
    if not peak:
        return None
    rates = peak[kind]["macs_per_s"]
    return rates.get(str(threads)) or max(rates.values())


def context_lines(results: dict) -> list[str]:
    c = results["context"]
    load = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    return [
        f"- machine: **{c['machine']}**: {c['cpu']}, {c['logical_cpus']} logical CPUs ({c['affinity_cpus']} usable), "
        f"LLVM cpu `{c['llvm_mcpu']}`, flags {', '.join(c['flags']) or 'none of interest'}; host `{c['host']}`",
        f"- threads: **{c['threads']}** for every system (TVM_NUM_THREADS, torch.set_num_threads, ONNX Runtime "
        "intra-op threads; inter-op 1)",
        f"- date {c['date']}; load average {load(c['loadavg_start'])} at the start, {load(c['loadavg_end'])} at the end "
        "(the machine may be shared: compare the rows of one run, which are interleaved)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in c['versions'].items())}",
        f"- command: `{c['command']}`" + (" (**--quick: a smoke test on tiny networks, not benchmark figures**)"
                                           if c["quick"] else ""),
    ]


def peak_section(results: dict) -> list[str]:
    peak = results.get("peak")
    if not peak:
        return []
    rows = []
    for kind in ("fp32", "int8"):
        rates = peak[kind]["macs_per_s"]
        rows.append([kind, peak[kind]["instruction"], *(f"{rates[t] / 1e9:.1f}" for t in sorted(rates, key=int))])
    threads = sorted(peak["fp32"]["macs_per_s"], key=int)
    return ["## Machine peak", "", f"Measured: {peak['method']}. GMAC/s (one multiply-accumulate = one FMA lane, or "
            "one int8 product summed).", "",
            *_table(["kind", "instruction", *(f"{t} thread(s) GMAC/s" for t in threads)], rows), ""]


def end_to_end_section(results: dict) -> tuple[list[str], list[str]]:
    """The section's lines and the plain list of cases where ours is slower than a peer."""
    section = results.get("end_to_end")
    if not section:
        return [], []
    threads = results["context"]["threads"]
    fp32_peak = peak_rate(results, "fp32", threads)
    lines = ["## End to end", "", "Batch 1. Ours: each network compiled by the project's build for `host` (records "
             f"from `{section['records']['directory']}` where a workload has one, default schedules elsewhere), "
             "verified against its eager PyTorch output. Peers run the float network the row names (what a user "
             "without our ops deploys). `time / ours` > 1: ours is faster. GMAC/s counts the float network's "
             f"multiply-accumulates; % of peak is against the measured fp32 peak on {threads} thread(s) "
             "(effective for the quantized systems). " + section["timing"]["method"] + ".", ""]
    lines += [f"- records: {problem}" for problem in section["records"]["problems"]]
    slower, summary, blocks = [], [], []
    for row in section["networks"]:
        blocks += [f"### {row['label']}", "", f"{row['input_shape']} input, {row['macs'] / 1e6:.1f} MMACs; peers on: "
                  f"{results['end_to_end']['float_networks'][row['float_network']]['label']}", ""]
        table = []
        for system, result in row["systems"].items():
            if "median_ms" in result:
                percent = f"{100 * result['gmacs'] * 1e9 / fp32_peak:.1f}%" if fp32_peak else "-"
                ratio = f"{result['ratio_to_ours']:.2f}" if "ratio_to_ours" in result and system != "ours" else ""
                table.append([SYSTEMS[system], _ms(result["median_ms"]), _ms(result["min_ms"]),
                              f"{result['gmacs']:.2f}", percent, ratio, result["detail"]])
                if system != "ours" and result.get("ratio_to_ours", 2) < 1:
                    slower.append(f"{row['label']}: ours is {1 / result['ratio_to_ours']:.2f}x slower than "
                                  f"{SYSTEMS[system]} ({_ms(row['systems']['ours']['median_ms'])} ms against "
                                  f"{_ms(result['median_ms'])} ms)")
            else:
                table.append([SYSTEMS[system], result["status"], "", "", "", "", result["detail"]])
        blocks += [*_table(["system", "median ms", "min ms", "GMAC/s", "% fp32 peak", "time / ours", "detail"], table), ""]
        summary.append([row["label"], *(f"{row['systems'][s]['ratio_to_ours']:.2f}" if "ratio_to_ours" in row["systems"][s]
                                        else row["systems"][s]["status"] for s in SYSTEMS if s != "ours")])
    lines += ["", "Peer time / ours (> 1: ours faster):", "",
              *_table(["network", *(SYSTEMS[s] for s in SYSTEMS if s != "ours")], summary), "", *blocks]
    return lines, slower


PEAK_KIND = {"fp32": "fp32", "int8": "int8", "bitserial": "int8"}


def ops_section(results: dict) -> list[str]:
    section = results.get("ops")
    if not section:
        return []
    lines = ["## Per op", "", "Each op benchmark ran in its own process in this run and interleaved its kernel with "
             "its peers; its own machine and thread context is given with its table. `peer / ours` > 1: ours is "
             "faster. % of peak: against the measured fp32 peak (fp32 kernels) or the int8 dot-sequence peak (int8 "
             "and bit-serial kernels, effective MACs) on the op benchmark's thread count; LCCL counts the dense conv's MACs "
             "(effective: its zero positions skip theirs), so it can pass 100%.", ""]
    for op, entry in section.items():
        lines.append(f"### {op}")
        lines.append("")
        if "document" not in entry:
            lines += [f"{entry['status']}: {entry['reason']}", ""]
            continue
        context = ops.context(entry["document"])
        lines += [f"`python bench/{' '.join(Path(a).name if a.startswith('/') else a for a in entry['command'])}` "
                  f"({entry['seconds']:.0f} s, {entry['status']}); ran on {context['cpu']} ({context['llvm_mcpu']}), "
                  f"{context['threads']} thread(s), {context['date']}" + (f"; {entry['reason']}" if "reason" in entry else ""), ""]
        rows = ops.ROWS[op](entry["document"])
        peers = list(dict.fromkeys(peer for row in rows for peer in row["peers"]))
        table = []
        for row in rows:
            gmacs = row["macs"] / (row["ours_ms"] * 1e-3) / 1e9 if row["macs"] else None
            peak = peak_rate(results, PEAK_KIND[row["kind"]], context["threads"] or 1)
            table.append([row["layer"], f"{row['macs'] / 1e6:.1f}" if row["macs"] else "-", _ms(row["ours_ms"]),
                          *(_ms(row["peers"][p]) if p in row["peers"] else "-" for p in peers),
                          *(f"{row['peers'][p] / row['ours_ms']:.2f}" if p in row["peers"] else "-" for p in peers),
                          f"{gmacs:.1f}" if gmacs else "-",
                          f"{100 * gmacs * 1e9 / peak:.0f}% {PEAK_KIND[row['kind']]}" if gmacs and peak else "-",
                          "yes" if row["correct"] else "**NO**"])
        head = ["layer", "MMACs", "ours ms", *(f"{ops.PEER_LABELS.get(p, p)} ms" for p in peers),
                *(f"{p} / ours" for p in peers), "GMAC/s", "% peak", "correct"]
        lines += [*_table(head, table), ""]
    return lines


def arm_section(results: dict) -> list[str]:
    arm = results.get("arm_estimates")
    if not arm:
        return []
    lines = ["## ARM kernels: static ESTIMATES (llvm-mca), not measurements", "",
             f"**{arm['note']}.** {arm['llvm_mca']} (LLVM {arm['llvm_mca_version']}); method in bench/mca.py: the "
             "innermost loop of the op's kernel with the most multiply-accumulate instructions, built by the project "
             "for the preset with default schedules, analysed in steady state; the peak is the same model's rate for "
             "12 independent copies of the kernel's main MAC instruction alone.", ""]
    table = []
    for row in arm["kernels"]:
        if row["status"] != "estimated":
            table.append([row["op"], row["preset"], row["status"], row.get("reason", ""), "", "", "", "", ""])
            continue
        mix = ", ".join(f"{k} {v}" for k, v in row["mac_instructions"].items())
        table.append([row["op"], row["preset"], f"{row['llvm_mcpu']} ({row['scheduling_model_units']} units)",
                      f"{row['loop_instructions']} instrs; {mix}", f"{row['macs_per_iteration']:.0f}",
                      f"{row['cycles_per_iteration']:.1f}", f"{row['macs_per_cycle']:.2f}",
                      f"{row['peak']['macs_per_cycle']:.2f} (`{row['peak']['instruction']}`)",
                      f"{100 * row['fraction_of_peak']:.0f}%"])
    lines += _table(["op", "preset", "llvm-mca model", "hot loop (MAC instructions: lane MACs)", "MACs / iteration",
                     "cycles / iteration", "MAC / cycle (estimate)", "model peak MAC / cycle", "of peak"], table)
    lines += ["", "Layers: " + "; ".join(f"{op}: {text}" for op, text in
                                          dict.fromkeys((r["op"], r["layer"]) for r in arm["kernels"])), "",
              "DSQ counts `cnt` one-bit products, divided by the plane pairs of a 2x2-bit MAC (4). Cores:", ""]
    for name, core in arm["cores"].items():
        lines.append(f"- {name}: estimated with {core['model']}; Arm's documents: {core['datasheet']}")
    return lines + [""]


def page(results: dict, plots: dict) -> str:
    c = results["context"]
    e2e_lines, slower = end_to_end_section(results)
    lines = [f"# tvm-effconv against its peers on {c['machine']}", "", *context_lines(results), ""]
    if slower:
        lines += ["**Where ours is slower than a peer** (end to end):", "", *(f"- {s}" for s in slower), ""]
    lines += [*peak_section(results), *e2e_lines, *ops_section(results), *arm_section(results)]
    cuda = results.get("cuda")
    if cuda:
        lines += ["## CUDA", "", cuda["status"], ""]
    lines += ["## Plots", ""]
    for name, entry in plots.items():
        lines.append(f"- {name}: " + (f"![{name}]({entry['file']})" if "file" in entry else f"not drawn: {entry['reason']}"))
    lines += ["", f"Every figure, with its machine and thread count, is in `{c['machine']}.json` (key `figures`).", ""]
    return "\n".join(lines)


# --- plots ---

def plots(results: dict, folder: Path, stem: str) -> dict:
    """{plot name: {"file"} or {"reason"}}; PNGs written next to the page."""
    try:
        import matplotlib
    except ImportError:
        reason = "matplotlib is not installed (pip install -e '.[bench]')"
        return {name: {"reason": reason} for name in ("latency", "lccl_sparsity", "lowbit_bits")}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    c = results["context"]
    title_context = f"{c['machine']}, {c['threads']} thread(s)" + (" (--quick smoke test)" if c["quick"] else "")
    networks = results.get("end_to_end", {}).get("networks", [])

    if networks:
        fig, ax = plt.subplots(figsize=(10, 4.8))
        width = 0.8 / len(SYSTEMS)
        for index, system in enumerate(SYSTEMS):
            xs = [i + (index - len(SYSTEMS) / 2 + 0.5) * width for i in range(len(networks))]
            values = [row["systems"][system].get("median_ms", 0) for row in networks]
            ax.bar(xs, values, width, label=SYSTEMS[system].split(" (")[0])
        ax.set_xticks(range(len(networks)), [row["label"].replace(" (", "\n(") for row in networks], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median latency, ms (log; missing bar: n/a)")
        ax.set_title(f"End-to-end latency per network and system: {title_context}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        drawn["latency"] = _save(fig, folder, f"{stem}-latency.png")
    else:
        drawn["latency"] = {"reason": "the end-to-end section did not run"}

    lccl_entry = results.get("ops", {}).get("lccl", {})
    if "document" in lccl_entry:
        curves = ops.lccl_curves(lccl_entry["document"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for algorithm, keys in curves.items():
            for key, style in (("speedup_over_dense", "-o"), ("speedup_over_torch", "--s")):
                points = sorted((float(s), v) for s, v in keys[key].items())
                ax.plot([100 * s for s, _ in points], [v for _, v in points], style,
                        label=f"{algorithm}: over {'the same kernel dense' if 'dense' in key else 'PyTorch dense conv'}")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("mask zero positions (%)")
        ax.set_ylabel("speed-up (geomean over ResNet-18 3x3 layers)")
        ax.set_title(f"LCCL speed-up versus sparsity: {lccl_entry['document']['machine']['cpu']}, "
                     f"{ops.context(lccl_entry['document'])['threads']} thread", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        drawn["lccl_sparsity"] = _save(fig, folder, f"{stem}-lccl-sparsity.png")
    else:
        drawn["lccl_sparsity"] = {"reason": f"the LCCL op benchmark did not run ({lccl_entry.get('reason', 'not selected')})"}

    drawn["lowbit_bits"] = _lowbit_plot(plt, networks, title_context, folder, stem)
    return drawn


LOWBIT_NETWORKS = {"resnet18_dsq2": 2, "resnet18_dsq4": 4, "resnet18_dsconv4": 4, "resnet18_fp32": 32}


def _lowbit_plot(plt, networks, title_context, folder, stem) -> dict:
    by_key = {row["network"]: row for row in networks}
    present = [key for key in LOWBIT_NETWORKS if key in by_key and "median_ms" in by_key[key]["systems"]["ours"]]
    if not present:
        return {"reason": "no low-bit network was measured end to end"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for peer, style in (("torch_fp32", "o"), ("torch_int8", "s"), ("ort_int8", "^")):
        points = [(LOWBIT_NETWORKS[k], by_key[k]["systems"][peer].get("ratio_to_ours"), by_key[k]["label"]) for k in present]
        points = [p for p in points if p[1] is not None]
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=style, label=f"{SYSTEMS[peer]} time / ours")
        for x, y, label in points:
            ax.annotate(label.replace("ResNet-18 ", ""), (x, y), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 4, 8, 32], ["2", "4", "8", "32 (fp32)"])
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("weight bits of our network")
    ax.set_ylabel("speed-up of ours (peer time / our time)")
    ax.set_title(f"Low-bit ResNet-18 speed-up versus bits: {title_context}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, folder, f"{stem}-lowbit.png")


def _save(fig, folder: Path, name: str) -> dict:
    import matplotlib.pyplot as plt

    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return {"file": name}
