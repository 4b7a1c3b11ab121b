"""The README's results table and every figures table in docs/ quote files the pipeline or a
benchmark writes; each number must be what the file says, so a `dvc repro` or a benchmark run
that changes them cannot leave the front door or a docs page stale."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from helpers.paths import REPO

_SPEC = importlib.util.spec_from_file_location("refresh_figures", REPO / "scripts/refresh_figures.py")
refresh = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(refresh)  # the row form and the key lookup, shared with the script that rewrites rows
ROW = refresh.ROW
DOCS = sorted((REPO / "docs").glob("*.md"))


def _rows() -> list[re.Match[str]]:
    text = (REPO / "README.md").read_text()
    results = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    return [m for line in results.splitlines() if (m := ROW.match(line.strip()))]


def _doc_rows() -> list[tuple[str, re.Match[str]]]:
    """Every row of a docs page's figures table (same form as the README's)."""
    return [(page.name, m) for page in DOCS for line in page.read_text().splitlines() if (m := ROW.match(line.strip()))]


def _lookup(data: dict, dotted: str) -> float:
    value = refresh.lookup(data, dotted)
    if value is None:
        raise KeyError(dotted)
    return value


def test_the_results_table_has_its_rows() -> None:
    assert len(_rows()) >= 4


def _expected(data: dict, keys: str, forms: tuple[str, ...]) -> list[str]:
    expected = []
    for key in re.findall(r"`([^`]+)`", keys):
        values = [_lookup(data, key)]
        for bound in ("_ci_low", "_ci_high"):
            leaf = key.rsplit(".", 1)
            try:
                values.append(_lookup(data, f"{leaf[0]}.{leaf[1]}{bound}" if len(leaf) == 2 else f"{key}{bound}"))
            except KeyError:
                continue
        expected += [form.format(v=abs(v), pct=abs(100 * v)) for v in values for form in forms]  # signs quoted apart
        expected += [f"{abs(v):.0f}" for v in values if v.is_integer()]  # a count, quoted whole
    return expected


@pytest.mark.parametrize("row", _rows(), ids=lambda m: m["measure"])
def test_each_quoted_number_is_in_its_file(row: re.Match[str]) -> None:
    data = json.loads((REPO / row["file"]).read_text())
    quoted = re.findall(r"\d+\.\d+", row["value"])
    expected = _expected(data, row["keys"], ("{pct:.1f}", "{v:.3f}"))  # percent, one decimal; or a fraction, three
    assert quoted and all(q in expected for q in quoted), (row["measure"], quoted, expected)


@pytest.mark.parametrize(("page", "row"), _doc_rows(), ids=lambda x: x if isinstance(x, str) else x["measure"][:40])
def test_each_figure_in_a_docs_table_is_in_its_file(page: str, row: re.Match[str]) -> None:
    """Docs tables may quote a file's own unit (images/s, seconds) at one to three decimals, and a
    count the file holds as a whole number whole (no thousands separator)."""
    data = json.loads((REPO / row["file"]).read_text())
    quoted = re.findall(r"\d+(?:\.\d+)?", row["value"])
    expected = _expected(data, row["keys"], ("{pct:.1f}", "{v:.1f}", "{v:.2f}", "{v:.3f}"))
    assert quoted and all(q in expected for q in quoted), (page, row["measure"], quoted, expected)


def test_docs_have_figures_tables() -> None:
    assert {page for page, _ in _doc_rows()} >= {"benchmarks.md"}


def test_the_suite_times_quoted_are_the_benchmarks() -> None:
    """The test paragraph's times are those `benchmarks/suite_time.py` wrote, with the test counts."""
    text = " ".join((REPO / "README.md").read_text().split())
    runs = json.loads((REPO / "reports/benchmarks/suite_time.json").read_text())
    for label in ("full", "quick"):
        minutes, seconds = divmod(round(runs[label]["wall_seconds"]), 60)
        tests = runs[label]["summary"].split()[0]
        took = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
        assert f"{tests} tests in {took}" in text, label


def test_refresh_figures_rewrites_each_number_in_the_form_it_was_quoted() -> None:
    """scripts/refresh_figures.py: a percent stays a percent, a fraction keeps its decimals, an
    interval's bounds follow their key, and a sign that flips is rewritten."""
    old = {"a": {"auc": 0.772, "auc_ci_low": 0.707, "auc_ci_high": 0.832}, "dice": 0.955, "gain": -0.032, "n": 101}
    new = {"a": {"auc": 0.801, "auc_ci_low": 0.75, "auc_ci_high": 0.86}, "dice": 0.9668, "gain": 0.011, "n": 99}
    keys = "`a.auc`, `dice`, `gain`, `n`"
    value, missed = refresh.refresh_value("77.2 (70.7–83.2), 0.955, −3.2, 101", refresh.pairs(old, new, keys))
    assert (value, missed) == ("80.1 (75.0–86.0), 0.967, 1.1, 99", 0)
    assert refresh.refresh_value("12.5", refresh.pairs(old, new, keys)) == ("12.5", 1)  # not a figure of the file
    low = {"d": {"value": 0.072, "value_ci_low": 0.001, "value_ci_high": 0.143}}
    lower = {"d": {"value": 0.052, "value_ci_low": -0.026, "value_ci_high": 0.134}}
    value, _ = refresh.refresh_value("7.2 (0.1 to 14.3)", refresh.pairs(low, lower, "`d.value`"))
    assert value == "5.2 (−2.6 to 13.4)"  # a bound that turns negative gets its minus
