"""Pull the metric names out of a PromQL expression, without a PromQL parser.

Good enough for the expressions we write (rules, dashboard targets, Grafana
template queries): strings, label matchers, ranges, grouping clauses and
Grafana variables are removed first, then every remaining identifier that is
not a function call, an aggregation or a keyword is a metric name.
"""

from __future__ import annotations

import re

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\$?\w+|\[\[[^\]]*\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+", re.IGNORECASE)
# Grafana's template query: label_values(label) or label_values(selector, label).
_LABEL_VALUES = re.compile(r"\blabel_values\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")

_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "atan2",
})


def metric_names_in_promql(expr: str) -> set[str]:
    """The metric names an expression selects, e.g. ``{"vllm:request_success_total"}``.

    Grafana's template queries work too: ``label_values(metric, label)`` gives
    the metric, ``label_values(label)`` nothing. Names selected with
    ``{__name__="..."}`` are not found: avoid that form.
    """
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub("1", text)
    previous = None
    while previous != text:  # matchers cannot nest, but be safe
        previous = text
        text = _MATCHERS.sub(" ", text)
    text = _LABEL_VALUES.sub(
        lambda m: m.group(1).rpartition(",")[0] if "," in m.group(1) else " ", text)
    text = _RANGE.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        ident, call = match.group(1), match.group(2)
        if call or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return names
