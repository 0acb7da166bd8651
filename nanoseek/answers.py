"""Answer extraction and GSM8K numeric equality: plain string work, no sympy, no torch.

The model's answer is the last `\\boxed{...}` (braces balanced), else the last answer it states
("The answer is X", "Answer: X", "**Final Answer**: X", "Final Answer: The final answer is $X$. I hope it
is correct.", a "Final Answer" heading with X on the next line, GSM8K's `#### X`; X as text or as inline
or display math, trailing units and punctuation dropped). When the completion has a `</think>`
only the text after the last one is the answer (`answer_region`). The task verifiers (`nanoseek.tasks`)
and the graders (`nanoseek.rewards`) both read answers with this module, so it imports nothing of
nanoseek and nothing heavy.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "answer_region",
    "extract_answer",
    "extract_boxed",
    "gsm8k_equal",
    "parse_gsm8k_number",
    "parse_number",
    "strip_math_delimiters",
]

# --------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the group whose content starts at `start`; None if it never closes.

    `\\{` and `\\}` are escaped (literal) braces and do not count, so `\\boxed{\\{1, 2\\}}` works.
    """
    depth = 1
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (`\{`, `\}`, `\\`)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str | None) -> str | None:
    """The content of the LAST `\\boxed{...}` or `\\fbox{...}`, matching balanced braces.

    If the last box never closes (a generation cut off mid-answer) the result is None rather than an
    earlier box: an answer the model was in the middle of replacing is not its answer.
    """
    if not text:
        return None
    last = None
    for m in _BOX_START.finditer(text):
        last = m
    if last is None:
        return None
    end = _closing_brace(text, last.end())
    return None if end is None else text[last.end() : end]


# Where a stated answer starts: "the answer is", "Answer:", "**Answer**:", "answer is:"; a "Final Answer"
# heading on a line of its own ("**Final Answer**", "## Final Answer") with the answer below it; GSM8K's
# "#### 18" (a number must follow: "#### Step 2" is a markdown heading).
_ANSWER_MARK = re.compile(
    r"\banswer\b(?:\*\*)?[ \t]*(?:is\b[ \t]*:?|:)"
    r"|\bfinal answer\b[ \t]*(?:\*\*)?[ \t]*:?[ \t]*(?=\n)"
    r"|####(?=[ \t]*[-+$\\.\d])",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"\.\s")
# Words that carry on the sentence after an answer: "$204$, which is ...", "204 because ...".
_AFTERWORD = re.compile(
    r"[,;]?\s+(?:which|since|because|as|so|but|where|hence|thus|therefore|meaning|i\.e\.)\b", re.IGNORECASE
)
# A number followed by unit words only: "204 dollars", "12 square meters", "3 cm^2", "5 \\text{ cm}" (not "2 pi").
_NUMBER_AND_UNITS = re.compile(
    r"(?P<number>[-+]?(?:\\?\$)?\d[\d,]*(?:\.\d+)?)"
    r"(?:\s*(?:\\(?:text|mathrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .]*\}|(?!pi\b)[A-Za-z]{2,}(?:\^\{?\d\}?)?\.?))+"
)
# Opening math delimiters, display math first; inline ones must close on the same line.
_MATH_SPANS = (("$$", "$$", False), ("\\[", "\\]", False), ("$", "$", True), ("\\(", "\\)", True))


def _math_span(text: str) -> str | None:
    """The content of the math span that `text` starts with (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`)."""
    for left, right, inline in _MATH_SPANS:
        if text.startswith(left):
            end = text.find(right, len(left))
            while end > 0 and text[end - 1] == "\\" and right.startswith("$"):  # `\\$` is a dollar sign
                end = text.find(right, end + 1)
            if end < 0 or (inline and "\n" in text[len(left) : end]):
                return None
            return text[len(left) : end].strip()
    return None


def _drop_units(answer: str) -> str:
    m = _NUMBER_AND_UNITS.fullmatch(answer)
    return m.group("number") if m else answer


