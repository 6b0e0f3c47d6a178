"""The benchmark harness: timing medians, memory, machine facts, the JSON rows and the markdown.

The machine is shared and noisy, so every number is a median of repeated runs, each
benchmark measures its own baseline in the same run, and every row records the load
average it was measured under.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCS = Path("docs")
JSON_FILE = "benchmarks.json"
MD_FILE = "BENCHMARKS.md"
_MARKED = re.compile(r"<!-- ([\w:.-]+):start -->.*?<!-- \1:end -->", re.S)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Seconds of ``runs`` repetitions; ``median`` is what tables show."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(statistics.median(self.runs)) if self.runs else math.nan

    @property
    def min(self) -> float:
        return float(min(self.runs)) if self.runs else math.nan

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were."""
        return float((max(self.runs) - min(self.runs)) / self.median) if self.runs and self.median > 0 else math.nan


def time_runs(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (seconds each)."""
    for _ in range(max(0, warmup)):
        fn()
    t = Timing()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        t.runs.append(time.perf_counter() - t0)
    return t


def median(values: Iterable[float]) -> float:
    """Median of ``values`` (NaN when empty)."""
    v = list(values)
    return float(statistics.median(v)) if v else math.nan


# --------------------------------------------------------------------------- memory


def rss_mb() -> float:
    """Current resident memory of this process, MB (Linux /proc; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


class PeakRss:
    """Context manager sampling this process's RSS every ``interval`` s; ``peak_mb``, ``start_mb``.

    ``ru_maxrss`` is the peak over the whole process life; this gives the peak of one block.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start_mb = math.nan
        self.peak_mb = math.nan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def delta_mb(self) -> float:
        """Peak minus the RSS when the block started."""
        return self.peak_mb - self.start_mb


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, GPU (or None), load average and date."""
    import numpy as np

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        pass
    info["load_avg"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    info["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return info


# --------------------------------------------------------------------------- rows


def merge_rows(existing: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``existing`` without the rows of the benchmarks present in ``new``, then ``new``.

    Benchmarks keep their place: a rerun benchmark's rows go where its old rows were.
    """
    replaced = {r["bench"] for r in new}
    out: list[dict[str, Any]] = []
    inserted: set[str] = set()
    for r in existing:
        b = r.get("bench")
        if b in replaced:
            if b not in inserted:
                out.extend(x for x in new if x["bench"] == b)
                inserted.add(b)
            continue
        out.append(r)
    out.extend(x for x in new if x["bench"] not in inserted)
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``docs/benchmarks.json`` (empty when missing; a non-list is an error)."""
    if not path.is_file():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "bench" in r for r in rows):
        raise ValueError(f"{path} is not a list of benchmark rows (each with a 'bench' key)")
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else ("yes" if v else "no")
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.3g}" if a < 10 else (f"{v:.1f}" if a < 1000 else f"{v:,.0f}")
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table; ``columns`` = [(key, header)]. Missing values are blank."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def generic_table(rows: list[dict[str, Any]]) -> str:
    """A table of every scalar key the rows have (except bench/machine bookkeeping)."""
    skip = {"bench", "machine", "quick"}
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in skip and k not in keys and (v is None or isinstance(v, (int, float, str, bool))):
                keys.append(k)
    return table(rows, [(k, k) for k in keys])


def machine_line(m: dict[str, Any] | None) -> str:
    """One line: CPU, cores, RAM, GPU, versions, load average, date."""
    if not m:
        return "Machine: unknown."
    gpu = m.get("gpu") or "none (GPU numbers not measured)"
    load = m.get("load_avg")
    return (
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM; GPU: {gpu}; torch {m.get('torch')}, "
        f"faiss {m.get('faiss')}, numpy {m.get('numpy')}; load average {load} (1/5/15 min) at {m.get('date')}."
    )


def render_markdown(
    rows: list[dict[str, Any]],
    renderers: dict[str, Callable[[list[dict[str, Any]]], str]],
    titles: dict[str, str],
    old_text: str = "",
    intro: str | Callable[[list[dict[str, Any]]], str] = "",
) -> str:
    """docs/BENCHMARKS.md: intro, then one marked section per benchmark in ``rows``, then
    every other marked section of ``old_text`` (``<!-- X:start -->...<!-- X:end -->``
    written by other tools) carried over verbatim."""
    text = intro(rows) if callable(intro) else intro
    parts = ["# Benchmarks", "", text.strip(), ""] if text else ["# Benchmarks", ""]
    order: list[str] = []
    for r in rows:
        if r["bench"] not in order:
            order.append(r["bench"])
    ours = set()
    for b in order:
        rs = [r for r in rows if r["bench"] == b]
        tag = f"bench:{b}"
        ours.add(tag)
        body = generic_table(rs)
        if b in renderers:
            try:
                body = renderers[b](rs)
            except (KeyError, ValueError, TypeError, IndexError) as e:  # rows of an older format: still show them
                body = f"(section renderer failed: {type(e).__name__}: {e}; plain table)\n\n" + body
        quick = " (quick run: small sizes)" if any(r.get("quick") for r in rs) else ""
        parts += [
            f"<!-- {tag}:start -->",
            f"## {titles.get(b, b)}{quick}",
            "",
            machine_line(rs[0].get("machine")),
            "",
            body.strip(),
            f"<!-- {tag}:end -->",
            "",
        ]
    for m in _MARKED.finditer(old_text):
        if m.group(1) not in ours and not m.group(1).startswith("bench:"):
            parts += [m.group(0), ""]
    return "\n".join(parts).rstrip() + "\n"


def write_results(
    new_rows: list[dict[str, Any]],
    docs: Path = DOCS,
    renderers: dict[str, Callable[[list[dict[str, Any]]], str]] | None = None,
    titles: dict[str, str] | None = None,
    intro: str | Callable[[list[dict[str, Any]]], str] = "",
) -> list[dict[str, Any]]:
    """Merge ``new_rows`` into ``docs/benchmarks.json`` and regenerate ``docs/BENCHMARKS.md`` (atomic writes)."""
    from cmpc.utils.io import atomic_write_json, atomic_write_text

    jpath, mpath = docs / JSON_FILE, docs / MD_FILE
    rows = merge_rows(read_rows(jpath), new_rows)
    atomic_write_json(jpath, rows)
    old = mpath.read_text(encoding="utf-8") if mpath.is_file() else ""
    atomic_write_text(mpath, render_markdown(rows, renderers or {}, titles or {}, old, intro))
    return rows
