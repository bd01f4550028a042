"""Runs the benchmarks and writes each one's table into BENCHMARKS.md under its own heading.

`python benchmarks/run_all.py` runs every `bench_*.py`; naming some
(`run_all.py tokenizer sampling`) runs only those and leaves the other
sections of BENCHMARKS.md as they were. Each section records its date and
machine, since sections may come from different runs.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path

from ringlm.ext import usable_cores

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nWritten by `make bench` (benchmarks/run_all.py); each section says when "
          "and where it ran. Benchmarks are not tests: nothing asserts on these numbers.\n")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = usable_cores()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {cores} cores, {memory_gib:.0f} GiB, Python {platform.python_version()}, no GPU"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def replace_section(document: str, name: str, body: str) -> str:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(document):
        return pattern.sub(lambda _: section, document)
    return document.rstrip() + "\n\n" + section + "\n"


def main(names: list[str]) -> None:
    names = names or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    document = RESULTS.read_text() if RESULTS.exists() else HEADER
    for name in names:
        module = load(name)
        print(f"== {name}", flush=True)
        table = module.main()
        title = (module.__doc__ or name).strip().splitlines()[0]
        load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        stamp = (f"{datetime.date.today().isoformat()} on {machine()}; load average at the start "
                 f"{load_average} (other work on the machine makes numbers noisy)")
        body = f"## {name}: {title}\n\nRun {stamp}.\n\n{table}"
        document = replace_section(document, name, body)
        RESULTS.write_text(document)   # after each benchmark, so a later failure keeps it
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main(sys.argv[1:])
