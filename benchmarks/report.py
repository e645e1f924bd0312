"""Results files: JSON, a markdown summary and PNG plots per run, and the tables of the README and the docs.

    python -m benchmarks.report    # regenerate README.md's headline table and docs/benchmarks.md's tables
"""
import argparse
import glob
import json
import os

from .cases import INVERSION_CASE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def _cell(row, key, fmt, suffix=""):
    return format(row[key], fmt) + suffix if key in row else "–"


def markdown(report, cases=None):
    env = report["environment"]
    lines = [f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · commit {env['commit']} · "
             f"{env['date']} · copy bandwidth {env['copy_bandwidth_gbs']:.1f} GB/s", "",
             f"Command: `{report['command']}`", ""]
    for result in report["results"]:
        if cases is not None and result["case"] not in cases:
            continue
        count = "aten ops" if env["device_type"] == "cpu" else "launches"
        versus = result.get("versus", ("eager", "compile"))
        steps = any("ops_per_flow_step" in r for r in result["rows"])  # a whole-model case, counted eagerly
        breaks = any("graph_breaks" in r for r in result["rows"])
        lines += [f"**{result['label']}**", "",
                  f"| provider | median ms | p10..p90 ms | vs {versus[0]} | vs {versus[1]} | of copy bw | peak MiB | "
                  f"{count} | conv share | first call s |" + (" ops per flow step | host syncs |" if steps else "")
                  + (" graph breaks |" if breaks else ""),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if steps else "")
                  + (" ---: |" if breaks else "")]
        for r in result["rows"]:
            if "error" in r:
                lines.append(f"| {r['provider']} | failed: {r['error']} | | | | | | | | |")
                continue
            lines.append(
                f"| {r['provider']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}..{r['p90_ms']:.3f} | "
                f"{_cell(r, 'speedup_vs_eager', '.2f', '×')} | {_cell(r, 'speedup_vs_compile', '.2f', '×')} | "
                f"{_cell(r, 'fraction_of_copy', '.0%')} | {r['peak_mb']:.1f} | "
                f"{r.get('launches', r.get('aten_ops'))} | {_cell(r, 'conv_share', '.0%')} | "
                f"{_cell(r, 'first_call_s', '.2f')} |"
                + (f" {_cell(r, 'ops_per_flow_step', '.1f')} | {_cell(r, 'host_syncs', 'd')} |" if steps else "")
                + (f" {_cell(r, 'graph_breaks', 'd')} |" if breaks else ""))
        lines.append("")
    return "\n".join(lines)


def _inversion_points(report):
    """(params, provider, row) of each step by inversion that was timed in turn with its baseline."""
    return [(result["params"], row["provider"], row) for result in report["results"]
            if result["case"] == INVERSION_CASE for row in result["rows"] if "baseline" in row]


