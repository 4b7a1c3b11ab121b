"""After a ``dvc repro`` or a benchmark changes a report, rewrite the figures that the README's
results table and the docs' figures tables quote from it (``tests/test_readme.py`` fails until they
follow). Each quoted number is found among the values the row's keys held at ``--since`` (a git
revision; default HEAD), in the form it was quoted in (a percent at one decimal, a fraction at one
to three, a count), and replaced by the key's value now, in the same form. Prose is not touched:
read the diff.

    python scripts/refresh_figures.py              # against the committed reports
    python scripts/refresh_figures.py --since HEAD~3
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covidct.atomic import write_text_atomic

ROW = re.compile(r"^\| (?P<measure>[^|]+) \| (?P<value>[^|]+) \| `(?P<file>reports/[^`]+\.json)`: (?P<keys>.+) \|$")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
FORMS: list[Callable[[float], str]] = [
    lambda v: f"{abs(100 * v):.1f}",
    lambda v: f"{abs(v):.3f}",
    lambda v: f"{abs(v):.2f}",
    lambda v: f"{abs(v):.1f}",
    lambda v: f"{abs(v):.0f}" if float(v).is_integer() else "",
]


def lookup(data: Any, dotted: str) -> float | None:
    """``a.b.c`` in nested JSON, where a key may itself hold dots (``cc-ccii.studies``)."""
    node, parts = data, dotted.split(".")
    while parts:
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if isinstance(node, dict) and key in node:
                node, parts = node[key], parts[n:]
                break
        else:
            return None
    return float(node) if isinstance(node, int | float) else None


def pairs(old: Any, new: Any, keys: str) -> list[tuple[float, float]]:
    """(then, now) for each key and its interval bounds, in the order a row quotes them."""
    out = []
    for key in re.findall(r"`([^`]+)`", keys):
        head, _, leaf = key.rpartition(".")
        for name in (key, *(f"{head}.{leaf}{b}" if head else f"{key}{b}" for b in ("_ci_low", "_ci_high"))):
            then, now = lookup(old, name), lookup(new, name)
            if then is not None and now is not None:
                out.append((then, now))
    return out


def refresh_value(value: str, known: list[tuple[float, float]]) -> tuple[str, int]:
    """The quoted value with each number matched in ``known`` replaced; and how many were not matched."""
    pieces, last, start, missed = [], 0, 0, 0
    for token in NUMBER.finditer(value):
        hit = next(
            ((i, form) for i in range(start, len(known)) for form in FORMS if form(known[i][0]) == token[0]),
            None,
        )
        if hit is None:
            missed += 1
            continue
        i, form = hit
        then, now = known[i]
        prefix = value[last : token.start()]
        if (then < 0) != (now < 0):  # a sign that flips is rewritten, and one that appears is written
            if prefix[-1:] in ("−", "-", "+"):
                prefix = prefix[:-1] + ("−" if now < 0 else "+" if prefix[-1] == "+" else "")
            elif now < 0:
                prefix += "−"
        pieces += [prefix, form(now)]
        last, start = token.end(), i + 1
    return "".join(pieces) + value[last:], missed


def refresh_page(path: Path, since: str, section: str | None = None) -> int:
    text = path.read_text()
    lines, changed = text.splitlines(keepends=True), 0
    inside = section is None
    for n, line in enumerate(lines):
        if section is not None and line.startswith("## "):
            inside = line.strip() == section
        match = ROW.match(line.strip()) if inside else None
        if not match or not Path(match["file"]).is_file():
            continue
        shown = subprocess.run(["git", "show", f"{since}:{match['file']}"], capture_output=True, text=True)
        if shown.returncode != 0:
            continue
        old, new = json.loads(shown.stdout), json.loads(Path(match["file"]).read_text())
        if not refresh_value(match["value"], pairs(new, new, match["keys"]))[1]:
            continue  # already quotes the file as it is (a second run would match old values again)
        value, missed = refresh_value(match["value"], pairs(old, new, match["keys"]))
        if missed:
            print(f"{path}: {match['measure'][:60]}: {missed} number(s) not found in {since}'s file; left as they were")
        if value != match["value"]:
            lines[n] = line.replace(f"| {match['value']} |", f"| {value} |", 1)
            changed += 1
    if changed:
        write_text_atomic(path, "".join(lines))
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--since", default="HEAD", help="the git revision whose reports the pages quote now")
    args = parser.parse_args()
    changed = refresh_page(Path("README.md"), args.since, "## Results")
    for page in sorted(Path("docs").glob("*.md")):
        changed += refresh_page(page, args.since)
    print(f"{changed} row(s) rewritten; review with git diff")


if __name__ == "__main__":
    main()
