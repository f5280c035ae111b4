"""Write a benchmark record as results.json, RESULTS.md with its tables, and a PNG plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .figures import plot_results
from .targets import OVERHEAD_LIMIT, evaluate_targets

__all__ = ["write_results", "render_markdown", "load_results", "solver_budget"]

_MIB = 2**20


# Keys that render_markdown reads from every record, at the top level and inside two of them.
_REQUIRED_KEYS = ("created", "settings", "machine", "load_average_start", "load_average_end", "elapsed_s")
_REQUIRED_SETTINGS = ("reference_batch", "reference_tolerance")
_REQUIRED_MACHINE = ("cpu", "cpu_count", "device", "torch_threads", "python", "torch", "torchdiffeq", "mlflow")


def load_results(path: str | Path) -> dict:
    """Read a results.json written by this benchmark.

    Raises ValueError when the file is missing, a directory, not JSON, or not a results record:
    a JSON object with the keys that RESULTS.md needs.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"invalid results file {path}: it is a directory; pass the results.json inside it")
    if not path.is_file():
        raise ValueError(f"results file not found: {path}; pass a results.json that python -m bench wrote")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON in {path}: {exc}") from exc
    _check_record(results, path)
    return results


def _check_record(results: object, path: Path) -> None:
    hint = "pass a results.json that python -m bench wrote"
    if not isinstance(results, dict):
        raise ValueError(f"invalid results file {path}: expected a JSON object, got a {type(results).__name__}; {hint}")
    missing = [key for key in _REQUIRED_KEYS if key not in results]
    for parent, keys in (("settings", _REQUIRED_SETTINGS), ("machine", _REQUIRED_MACHINE)):
        if parent not in results:
            continue
        if not isinstance(results[parent], dict):
            raise ValueError(f"invalid results file {path}: {parent!r} is not a JSON object; {hint}")
        missing += [f"{parent}.{key}" for key in keys if key not in results[parent]]
    if missing:
        raise ValueError(f"invalid results file {path}: missing keys {', '.join(missing)}; {hint}")
    for key in ("load_average_start", "load_average_end"):
        value = results[key]
        if not (isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"invalid results file {path}: {key} is {value!r}, expected a list of load averages")


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


def _spread(spread: dict, scale: float = 1.0, digits: int = 1) -> str:
    """Median [q25-q75] (min-max), scaled, as one table cell."""
    f = f"{{:.{digits}f}}"
    med, q25, q75 = (f.format(spread[k] * scale) for k in ("median", "q25", "q75"))
    lo, hi = (f.format(spread[k] * scale) for k in ("min", "max"))
    return f"{med} [{q25}-{q75}] ({lo}-{hi})"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _machine_section(results: dict) -> list[str]:
    m = results["machine"]
    cores = m.get("cpu_count") or 1
    lines = ["## Machine", ""]
    rows = [
        ["processor", f"{m['cpu']}, {m['cpu_count']} logical cores, {m.get('memory_gib')} GiB"],
        ["device", m["device"] + (f" ({m['gpu']})" if m.get("gpu") else "")],
        ["torch threads", m["torch_threads"]],
        ["software", f"Python {m['python']}, torch {m['torch']}, torchdiffeq {m['torchdiffeq']}, mlflow {m['mlflow']}"],
        ["load average (1/5/15 min) at start / end", f"{_load(results['load_average_start'])} / {_load(results['load_average_end'])}"],
        ["benchmark wall time", f"{results['elapsed_s']:.0f} s"],
    ]
    lines += _table(["", ""], rows)
    peak_load = max(results["load_average_start"][0], results["load_average_end"][0])
    if peak_load > 0.75 * cores:
        lines += [
            f"The machine was shared: a 1-minute load average of up to {peak_load:.1f} on {cores} cores means "
            f"other processes competed for the CPU, so times are inflated and noisy; each table gives the "
            f"load average at the time of its measurement. Shares within one profiled iteration are less "
            f"affected than seconds.",
            "",
        ]
    return lines


def _targets_section(results: dict) -> list[str]:
    targets = evaluate_targets(results)
    lines = ["## Targets", ""]
    if results["settings"].get("quick"):
        lines += [
            "**A --quick run:** a tiny model with few repeats, so these figures show that the benchmark "
            "runs, not whether the harness meets its targets.",
            "",
        ]
    rows = []
    for target in targets:
        if target["value"] is None:
            status = "n/a"
        elif target["met"] is None:
            status = "-"  # Measured, but the row has no limit to meet.
        elif target["met"]:
            status = "met"
        else:
            status = "not met"
        rows.append([target["name"], target["measured"], target["limit"], status, target["where"]])
    lines += _table(["target", "measured", "limit", "status", "measured on"], rows)
    return lines