def inversion_table(report):
    """Training by inversion against standard backprop: activation memory and median step time of each,
    and the time ratio as the median over calls made in turn."""
    lines = ["| K | hidden | provider | standard MiB | by inversion MiB | memory ratio | standard ms | "
             "by inversion ms | time ratio |", "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for params, provider, row in _inversion_points(report):
        base = row["baseline"]
        lines.append(f"| {params['K']} | {params['hidden']} | {provider} | {base['peak_mb']:.1f} | "
                     f"{row['peak_mb']:.1f} | {row['peak_mb'] / base['peak_mb']:.1%} | {base['median_ms']:.0f} | "
                     f"{row['median_ms']:.0f} | {row['ratio_to_baseline']:.2f}× |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if any("median_ms" in row for row in r["rows"])]
    providers = sorted({row["provider"] for r in results for row in r["rows"] if "median_ms" in row},
                       key=lambda p: (p != "eager", p != "compile", p))
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.22 * len(results) * len(providers)))
    height = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        values = [next((row.get("speedup_vs_eager", 0) for row in r["rows"] if row["provider"] == provider), 0)
                  for r in results]
        ax.barh([k + i * height for k in range(len(results))], values, height, label=provider)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(results))])
    ax.set_yticklabels([r["label"] for r in results], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speed-up over eager: the reference ops, or the plain-PyTorch Glow (median)")
    ax.set_title(f"flowkern on {report['environment']['device']}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depth(report, path):
    """Activation memory and step time of a Glow training step against depth K, standard vs by inversion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for params, provider, row in _inversion_points(report):
        label = f"{provider}, {params['hidden']} hidden"
        series.setdefault(("standard backprop", label), []).append((params["K"], row["baseline"]))
        series.setdefault(("by inversion", label), []).append((params["K"], row))
    series = {key: points for key, points in series.items() if len(points) > 1}  # a sweep over K
    if not series:
        return False
    fig, (mem, time) = plt.subplots(1, 2, figsize=(10, 4))
    for (mode, label), points in sorted(series.items()):
        ks = [k for k, _ in points]
        style = "-o" if mode == "standard backprop" else "--s"
        mem.plot(ks, [row["peak_mb"] for _, row in points], style, label=f"{mode}, {label}")
        time.plot(ks, [row["median_ms"] for _, row in points], style, label=f"{mode}, {label}")
    for ax, label in ((mem, "activation memory of a step (MiB)"), (time, "median step time (ms)")):
        ax.set_xlabel("flow steps per level K")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    mem.legend(fontsize=7)
    fig.suptitle(f"Glow training by depth on {report['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(report, folder):
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, name) for name in ("results.json", "summary.md", "speedup.png")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(f"# flowkern benchmarks\n\n{markdown(report)}\n")
        table = inversion_table(report)
        if table:
            f.write(f"## Training by inversion against standard backprop\n\n{table}")
    plot(report, paths[2])
    depth_path = os.path.join(folder, "memory_by_depth.png")
    if plot_depth(report, depth_path):
        paths.append(depth_path)
    return paths


def latest_reports():
    """The newest ``results.json`` of each device under :data:`RESULTS`, as ``[(folder, report)]``: the docs show
    one run of one commit per device; older runs stay in their folders, labelled with their commit."""
    newest = {}
    for path in glob.glob(os.path.join(RESULTS, "*", "results.json")):
        with open(path) as f:
            report = json.load(f)
        env = report["environment"]
        if env["device"] not in newest or env["date"] > newest[env["device"]][1]["environment"]["date"]:
            newest[env["device"]] = (os.path.relpath(os.path.dirname(path), ROOT), report)
    return sorted(newest.values(), key=lambda item: item[1]["environment"]["date"], reverse=True)


def headline_table(report):
    """The whole-model Glow's training step and sampling, per provider: median ms and speed-up over plain
    PyTorch eager and compiled, and the ops per flow step an eager step dispatches."""
    by_case = {r["case"]: r for r in report["results"] if r["case"] in ("glow_train_step", "glow_sample")}
    if len(by_case) < 2:
        return None
    train, sample = (by_case[name] for name in ("glow_train_step", "glow_sample"))
    samples = {r["provider"]: r for r in sample["rows"] if "median_ms" in r}
    lines = [f"{train['label']}, sampling at T = 0.7; medians, speed-ups over plain PyTorch eager / compiled:", "",
             "| provider | training step ms | × eager | × compiled | ops per flow step | sampling ms | × eager | "
             "× compiled |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in train["rows"]:
        if "median_ms" not in r:
            continue
        s = samples.get(r["provider"], {})
        lines.append(f"| {r['provider']} | {r['median_ms']:.1f} | {_cell(r, 'speedup_vs_eager', '.2f', '×')} | "
                     f"{_cell(r, 'speedup_vs_compile', '.2f', '×')} | {_cell(r, 'ops_per_flow_step', '.1f')} | "
                     f"{_cell(s, 'median_ms', '.1f')} | {_cell(s, 'speedup_vs_eager', '.2f', '×')} | "
                     f"{_cell(s, 'speedup_vs_compile', '.2f', '×')} |")
    env = report["environment"]
    lines += ["", f"{env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date'][:10]}."]
    return "\n".join(lines) + "\n"


def dropin_table(report):
    """The peers' Glows, original and after ``flowkern.accelerate``: training step medians, speed-ups over the
    original eager and compiled, peak memory and graph breaks."""
    results = [r for r in report["results"] if r["case"].endswith("_glow_train_step") and r["case"] != "glow_train_step"]
    if not results:
        return None
    lines = ["Your model, accelerated: the training step of a peer library's Glow at the same size, as its users "
             "write it, and after `flowkern.accelerate(model)`:", "",
             "| provider | training step ms | × original | × original compiled | peak MiB | graph breaks |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        for r in result["rows"]:
            if "median_ms" in r:
                lines.append(f"| {r['provider']} | {r['median_ms']:.1f} | {_cell(r, 'speedup_vs_eager', '.2f', '×')} | "
                             f"{_cell(r, 'speedup_vs_compile', '.2f', '×')} | {r['peak_mb']:.0f} | "
                             f"{_cell(r, 'graph_breaks', 'd')} |")
    return "\n".join(lines) + "\n"


def readme_section():
    """The README's results: the headline table of the newest run that has one."""
    parts = [README_START, "", "Generated by `python -m benchmarks.report` from the newest run; every table is in "
             "[docs/benchmarks.md](docs/benchmarks.md).", ""]
    for folder, report in latest_reports():
        table = headline_table(report)
        if table:
            dropin = dropin_table(report)
            parts += [table, *([dropin] if dropin else []), f"Raw results and log: `{folder}/`.", ""]
            break
    parts.append(README_END)
    return "\n".join(parts)


def docs_section():
    """The benchmark page's results: every table of the newest run of each device."""
    parts = [README_START, "", "Generated by `python -m benchmarks.report` from the newest run of each device.", ""]
    for folder, report in latest_reports():
        parts += [f"### {report['environment']['device']}", "", f"Results and log: `{folder}/`.", "",
                  markdown(report)]
        table = inversion_table(report)
        if table:
            parts += ["Training by inversion against standard backprop (activation memory of a step, "
                      "median step time):", "", table]
    parts.append(README_END)
    return "\n".join(parts)


def update_section(path, section):
    """Replace the text between the results markers of ``path`` with ``section``."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    with open(path, "w") as f:
        f.write(text[:start] + section + text[end:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = parser.parse_args()
    update_section(args.readme, readme_section())
    update_section(args.docs, docs_section())
