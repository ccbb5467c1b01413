"""Shared helpers of the benchmark scripts: machine description, timing, memory, RESULTS.md.

Each configuration is measured in a fresh subprocess so that peak RSS belongs to it alone.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"
REPO = pathlib.Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description() -> str:
    """One line: CPU, cores, memory, accelerator, jax version."""
    import jax

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    dev = jax.devices()[0]
    accel = "" if dev.platform == "cpu" else f", {dev.device_kind}"
    return f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB{accel}; jax {jax.__version__} ({dev.platform})"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first accelerator, when the backend reports it."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's own accounting of a compiled function: arguments, outputs and temporaries (bytes)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(getattr(m, "alias_size_in_bytes", 0)),
    }


def compiled_cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of a compiled function: floating-point operations and bytes
    accessed per call, as XLA counts them (custom calls, such as the C++ kernels, count
    for nothing: meaningful for the pure-XLA implementations, e.g. on a GPU)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    if not cost:
        return {}
    return {"xla_flops": float(cost.get("flops", 0.0)), "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Wall seconds of `steps` calls of fn (which must block until done), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def run_json_subprocess(argv: list[str], python: str | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Run `python -m ...` in a fresh process from the repo root; return its last JSON line."""
    cmd = [python or sys.executable, *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Transparent huge pages for malloc: fresh 100+ MB buffers otherwise cost ~40k page faults each.
    # Set for every measured process alike, ours and the peer (crnet_jax's command-line entry
    # points set it themselves: crnet_jax.host_memory).
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else 'no output'}", "cmd": " ".join(cmd)}
    return json.loads(lines[-1])


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


def results_section(title: str, table: str, notes: str = "", command: str | None = None,
                    machine: str | None = None) -> str:
    """A dated RESULTS.md section: title, date, machine (this process's unless given), the
    command (this process's unless given), the table and notes."""
    if command is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # set under python -m
        module = spec.name if spec is not None else pathlib.Path(sys.argv[0]).stem
        command = "python -m " + " ".join([module] + sys.argv[1:])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine or machine_description()
    section = f"\n## {title}\n\n- Date: {when}\n- Machine: {machine}\n- Command: `{command}`\n\n{table}\n"
    if notes:
        section += f"\n{notes.strip()}\n"
    return section


def append_results(title: str, table: str, notes: str = "", command: str | None = None,
                   machine: str | None = None) -> None:
    """Append `results_section(...)` to RESULTS.md."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nMeasured figures only; each section names its machine, command and date.\n")
    with RESULTS.open("a") as f:
        f.write(results_section(title, table, notes, command, machine))
