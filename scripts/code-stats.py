#!/usr/bin/env python3
"""Code-shape figures for the workspace: function lengths of non-test code per crate, the
longest functions, large files, and import cycles among each crate's modules.

    python3 scripts/code-stats.py [--top N] [--json]
    python3 scripts/code-stats.py --check

`--check` (run by .ci/run) fails when a non-test source file has more than 700 non-test
lines, when a non-test function is longer than 80 lines with no one-line reason above it (a
`// long: WHY` comment among the lines just above its `fn`, with its doc comment and
attributes), or when the modules of one crate import each other in a circle (`error`
excepted).

Non-test code is every `.rs` file under a crate's `src/` (not `tests/`, `benches/`,
`examples/` or generated code), less `#[cfg(test)]` modules. A function's length is the number
of lines from its `fn` line to its closing brace. Brace matching skips comments, strings and
character literals; it is a measurement aid, not a parser, and is exact for rustfmt'd code.
"""

import json
import os
import re
import statistics
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = ["hsm-bridge", "kms-core", "recovery", "api", "server", "deployment", "loadgen", "cli", "tests"]
MAX_FILE_LINES = 700
MAX_FN_LINES = 80
FN_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)")


def strip(text):
    """The text with comments, strings and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:end]))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def block_end(lines, start):
    """Index of the line closing the first `{` at or after `start` (None for `;` first)."""
    depth = 0
    opened = False
    for k in range(start, len(lines)):
        for ch in lines[k]:
            if ch == "{":
                depth += 1
                opened = True
            elif ch == "}":
                depth -= 1
                if opened and depth == 0:
                    return k
            elif ch == ";" and not opened and depth == 0:
                return None
    return None


def test_ranges(lines):
    """Line ranges of `#[cfg(test)]` items."""
    ranges = []
    for i, line in enumerate(lines):
        if line.strip().startswith("#[cfg(test)]"):
            end = block_end(lines, i + 1)
            if end is not None:
                ranges.append((i, end))
    return ranges


def source_files(crate):
    src = os.path.join(ROOT, crate, "src")
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs"):
                yield os.path.join(dirpath, f)


def functions(path):
    with open(path, encoding="utf-8") as fh:
        raw = fh.read()
    raw_lines = raw.split("\n")
    lines = strip(raw).split("\n")
    skip = test_ranges(lines)
    found = []
    for i, line in enumerate(lines):
        if any(a <= i <= b for a, b in skip):
            continue
        m = FN_RE.match(line)
        if not m:
            continue
        end = block_end(lines, i)
        if end is None:
            continue
        found.append((m.group(1), i + 1, end - i + 1, has_reason(raw_lines, i)))
    non_test_lines = len(lines) - sum(b - a + 1 for a, b in skip)
    return found, len(raw.split("\n")), non_test_lines


def has_reason(raw_lines, at):
    """Whether a `// long: WHY` comment stands among the doc comments, attributes and comments
    right above line `at`."""
    k = at - 1
    while k >= 0:
        line = raw_lines[k].strip()
        if re.match(r"//\s*long:\s*\S", line, re.IGNORECASE):
            return True
        if line.startswith(("//", "#[", "#![", ")]", "reason", "clippy::")) or line.endswith(","):
            k -= 1
            continue
        return False
    return False


def crate_cycles(crate):
    """Strongly connected groups of a crate's modules, by `crate::...` paths (error types
    excepted). A module is a top-level file or folder; in kms-core, inside `governance/`, each
    child is its own module (governance::policy, governance::grants, ...)."""
    src = os.path.join(ROOT, crate, "src")

    def module(parts):
        parts = [p.removesuffix(".rs") for p in parts]
        if parts and parts[-1] == "mod":
            parts = parts[:-1]
        if crate == "kms-core" and parts[:1] == ["governance"] and len(parts) > 1:
            return "::".join(parts[:2])
        return parts[0] if parts else ""

    graph = defaultdict(set)
    for path in source_files(crate):
        me = module(os.path.relpath(path, src).split(os.sep))
        if me in ("lib", "main", "governance", ""):
            continue
        with open(path, encoding="utf-8") as fh:
            text = strip(fh.read())
        lines = text.split("\n")
        skip = test_ranges(lines)
        body = "\n".join(l for i, l in enumerate(lines) if not any(a <= i <= b for a, b in skip))
        refs = [m.group(1).split("::") for m in re.finditer(r"crate::((?:\w+::)*\w+)", body)]
        for m in re.finditer(r"use crate::\{([^}]*)\}", body):
            refs += [[d] for d in re.findall(r"(?:^|,)\s*(\w+)", m.group(1))]
        for parts in refs:
            dep = module(parts)
            if dep not in (me, "error", "") and dep != "governance":
                graph[me].add(dep)
    return tarjan(graph)


def tarjan(graph):
    """The strongly connected groups of more than one node."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def core_cycles():
    """Strongly connected groups of kms-core's modules (see crate_cycles)."""
    return crate_cycles("kms-core")


