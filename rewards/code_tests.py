"""The ``code`` reward: run the completion's program against the row's tests in the sandbox.

The program is the last fenced Python block of the completion (```python, ```py or a bare
```), else the whole text. For a HumanEval row whose program does not define the
``entry_point``, the program is taken as a continuation of the row's ``prompt`` (HumanEval
completions are function bodies) and the prompt is put in front.

Five test layouts, each run when present (``data/sources.py`` reads them from the columns
the datasets publish; docs/rewards.md has the sources):

* **HumanEval** (``test`` defining ``check(candidate)``, and ``entry_point``): one test.
  ``check`` runs here, in the trusted scoring process, with the row's ``prompt`` executed
  first for helpers it uses (``poly`` in HumanEval/32); ``candidate`` is a stand-in that
  calls the real function inside the sandbox.
* **pytest file** (``test`` defining ``test_*`` functions or ``Test*`` classes, KodCode):
  the file runs here; ``from solution import f`` / ``import solution`` give stand-ins for
  the program's functions. Each test function (each parameter set of a parametrized one)
  is a test; fixtures defined in the file, ``parametrize``, ``skip``/``skipif``/``xfail``
  marks and ``setup_method``/``teardown_method`` work as in pytest (``rewards/pytest_file.py``).
* **assert list** (``tests: list[str]``): each item containing an ``assert`` is one test,
  run here against stand-ins for the program's functions; other items (``import math``)
  are set-up run before them. A program that crashes is restarted for the next test.
* **call-based** (``entry_point`` + ``io`` without ``test``: APPS/TACO ``input_output`` with
  ``fn_name``, LiveCodeBench's functional cases): each case calls the function (or, when the
  program defines none, the method of the same name of a fresh ``Solution()``) with the
  case's arguments (its ``input``: one JSON value per line) and compares the result with
  its ``output`` (JSON) as the datasets do: as the result would serialise to JSON (tuples
  are lists, dict keys text), floats to a tolerance, and an expected one-item list also
  matched by its item (APPS wraps return values so).
* **stdin/stdout** (``io: list[{input, output}]``, no ``entry_point``): each case is one
  test, a fresh run of the program; it passes when it exits 0 and its output matches line
  by line (trailing whitespace and trailing blank lines ignored; else token by token, with
  numbers equal to a tolerance).

A call that raises one of Python's ordinary errors raises a fresh error of that class in
the test (``rewards.sandbox.PLAIN_ERRORS``): a test may require it (``pytest.raises``);
anything else raised stays ``CandidateError`` and fails the test.

Reward: ``all_or_nothing`` (1.0 when every test passes, stopping at the first failure) or
``fraction`` (passed / total). ``timeout_s`` is the CPU-time budget of all of a
completion's tests together (all its processes counted); ``wall_s`` a wall-clock backstop
for programs that wait instead of computing (default ``2 * timeout_s + 5``): CPU time, not
the clock, decides, so a correct program is scored correctly however busy the machine is.
The candidate's failures (wrong answer, a crash such as NameError or a missing import, a
wrong signature, a timeout, an exit before answering, any exception the test code raises
because of it, pytest's ``Failed`` included) score 0 and say why (``Explained``: the text
lands in the row's error column, with how many tests passed and ran: ``passed 2 of 5 tests
(3 ran); first failure: ...``); failures of the harness or the row (sandbox not working, a
test that references an undefined helper, a fixture this harness cannot provide) raise, so
the row gets NaN and the error text.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import math
import re
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field

from rewards.pytest_file import TestFileError, TestItem, collect_tests, count_test_functions, is_pytest_file
from rewards.registry import Explained, register
from rewards.sandbox import CandidateError, Isolation, Limits, RunResult, Session, SessionBroken, run_script

_FENCE_ANY = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)
# The module name a pytest-style test file imports the program as (KodCode: `from solution import f`).
SOLUTION_MODULE = "solution"
# Floats compare as numpy.allclose does by default, the rule APPS and TACO state for outputs.
FLOAT_RTOL = 1e-5
FLOAT_ATOL = 1e-8
# Put in front of call-based programs: the imports LeetCode-style solutions take for granted
# (`List[int]` without importing it). LiveCodeBench and APPS prepend a header like this one.
CALL_HEADER = (
    "import sys, math, string, re, itertools, collections, heapq, bisect, functools, operator, random, copy\n"
    "from typing import *\nfrom collections import *\nfrom itertools import *\nfrom functools import *\n"
    "from heapq import *\nfrom bisect import *\nfrom math import *\nsys.setrecursionlimit(50000)\n"
)
_SOLUTION_CALL = "__grpoflow_solution_call__"


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
    test = example.get("test")
    humaneval = bool(test) and _defines_function(test, "check")
    if humaneval and not entry_point:
        raise ValueError("the row's 'test' defines check(candidate) but the row has no 'entry_point'")
    if test and not humaneval and not is_pytest_file(test):
        raise ValueError("the row's 'test' defines neither check(candidate) nor pytest test functions")
    wall = _wall_s({"timeout_s": timeout_s, "wall_s": wall_s})
    budget = _Budget(
        timeout_s,
        time.monotonic() + wall,
        memory_mb,
        mode == "all_or_nothing",
        Isolation(namespaces=namespaces, python=python),
    )
    layouts: list[Callable[[], None]] = []
    if humaneval:
        if prompt and not defines(program, entry_point):
            program = prompt + program
        layouts.append(lambda: _humaneval(program, test, entry_point, prompt, budget))
    elif test:
        layouts.append(lambda: _pytest_file(program, test, budget))
    if example.get("tests"):
        layouts.append(lambda: _assert_list(program, example["tests"], budget))
    if example.get("io") and entry_point and not test:
        layouts.append(lambda: _call_based(program, entry_point, example["io"], budget))
    elif example.get("io"):
        layouts.append(lambda: _stdin_stdout(program, example["io"], budget))
    if not layouts:
        raise ValueError("the code reward needs 'test' (+ 'entry_point' for check()), 'tests' or 'io' in the row")
    for run_layout in layouts:
        if budget.stop_at_first_failure and budget.why is not None:
            break
        run_layout()
    if budget.total == 0:
        raise ValueError("the row's tests hold no test to run (every test skipped, or none collected)")
    value = float(budget.passed == budget.total) if budget.stop_at_first_failure else budget.passed / budget.total
    if value < 1.0:
        counts = f"passed {budget.passed} of {budget.total} tests ({budget.ran} ran)"
        return Explained(value, f"{counts}; first failure: {budget.why}" if budget.why else counts)
    return value


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


def _defines_function(source: str, name: str) -> bool:
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ValueError(f"the row's 'test' is not valid Python: {err}") from None
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in tree.body)


class _Budget:
    """The CPU-time and wall-clock budget shared by all tests of one completion, the count
    of tests (total, ran, passed) and the first reason a test failed."""

    def __init__(
        self, cpu_s: float, deadline: float, memory_mb: int, stop_at_first_failure: bool, isolation: Isolation
    ):
        self.cpu_left = cpu_s
        self.deadline = deadline
        self.memory_mb = memory_mb
        self.stop_at_first_failure = stop_at_first_failure
        self.isolation = isolation
        self.why: str | None = None
        self.total = self.ran = self.passed = 0
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

    def record(self, passed: bool) -> bool:
        """Count one test that ran; whether to go on with the next."""
        self.ran += 1
        self.passed += passed
        return passed or not self.stop_at_first_failure


_LIMIT_TEXT = {
    "cpu": "the program ran past its CPU-time limit",
    "wall": "the program ran past its wall-clock limit",
    "memory": "the program ran past its memory limit",
    "output": "the program wrote more output than allowed",
}


class _Program:
    """The candidate's program in one sandboxed session, restarted after a crash.

    Stand-ins made by `function` call whichever session is current, so test code that
    holds them (a test file's `from solution import f`) goes on working after a restart."""

    def __init__(self, source: str, budget: _Budget):
        self.source = source
        self.budget = budget
        self.session: Session | None = None

    def start(self) -> bool:
        """A session ready to answer (a new one if the last crashed); False when the program
        cannot start (its failure recorded), or the budget is spent."""
        if self.session is not None and self.session.failure is None:
            return True
        self.close()
        limits = self.budget.limits()
        if limits is None:
            return False
        self.session = Session(self.source, limits, self.budget.isolation)
        if not self.session.ready:
            self.budget.failed(_start_failure(self.session))
            return False
        return True

    @property
    def names(self) -> list[str]:
        return self.session.names if self.session is not None else []

    def function(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.session is None:
                raise SessionBroken("the program is not running")
            return self.session.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            self.budget.spent(session.close())


def _passes(
    action: Callable[[], object],
    program: _Program,
    budget: _Budget,
    label: str = "",
    star_imported: frozenset[str] | None = None,
) -> bool:
    """Run trusted test code; True when it finished and the program kept answering.

    Whatever the test code raises because of the candidate is the candidate's 0: a failed
    assert, an error of the program's raised into the test, pytest's `Failed` (a
    BaseException) from `pytest.raises` that saw nothing raised, a `Skipped`. A NameError
    is the test code's own fault (the candidate's never reach it as one): NaN. A real
    KeyboardInterrupt is the operator's. `star_imported`: the test file takes names from the
    program with ``from solution import *``; a NameError for one it does not bind itself is
    then the program not defining it (0), not the file's fault."""
    session = program.session
    prefix = f"{label}: " if label else ""
    try:
        action()
    except (SessionBroken, CandidateError) as err:
        budget.failed(prefix + str(err))
        return False
    except KeyboardInterrupt:
        raise
    except TestFileError as err:
        raise ValueError(f"the row's test file cannot be run here: {prefix}{err}") from None
    except NameError as err:
        if star_imported is not None and getattr(err, "name", None) not in star_imported:
            budget.failed(f"{prefix}the program does not define {getattr(err, 'name', None)}, which the tests use")
            return False
        raise ValueError(f"the row's test code failed: {prefix}NameError: {err}") from None
    except BaseException as err:
        if session is not None and session.raised_by_program(err):
            budget.failed(prefix + session.raised_text)
        else:
            budget.failed(prefix + _test_failure(err))
        return False
    return session is None or session.failure is None


def _humaneval(program: str, test: str, entry_point: str, prompt: str | None, budget: _Budget) -> None:
    budget.total += 1
    trusted: dict[str, Any] = {"__name__": "__test__"}
    if prompt and _compiles(prompt):
        # The dataset's prompt (not the completion) defines helpers that check() may use.
        exec(compile(prompt, "<prompt>", "exec"), trusted)
    exec(compile(test, "<test>", "exec"), trusted)
    check = trusted.get("check")
    if not callable(check):
        raise ValueError("the row's 'test' code does not define check(candidate)")
    runner = _Program(program, budget)
    try:
        if not runner.start():
            return
        if entry_point not in runner.names:
            budget.failed(f"the program does not define {entry_point}()")
            budget.record(False)
            return
        candidate = runner.function(entry_point)
        trusted[entry_point] = candidate  # tests may call it by name (HumanEval/33 does)
        passed = _passes(lambda: check(candidate), runner, budget)
        if passed and runner.session.calls == 0:
            budget.failed("the test never called the program")
            passed = False
        budget.record(passed)
    finally:
        runner.close()


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


def _test_failure(err: BaseException) -> str:
    text = str(err)[:300]
    return f"a test failed: {type(err).__name__}" + (f": {text}" if text else "")


def _assert_list(program: str, tests: Sequence[str], budget: _Budget) -> None:
    setup = [t for t in tests if not _has_assert(t)]
    cases = [t for t in tests if _has_assert(t)]
    budget.total += len(cases)
    runner = _Program(program, budget)
    namespace: dict[str, Any] = {}
    own_names = frozenset(set().union(*(_bound_names(ast.parse(t)) for t in tests)) | set(dir(builtins)))
    try:
        for case in cases:
            if runner.session is None or runner.session.failure is not None:
                if not runner.start():
                    break  # it fails at start-up (it would again for every test), or the budget is spent
                namespace = _trusted_namespace(runner, [*setup, *cases])
                for statement in setup:
                    exec(compile(statement, "<test setup>", "exec"), namespace)
            code = compile(case, "<test>", "exec")
            # The tests name the program's functions as if star-imported: a name neither
            # the program nor the tests define is the program's missing function (0).
            passes = _passes(lambda code=code, ns=namespace: exec(code, ns), runner, budget, "", own_names)
            if not budget.record(passes):
                break
    finally:
        runner.close()


def _trusted_namespace(runner: _Program, statements: Sequence[str]) -> dict[str, Any]:
    """Stand-ins for the program's functions, plus the standard modules the tests name."""
    namespace: dict[str, Any] = {"__name__": "__test__"}
    for name in runner.names:
        if not hasattr(builtins, name):  # a program defining `sorted` must not hijack the test's
            namespace[name] = runner.function(name)
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


# --------------------------------------------------------------------------- pytest files


def _pytest_file(program: str, test: str, budget: _Budget) -> None:
    runner = _Program(program, budget)
    try:
        if not runner.start():
            budget.total += count_test_functions(test)  # not collected: the file imports the program
            return
        module, file_binds = _solution_module(runner, test)
        namespace: dict[str, Any] = {
            "__name__": "test_solution",
            "__builtins__": {**vars(builtins), "__import__": _importer(module)},
        }
        collected: list[TestItem] = []

        def load() -> None:
            exec(compile(test, "<test>", "exec"), namespace)
            collected.extend(collect_tests(namespace, "<test>"))

        if not _passes(load, runner, budget, "importing the test file", file_binds):
            # It could not import or build what it needs from the program: every test fails.
            budget.total += count_test_functions(test)
            return
        budget.total += len(collected)
        for item in collected:
            if not runner.start():
                break
            if not budget.record(_passes(item.run, runner, budget, item.name, file_binds)):
                break
    finally:
        runner.close()


def _solution_module(runner: _Program, test: str) -> tuple[types.ModuleType, frozenset[str] | None]:
    """The `solution` module the test file imports: stand-ins for the program's functions,
    and, when the file star-imports it, the names the file binds itself (else None).

    With ``from solution import *`` it exports only names the file does not bind itself: a
    program defining `isclose` must not replace the `math.isclose` the file imported."""
    module = types.ModuleType(SOLUTION_MODULE)
    for name in runner.names:
        if not hasattr(builtins, name):
            setattr(module, name, runner.function(name))
    tree = ast.parse(test)
    star = any(
        isinstance(node, ast.ImportFrom) and node.module == SOLUTION_MODULE and any(a.name == "*" for a in node.names)
        for node in ast.walk(tree)
    )
    if not star:
        return module, None
    bound = _bound_names(tree)
    module.__all__ = [name for name in runner.names if hasattr(module, name) and name not in bound]
    return module, frozenset(bound | set(dir(builtins)))


def _bound_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _importer(module: types.ModuleType) -> Callable[..., Any]:
    """`__import__` for the test file: `solution` is the program's stand-ins, the rest real.

    Only this namespace sees it (no sys.modules entry): scoring threads do not share it."""

    def import_(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name == SOLUTION_MODULE:
            return module
        return builtins.__import__(name, globals, locals, fromlist, level)

    return import_


# --------------------------------------------------------------------------- call-based


def _call_based(program: str, fn_name: str, cases: Sequence[Mapping[str, Any]], budget: _Budget) -> None:
    calls = [(_call_arguments(case, n), _expected(case, n)) for n, case in enumerate(cases)]
    budget.total += len(calls)
    source, target = CALL_HEADER + program, fn_name
    uses_solution_class = not defines(program, fn_name) and defines(program, "Solution")
    if uses_solution_class:
        # LeetCode style (LiveCodeBench): the method of a fresh Solution() per call.
        source += f"\n\ndef {_SOLUTION_CALL}(*args):\n    return Solution().{fn_name}(*args)\n"
        target = _SOLUTION_CALL
    runner = _Program(source, budget)
    try:
        for args, expected in calls:
            if not runner.start():
                break
            if not uses_solution_class and fn_name not in runner.names:
                budget.failed(f"the program does not define {fn_name}() (nor a class Solution with it)")
                break
            got: list[Any] = []
            passed = _passes(lambda got=got, args=args: got.append(runner.session.call(target, args)), runner, budget)
            if passed and not same_value(got[0], expected):
                budget.failed(f"{fn_name}() returned {got[0]!r:.200} where {expected!r:.200} was expected")
                passed = False
            if not budget.record(passed):
                break
    finally:
        runner.close()


def _call_arguments(case: Mapping[str, Any], index: int) -> list[Any]:
    """The case's input: one JSON value per line (LiveCodeBench's form; APPS's argument
    lists are stored so at ingestion). JSON objects with integer-like keys get integer keys,
    as APPS's harness gives them."""
    text = str(case.get("input") or "")
    try:
        args = [json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"io[{index}].input of a call-based row is not one JSON value per line: {err}") from None
    return [_int_keys(a) for a in args]


def _int_keys(value: Any) -> Any:
    if isinstance(value, dict) and value and all(isinstance(k, str) and re.fullmatch(r"-?\d+", k) for k in value):
        return {int(k): v for k, v in value.items()}
    return value


def _expected(case: Mapping[str, Any], index: int) -> Any:
    try:
        return json.loads(str(case.get("output")))
    except json.JSONDecodeError as err:
        raise ValueError(f"io[{index}].output of a call-based row is not JSON: {err}") from None


def same_value(got: Any, expected: Any) -> bool:
    """Whether a returned value matches a call-based case's expected JSON value: compared as
    it would serialise (tuples as lists, dict keys as text), floats to FLOAT_RTOL/FLOAT_ATOL;
    an expected one-item list also matches its item (APPS publishes return values wrapped)."""
    got = _as_json(got)
    if _close(got, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and _close(got, expected[0])


def _as_json(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {_json_key(k): _as_json(v) for k, v in value.items()}
    return value


def _json_key(key: Any) -> Any:
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, (int, float)) or key is None:
        return json.dumps(key)
    return key


def _close(got: Any, expected: Any) -> bool:
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(_close(g, e) for g, e in zip(got, expected, strict=True))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(_close(got[k], expected[k]) for k in got)
    if _is_number(got) and _is_number(expected) and (isinstance(got, float) or isinstance(expected, float)):
        return _numbers_close(float(got), float(expected))
    return (
        type(got) is type(expected)
        and got == expected
        or (_is_number(got) and _is_number(expected) and got == expected)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers_close(got: float, expected: float) -> bool:
    if got == expected:  # the infinities too
        return True
    return (
        math.isfinite(got)
        and math.isfinite(expected)
        and abs(got - expected) <= FLOAT_ATOL + FLOAT_RTOL * abs(expected)
    )


# --------------------------------------------------------------------------- stdin/stdout


def _stdin_stdout(program: str, cases: Sequence[Mapping[str, Any]], budget: _Budget) -> None:
    budget.total += len(cases)
    for case in cases:
        limits = budget.limits()
        if limits is None:
            break
        run = run_script(
            program, stdin=str(case.get("input") or "").encode(), limits=limits, isolation=budget.isolation
        )
        budget.spent(run)
        same = same_output(run.stdout.decode(errors="replace"), str(case.get("output") or ""))
        if not run.ok and not run.limit:
            lines = run.stderr.decode(errors="replace").strip().splitlines()
            budget.failed(f"the program exited with status {run.exit_code}" + (f": {lines[-1][:500]}" if lines else ""))
        elif not same:
            budget.failed("the program's output differs from the expected output")
        if not budget.record(run.ok and same):
            break


def same_output(got: str, expected: str) -> bool:
    """Line by line, trailing whitespace and trailing blank lines ignored; a line that
    differs still matches when its whitespace-separated tokens do, numbers to FLOAT_RTOL /
    FLOAT_ATOL (APPS and TACO accept both)."""

    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.replace("\r\n", "\n").rstrip().split("\n")]

    got_lines, expected_lines = lines(got), lines(expected)
    if len(got_lines) != len(expected_lines):
        return False
    return all(g == e or _same_tokens(g.split(), e.split()) for g, e in zip(got_lines, expected_lines, strict=True))


def _same_tokens(got: list[str], expected: list[str]) -> bool:
    if len(got) != len(expected):
        return False
    for g, e in zip(got, expected, strict=True):
        if g == e:
            continue
        try:
            if not _numbers_close(float(g), float(e)):
                return False
        except ValueError:
            return False
    return True


def _compiles(source: str) -> bool:
    try:
        compile(source, "<prompt>", "exec")
    except SyntaxError:
        return False
    return True
