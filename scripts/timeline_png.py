"""Draw one phase of a ``--timeline`` file as a PNG: the picture in
docs/timeline.md, made from a real run rather than a screenshot.

Not a trace viewer: a static rendering of the spans Perfetto shows for the
same file, one panel per domain (its whole phase, every trap to scale) and
a close-up of the first traps of a domain that made many, where a trap's
guest-side round trip and the hypervisor's span inside it can be told apart.

usage:
  pvemu run --pages 600 --modes trap,batched --timeline run.json
  python -m pvemu.scripts.timeline_png run.json --phase protect_ro --out docs/timeline.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Traps shown in a close-up; a phase with more than this many gets one.
CLOSE_UP = 6
COLORS = {"guest": "#9db4c0", "trap": "#c0392b", "slice": "#e67e22"}
ROWS = (("guest", "guest round trip"), ("trap", "hypervisor: trap"), ("slice", "hypervisor: slice"))


@dataclass
class Panel:
    """What one panel draws: spans of one domain between two times (µs)."""

    title: str
    start: float
    end: float
    spans: list[dict[str, Any]]


def panels(document: dict[str, Any], phase: str) -> list[Panel]:
    """A panel per domain that ran ``phase``, then close-ups."""
    events = [e for e in document["traceEvents"] if e["ph"] == "X"]
    names = {
        e["pid"]: e["args"]["name"]
        for e in document["traceEvents"]
        if e["ph"] == "M" and e["name"] == "process_name"
    }
    whole: list[Panel] = []
    close: list[Panel] = []
    for window in (e for e in events if e["cat"] == "phase" and e["name"] == phase):
        pid, start, end = window["pid"], window["ts"], window["ts"] + window["dur"]
        inside = [
            e for e in events if e["pid"] == pid and e["cat"] in COLORS and start <= e["ts"] <= end
        ]
        traps = sorted((e for e in inside if e["cat"] == "trap"), key=lambda e: e["ts"])
        name = names.get(pid, f"domain {pid}")
        title = f"{name}: {phase}, {len(traps):,} traps in {window['dur'] / 1000:,.1f} ms"
        whole.append(Panel(title, start, end, inside))
        if len(traps) > CLOSE_UP:
            first = [e for e in inside if e["ts"] <= traps[CLOSE_UP - 1]["ts"]]
            begin = min(e["ts"] for e in first)
            finish = max(e["ts"] + e["dur"] for e in first)
            title = (
                f"{name}: close-up of its first {CLOSE_UP} traps ({(finish - begin) / 1000:.2f} ms)"
            )
            close.append(Panel(title, begin, finish, first))
    return whole + close


def draw(document: dict[str, Any], phase: str, out: str) -> int:
    """Write the figure; the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels(document, phase)
    if not shown:
        return 0
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.9 * len(shown) + 0.4), squeeze=False)
    for ax, panel in zip(axes[:, 0], shown, strict=True):
        width = (panel.end - panel.start) / 1000
        for row, (cat, _label) in enumerate(ROWS):
            # At least a pixel wide: a 50 µs trap in a 2 s window would vanish.
            bars = [
                ((e["ts"] - panel.start) / 1000, max(e["dur"] / 1000, width / 1500))
                for e in panel.spans
                if e["cat"] == cat
            ]
            ax.broken_barh(
                bars,
                (len(ROWS) - row - 1.4, 0.8),
                facecolor=COLORS[cat],
                # Round trips abut: a white edge tells them apart where they are wide.
                edgecolor="white" if len(bars) <= 50 else "none",
                linewidth=0.3,
                antialiased=False,
            )
        ax.set_yticks(range(len(ROWS)), [label for _, label in reversed(ROWS)], fontsize=8)
        ax.set_xlim(0, width)
        ax.set_ylim(-0.6, len(ROWS) - 0.4)
        ax.set_title(panel.title, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms from the start of the window", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return len(shown)


def main(argv: Sequence[str] | None = None) -> int:
    from pvemu.shared.timeline import load

    parser = argparse.ArgumentParser(
        prog="python -m pvemu.scripts.timeline_png", description=__doc__.splitlines()[0]
    )
    parser.add_argument("trace", help="a file written by --timeline")
    parser.add_argument("--phase", default="protect_ro", help="workload phase (default protect_ro)")
    parser.add_argument("--out", default="timeline.png", help="PNG to write (default timeline.png)")
    args = parser.parse_args(argv)
    if not draw(load(args.trace), args.phase, args.out):
        print(f"timeline_png: no phase {args.phase!r} in {args.trace}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
