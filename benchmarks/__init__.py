"""Benchmarks of cmpc (``make bench`` = ``python -m benchmarks.run_all``; not part of CI).

Results: ``docs/benchmarks.json`` (a list of rows, one per measured configuration) and
``docs/BENCHMARKS.md`` (generated from those rows, one section per benchmark, plus the
machine it ran on).

Adding a benchmark: a module ``benchmarks/bench_<name>.py`` with

    BENCH = "<name>"                       # the "bench" key of its rows
    TITLE = "One line shown as the section heading"
    def run(quick: bool) -> list[dict]: ...  # every row has "bench": BENCH
    def render(rows: list[dict]) -> str: ... # optional: the markdown of its section

``run_all`` finds it, runs it (``--only <name>``, ``--quick`` for small sizes), stamps each
row with the machine and date, and replaces only that benchmark's rows in
``docs/benchmarks.json``: running one benchmark never erases the others. Without
``render`` a plain table of the rows' scalar values is shown. Timing helpers (medians of
repeated runs, peak memory, machine facts) are in :mod:`benchmarks.harness`.
"""
