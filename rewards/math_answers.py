"""The ``math`` reward: find the completion's final answer and compare it with the gold by value.

Extraction, each step switchable, first hit wins:

1. ``boxed``: the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched;
2. ``gsm8k``: the last ``#### x`` line;
3. ``answer_is``: the last "the (final) answer is x";
4. ``last_number``: the last number in the text (``-1,234.5``, ``3/4``, ``50%``).

Comparison is math-verify's (LaTeX and plain-text parsing into sympy, then numeric and
symbolic equality): ``1,000`` = ``1000``, ``0.5`` = ``\\frac12`` = ``1/2``, ``50\\%`` = ``0.5``,
``3\\sqrt2`` = ``\\sqrt{18}``, ``(x+1)^2`` = ``x^2+2x+1``, ``[1, 2)``, ``\\{1,2\\}``,
``5\\text{ cm}`` = ``5``. We only choose *which* text is the answer; math-verify decides
what it means, rather than a hand-written parser.

Guards against a policy that games the checker (each scores 0):

* several ``\\boxed`` answers that are not all equal (hedging: ``\\boxed{1} or \\boxed{2}``);
* a hedged final statement, whatever the extraction step: two different numbers joined only
  by hedging words (``69 or 70``, ``69, or maybe 70``, ``\\boxed{69 \\text{ or } 70}``,
  ``#### 69 or 70``); and, when the gold is a single number, a list of several (``69, 70``,
  ``69 and 70``, ``69 to 70``). For the last-number step the last number and the one
  before it are read that way; a computation in between (``3 + 4 = 7``) is no list;
* an answer longer than ``max_answer_chars`` (a list of every candidate value);
* numbers too large to evaluate (power towers, ``(10^{100})!``): sympy would compute them
  exactly, in C, for minutes; they are refused before sympy sees them.

Time limit: math-verify's own timeouts use ``signal.alarm``, which raises outside the main
thread and cannot interrupt sympy busy inside C code, so they are switched off here. The
limit is enforced from outside: the scoring worker that runs this reward is killed and
replaced when a call overruns ``time_limit_s`` (``rewards/pool.py``), and the row gets
NaN plus the error text.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field

from rewards.registry import register

# The largest number, in decimal digits, that a parsed answer may ask sympy to build. 2^(10^7)
# (3 million digits) verifies in 0.4 s here; 9^(9^9) does not finish in minutes.
MAX_DIGITS = 1_000_000
# More distinct boxed answers than this is hedging whatever they are; skip comparing them.
MAX_DISTINCT_BOXED = 4

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]+)", re.IGNORECASE)
# A minus sign counts only where it cannot be a hyphen or a subtraction ("pages 10-15").
_NUMBER = re.compile(r"(?:(?<![\w.)\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?")
# Where the sentence (or a clause: ", which ...") that holds the answer ends.
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\.$")
_CLAUSE = re.compile(r",\s+(?=[A-Za-z]{2,})")
# Thousands written with a thin space or "\," (1\,000): LaTeX would read a product 1*000.
_SPACED_THOUSANDS = re.compile(r"(?<=\d)(?:\\,|\\ |~|[ \u00a0\u2009\u202f])(?=\d{3}(?!\d))")


@register("math", time_limit_s=5.0)
def math_reward(
    completion: str,
    example: Mapping[str, Any],
    *,
    boxed: bool = True,
    gsm8k: bool = True,
    answer_is: bool = True,
    last_number: bool = True,
    max_answer_chars: Annotated[int, Field(gt=0)] = 300,
) -> float:
    """1.0 when the extracted final answer equals the row's gold ``answer``, else 0.0."""
    gold = example.get("answer")
    if gold is None or not str(gold).strip():
        raise ValueError("the math reward needs the row's 'answer' field (the gold answer)")
    gold_parsed = _parse_gold(str(gold))
    boxes = find_boxed(completion) if boxed else []
    distinct = list(dict.fromkeys(_squash(b) for b in boxes))
    if len(distinct) > MAX_DISTINCT_BOXED:
        return 0.0
    rule, answer = _extract(completion, boxed=boxed, gsm8k=gsm8k, answer_is=answer_is, last_number=last_number)
    if answer is None or len(answer) > max_answer_chars:
        return 0.0
    single_gold = _NUMBER.fullmatch(_squash(str(gold)).strip("$")) is not None
    if hedged(completion if rule == "last_number" else answer, single_gold, only_last=rule == "last_number"):
        return 0.0
    if len(distinct) > 1:
        final = _parse_answer(distinct[-1])
        if any(not _equal(final, _parse_answer(other)) for other in distinct[:-1]):
            return 0.0
    return float(_equal(gold_parsed, _parse_answer(answer)))


