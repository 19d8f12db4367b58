"""What ``ssmc compile --target c -o DIR`` writes: the kernel, its header, an example, a Makefile."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from ssmc.ir import KernelPlan

from .layout import make_layout
from .programs import driver_main, example_main

MAKEFILE = """\
# Builds the ssmc-generated {entry} kernel: lib{prefix}.so and the example program.
# Only a C99 compiler and libm are needed. Cross-compile with e.g.
#   make CC=aarch64-linux-gnu-gcc LDFLAGS=-static
CC ?= cc
CFLAGS ?= -std=c99 -O3 -Wall -Werror
LDFLAGS ?=
LDLIBS = -lm

all: lib{prefix}.so example

lib{prefix}.so: {prefix}.c {prefix}.h
\t$(CC) $(CFLAGS) -fPIC -shared -o $@ {prefix}.c $(LDLIBS)

example: main.c {prefix}.c {prefix}.h
\t$(CC) $(CFLAGS) $(LDFLAGS) -o $@ main.c {prefix}.c $(LDLIBS)

{prefix}_driver: {prefix}_driver.c {prefix}.c {prefix}.h
\t$(CC) $(CFLAGS) $(LDFLAGS) -o $@ {prefix}_driver.c {prefix}.c $(LDLIBS)

run: example
\t./example

clean:
\trm -f lib{prefix}.so example {prefix}_driver

.PHONY: all run clean
"""


def source_files(plan: KernelPlan, config: dict) -> Dict[str, str]:
    """Every text file of the artifact, by name."""
    from . import lower_files
    layout = make_layout(plan)
    files = dict(lower_files(plan, config))
    header = f"{layout.prefix}.h"
    files["main.c"] = example_main(layout, header)
    files[f"{layout.prefix}_driver.c"] = driver_main(layout, header)
    files["Makefile"] = MAKEFILE.format(prefix=layout.prefix, entry=layout.entry)
    return files


def write_sources(plan: KernelPlan, config: dict, out_dir) -> List[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in source_files(plan, config).items():
        path = out / name
        path.write_text(text)
        paths.append(path)
    return paths
