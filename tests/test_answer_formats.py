"""The answer formats open models print, graded through the one `grade`: right answers right, wrong ones wrong.

Each format is a template for the end of a completion. For each, the right answer (after reasoning that
holds other numbers) must grade right, and these must grade wrong: a different final answer after
reasoning that mentions the gold number (even as "the answer is 204?"), gold x 10 and gold + 1 (a grader
that reads a prefix, or a neighbouring number, would accept them).
"""

from __future__ import annotations

import pytest

from nanoseek.rewards import extract_answer, grade

GOLD = 204

FORMATS = {
    "boxed": "\\boxed{{{a}}}",
    "boxed in math": "The final answer is $\\boxed{{{a}}}$.",
    "minerva": "Final Answer: The final answer is ${a}$. I hope it is correct.",
    "minerva, no dollars": "Final Answer: The final answer is {a}. I hope it is correct.",
    "answer: the answer is": "Answer: The answer is {a}",
    "math then a clause": "The answer is ${a}$, which is the required value.",
    "text then a clause": "The answer is {a}, since every pair is counted once.",
    "bold final answer colon": "**Final Answer**: {a}",
    "bold final answer colon inside": "**Final Answer:** {a}",
    "bold answer colon": "**Answer:** {a}",
    "bold answer line": "**Answer: {a}**",
    "bold number": "So the answer is **{a}**.",
    "the answer is": "So the answer is {a}.",
    "the answer is, no stop": "The final answer is {a}",
    "answer is colon": "the answer is: {a}",
    "answer colon": "Answer: {a}",
    "inline paren math": "The answer is \\({a}\\).",
    "display math on the next line": "The answer is:\n\\[\n{a}\n\\]",
    "dollar display math": "Therefore, the answer is $$ {a} $$",
    "final answer heading, boxed display": "**Final Answer**\n\\[\n\\boxed{{{a}}}\n\\]",
    "final answer heading, plain": "**Final Answer**\n{a}",
    "markdown heading": "## Final Answer\n\nThe final answer is {a}.",
    "unit words": "The answer is {a} dollars.",
    "two unit words": "The answer is {a} square meters.",
    "latex unit": "The answer is ${a} \\text{{ cm}}$.",
    "trailing semicolon": "Answer: {a};",
    "gsm8k marker": "#### {a}",
}

THINK_RIGHT = "<think>\nTry 17 * 11 = 187: too few. The answer is 187? No: 12 * 17 = {a}.\n</think>\n\n"
PLAIN_RIGHT = "First, 17 * 11 = 187 is too few. Then 12 * 17 = {a}.\n\n"
# the gold number in the reasoning, a different final answer
THINK_WRONG = "<think>\n12 * 17 = 204, so the answer is 204? No: each pair counts once, 102.\n</think>\n\n"
PLAIN_WRONG = "We get 12 * 17 = 204, so the answer is 204? No: each pair counts once, so 102.\n\n"


def completions(fmt: str) -> tuple[list[str], list[str]]:
    """(right completions, wrong completions) for one format."""
    right = [prefix.format(a=GOLD) + fmt.format(a=GOLD) for prefix in (THINK_RIGHT, PLAIN_RIGHT, "")]
    wrong = [THINK_WRONG + fmt.format(a=102), PLAIN_WRONG + fmt.format(a=102)]
    wrong += [THINK_RIGHT.format(a=GOLD) + fmt.format(a=a) for a in (GOLD * 10, GOLD + 1)]
    return right, wrong


@pytest.mark.parametrize("kind", ["math", "gsm8k"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_answer_format_is_read(name: str, kind: str) -> None:
    right, wrong = completions(FORMATS[name])
    row = {"answer": str(GOLD)}
    for text in right:
        graded = grade(row, text, kind=kind)
        assert graded.correct, (text, graded)
    for text in wrong:
        graded = grade(row, text, kind=kind)
        assert not graded.correct and graded.status == "wrong", (text, graded)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("The answer is $x = 3$, as required.", "x = 3"),
        ("The answer is 3.5. That is all.", "3.5"),
        ("The answer is (3, \\pi/2).", "(3, \\pi/2)"),  # a comma inside an answer is not a clause
        ("The answer is 1, 2, 3.", "1, 2, 3"),
        ("The answer is 2 pi.", "2 pi"),  # pi is no unit
        ("The answer is 18 or 19.", "18 or 19"),  # two numbers: kept, so it is not one answer
        ("The answer is $\\$18$.", "\\$18"),
        ("The answer is\n\nFirst we add.", "First we add"),  # a marker ending its line: the next line
        ("**Final Answer**\n\n$$\n\\frac{3}{4}\n$$", "\\frac{3}{4}"),
        ("The answer is $5, as in the question", "$5"),  # an unclosed $ is a currency sign
        ("The answer is 204.\n\n#### Check\n12 * 17 = 204", "204"),  # a markdown heading is no GSM8K mark
        ("#### 18\nThe answer is 19.", "19"),  # the last stated answer
    ],
)
def test_stated_answers_are_cut_to_the_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected
