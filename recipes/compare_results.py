"""Compare two studies' results.json (or run.json) files, ignoring the timing keys.

    python recipes/compare_results.py outputs/before/results.json outputs/after/results.json

Prints every other difference (a key missing on one side, or a different value) and exits 1 if
there is any: a change that should not move the numbers (a refactor) is checked with a fixed-seed
run before and after it.
"""

from __future__ import annotations

import argparse
import json
import sys

TIMING = ("seconds", "train_seconds")


def differences(before, after, path: tuple = ()) -> list[tuple[str, object, object]]:
    """(key path, before, after) of every difference outside the timing keys."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after), key=str):
            if key in TIMING:
                continue
            if key not in before or key not in after:
                found.append(
                    ("/".join(map(str, (*path, key))), before.get(key, "<missing>"), after.get(key, "<missing>"))
                )
            else:
                found += differences(before[key], after[key], (*path, key))
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [found for i, (x, y) in enumerate(zip(before, after)) for found in differences(x, y, (*path, i))]
    same = before == after or (before != before and after != after)  # NaN (a metric of no rows) equals NaN
    return [] if same else [("/".join(map(str, path)), before, after)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    with open(args.before) as f, open(args.after) as g:
        found = differences(json.load(f), json.load(g))
    print(f"{len(found)} differences outside the timing keys {TIMING}")
    for path, old, new in found:
        print(f"{path}: {old!r} -> {new!r}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
