"""Collect and run the tests of a pytest-style test file (KodCode's layout) in this process.

The ``code`` reward executes the row's test file in the trusted scoring process, with the
program's functions as stand-ins that call into the sandbox (``rewards/code_tests.py``).
This module finds the tests in the executed file the way pytest's default collection does
and runs each one with what it asks for:

* functions named ``test*`` and methods ``test*`` of classes ``Test*`` without ``__init__``
  (a fresh instance per test, ``setup_method``/``teardown_method`` around it), defined in
  the file itself (a program's function imported under a ``test_`` name is not a test);
* ``@pytest.mark.parametrize`` (stacked marks multiply; ``pytest.param`` values and marks),
  each parameter set one test, named ``test_f[1-2]`` as pytest names them;
* fixtures defined in the file with ``@pytest.fixture``, depending on one another, plain
  or ``yield`` (the code after the yield runs after the test), ``autouse`` included; each
  test gets its own instances (any scope), which a test cannot tell apart from pytest's;
* ``skip``, ``skipif`` (a boolean condition) and ``xfail`` marks: such tests are left out of
  the count, as pytest never fails a run over them.

Why not run pytest itself. Its session is process-wide state (``sys.modules``, import hooks
for assertion rewriting, file-descriptor capture, ``sys.path``/rootdir and ``conftest.py``
discovery from the filesystem), not safe in a scoring worker that runs rows in threads,
and about 0.1 s per row to start. Running it inside the sandbox instead would hand the
verdict to the candidate's process (a ``conftest.py``, ``sys.exit(0)`` or an ``atexit`` hook
there decides the exit status). What the test files of code datasets use is this small
part of pytest; ``pytest.raises``, ``pytest.approx`` and the marks themselves are pytest's
own objects (the file imports pytest as usual). Anything else a test asks for (a built-in
fixture such as ``capsys`` or ``tmp_path``, a parametrized fixture, an ``async`` test)
raises `TestFileError`: the row cannot be scored here, which the reward reports as NaN
rather than as a verdict.
"""

from __future__ import annotations

import ast
import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


class TestFileError(Exception):
    """The test file asks for something this runner does not provide (the row's fault)."""

    __test__ = False  # not a test class, for pytest collecting this project's own tests


@dataclass(frozen=True)
class TestItem:
    """One test: a function (or method) and the parameters it runs with."""

    __test__ = False

    name: str
    function: Callable[..., Any]
    owner: type | None
    params: Mapping[str, Any]
    fixtures: Mapping[str, Any]  # fixture name -> fixture definition (pytest's object)

    def run(self) -> None:
        instance = self.owner() if self.owner is not None else None
        bound = self.function.__get__(instance) if instance is not None else self.function
        cleanups: list[Iterator[Any]] = []
        values: dict[str, Any] = {}
        try:
            for name, fixture in self.fixtures.items():
                if _fixture_marker(fixture).autouse:
                    self._fixture_value(name, values, cleanups, ())
            kwargs = {}
            for name in _argument_names(self.function, skip_self=instance is not None):
                if name in self.params:
                    kwargs[name] = self.params[name]
                else:
                    kwargs[name] = self._fixture_value(name, values, cleanups, ())
            if instance is not None and hasattr(instance, "setup_method"):
                instance.setup_method(bound)
            try:
                bound(**kwargs)
            finally:
                if instance is not None and hasattr(instance, "teardown_method"):
                    instance.teardown_method(bound)
        finally:
            for generator in reversed(cleanups):
                for _ in generator:  # a yield fixture's tear-down: the code after its yield
                    raise TestFileError("a yield fixture yielded more than once")

    def _fixture_value(self, name: str, values: dict[str, Any], cleanups: list, chain: tuple[str, ...]) -> Any:
        if name in values:
            return values[name]
        if name in self.params:
            return self.params[name]
        if name in chain:
            raise TestFileError(f"fixtures depend on each other in a circle: {' -> '.join((*chain, name))}")
        fixture = self.fixtures.get(name)
        if fixture is None:
            raise TestFileError(f"{self.name} uses the fixture '{name}', which the file does not define")
        marker = _fixture_marker(fixture)
        if getattr(marker, "params", None):
            raise TestFileError(f"the fixture '{name}' is parametrized, which is not supported")
        function = _fixture_function(fixture)
        arguments = {
            arg: self._fixture_value(arg, values, cleanups, (*chain, name)) for arg in _argument_names(function)
        }
        if inspect.isgeneratorfunction(function):
            generator = function(**arguments)
            values[name] = next(generator)
            cleanups.append(generator)
        else:
            values[name] = function(**arguments)
        return values[name]


def is_pytest_file(source: str) -> bool:
    """Whether `source` defines test functions or test classes at module level."""
    return count_test_functions(source) > 0