def find_boxed(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, in order."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:pos])
                    break
    return found


def extract_answer(
    completion: str, *, boxed: bool = True, gsm8k: bool = True, answer_is: bool = True, last_number: bool = True
) -> str | None:
    """The final-answer text by the first enabled rule that finds one, or None."""
    return _extract(completion, boxed=boxed, gsm8k=gsm8k, answer_is=answer_is, last_number=last_number)[1]


def _extract(
    completion: str, *, boxed: bool, gsm8k: bool, answer_is: bool, last_number: bool
) -> tuple[str | None, str | None]:
    """(the rule that found the answer, its text), or (None, None)."""
    if boxed and (boxes := find_boxed(completion)):
        return "boxed", boxes[-1].strip()
    if gsm8k and (hits := _GSM8K.findall(completion)):
        return "gsm8k", _tidy(hits[-1])
    if answer_is and (hits := _ANSWER_IS.findall(completion)):
        return "answer_is", _tidy(hits[-1])
    if last_number and (hits := _NUMBER.findall(completion)):
        return "last_number", hits[-1].replace(" ", "")
    return None, None


# Words that join numbers into a hedge ("69 or maybe 70") or, for a single-number gold, into
# a list of answers ("69 and 70", "69 to 70"); any other word or symbol between two numbers
# ("3 + 4 = 7", "5 apples give 10") means they are not alternatives.
_HEDGE_WORDS = frozenset({"or", "either", "maybe", "perhaps", "possibly", "probably", "rather", "else", "otherwise"})
_LIST_WORDS = frozenset({"and", "to"})
_TEXT_COMMAND = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_GAP_FILLER = re.compile(r"[\s,;/&.?!()$~]|\\(?:quad|qquad|[,;: ])")


def hedged(text: str, single_gold: bool, only_last: bool = False) -> bool:
    """Whether `text` offers several different numbers as the answer (see the module doc).

    `only_last`: look at the last two numbers only (the last-number step's final statement).
    """
    text = _SPACED_THOUSANDS.sub("", text)  # 1\,000 is one number
    numbers = list(_NUMBER.finditer(text))
    pairs = list(itertools.pairwise(numbers))
    if only_last:
        pairs = pairs[-1:]
    for first, second in pairs:
        if _number_value(first.group()) == _number_value(second.group()):
            continue
        gap = _TEXT_COMMAND.sub(r" \1 ", text[first.end() : second.start()]).lower()
        words = re.findall(r"[a-z]+", gap)
        if _GAP_FILLER.sub("", re.sub(r"[a-z]+", "", gap)) or len(gap) > 40:
            continue  # an operator, a unit, a sentence: not a list of alternatives
        others = [w for w in words if w not in _HEDGE_WORDS | _LIST_WORDS]
        if any(w in _HEDGE_WORDS for w in words) and len(others) <= 2:  # "69 apples or maybe 70"
            return True
        listed = (words and all(w in _LIST_WORDS for w in words)) or (not words and re.search(r"[,;/&]", gap))
        if single_gold and listed:
            return True
    return False


def _number_value(text: str) -> str:
    return text.replace(",", "").replace(" ", "")


def answers_match(answer: str, gold: str) -> bool:
    """Whether answer text `answer` means the same as gold answer text `gold`."""
    return _equal(_parse_gold(gold), _parse_answer(answer))


def _tidy(text: str) -> str:
    """The answer part of "the answer is ...": inline math, else up to the sentence's end.

    "$x, y$." -> "x, y"; "7, which is prime." -> "7"; "3.5." -> "3.5".
    """
    text = text.strip()
    if text.startswith("$") and (end := text.find("$", 1)) > 0:
        return text[1:end].strip()
    text = _SENTENCE_END.split(text, maxsplit=1)[0]
    return _CLAUSE.split(text, maxsplit=1)[0].strip()


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _mv():
    # math-verify (with sympy and the LaTeX grammar) costs half a second to import: only
    # processes that actually check math answers pay it.
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # one warning per unparsable answer
    return math_verify


def _parse_answer(text: str) -> list:
    mv = _mv()
    text = _SPACED_THOUSANDS.sub("", text.strip().strip("$"))
    if not text:
        return []
    configs = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    parsed = mv.parse(f"${text}$", extraction_config=configs, parsing_timeout=None)
    if not parsed:  # plain text math-verify reads better without the LaTeX wrapper
        parsed = mv.parse(text, extraction_config=[mv.ExprExtractionConfig()], parsing_timeout=None)
    return parsed


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    parsed = _parse_answer(gold) if "\\boxed" not in gold else _parse_answer(find_boxed(gold)[-1])
    if not parsed:
        raise ValueError(f"cannot parse the gold answer {gold!r}")
    return parsed


def _equal(gold: list, answer: list) -> bool:
    if not gold or not answer or _too_large(gold) or _too_large(answer):
        return False
    return bool(_mv().verify(gold, answer, timeout_seconds=None))


def _too_large(parsed: list) -> bool:
    sympy = _sympy()
    return any(isinstance(e, sympy.Basic) and _cost_digits(e) > MAX_DIGITS for e in parsed)


def _sympy():
    import sympy

    return sympy


# Functions sympy evaluates exactly to integers that grow like n! (digits ~ n log n).
_FACTORIAL_LIKE = (
    "factorial",
    "factorial2",
    "subfactorial",
    "gamma",
    "RisingFactorial",
    "FallingFactorial",
    "primorial",
)


def _cost_digits(expr) -> float:
    """Upper estimate of log10 |value| of `expr`: the digits sympy may have to build for it.

    Magnitudes are tracked as logarithms, so a tower like 10^(10^(10^10)) comes out as
    infinity instead of being computed. A symbol counts as a one-digit value: a symbolic
    power (x+1)^n costs about n terms when expanded, which the same estimate covers.
    """
    sympy = _sympy()
    if expr.is_Integer:
        return _log10(int(expr))
    if expr.is_Rational:
        return max(_log10(expr.p), _log10(expr.q))
    if expr.is_Float:
        return _log10(float(expr)) if math.isfinite(float(expr)) else math.inf
    if not expr.args:
        return 1.0  # a symbol or a constant such as pi
    costs = [_cost_digits(a) for a in expr.args]
    name = type(expr).__name__
    if isinstance(expr, sympy.Pow):
        base, exponent = costs
        if base == 0.0:
            return 0.0  # 1^e and 0^e stay small whatever e is
        return math.inf if exponent > 300 else base * 10.0**exponent
    if name in _FACTORIAL_LIKE:
        n = costs[0]
        return math.inf if n > 300 else 10.0**n * max(n, 1.0)
    if name == "binomial":
        n, k = costs
        return math.inf if k > 300 else 10.0**k * max(n, 1.0)
    if isinstance(expr, sympy.Mul):
        return sum(costs)
    return max(costs)


def _log10(value: int | float) -> float:
    value = abs(value)
    if value <= 1:
        return 0.0
    if isinstance(value, int) and value.bit_length() > 1000:
        return value.bit_length() * math.log10(2)  # beyond float range
    return math.log10(value)
