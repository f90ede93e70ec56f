#!/usr/bin/env python3
"""Lists import cycles between the files of each crate in the workspace.

A file depends on another when it names a module path (in a `use` or an
inline path such as `crate::a::b::f` or `super::x`) that resolves to that
other file's module. A module's own child declarations (`mod x;`) do not
count, nor does a file's inline `mod tests` using its parent. Cycles are
the strongly connected components of more than one file.

Usage: scripts/module-cycles.py [CRATE_DIR ...]   (default: every crate)
Exit status: 0 without cycles, 1 with (each cycle printed on one line).
"""

import os
import re
import sys

CRATES = ["replicator", "replicator/api", "kernel-glue", "clusterd", "mta", "tests"]


def module_files(src):
    """Maps a module path (tuple of names, () = crate root) to its file."""
    files = {}
    for root, _dirs, names in os.walk(src):
        for name in names:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[0] == "bin":
                continue  # each binary is a crate of its own
            if rel in (["lib"], ["main"]):
                module = ()
            elif rel[-1] == "mod":
                module = tuple(rel[:-1])
            else:
                module = tuple(rel)
            files.setdefault(module, path)
    return files


PATH_RE = re.compile(r"\b((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\};", re.S)


def strip_tests(text):
    """Drops `#[cfg(test)] mod tests { ... }` blocks written inline."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def referenced_paths(text):
    text = re.sub(r"//[^\n]*", "", strip_tests(text))
    paths = [m.group(1) for m in PATH_RE.finditer(text)]
    for m in USE_GROUP_RE.finditer(text):
        prefix = m.group(1)
        for item in re.split(r"[,\s]+", m.group(2)):
            item = item.split("::")[0].strip("{} ")
            if re.match(r"^[A-Za-z_]\w*$", item) and item != "self":
                paths.append(prefix + "::" + item)
    return paths


def resolve(path, here, files):
    parts = path.split("::")
    base = list(here)
    if parts[0] == "crate":
        base, parts = [], parts[1:]
    else:
        while parts and parts[0] in ("super", "self"):
            if parts[0] == "super":
                base = base[:-1]
            parts = parts[1:]
    full = tuple(base + parts)
    for n in range(len(full), -1, -1):
        if full[:n] in files:
            return full[:n]
    return None


def cycles(crate):
    src = os.path.join(crate, "src")
    files = module_files(src)
    graph = {m: set() for m in files}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for p in referenced_paths(text):
            target = resolve(p, module, files)
            # A module naming its own descendants is declaring, not importing.
            if target is None or target == module or target[: len(module)] == module:
                continue
            graph[module].add(target)
    # Tarjan's strongly connected components.
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(files[m] for m in comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    found = 0
    for crate in sys.argv[1:] or CRATES:
        for comp in cycles(crate):
            found += 1
            print("cycle: " + " <-> ".join(comp))
    if found:
        print(f"{found} import cycle(s)")
        return 1
    print("no import cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