def _stated_answer(text: str) -> str:
    """The answer that `text` (what follows an answer marker) starts with, cleaned of the prose around it.

    A math span is taken whole ("$204$, which is ..." -> "204"); otherwise the rest of the line up to
    the end of its sentence or a word that carries the sentence on, without markdown bold, math
    delimiters or the final punctuation. When the marker ends its line the answer is on the next one.
    """
    line = text.split("\n", 1)[0]
    text = text.lstrip(" \t*:\n" if not line.strip(" \t*:") else " \t*:")
    span = _math_span(text)
    if span is not None:
        return _drop_units(span)
    s = text.split("\n", 1)[0].strip()
    cut = _SENTENCE_END.search(s)  # "The answer is 3.5. So ..." -> "3.5." (the sentence, not the paragraph)
    if cut:
        s = s[: cut.start() + 1]
    cut = _AFTERWORD.search(s)
    if cut:
        s = s[: cut.start()]
    s = s.strip().rstrip(".,;:*").strip().strip("*").strip()
    return _drop_units(strip_math_delimiters(s))


def strip_math_delimiters(s: str) -> str:
    s = s.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
                break
    return s


def answer_region(completion: str) -> str:
    """The part of a completion that holds the answer: after the last `</think>` if there is one."""
    _head, sep, tail = completion.rpartition("</think>")
    return tail if sep else completion


def extract_answer(text: str | None) -> str | None:
    """The model's final answer: the last boxed; else the last stated answer ("the answer is X", "Answer: X",
    "**Final Answer**: X", a "Final Answer" heading with X below, `#### X`; as running text or math).

    Returns a stripped string, or None when the text contains no recognisable answer.
    """
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for m in reversed(list(_ANSWER_MARK.finditer(text))):
        answer = _stated_answer(text[m.end() :])
        if answer:
            return answer
    return None


# --------------------------------------------------------------------------------------------------
# GSM8K numeric equality
# --------------------------------------------------------------------------------------------------

_GSM_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+(?:\.\d*)?)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def parse_gsm8k_number(text: str | None) -> Fraction | None:
    """The exact number in a GSM8K-style answer ("$1,234.50", "18 dollars", "-3", "3/4", "25%").

    Dollar signs, thousands separators, LaTeX spacing, a trailing full stop and trailing units are
    dropped. Anything else that carries a second number ("18 or 19") is not a single answer: None.
    """
    if text is None:
        return None
    s = text.strip()
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = s.replace("\\%", "").replace("%", "")
    s = _LATEX_TEXT.sub(r" \1", s)
    s = _LATEX_FRAC.sub(r"(\1)/(\2)", s).replace("(", "").replace(")", "")
    s = _THOUSANDS.sub("", s).strip().lstrip("=").strip()
    m = _GSM_NUMBER.match(s)
    if not m:
        return None
    rest = s[m.end() :].strip().rstrip(".")
    if any(ch.isdigit() for ch in rest):
        return None
    num = m.group(0).replace(" ", "")
    try:
        if "/" in num:
            a, b = num.split("/")
            return Fraction(a) / Fraction(b)
        return Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_equal(pred: str | None, gold: str | None) -> bool:
    """Exact numeric equality of two GSM8K answers (`18`, `$18.00` and `18 dollars` are all 18)."""
    a, b = parse_gsm8k_number(pred), parse_gsm8k_number(gold)
    return a is not None and b is not None and a == b


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?")
_INT_FRAC = re.compile(r"\\[dt]?frac\{(\d+)\}\{(\d+)\}")


def parse_number(text: str | None) -> Fraction | None:
    """The exact number an answer is, when it is nothing but a number; None otherwise.

    Accepts "42", "-3", "1,234", "$12", "2.5", "3/4", "\\frac{3}{4}", "-\\dfrac{1}{2}". Stricter than
    `parse_gsm8k_number`: no trailing words or units, so "2\\pi" or "4x" are not numbers.
    """
    if text is None:
        return None
    s = text.strip().replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = s.replace("\\,", "").replace("\\!", "").replace(" ", "")
    s = _INT_FRAC.sub(r"\1/\2", s)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
