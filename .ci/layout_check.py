#!/usr/bin/env python3
"""The house rules clippy cannot check: no import cycle among the library's parts, and no
source file over 1,000 lines.

An edge A -> B is a path `crate::B` named in src/A (a file or folder) outside comments and
outside `#[cfg(test)]` modules and test files (tests may reach anywhere). Exits non-zero,
naming the cycle and a file behind each edge, when the parts do not form a tree of layers.
"""

import os
import re
import sys

PARTS = ["node", "adapters", "scope", "config", "policy", "sync", "net", "store", "record", "cli"]
LINES_MAX = 1000
TEST_MODULE = re.compile(r"#\[cfg\(test\)\]\s*(pub(\(\w+\))? )?mod \w+\s*\{")


def source_files(roots):
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in sorted(files):
                if name.endswith(".rs"):
                    yield os.path.join(folder, name)


def edges():
    found = {part: {} for part in PARTS}
    for path in source_files(["src"]):
        part = os.path.relpath(path, "src").split(os.sep)[0].removesuffix(".rs")
        name = os.path.basename(path)
        if part not in PARTS or name == "tests.rs" or name.endswith("_tests.rs"):
            continue
        with open(path, encoding="utf-8") as file:
            text = file.read()
        test_module = TEST_MODULE.search(text)
        if test_module:
            text = text[: test_module.start()]
        code = "\n".join(line for line in text.split("\n") if not line.strip().startswith("//"))
        named = re.findall(r"crate::([a-z_]+)", code)
        for group in re.findall(r"crate::\{([^}]*)\}", code):
            named += re.findall(r"\b([a-z_]+)\b", group)
        for other in named:
            if other in PARTS and other != part:
                found[part].setdefault(other, path)
    return found


def cycle(found):
    """One cycle, as a list of parts, or None."""
    state = {}

    def visit(part, path):
        state[part] = "open"
        for other in sorted(found[part]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                loop = visit(other, path + [other])
                if loop:
                    return loop
        state[part] = "done"
        return None

    for part in PARTS:
        if part not in state:
            loop = visit(part, [part])
            if loop:
                return loop
    return None


def main():
    failed = False
    found = edges()
    loop = cycle(found)
    if loop:
        failed = True
        print("import cycle: " + " -> ".join(loop))
        for a, b in zip(loop, loop[1:]):
            print(f"  {a} -> {b}: {found[a][b]}")
    for path in source_files(["src", "simulations/src", "proto/src", "tests", "benches"]):
        with open(path, encoding="utf-8") as file:
            lines = sum(1 for _ in file)
        if lines > LINES_MAX:
            failed = True
            print(f"{path}: {lines} lines, over {LINES_MAX}")
    if failed:
        sys.exit(1)
    for part in PARTS:
        print(f"{part} -> {', '.join(sorted(found[part])) or '(nothing)'}")


if __name__ == "__main__":
    main()
