"""Run every benchmark module (or the ones named on the command line: `python -m benchmarks screening`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback

import benchmarks


def report(name: str, value: float | int | str, unit: str = "", note: str = "") -> None:
    if isinstance(value, float):
        shown = f"{value:,.3f}"
    else:
        shown = str(value)
    line = f"  {name:<58} {shown:>14} {unit:<6}"
    if note:
        line += f"  {note}"
    print(line, flush=True)


def main(argv: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    failed = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name[len('bench_'):]}: {(module.__doc__ or '').strip().splitlines()[0] if module.__doc__ else ''}", flush=True)
        started = time.perf_counter()
        try:
            module.run(report)
        except Exception:  # a broken benchmark must not hide the others' figures
            failed += 1
            traceback.print_exc()
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
