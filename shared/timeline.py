"""A timeline of what happened when, as Chrome's trace-event JSON.

The counters say how many traps a run cost; a timeline says when each one
happened, on which domain and vCPU, and how long the hypervisor spent on it.
The format is the one ``chrome://tracing`` and the Perfetto UI
(ui.perfetto.dev) open directly: a JSON object whose ``traceEvents`` holds
complete events (``"ph": "X"``, ``ts`` and ``dur`` in microseconds) and
metadata events naming each process (a domain: ``pid`` is its domid) and
thread (a vCPU: ``tid`` is its number), so each domain and vCPU gets a track.

Sans I/O apart from :meth:`Timeline.write`: the recorder keeps one tuple per
event and builds the JSON only when written. Every process stamps events
with ``CLOCK_MONOTONIC``, which is one clock for the whole host, so files
written by the hypervisor and by its guests :func:`merge` into one timeline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

#: Nanoseconds on the host-wide monotonic clock (what every event is stamped with).
now_ns: Final = time.monotonic_ns

#: The ``tid`` of a domain's lifetime span (recorded by the hypervisor).
DOMAIN_TID: Final = 999
#: The ``tid`` of a domain's workload phases, recorded by its guest.
GUEST_TID: Final = 1000
#: The categories of spans: a trap the hypervisor counted (one per trap),
#: one slice of a preempted hypercall, a domain's life, a request's round
#: trip as its guest saw it, a phase of the guest's workload.
TRAP: Final = "trap"
SLICE: Final = "slice"
DOMAIN: Final = "domain"
GUEST: Final = "guest"
PHASE: Final = "phase"
#: The ``pid`` of a guest with no hypervisor (mode ``native``).
NATIVE_PID: Final = 0

_Event = tuple[int, int, str, str, int, int, Mapping[str, object] | None]


class Timeline:
    """Records complete events and track names; :meth:`document` is the JSON."""

    __slots__ = ("_events", "_names")

    def __init__(self) -> None:
        self._events: list[_Event] = []
        #: (kind, pid, tid) -> (name, sort index): the tracks' metadata.
        self._names: dict[tuple[str, int, int], tuple[str, int | None]] = {}

    def __len__(self) -> int:
        return len(self._events)

    def name_process(self, pid: int, name: str, sort_index: int | None = None) -> None:
        """Name a domain's track group (the last name given wins)."""
        self._names["process", pid, 0] = (name, sort_index)

    def name_thread(self, pid: int, tid: int, name: str, sort_index: int | None = None) -> None:
        """Name one track inside a domain (a vCPU, or the guest's own view)."""
        self._names["thread", pid, tid] = (name, sort_index)

    def complete(
        self,
        name: str,
        cat: str,
        pid: int,
        tid: int,
        start_ns: int,
        end_ns: int,
        args: Mapping[str, object] | None = None,
    ) -> None:
        """One span from ``start_ns`` to ``end_ns`` (:data:`now_ns` stamps)."""
        self._events.append((start_ns, end_ns - start_ns, name, cat, pid, tid, args))

    def document(self) -> dict[str, Any]:
        """The trace-event JSON object: metadata first, then the spans in time
        order (an enclosing span before the spans inside it)."""
        events: list[dict[str, Any]] = []
        for (kind, pid, tid), (name, sort_index) in sorted(self._names.items()):
            events.append(_metadata(f"{kind}_name", pid, tid, {"name": name}))
            if sort_index is not None:
                events.append(_metadata(f"{kind}_sort_index", pid, tid, {"sort_index": sort_index}))
        for start, dur, name, cat, pid, tid, args in sorted(
            self._events, key=lambda e: (e[0], -e[1])
        ):
            event: dict[str, Any] = {
                "name": name,
                "cat": cat,
                "ph": "X",
                "ts": start / 1000,
                "dur": dur / 1000,
                "pid": pid,
                "tid": tid,
            }
            if args:
                event["args"] = dict(args)
            events.append(event)
        return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": OTHER_DATA}

    def write(self, path: str | Path) -> None:
        """Write :meth:`document` to ``path`` (the whole file at once)."""
        Path(path).write_text(json.dumps(self.document(), separators=(",", ":")) + "\n")


#: What every file says about itself (trace viewers show it as the trace's metadata).
OTHER_DATA: Final = {"tool": "pvemu", "clock": "CLOCK_MONOTONIC", "ts_unit": "us"}


def _metadata(name: str, pid: int, tid: int, args: dict[str, object]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def merge(documents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One timeline from several files of the same run (the clock is shared):
    each track's name as the first file gives it, then every span in time
    order. A guest and its hypervisor both name the domain's tracks."""
    metadata: dict[tuple[str, int, int], dict[str, Any]] = {}
    spans: list[dict[str, Any]] = []
    for document in documents:
        for event in document["traceEvents"]:
            if event["ph"] == "M":
                metadata.setdefault((event["name"], event["pid"], event["tid"]), event)
            else:
                spans.append(event)
    spans.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    events = list(metadata.values()) + spans
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": OTHER_DATA}


def load(path: str | Path) -> dict[str, Any]:
    """Read a timeline file written by :meth:`Timeline.write` or :func:`merge`."""
    document: dict[str, Any] = json.loads(Path(path).read_text())
    return document


__all__ = [
    "DOMAIN",
    "DOMAIN_TID",
    "GUEST",
    "PHASE",
    "SLICE",
    "TRAP",
    "GUEST_TID",
    "NATIVE_PID",
    "OTHER_DATA",
    "Timeline",
    "load",
    "merge",
    "now_ns",
]
