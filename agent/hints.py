"""Exactly one ``(fix: ...)`` hint per error line, also when errors wrap errors that carry their own."""

from __future__ import annotations

MARK = " (fix: "


def _hint_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each `` (fix: ...)`` part, parentheses balanced."""
    spans, i = [], 0
    while (start := text.find(MARK, i)) >= 0:
        depth, j = 0, start + 1
        while j < len(text):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                break
        spans.append((start, j))
        i = j
    return spans


def strip_fix_hints(text: str) -> str:
    """``text`` without any `` (fix: ...)`` parts."""
    out, i = [], 0
    for start, end in _hint_spans(text):
        out.append(text[i:start])
        i = end
    return "".join(out) + text[i:]


def one_fix_hint(text: str) -> str:
    """``text`` with only its last (outermost) `` (fix: ...)`` hint: inner ones, carried in by wrapped errors, go."""
    spans = _hint_spans(text)
    if len(spans) <= 1:
        return text
    start, end = spans[-1]
    return strip_fix_hints(text[:start]) + text[start:end] + strip_fix_hints(text[end:])


def error_line(exc: BaseException) -> str:
    """An exception with ``problem``/``fix`` (AgentError, FleetError) as one line with exactly one hint: its own."""
    problem, fix = getattr(exc, "problem", None), getattr(exc, "fix", None)
    if isinstance(problem, str):
        problem = strip_fix_hints(problem)
        return f"{problem}{MARK}{fix})" if fix else problem
    return one_fix_hint(str(exc))
