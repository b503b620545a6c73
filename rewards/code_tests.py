"""The ``code`` reward: run the completion's program against the row's tests in the sandbox.

The program is the last fenced Python block of the completion (```python, ```py or a bare
```), else the whole text. When it does not define the row's ``entry_point`` and the row
has a ``prompt``, it is taken as a continuation of that prompt (HumanEval completions are
function bodies) and the prompt is put in front.

Three test formats, all run when present:

* **HumanEval** (``test`` defining ``check(candidate)``, and ``entry_point``): one test.
  ``check`` runs here, in the trusted scoring process, with the row's ``prompt`` executed
  first for helpers it uses (``poly`` in HumanEval/32); ``candidate`` is a stand-in that
  calls the real function inside the sandbox.
* **assert list** (``tests: list[str]``): each item containing an ``assert`` is one test,
  run here against stand-ins for the program's functions; other items (``import math``)
  are set-up run before them. A program that crashes is restarted for the next test.
* **stdin/stdout** (``io: list[{input, output}]``): each case is one test, a fresh run of
  the program; it passes when it exits 0 and its output matches (trailing whitespace of
  each line and trailing blank lines ignored).

Reward: ``all_or_nothing`` (1.0 when every test passes, stopping at the first failure) or
``fraction`` (passed / total). ``timeout_s`` is the CPU-time budget of all of a
completion's tests together (all its processes counted); ``wall_s`` a wall-clock backstop
for programs that wait instead of computing (default ``2 * timeout_s + 5``): CPU time, not
the clock, decides, so a correct program is scored correctly however busy the machine is.
The candidate's failures (wrong answer, a crash such as NameError or a missing import, a
wrong signature, a timeout, an exit before answering) score 0 and say why (``Explained``:
the text lands in the row's error column); failures of the harness or the row (sandbox
not working, a test that references an undefined helper) raise, so the row gets NaN and
the error text.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field

from rewards.registry import Explained, register
from rewards.sandbox import CandidateError, Isolation, Limits, RunResult, Session, SessionBroken, run_script

_FENCE_ANY = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def _wall_s(options: Mapping[str, Any]) -> float:
    return options["wall_s"] if options.get("wall_s") else 2 * options["timeout_s"] + 5.0


@register("code", time_limit_s=lambda options: _wall_s(options) + 15.0)
def code_reward(
    completion: str,
    example: Mapping[str, Any],
    *,
    mode: Literal["all_or_nothing", "fraction"] = "all_or_nothing",
    timeout_s: Annotated[float, Field(gt=0)] = 10.0,
    wall_s: Annotated[float, Field(gt=0)] | None = None,
    memory_mb: Annotated[int, Field(ge=64)] = 1024,
    namespaces: bool = True,
    python: str | None = None,
) -> float:
    """Fraction of the row's tests the completion's program passes (or 1/0 all-or-nothing).

    `namespaces=False` runs the programs with Landlock and seccomp only (what a kernel
    without user namespaces gets; for tests of that path); `python` is the interpreter the
    programs run in (default: the scorer's)."""
    program = extract_program(completion)
    entry_point = example.get("entry_point")
    prompt = example.get("prompt")
    if prompt and entry_point and not defines(program, entry_point):
        program = prompt + program
    wall = _wall_s({"timeout_s": timeout_s, "wall_s": wall_s})
    budget = _Budget(
        timeout_s,
        time.monotonic() + wall,
        memory_mb,
        mode == "all_or_nothing",
        Isolation(namespaces=namespaces, python=python),
    )
    results: list[bool] = []
    if example.get("test") and entry_point:
        results += [_humaneval(program, example["test"], entry_point, prompt, budget)]
    if example.get("tests") and not (budget.stop_at_first_failure and False in results):
        results += _assert_list(program, example["tests"], budget)
    if example.get("io") and not (budget.stop_at_first_failure and False in results):
        results += _stdin_stdout(program, example["io"], budget)
    if not results:
        raise ValueError("the code reward needs 'test' + 'entry_point', 'tests' or 'io' in the row")
    value = float(all(results)) if budget.stop_at_first_failure else sum(results) / len(results)
    return Explained(value, budget.why) if budget.why and value < 1.0 else value


def extract_program(completion: str) -> str:
    """The last fenced Python block of `completion` (bare fences count), else all of it."""
    blocks = [body for lang, body in _FENCE_ANY.findall(completion) if lang.lower() in ("", "python", "python3", "py")]
    return blocks[-1] if blocks else completion


def defines(program: str, name: str) -> bool:
    """Whether `program` defines `name` at module level (function, class or assignment)."""
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


class _Budget:
    """The CPU-time and wall-clock budget shared by all tests of one completion, and the
    first reason a test failed."""

    def __init__(
        self, cpu_s: float, deadline: float, memory_mb: int, stop_at_first_failure: bool, isolation: Isolation
    ):
        self.cpu_left = cpu_s
        self.deadline = deadline
        self.memory_mb = memory_mb
        self.stop_at_first_failure = stop_at_first_failure
        self.isolation = isolation
        self.why: str | None = None
        self._counted: set[int] = set()

    def limits(self) -> Limits | None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0.05 or self.cpu_left <= 0.01:
            self.failed("the program used up its time budget")
            return None
        return Limits(wall_s=remaining, cpu_s=self.cpu_left, memory_mb=self.memory_mb)

    def spent(self, run: RunResult | None) -> None:
        if run is not None and id(run) not in self._counted:  # a closed session reports the same result again
            self._counted.add(id(run))
            self.cpu_left -= run.cpu_s
            if run.limit:
                self.failed(_LIMIT_TEXT[run.limit])

    def failed(self, why: str) -> None:
        if self.why is None:
            self.why = why[:2000]


_LIMIT_TEXT = {
    "cpu": "the program ran past its CPU-time limit",
    "wall": "the program ran past its wall-clock limit",
    "memory": "the program ran past its memory limit",
    "output": "the program wrote more output than allowed",
}


def _humaneval(program: str, test: str, entry_point: str, prompt: str | None, budget: _Budget) -> bool:
    trusted: dict[str, Any] = {"__name__": "__test__"}
    if prompt and _compiles(prompt):
        # The dataset's prompt (not the completion) defines helpers that check() may use.
        exec(compile(prompt, "<prompt>", "exec"), trusted)
    exec(compile(test, "<test>", "exec"), trusted)
    check = trusted.get("check")
    if not callable(check):
        raise ValueError("the row's 'test' code does not define check(candidate)")
    limits = budget.limits()
    if limits is None:
        return False
    session = Session(program, limits, budget.isolation)
    try:
        if not session.ready:
            budget.failed(_start_failure(session))
            return False
        if entry_point not in session.names:
            budget.failed(f"the program does not define {entry_point}()")
            return False
        candidate = session.function(entry_point)
        trusted[entry_point] = candidate  # tests may call it by name (HumanEval/33 does)
        try:
            check(candidate)
        except (SessionBroken, CandidateError) as err:
            budget.failed(str(err))
            return False
        except NameError as err:
            # Only the test code names things here; the candidate's errors arrive as CandidateError.
            raise ValueError(f"the row's test code failed: NameError: {err}") from None
        except Exception as err:  # AssertionError, or the candidate's wrong value breaking the test
            budget.failed(_test_failure(err))
            return False
        if session.calls == 0:
            budget.failed("the test never called the program")
        return session.failure is None and session.calls > 0
    finally:
        budget.spent(session.close())


def _start_failure(session: Session) -> str:
    """Why a program never got ready: the last line of its traceback, or the limit it hit."""
    result = session.close()
    if result.limit:
        return _LIMIT_TEXT[result.limit]
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return (
        f"the program failed before its functions could be called: {lines[-1][:500]}"
        if lines
        else (session.failure or "")
    )


def _test_failure(err: Exception) -> str:
    text = str(err)[:300]
    return f"a test failed: {type(err).__name__}" + (f": {text}" if text else "")


def _assert_list(program: str, tests: Sequence[str], budget: _Budget) -> list[bool]:
    setup = [t for t in tests if not _has_assert(t)]
    cases = [t for t in tests if _has_assert(t)]
    results: list[bool] = []
    session: Session | None = None
    namespace: dict[str, Any] = {}
    try:
        for case in cases:
            if session is None or session.failure is not None:
                if session is not None:
                    budget.spent(session.close())
                limits = budget.limits()
                if limits is None:
                    break
                session = Session(program, limits, budget.isolation)
                if not session.ready:
                    budget.failed(_start_failure(session))
                    break  # it fails at start-up; it would again for every test
                namespace = _trusted_namespace(session, [*setup, *cases])
                for statement in setup:
                    exec(compile(statement, "<test setup>", "exec"), namespace)
            results.append(_passes(case, namespace, session, budget))
            if budget.stop_at_first_failure and not results[-1]:
                break
    finally:
        if session is not None:
            budget.spent(session.close())
    return results + [False] * (len(cases) - len(results))


def _passes(case: str, namespace: dict[str, Any], session: Session, budget: _Budget) -> bool:
    try:
        exec(compile(case, "<test>", "exec"), namespace)
    except (SessionBroken, CandidateError) as err:
        budget.failed(str(err))
        return False
    except Exception as err:  # a failed assert, or the candidate's value broke the test
        budget.failed(_test_failure(err))
        return False
    return session.failure is None


def _trusted_namespace(session: Session, statements: Sequence[str]) -> dict[str, Any]:
    """Stand-ins for the program's functions, plus the standard modules the tests name."""
    namespace: dict[str, Any] = {"__name__": "__test__"}
    for name in session.names:
        if not hasattr(builtins, name):  # a program defining `sorted` must not hijack the test's
            namespace[name] = session.function(name)
    for statement in statements:
        for node in ast.walk(ast.parse(statement)):
            if isinstance(node, ast.Name) and node.id not in namespace and node.id in sys.stdlib_module_names:
                namespace[node.id] = importlib.import_module(node.id)
    return namespace


def _has_assert(statement: str) -> bool:
    try:
        return any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(statement)))
    except SyntaxError as err:
        raise ValueError(f"a test in the row's 'tests' is not valid Python: {statement[:200]!r} ({err})") from None


def _stdin_stdout(program: str, cases: Sequence[Mapping[str, Any]], budget: _Budget) -> list[bool]:
    results = []
    for case in cases:
        limits = budget.limits()
        if limits is None:
            break
        run = run_script(
            program, stdin=str(case.get("input") or "").encode(), limits=limits, isolation=budget.isolation
        )
        budget.spent(run)
        same = _same_output(run.stdout.decode(errors="replace"), str(case.get("output") or ""))
        results.append(run.ok and same)
        if not run.ok and not run.limit:
            lines = run.stderr.decode(errors="replace").strip().splitlines()
            budget.failed(f"the program exited with status {run.exit_code}" + (f": {lines[-1][:500]}" if lines else ""))
        elif not same:
            budget.failed("the program's output differs from the expected output")
        if budget.stop_at_first_failure and not results[-1]:
            break
    return results + [False] * (len(cases) - len(results))


def _same_output(got: str, expected: str) -> bool:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.replace("\r\n", "\n").rstrip().split("\n")]

    return lines(got) == lines(expected)


def _compiles(source: str) -> bool:
    try:
        compile(source, "<prompt>", "exec")
    except SyntaxError:
        return False
    return True