def _digits_section(results: dict) -> list[str]:
    cells = results.get("digits", {}).get("cells", [])
    if not cells:
        return []
    lines = [
        "## Digits InfoCNF training iteration",
        "",
        "One iteration of the minimal loop (dequantise, solve every block, loss, backward, clip, Adam) "
        "on real digits, after the warm-up. The cells were timed in turns, one iteration of each cell "
        "per round, so that a burst of load from other processes spreads over many cells. Time in ms: median [interquartile range] (min-max) over "
        "the repeats, as wall-clock time and as this process's CPU time (steadier when other processes "
        "compete for the cores); NFE summed over the CNF blocks, median; peak memory of one more "
        f"iteration ({cells[0]['memory_method']}).",
        "",
    ]
    rows = []
    for c in cells:
        rows.append([
            c["batch_size"], f"{c['tolerance']:g}", _spread(c["time_s"], 1e3), _spread(c["cpu_time_s"], 1e3),
            f"{c['nfe_forward']['median']:g}", f"{c['nfe_backward']['median']:g}",
            f"{c['peak_memory_bytes'] / _MIB:.1f}", _load(c["load_average"]),
        ])
    lines += _table(["batch", "tolerance", "wall ms per iteration", "CPU ms per iteration", "NFE forward",
                     "NFE backward", "peak memory (MiB)", "load average"], rows)
    return lines


def _split_row(cell: dict) -> list:
    s = cell["split"]
    it = s["iteration_s"]
    counts = s.get("counts", {})
    cost = cell.get("field_cost", {})
    return [
        cell["batch_size"], f"{cell['tolerance']:g}", f"{cell['nfe_forward']}/{cell['nfe_backward']}",
        f"{it * 1e3:.0f}", _pct(s["field_forward_s"] / it), _pct(s["field_backward_s"] / it),
        _pct(s["solver_forward_s"] / it), _pct(s["solver_backward_s"] / it), _pct(s["other_s"] / it),
        f"**{_pct(s['overhead_share'])}**", _pct(cost.get("overhead_share")), _pct(cost.get("floor_share")),
        f"{counts.get('field_ops', 0)}/{counts.get('ops', 0)}",
    ]


_SPLIT_HEADER = ["batch", "tolerance", "NFE fwd/bwd", "profiled ms", "field forward", "field backward",
                 "solver forward", "solver backward", "other", "overhead (solver + other)", "overhead, cost model",
                 "overhead with Euler chains", "field ops / all ops"]


def _profile_section(results: dict) -> list[str]:
    cells = results.get("profile", {}).get("cells", [])
    if not cells:
        return []
    lines = [
        "## Where an iteration's time goes (torch.profiler)",
        "",
        "Shares of one profiled iteration. Field forward: time inside the solver's field ranges (the "
        "field, its Hutchinson vector-Jacobian product and the graph they record). Field backward: "
        "the backward nodes those ranges recorded, matched by autograd sequence number. Solver: the "
        "rest of each solve (torchdiffeq's Runge-Kutta arithmetic, step-size control, interpolation, "
        "the tuple state's packing, the dynamics' bookkeeping) and its backward nodes. Other: the logit "
        "transform, prior, classifier and loss, the gradient clip, Adam, autograd's scheduling between "
        "nodes and Python between them. The profiler slows every op by a few microseconds, so profiled "
        "ms exceed the timed ones; the op counts do not depend on the machine's load. Overhead, cost "
        "model: a check without the profiler, the median over rounds of 1 - (NFE x seconds per field "
        "evaluation timed alone) / (seconds per iteration), where each round times one iteration and "
        "then the field alone, in CPU seconds on the CPU (bench/field_cost.py). Overhead with Euler "
        "chains: the same cost model for an iteration, timed in the same rounds, whose solves are "
        "replaced by plain Euler steps through the same forward NFE per block, with no step-size control, "
        "Runge-Kutta stages or interpolation; it is the overhead that no solver can remove.",
        "",
    ]
    lines += _table(_SPLIT_HEADER + ["load average"], [_split_row(c) + [_load(c["load_average"])] for c in cells])
    reference = _reference_profile(results)
    if reference is not None:
        lines += solver_budget(reference)
        lines += [f"Largest overhead ops by self time at batch {reference['batch_size']}, tolerance "
                  f"{reference['tolerance']:g}:", ""]
        rows = [[f"`{name}`", f"{seconds * 1e3:.1f}", count] for name, seconds, count in reference["split"]["top_overhead_ops"]]
        lines += _table(["op", "self ms", "calls"], rows)
    return lines