def count_test_functions(source: str) -> int:
    """Test functions and test methods in `source` by its syntax (parameter sets not
    expanded): the count when the file cannot be run at all."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ValueError(f"the row's 'test' is not valid Python: {err}") from None
    count = 0
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            count += 1
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            count += sum(
                isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test")
                for item in node.body
            )
    return count


def collect_tests(namespace: Mapping[str, Any], filename: str) -> list[TestItem]:
    """The tests of an executed file (`namespace`, compiled as `filename`), in file order."""
    fixtures = {}
    for value in namespace.values():
        if _is_fixture(value):
            fixtures[_fixture_name(value)] = value
    module_marks = _marks(namespace.get("pytestmark"))
    items: list[TestItem] = []
    for name, value in list(namespace.items()):
        if name.startswith("test") and _defined_here(value, filename):
            items += _expand(name, value, None, module_marks, fixtures)
        elif name.startswith("Test") and inspect.isclass(value) and "__init__" not in vars(value):
            class_marks = module_marks + _marks(getattr(value, "pytestmark", None))
            for method_name, method in vars(value).items():
                if method_name.startswith("test") and _defined_here(method, filename):
                    items += _expand(f"{name}::{method_name}", method, value, class_marks, fixtures)
    return items


def _defined_here(value: Any, filename: str) -> bool:
    return inspect.isfunction(value) and value.__code__.co_filename == filename


def _expand(name: str, function, owner, outer_marks: list, fixtures: Mapping[str, Any]) -> list[TestItem]:
    if inspect.iscoroutinefunction(function):
        raise TestFileError(f"{name} is an async test, which is not supported")
    marks = outer_marks + _marks(getattr(function, "pytestmark", None))
    if _left_out(marks, name):
        return []
    parametrize = [m for m in marks if m.name == "parametrize"]
    if not parametrize:
        return [TestItem(name, function, owner, {}, fixtures)]
    axes = [_parameter_sets(mark, name) for mark in parametrize]  # pytestmark lists the innermost decorator first
    items = []
    for combination in itertools.product(*axes):
        params: dict[str, Any] = {}
        ids = []
        skipped = False
        for values, set_id, set_marks in combination:
            params.update(values)
            ids.append(set_id)
            skipped = skipped or _left_out(set_marks, name)
        if not skipped:
            items.append(TestItem(f"{name}[{'-'.join(ids)}]", function, owner, params, fixtures))
    return items


def _parameter_sets(mark, test_name: str) -> list[tuple[dict[str, Any], str, list]]:
    argnames, argvalues = mark.args[0], mark.args[1]
    names = [n.strip() for n in argnames.split(",") if n.strip()] if isinstance(argnames, str) else list(argnames)
    given_ids = mark.kwargs.get("ids")
    sets = []
    for index, entry in enumerate(argvalues):
        set_marks: list = []
        set_id = None
        values = entry
        if type(entry).__name__ == "ParameterSet":  # pytest.param(...)
            values, set_marks, set_id = entry.values, list(entry.marks), entry.id
        elif len(names) == 1:
            values = (entry,)
        if len(names) == 1 and type(entry).__name__ == "ParameterSet":
            values = tuple(values)
        if len(values) != len(names):
            raise TestFileError(f"{test_name}: a parameter set of {argnames!r} has {len(values)} values")
        if set_id is None and isinstance(given_ids, (list, tuple)) and index < len(given_ids):
            set_id = str(given_ids[index])
        if set_id is None:
            set_id = "-".join(_id_part(v, n, index) for v, n in zip(values, names, strict=True))
        sets.append((dict(zip(names, values, strict=True)), set_id, [_plain_mark(m) for m in set_marks]))
    return sets


def _id_part(value: Any, name: str, index: int) -> str:
    # pytest's own ids: scalars as text, anything else the argument name and the set's index.
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value)
    return f"{name}{index}"


def _marks(value: Any) -> list:
    if value is None:
        return []
    marks = value if isinstance(value, list) else [value]
    return [_plain_mark(m) for m in marks]


def _plain_mark(mark: Any) -> Any:
    return getattr(mark, "mark", mark)  # a MarkDecorator holds its Mark


def _left_out(marks: list, name: str) -> bool:
    """Skipped or expected to fail: pytest never fails a run over such a test."""
    for mark in marks:
        if mark.name in ("skip", "xfail"):
            condition = mark.args[0] if mark.args else mark.kwargs.get("condition", True)
            if isinstance(condition, str):
                raise TestFileError(f"{name}: a {mark.name} condition given as text is not supported")
            if condition:
                return True
        elif mark.name == "skipif":
            conditions = mark.args or (mark.kwargs.get("condition"),)
            if any(isinstance(c, str) for c in conditions):
                raise TestFileError(f"{name}: a skipif condition given as text is not supported")
            if any(conditions):
                return True
    return False


def _is_fixture(value: Any) -> bool:
    # pytest >= 8.4 wraps fixtures in FixtureFunctionDefinition; older ones mark the function.
    return type(value).__name__ == "FixtureFunctionDefinition" or hasattr(value, "_pytestfixturefunction")


def _fixture_marker(fixture: Any) -> Any:
    return getattr(fixture, "_fixture_function_marker", None) or fixture._pytestfixturefunction


def _fixture_name(fixture: Any) -> str:
    marker = _fixture_marker(fixture)
    return getattr(marker, "name", None) or _fixture_function(fixture).__name__


def _fixture_function(fixture: Any) -> Callable[..., Any]:
    if hasattr(fixture, "_get_wrapped_function"):
        return fixture._get_wrapped_function()
    return fixture.__pytest_wrapped__.obj


def _argument_names(function: Callable[..., Any], skip_self: bool = False) -> list[str]:
    parameters = list(inspect.signature(function).parameters.values())
    if skip_self and parameters:
        parameters = parameters[1:]
    names = []
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty:
            continue  # pytest passes nothing for an argument with a default
        names.append(parameter.name)
    return names