def main():
    top = 10
    if "--top" in sys.argv:
        top = int(sys.argv[sys.argv.index("--top") + 1])
    per_crate = {}
    everything = []
    big_files = []
    violations = []
    for crate in CRATES:
        if not os.path.isdir(os.path.join(ROOT, crate, "src")):
            continue
        lengths = []
        for path in source_files(crate):
            rel = os.path.relpath(path, ROOT)
            fns, total, non_test = functions(path)
            if total > 600:
                big_files.append((rel, total, non_test))
            if non_test > MAX_FILE_LINES and crate != "tests":
                violations.append(f"{rel}: {non_test} non-test lines (at most {MAX_FILE_LINES})")
            for name, line, length, reason in fns:
                lengths.append(length)
                everything.append((length, f"{rel}:{line}", name))
                if length > MAX_FN_LINES and not reason:
                    violations.append(
                        f"{rel}:{line}: fn {name} is {length} lines (over {MAX_FN_LINES}) with no "
                        "`// long: WHY` above it"
                    )
        for cycle in crate_cycles(crate):
            violations.append(f"{crate}: modules import each other in a circle: " + " <-> ".join(cycle))
        if lengths:
            per_crate[crate] = {
                "functions": len(lengths),
                "median": statistics.median(lengths),
                "over_60_pct": round(100 * sum(1 for l in lengths if l > 60) / len(lengths), 1),
                "over_80": sum(1 for l in lengths if l > 80),
            }
    everything.sort(reverse=True)
    result = {
        "per_crate": per_crate,
        "longest": [{"lines": l, "at": at, "fn": name} for l, at, name in everything[:top]],
        "files_over_600": [{"file": f, "lines": t, "non_test_lines": n} for f, t, n in sorted(big_files, key=lambda x: -x[1])],
        "kms_core_import_cycles": core_cycles(),
    }
    if "--check" in sys.argv:
        for v in violations:
            print(v)
        print(f"code-stats --check: {len(violations)} problem(s)")
        sys.exit(1 if violations else 0)
    if "--json" in sys.argv:
        print(json.dumps(result, indent=1))
        return
    print("crate         fns  median  >60 %  >80")
    for crate, s in per_crate.items():
        print(f"{crate:12} {s['functions']:4}  {s['median']:6}  {s['over_60_pct']:5}  {s['over_80']:3}")
    print(f"\nlongest {top} functions:")
    for f in result["longest"]:
        print(f"  {f['lines']:4}  {f['fn']:32} {f['at']}")
    print("\nfiles over 600 lines (total, non-test):")
    for f in result["files_over_600"]:
        print(f"  {f['lines']:5} {f['non_test_lines']:5}  {f['file']}")
    print("\nimport cycles among kms-core modules (error types excepted):")
    for c in result["kms_core_import_cycles"]:
        print("  " + " <-> ".join(c))
    if not result["kms_core_import_cycles"]:
        print("  none")


if __name__ == "__main__":
    main()
