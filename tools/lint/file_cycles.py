#!/usr/bin/env python3
"""Two-file dependency cycles in a Rust crate's source tree.

Usage: tools/lint/file_cycles.py CRATE_SRC [CRATE_SRC ...]   (exit 1 when a cycle is found)

A file depends on another when it names a path into it: `crate::a::b`, `super::x`, `self::x`
or a child module's name (`db::Stmt`), in `use` lines or in code (comments and `mod tests`
blocks are ignored). Each path is resolved to the file of the deepest module that exists. Two
files that depend on each other are reported. A heuristic read of the text, not a compiler:
good enough to keep layering honest (issue 13: "no cycle between two files").
"""
import os
import re
import sys


def modules(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith('.rs'):
                p = os.path.join(d, f)
                rel = os.path.relpath(p, root)[:-3].split(os.sep)
                if rel[-1] in ('mod', 'lib', 'main'):
                    rel = rel[:-1]
                out[tuple(rel)] = p
    return out


def deps(mods):
    def resolve(path):
        path = tuple(path)
        while path and path not in mods:
            path = path[:-1]
        return mods.get(path)

    out = {}
    for here, p in mods.items():
        src = open(p, encoding='utf-8').read()
        src = re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*', '', src, flags=re.S)
        src = re.sub(r'//.*', '', src)
        found = set()
        for m in re.finditer(r'\b(\w+)((?:::\w+)*)(?:::\{([^}]*)\})?', src):
            base, rest, group = m.group(1), [x for x in m.group(2).split('::') if x], m.group(3)
            if not rest and group is None:
                continue
            if base == 'crate':
                start = []
            elif base == 'self':
                start = list(here)
            elif base == 'super':
                start = list(here[:-1])
            elif here + (base,) in mods:
                start = list(here) + [base]
            else:
                continue
            paths = [start + rest]
            for g in (group or '').split(','):
                g = g.strip().split(' as ')[0]
                if g and g != 'self':
                    paths.append(start + rest + [x for x in g.split('::') if x])
            for q in paths:
                f = resolve(q)
                if f and f != p:
                    found.add(f)
        out[p] = found
    return out


def main():
    cycles = []
    for root in sys.argv[1:]:
        d = deps(modules(root))
        for a in sorted(d):
            for b in sorted(d[a]):
                if a < b and a in d.get(b, ()):
                    cycles.append((a, b))
    for a, b in cycles:
        print(f'cycle: {a} <-> {b}')
    print(f'{len(cycles)} two-file cycles')
    return 1 if cycles else 0


if __name__ == '__main__':
    sys.exit(main())
