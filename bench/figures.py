"""The benchmark plot: time against batch size and NFE, peak memory, and the profile split."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_results"]

_MIB = 2**20


def plot_results(results: dict, path: str | Path) -> bool:
    """Draw the four panels into a PNG at ``path``. Returns False when there is nothing to plot."""
    cells = results.get("digits", {}).get("cells", [])
    profiles = results.get("profile", {}).get("cells", [])
    adjoint = results.get("adjoint", {})
    if not (cells or profiles or adjoint):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    def plain_log_axes(ax, ticks) -> None:
        # Log scales labelled with the batch sizes and 1-2-5 steps, not powers of ten.
        ax.set_xticks(ticks)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    ax_batch, ax_nfe, ax_memory, ax_split = axes.ravel()

    # The clock the scaling fits used: CPU time on the CPU, wall-clock time on a GPU.
    key = results.get("scaling", {}).get("time_clock", "time_s")
    clock = "CPU" if key == "cpu_time_s" else "wall"
    for tolerance in sorted({c["tolerance"] for c in cells}, reverse=True):
        rows = sorted((c for c in cells if c["tolerance"] == tolerance), key=lambda c: c["batch_size"])
        x = [c["batch_size"] for c in rows]
        y = [c[key]["median"] * 1e3 for c in rows]
        err = [[m - c[key]["q25"] * 1e3 for m, c in zip(y, rows)], [c[key]["q75"] * 1e3 - m for m, c in zip(y, rows)]]
        ax_batch.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"tolerance {tolerance:g}")
    ax_batch.set(xscale="log", yscale="log", xlabel="batch size", ylabel=f"{clock} ms per iteration (median, IQR)",
                 title="Digits iteration time vs batch size")
    plain_log_axes(ax_batch, sorted({c["batch_size"] for c in cells}))
    ax_batch.legend(fontsize=8)

    fits = results.get("scaling", {}).get("time_vs_nfe", {})
    for batch in sorted({c["batch_size"] for c in cells}):
        rows = [c for c in cells if c["batch_size"] == batch]
        x = [c["nfe_forward"]["median"] + c["nfe_backward"]["median"] for c in rows]
        y = [c[key]["median"] * 1e3 for c in rows]
        line = ax_nfe.plot(x, y, "o", label=f"batch {batch}")[0]
        fit = fits.get(str(batch))
        if fit:
            lo, hi = min(x), max(x)
            lin = fit["linear"]
            ax_nfe.plot([lo, hi], [(lin["intercept"] + lin["slope"] * v) * 1e3 for v in (lo, hi)], "-", color=line.get_color())
    ax_nfe.set(xlabel="NFE per iteration (forward + backward)", ylabel=f"{clock} ms per iteration (median)",
               title="Time vs NFE (tolerance varies), fitted lines")
    ax_nfe.legend(fontsize=8)

    for mode, label in ((False, "backprop through solver"), (True, "adjoint")):
        rows = sorted((c for c in adjoint.get("by_batch", []) if c["adjoint"] == mode), key=lambda c: c["batch_size"])
        if rows:
            ax_memory.plot([c["batch_size"] for c in rows], [c["peak_memory_bytes"] / _MIB for c in rows], "o-", label=label)
    ax_memory.set(xscale="log", yscale="log", xlabel="batch size", ylabel="peak memory of one iteration (MiB)",
                  title="Memory with and without the adjoint")
    plain_log_axes(ax_memory, sorted({c["batch_size"] for c in adjoint.get("by_batch", [])}))
    if adjoint:
        ax_memory.legend(fontsize=8)

    labels = [f"{c['batch_size']}\n{c['tolerance']:g}" for c in profiles]
    bottom = [0.0] * len(profiles)
    parts = (
        (("field_forward_s",), "field forward"),
        (("field_backward_s",), "field backward"),
        (("solver_forward_s", "solver_backward_s"), "solver"),
        (("other_s",), "other"),
    )
    for keys, label in parts:
        share = [100 * sum(c["split"][k] for k in keys) / c["split"]["iteration_s"] for c in profiles]
        ax_split.bar(labels, share, bottom=bottom, label=label)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax_split.set(xlabel="batch size / tolerance", ylabel="% of profiled iteration", title="Profile split")
    if profiles:
        ax_split.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