def solver_budget(cell: dict, limit: float = OVERHEAD_LIMIT) -> list[str]:
    """Say how much time the overhead target leaves for the solver, from the cost-model medians."""
    cost = cell.get("field_cost", {})
    if cost.get("floor_share") is None or not cost.get("steps"):
        return []

    iteration = cost["iteration_s"]["median"]
    floor_iteration = cost["floor_iteration_s"]["median"]
    field_s = (1 - cost["overhead_share"]) * iteration
    rest_s = floor_iteration * cost["floor_share"]
    # The chains' backward NFE equals their forward NFE, so the field's time is subtracted from each
    # iteration with its own NFE instead of taking the difference of the two iteration times.
    solver_s = iteration * cost["overhead_share"] - rest_s
    steps = sorted(cost["steps"])[len(cost["steps"]) // 2]
    budget_s = field_s * limit / (1 - limit) - rest_s

    unit = "CPU" if cost.get("clock") == "cpu" else "wall-clock"
    text = (
        f"What the overhead target leaves for the solver, at batch {cell['batch_size']}, tolerance "
        f"{cell['tolerance']:g} ({unit} medians of the cost model): an iteration takes "
        f"{iteration * 1e3:.1f} ms, of which the field evaluations take about {field_s * 1e3:.1f} ms. With "
        f"Euler chains in place of the solves it takes {floor_iteration * 1e3:.1f} ms, of which "
        f"{rest_s * 1e3:.1f} ms are not field evaluations, so the solves' own work costs about "
        f"{solver_s * 1e3:.1f} ms over {steps} solver steps ({solver_s / steps * 1e3:.2f} ms per step, "
        f"forward and backward). An overhead of at most {100 * limit:.0f} % allows "
        f"{field_s * limit / (1 - limit) * 1e3:.1f} ms besides the field, and the rest of the iteration already "
        f"takes {rest_s * 1e3:.1f} ms of it, which leaves "
    )
    if budget_s > 0:
        text += f"{budget_s * 1e3:.1f} ms for the solver ({budget_s / steps * 1e3:.2f} ms per step)."
    else:
        text += "nothing for the solver."
    return [text, ""]


def _reference_profile(results: dict) -> dict | None:
    settings = results["settings"]
    for cell in results.get("profile", {}).get("cells", []):
        if cell["batch_size"] == settings["reference_batch"] and cell["tolerance"] == settings["reference_tolerance"]:
            return cell
    return None


def _mnist_section(results: dict) -> list[str]:
    mnist = results.get("mnist")
    if not mnist:
        return []
    shape = "x".join(str(v) for v in mnist["shape"])
    lines = [
        f"## MNIST-shaped multiscale flow ({shape}, {mnist['num_scales']} scales, random pixels)",
        "",
        "Same iteration as above on random 8-bit images; one warm-up iteration, then the repeats.",
        "",
    ]
    rows = []
    for c in mnist["cells"]:
        rows.append([
            c["batch_size"], f"{c['tolerance']:g}", _spread(c["time_s"], 1.0, 2), _spread(c["cpu_time_s"], 1.0, 2),
            f"{c['nfe_forward']['median']:g}", f"{c['nfe_backward']['median']:g}",
            f"{c['peak_memory_bytes'] / _MIB:.0f}", _load(c["load_average"]),
        ])
    lines += _table(["batch", "tolerance", "wall s per iteration", "CPU s per iteration", "NFE forward",
                     "NFE backward", "peak memory (MiB)", "load average"], rows)
    profiled = [dict(c["profile"], batch_size=c["batch_size"], tolerance=c["tolerance"]) for c in mnist["cells"] if "profile" in c]
    if profiled:
        lines += ["Profile split of one more iteration:", ""]
        lines += _table(_SPLIT_HEADER, [_split_row(c) for c in profiled])
    return lines


def _harness_section(results: dict) -> list[str]:
    h = results.get("harness")
    if not h:
        return []
    steps = h["epochs"] * (h["iterations_per_epoch"] - 1)
    basis = "CPU" if results["machine"]["device"] == "cpu" else "wall-clock"
    lines = [
        "## Harness cost: Trainer with MLflow against the minimal loop",
        "",
        f"Batch {h['batch_size']}, tolerance {h['tolerance']:g}: Trainer.fit ran {h['epochs']} epochs of "
        f"{h['iterations_per_epoch']} iterations (checkpoint every epoch, one evaluation at the end). Inside "
        f"it, a callback ran one iteration of the minimal loop before each of {steps} timed trainer "
        f"iterations, so that both loops met the same load. Load average {_load(h['load_average'])}.",
        "",
    ]
    rows = [
        ["minimal loop", _spread(h["hand_loop_s"], 1e3), _spread(h["hand_loop_cpu_s"], 1e3), f"{h['hand_loop_nfe']['median']:g}"],
        ["Trainer", _spread(h["trainer_s"], 1e3), _spread(h["trainer_cpu_s"], 1e3), f"{h['trainer_nfe_mean']:.1f} (mean)"],
    ]
    lines += _table(["loop", "wall ms per iteration", "CPU ms per iteration", "NFE fwd+bwd"], rows)
    lines += [f"Trainer iteration minus the minimal-loop iteration before it ({basis} ms): "
              f"{_spread(h['paired_difference_s'], 1e3)}. Trainer overhead (median difference over the "
              f"trainer's median): {_pct(h['trainer_overhead_share'])}. Trainer.fit wall time without the "
              f"minimal-loop iterations: {h['trainer_fit_s']:.1f} s.", ""]
    m = h.get("mlflow")
    if m:
        rows = [[event, f"{seconds * 1e3:.1f}", m["event_calls"][event]] for event, seconds in m["event_s"].items()
                if m["event_calls"][event]]
        lines += [
            f"MLflow callback (SQLite store): {m['total_s'] * 1e3:.0f} ms in all, "
            f"{_pct(m['share_of_fit'])} of Trainer.fit. Opening the new store took {m['open_store_s']:.1f} s "
            f"(table creation, once per store) and creating the run {m['create_run_s'] * 1e3:.0f} ms; both "
            f"happen before fit and are not in the share.",
            "",
        ]
        lines += _table(["event", "ms in all", "calls"], rows)
    return lines


def _compile_section(results: dict) -> list[str]:
    c = results.get("compile")
    if not c:
        return []
    lines = [
        "## torch.compile of the vector field",
        "",
        f"Every block's field wrapped in torch.compile (torch {c['torch']}, default inductor backend), batch "
        f"{c['batch_size']}, tolerance {c['tolerance']:g}, load average {_load(c['load_average'])}.",
        "",
    ]
    training = c["training"]
    lines.append("- Training iteration: " + ("runs." if training["runs"] else f"fails with `{training['error']}`. "
                 "Training differentiates the Hutchinson vector-Jacobian product, which needs a double backward "
                 "through the field."))
    ev = c["evaluation"]
    if ev["runs"]:
        lines.append(
            f"- Evaluation solve (no_grad, first-order backward for the divergence only): eager "
            f"{_spread(ev['eager_s'], 1e3)} ms, compiled {_spread(ev['compiled_s'], 1e3)} ms, speedup "
            f"{ev['speedup']:.2f}x, first compiled call {ev['first_call_s']:.1f} s, NFE {ev['nfe_forward'][0]} "
            f"eager / {ev['nfe_forward'][1]} compiled, max |log p difference| {ev['max_abs_log_prob_difference']:.2g}."
        )
    else:
        lines.append(f"- Evaluation solve: fails with `{ev['error']}`.")
    return lines + [""]


def _fit_text(fit: dict, scale: float, unit: str) -> str:
    lin = fit["linear"]
    text = f"{lin['slope'] * scale:.3g} {unit} (intercept {lin['intercept'] * scale:.3g}, r² {lin['r_squared']:.3f})"
    if "power" in fit:
        text += f"; exponent {fit['power']['slope']:.2f}"
    return text


def _scaling_section(results: dict) -> list[str]:
    fits = results.get("scaling", {})
    lines = ["## Scaling", ""]
    rows = []
    for tolerance, fit in fits.get("time_vs_batch", {}).items():
        rows.append(["time vs batch size", f"tolerance {tolerance}", _fit_text(fit, 1e3, "ms per example")])
    for batch, fit in fits.get("time_vs_nfe", {}).items():
        rows.append(["time vs NFE (fwd+bwd)", f"batch {batch}", _fit_text(fit, 1e3, "ms per evaluation")])
    for mode, fit in fits.get("memory_vs_batch", {}).items():
        rows.append(["peak memory vs batch size", mode, _fit_text(fit, 1 / _MIB, "MiB per example")])
    for mode, fit in fits.get("memory_vs_nfe", {}).items():
        rows.append(["peak memory vs forward NFE", mode, _fit_text(fit, 1 / _MIB, "MiB per evaluation")])
    if not rows:
        return []
    clock = "CPU" if fits.get("time_clock") == "cpu_time_s" else "wall-clock"
    lines += [
        f"Least-squares lines (scipy.stats.linregress) through the medians above, {clock} time. The "
        "exponent is the slope of log time against log batch size. NFE varies with the tolerance at a "
        "fixed batch.",
        "",
    ]
    lines += _table(["quantity", "where", "slope"], rows)
    adjoint = results.get("adjoint")
    if adjoint:
        lines += [f"Peak memory of one iteration with backpropagation through the solver and with the adjoint "
                  f"method (solver.adjoint = true), {adjoint['by_batch'][0]['memory_method']}:", ""]
        rows = []
        for c in adjoint["by_batch"] + adjoint["by_tolerance"]:
            rows.append([c["batch_size"], f"{c['tolerance']:g}", "adjoint" if c["adjoint"] else "backprop",
                         f"{c['nfe_forward']}/{c['nfe_backward']}", f"{c['peak_memory_bytes'] / _MIB:.1f}", _load(c["load_average"])])
        lines += _table(["batch", "tolerance", "gradient", "NFE fwd/bwd", "peak memory (MiB)", "load average"], rows)
    return lines


def _history_section(history: list[dict]) -> list[str]:
    if not history:
        return []
    lines = [
        "## Hot-path changes, before and after",
        "",
        "Each row is one benchmark run, in the order the changes were made; the label names the change "
        "that run includes. Time: median [interquartile range] (min-max) of the timed iterations. "
        "Overhead: share of one profiled iteration outside the field. Ops and backward nodes: aten ops "
        "and autograd nodes the profiled iteration ran, which do not depend on the machine's load.",
        "",
    ]
    rows = []
    for record in history:
        profiles = {(c["batch_size"], c["tolerance"]): c for c in record.get("profile", {}).get("cells", [])}
        for cell in record.get("digits", {}).get("cells", []):
            profile = profiles.get((cell["batch_size"], cell["tolerance"]))
            counts = profile["split"].get("counts", {}) if profile else {}
            rows.append([
                record.get("label") or "(no label)", cell["batch_size"], f"{cell['tolerance']:g}",
                _spread(cell["time_s"], 1e3), _spread(cell["cpu_time_s"], 1e3),
                f"{cell['nfe_forward']['median']:g}/{cell['nfe_backward']['median']:g}",
                _pct(profile["split"]["overhead_share"]) if profile else "n/a",
                counts.get("ops", "n/a"), counts.get("backward_nodes", "n/a"), _load(cell["load_average"]),
            ])
    lines += _table(["change", "batch", "tolerance", "wall ms per iteration", "CPU ms per iteration", "NFE fwd/bwd",
                     "overhead", "ops", "backward nodes", "load average"], rows)
    return lines


def render_markdown(results: dict, history: list[dict] | None = None, plot_name: str | None = None) -> str:
    """Render the results record, and earlier records to compare with, as RESULTS.md."""
    lines = [
        "# Benchmark: the CNF training iteration",
        "",
        f"Written by `{results.get('command', 'python -m bench')}` on {results['created']}"
        + (f", label \"{results['label']}\"" if results.get("label") else "") + ". All numbers below come from "
        "that run" + (" and the earlier runs it compares with" if history else "") + "; results.json holds them "
        "for machines to read.",
        "",
    ]
    lines += _machine_section(results)
    lines += _targets_section(results)
    if plot_name:
        lines += [f"![iteration time, NFE, memory and profile split]({plot_name})", ""]
    for section in (_digits_section, _profile_section, _scaling_section, _mnist_section, _harness_section,
                    _compile_section):
        lines += section(results)
    lines += _history_section(history or [])
    return "\n".join(lines).rstrip() + "\n"


def write_results(results: dict, output_dir: str | Path, history: list[dict] | None = None, json_only: bool = False) -> list[Path]:
    """Write results.json, and unless ``json_only`` also RESULTS.md and results.png. Returns the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = output_dir / "results.json"
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float) + "\n")
    os.replace(tmp, json_path)
    written.append(json_path)
    if json_only:
        return written
    plot_path = output_dir / "results.png"
    plotted = plot_results(results, plot_path)
    if plotted:
        written.append(plot_path)
    md_path = output_dir / "RESULTS.md"
    md_path.write_text(render_markdown(results, history, plot_path.name if plotted else None))
    written.append(md_path)
    return written
