"""Plain-text summary tables printed at the end of a stage."""

from __future__ import annotations

from edgekd.run_dir import RunDir


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A left/right aligned text table (numbers right-aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def distill_summary(rd: RunDir) -> str:
    """Teacher vs scratch baseline vs KD student, and where the run directory is."""
    m = rd.metrics()
    rows = []
    for role in ("teacher", "baseline", "student"):
        if role not in m:
            continue
        e = m[role]
        rows.append([role, e.get("model", "-"), f"{e['test_accuracy']:.4f}", f"{e['f1_macro']:.4f}",
                     _fmt_count(e.get("params")), _fmt_count(e.get("macs")), f"{e.get('train_seconds', 0):.1f}s"])
    text = table(["model", "arch", "test_acc", "macro_f1", "params", "MACs", "train"], rows)
    extra = []
    if "baseline" in m and "student" in m and "teacher" in m:
        gap = m["teacher"]["test_accuracy"] - m["baseline"]["test_accuracy"]
        gain = m["student"]["test_accuracy"] - m["baseline"]["test_accuracy"]
        closed = f" ({100 * gain / gap:.0f}% of the scratch→teacher gap)" if gap > 0 else ""
        extra.append(f"KD vs scratch: {100 * gain:+.2f} points{closed}")
    extra.append(f"run directory: {rd.path}")
    return "\n" + text + "\n" + "\n".join(extra)


def plain(markdown: str) -> str:
    """A line of the report's Markdown as console text: without the ``**`` and backticks."""
    return markdown.replace("**", "").replace("`", "")


def report_block(lines: list[str], notes: list[str], verbose: bool = False) -> list[str]:
    """The report's summary as console lines; the notes behind it with ``verbose``, else how many there are."""
    out = [plain(line) for line in lines]
    if verbose:
        out += [f"note: {plain(n)}" for n in notes]
    elif notes:
        out.append(f"({len(notes)} more note(s) in the report's Notes, or with -v)")
    return out
