"""Verifiers: answer extraction and grading per dataset.

- `arith` / `gsm8k`: the number after the last `####`, else the last number in the response
  (commas, `$` and a trailing `.` removed), compared numerically with the reference.
- `math500` / `aime24` / `aime25`: the content of the last `\\boxed{}` (or `\\fbox{}`), compared with
  the reference by math-verify equivalence (`\\frac{1}{2}` == `0.5`, intervals, sets, `\\dfrac`...),
  falling back to an exact match of normalised strings when math-verify cannot parse or raises.
  This is the usual rule (Qwen2.5-Math / DeepSeek-R1 evaluations): a response without a boxed
  answer is wrong even if the right number appears somewhere in it.

Callers decide about truncated responses (cut at the token limit): they are never correct,
whatever their text says (`stages.sampling.rewards` adds the training penalty).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from decimal import Decimal, InvalidOperation

# `numeric` and `boxed` are the graders a user's dataset names (`task.grader`, stages/data/user_tasks.py).
NUMERIC_DATASETS = frozenset({"arith", "gsm8k", "numeric"})
BOXED_DATASETS = frozenset({"math500", "aime24", "aime25", "boxed"})

# A number: digits with proper thousands groups or plain digits, optional decimals. A minus sign
# counts only when it does not follow a word character or ")" ("3-5" is a range, not -5).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------
def extract_gsm8k_answer(text: str) -> str | None:
    """The first number after the last `####` if there is one, else the last number in the text.

    Normalised: commas and `$` dropped, `18.00` -> `18`, `0.50` -> `0.5`, `-0` -> `0`.
    A `####` followed by no number gives None (the model announced an answer and gave none).
    """
    marker = text.rfind("####")
    if marker >= 0:
        match = _NUMBER.search(text[marker + 4 :].replace("$", ""))
        return _normalise_number(match.group()) if match else None
    matches = _NUMBER.findall(text.replace("$", ""))
    return _normalise_number(matches[-1]) if matches else None


def _normalise_number(text: str) -> str | None:
    try:
        value = Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_boxed_answer(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` / `\\fbox{...}` (nested braces matched by a scan).

    `\\boxed 5` (no braces, as some models write) gives `5`. An unclosed last box (a truncated
    response) is skipped in favour of the previous complete one; no complete box gives None.
    """
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    for start in reversed(starts):
        content = _box_content(text, start + (6 if text.startswith("\\boxed", start) else 5))
        if content is not None:
            return content.strip()
    return None


def _box_content(text: str, pos: int) -> str | None:
    """Content of the box whose command name ends at `pos`, or None if it never closes."""
    if pos < len(text) and text[pos] == " ":  # `\boxed 5`: one token up to a space or `$`
        match = re.match(r" +([^\s$]+)", text[pos:])
        return match.group(1) if match else None
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    for i in range(pos, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i]
    return None


def extract_answer(dataset: str, response: str) -> str | None:
    """The final answer a grader would read from `response`, in a canonical spelling (what maj@k
    votes on): the normalised number (arith, gsm8k) or the normalised last boxed content."""
    if dataset in NUMERIC_DATASETS:
        return extract_gsm8k_answer(response)
    if dataset in BOXED_DATASETS:
        boxed = extract_boxed_answer(response)
        return normalise_latex(boxed) if boxed else None
    known = ", ".join(sorted(NUMERIC_DATASETS | BOXED_DATASETS))
    raise ValueError(f"no grader for dataset {dataset!r}; known: {known}")


# ---------------------------------------------------------------------------------------------
# grading
# ---------------------------------------------------------------------------------------------
def grade(dataset: str, response: str, ground_truth: str, timeout_s: float = 5.0) -> bool:
    """Whether `response` answers correctly. `timeout_s` bounds each math-verify parse/compare
    (whole seconds, rounded up); from a non-main thread math-verify cannot use its signal-based
    timeout, so it runs without one there (call `grade` from the main thread or a process pool
    if untrusted outputs may make sympy hang)."""
    if dataset in NUMERIC_DATASETS:
        predicted, expected = extract_gsm8k_answer(response), _normalise_number(ground_truth.strip())
        return predicted is not None and expected is not None and Decimal(predicted) == Decimal(expected)
    if dataset in BOXED_DATASETS:
        predicted = extract_boxed_answer(response)
        if not predicted:
            return False
        return _math_equal(predicted, ground_truth, timeout_s) or (
            normalise_latex(predicted) == normalise_latex(ground_truth)
        )
    known = ", ".join(sorted(NUMERIC_DATASETS | BOXED_DATASETS))
    raise ValueError(f"no grader for dataset {dataset!r}; known: {known}")


def _math_equal(predicted: str, ground_truth: str, timeout_s: float) -> bool:
    """math-verify equivalence of two bare answers (each wrapped in `\\boxed{}` so that it is parsed
    as one answer); False if either does not parse, or on any error or timeout."""
    from math_verify import parse, verify

    in_main = threading.current_thread() is threading.main_thread()
    seconds = max(1, math.ceil(timeout_s)) if in_main else None  # signal.alarm takes whole seconds
    logging.getLogger("math_verify").setLevel(
        logging.ERROR
    )  # its "timeout disabled" warning, once per thread
    try:
        gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=seconds)
        pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=seconds)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=seconds))
    except Exception:  # math-verify's own TimeoutException included
        return False


_LATEX_NOISE = [
    (re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\quad|\$|\s"), ""),
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\^\{?\\circ\}?|\\%|%"), ""),
    (re.compile(r"\\text\{([^{}]*)\}|\\textbf\{([^{}]*)\}|\\mathrm\{([^{}]*)\}"), r"\1\2\3"),
]


def normalise_latex(answer: str) -> str:
    """A canonical spelling for the exact-match fallback: no spaces, `\\left`/`\\right`, `$`,
    degree/percent signs or text wrappers; `\\dfrac`/`\\tfrac` -> `\\frac`; no trailing `.`."""
    for pattern, replacement in _LATEX_NOISE:
        answer = pattern.sub(replacement, answer)
    return answer.rstrip(".").lower()
