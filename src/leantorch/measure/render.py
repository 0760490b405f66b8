"""Human-readable views of a :class:`CostReport`: a plain-text table, or a rich one."""

from __future__ import annotations

from typing import Any

from leantorch.measure.report import CostReport, ModuleCost, fmt_bytes, fmt_count

__all__ = ["render_rich", "render_text", "table_rows"]


def _visible(report: CostReport, depth: int) -> list[ModuleCost]:
    return [m for m in report.modules
            if m.depth <= depth and (m.calls or m.params.total or m.forward.flops or m.depth == 0)]


def table_rows(report: CostReport, depth: int) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the module table down to ``depth`` (0 = the model alone)."""
    backward = report.backward is not None
    roofline = report.device is not None
    header = ["module", "type", "params", "MACs", "FLOPs"]
    if backward:
        header.append("bwd FLOPs")
    saved = report.memory.saved_activation_bytes is not None
    header += ["mem r+w", *(["saved act."] if saved else []), "FLOP/B"]
    if roofline:
        header += ["bound", "roofline ms"]
    total_flops = report.forward.flops or 1
    rows = []
    for m in _visible(report, depth):
        name = ("  " * m.depth) + (m.path.rsplit(".", 1)[-1] if m.path else m.name)
        if m.calls > 1:
            name += f" x{m.calls}"
        row = [name, m.type, fmt_count(m.params.total), fmt_count(m.forward.macs),
               f"{fmt_count(m.forward.flops)} ({100 * m.forward.flops / total_flops:.0f}%)"]
        if backward:
            row.append(fmt_count(m.backward.flops if m.backward else None))
        intensity = m.forward.intensity
        row += [fmt_bytes(m.forward.bytes), *([fmt_bytes(m.saved_bytes)] if saved else []),
                "-" if intensity is None else f"{intensity:.1f}"]
        if roofline:
            row += [m.forward.bound or "-", f"{m.forward.roofline_seconds * 1e3:.3f}"]
        rows.append(row)
    return header, rows


def summary_lines(report: CostReport) -> list[str]:
    """The totals under the table, one fact per line."""
    p, f, mem = report.params, report.forward, report.memory
    lines = [
        f"model {report.model} on {_inputs(report)}, {'train' if report.training else 'eval'} "
        "mode",
        f"params {fmt_count(p.total)} ({fmt_count(p.trainable)} trainable, "
        f"{fmt_count(p.frozen)} frozen), {fmt_bytes(p.bytes)}; buffers {fmt_bytes(p.buffer_bytes)}",
        f"forward {fmt_count(f.flops, 'FLOPs')} = 2 x {fmt_count(f.macs, 'MACs')} + "
        f"{fmt_count(f.other_flops, 'FLOPs')} non-matmul; {fmt_bytes(f.bytes)} read+written "
        f"({fmt_bytes(f.weight_bytes_read)} of weights)",
    ]
    if report.backward is not None:
        b = report.backward
        ratio = b.flops / f.flops if f.flops else float("nan")
        lines.append(f"backward {fmt_count(b.flops, 'FLOPs')} ({fmt_count(b.macs, 'MACs')}), "
                     f"{ratio:.2f}x forward")
    saved = ("not measured" if mem.saved_activation_bytes is None
             else fmt_bytes(mem.saved_activation_bytes))
    lines.append(
        f"memory: activations saved for backward {saved}; peak "
        f"{fmt_bytes(mem.peak_bytes)} = {fmt_bytes(mem.peak_bytes - mem.peak_activation_bytes)} "
        f"resident + {fmt_bytes(mem.peak_activation_bytes)} transient"
        + (f" (reached in {mem.peak_module})" if mem.peak_module else "")
    )
    if mem.device_peak_bytes is not None:
        lines.append(f"device allocator peak {fmt_bytes(mem.device_peak_bytes)}")
    if report.latency is not None:
        t = report.latency
        lines.append(f"latency {t.what}: median {t.median_ms:.2f} ms (min {t.min_ms:.2f}, "
                     f"max {t.max_ms:.2f}) over {t.runs} runs after {t.warmup} warm-up, "
                     f"{t.threads} thread(s), {t.device}")
    if report.device is not None:
        d = report.device
        bound_ms = f.roofline_seconds * 1e3
        line = (f"roofline on {d.name}: peak {fmt_count(d.matmul_flops.get('float32'), 'FLOP/s')} "
                f"float32, {fmt_bytes(d.bandwidth)}/s; lower bound {bound_ms:.2f} ms")
        if report.latency is not None and report.latency.median_ms > 0:
            line += f" = {100 * bound_ms / report.latency.median_ms:.0f}% of the measured median"
        lines.append(line)
    for name, entry in sorted(report.uncounted.items()):
        lines.append(f"UNCOUNTED {name}: {entry['calls']} call(s) in "
                     f"{', '.join(m or '(model)' for m in entry['modules'])} ({entry['reason']})")
    if report.uncounted:
        lines.append("note: uncounted ops are not in the totals; "
                     "leantorch.measure.register_formula gives them a cost")
    lines += [f"note: {n}" for n in report.notes]
    return lines


def _inputs(report: CostReport) -> str:
    return ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in report.inputs) or "no inputs"


def render_text(report: CostReport, depth: int = 2) -> str:
    """The report as a plain-text table (modules down to ``depth`` levels below the model)
    followed by the summary lines; what ``str(report)`` prints."""
    header, rows = table_rows(report, depth)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append("")
    out += summary_lines(report)
    return "\n".join(out)


def render_rich(report: CostReport, depth: int = 2, console: Any = None) -> None:
    """Print the report with rich (``pip install leantorch[cli]``)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: do not squeeze the table to 80 columns
            console = Console(width=max(console.width, 160))
    header, rows = table_rows(report, depth)
    table = Table(title=f"leantorch profile: {report.model}", title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for text in summary_lines(report):
        style = "bold red" if text.startswith("UNCOUNTED") else None
        console.print(text, style=style, highlight=False)
