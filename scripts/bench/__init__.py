"""``pvemu bench``, piece by piece: the sweep (what to measure), the runner
(guest processes per point), provenance (commit, host, versions), the JSON
documents, the SQLite store, the comparison (the CI gate), the rendering, and
the command line's options and actions; ``scripts/bench_cmd.py`` is the entry
point that wires them together."""
