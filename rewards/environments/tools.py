"""Tools: Python functions the model calls by writing a tool call in its turn.

A tool is a plain function with type hints and a Google-style docstring (``Args:``); its
JSON schema, which the chat template shows the model (``apply_chat_template(tools=...)``),
comes from transformers' own ``get_json_schema``, the function TRL's tool path uses too.

Tool-call formats (``TOOL_CALL_FORMATS``): ``hermes``, the one Hermes 2/3, Qwen2.5 and Qwen3
templates teach: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number per
turn (``arguments`` may also be a JSON string, as OpenAI encodes it). Other formats
(Llama 3.1's bare JSON, Mistral's ``[TOOL_CALLS]``, Qwen3-Coder's XML) are not parsed.

Nothing a call does crashes the stage; each outcome becomes the tool message the model
sees (``error: ...`` for the failures) and a ``ToolCallRecord`` stored with the trajectory:
a call that does not parse, an unknown tool, arguments the function does not take, an
exception (its type and message), a timeout. The arguments are the model's, so a tool is
assumed to hang or blow up on some of them: each call runs in a forked child process that is
killed at the tool's ``timeout_s`` (a thread could not be stopped), and only the result's
text, capped at ``max_result_chars`` in the child, comes back over a pipe (never an object
the tool made). A tool that enforces its own limits, as the code sandbox does, runs in the
caller's process (``in_process=True``): ``python_tool`` runs the model's program in
rewards/sandbox with its CPU, memory and wall-clock limits.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rewards.environments.base import (
    Environment,
    Episode,
    Message,
    Rubric,
    StepResult,
    ToolCallRecord,
    row_messages,
)

DEFAULT_TOOL_TIMEOUT_S = 5.0
DEFAULT_MAX_RESULT_CHARS = 2048
DEFAULT_MAX_CALLS_PER_TURN = 4


@dataclass(frozen=True)
class Tool:
    fn: Callable[..., Any]
    schema: dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S
    max_result_chars: int = DEFAULT_MAX_RESULT_CHARS
    in_process: bool = False  # True only for tools that bound their own time and memory

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def make_tool(
    fn: Callable[..., Any],
    *,
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
    max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
    in_process: bool = False,
) -> Tool:
    """`fn` as a tool; its schema from its signature and docstring (every argument documented)."""
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

    try:
        schema = get_json_schema(fn)
    except (DocstringParsingException, TypeHintParsingException) as err:
        raise ValueError(f"tool {getattr(fn, '__qualname__', fn)!r}: {err}") from None
    if timeout_s <= 0 or max_result_chars < 1:
        raise ValueError(f"tool {schema['function']['name']!r}: timeout_s and max_result_chars must be positive")
    return Tool(fn, schema, timeout_s, max_result_chars, in_process)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class MalformedCall:
    raw: str  # the text inside the tags (or after an unclosed one)
    why: str


_HERMES_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.DOTALL)


def parse_hermes(text: str) -> list[ToolCall | MalformedCall]:
    """Every ``<tool_call>...</tool_call>`` in `text`, in order; a call that does not parse is a
    MalformedCall saying why."""
    calls: list[ToolCall | MalformedCall] = []
    for match in _HERMES_CALL.finditer(text):
        body, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(MalformedCall(body, "unclosed <tool_call> (no </tool_call>)"))
            continue
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(MalformedCall(body, f"the tool call is not JSON ({err.msg} at character {err.pos})"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append(MalformedCall(body, 'a tool call is a JSON object {"name": ..., "arguments": {...}}'))
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI's encoding: the arguments as a JSON string
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(MalformedCall(body, '"arguments" must be a JSON object'))
            continue
        calls.append(ToolCall(call["name"], arguments))
    return calls


TOOL_CALL_FORMATS: dict[str, Callable[[str], list[ToolCall | MalformedCall]]] = {"hermes": parse_hermes}


def tool_call_parser(name: str) -> Callable[[str], list[ToolCall | MalformedCall]]:
    try:
        return TOOL_CALL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call format '{name}'; known: {', '.join(TOOL_CALL_FORMATS)}") from None


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _outcome(fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int) -> tuple[bool, str, int]:
    """(ok, text, characters cut) of one call, the text capped where it is made."""
    try:
        text, ok = _as_text(fn(**arguments)), True
    except Exception as err:  # the tool's failure is the model's to see, not the stage's
        text, ok = f"{type(err).__name__}: {err}", False
    return ok, text[:max_chars], max(len(text) - max_chars, 0)


def _child(conn, fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int) -> None:
    conn.send(_outcome(fn, arguments, max_chars))
    conn.close()


def _in_child(tool: Tool, arguments: dict[str, Any]) -> tuple[bool, str, int]:
    """Run the call in a forked child, killed at the tool's deadline: (ok, text, cut)."""
    # fork: the tool (often a closure or a function defined in a script) needs no pickling,
    # and the child starts in milliseconds; it runs only the tool and sends plain text back.
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, tool.fn, arguments, tool.max_result_chars), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(tool.timeout_s):
            return False, f"timed out after {tool.timeout_s:g} s", 0
        try:
            ok, text, cut = receive.recv()
        except EOFError:
            process.join(1.0)
            return False, f"the tool's process died (exit code {process.exitcode})", 0
        return bool(ok), str(text), int(cut)
    finally:
        receive.close()
        if process.is_alive():
            process.kill()
        process.join(5.0)
        process.close()


def call_tool(tools: Mapping[str, Tool], call: ToolCall | MalformedCall, turn: int) -> ToolCallRecord:
    """Run one parsed call; every failure becomes the text the model is shown."""
    started = time.monotonic()
    if isinstance(call, MalformedCall):
        return ToolCallRecord(turn, "", call.raw, f"error: {call.why}", call.why)
    arguments_text = json.dumps(call.arguments, sort_keys=True)
    tool = tools.get(call.name)
    if tool is None:
        why = f"unknown tool '{call.name}'; available: {', '.join(sorted(tools)) or '(none)'}"
        return ToolCallRecord(turn, call.name, arguments_text, f"error: {why}", why)
    try:
        inspect.signature(tool.fn).bind(**call.arguments)
    except TypeError as err:
        why = f"bad arguments for '{call.name}': {err}"
        return ToolCallRecord(turn, call.name, arguments_text, f"error: {why}", why)
    ok, text, cut = (
        _outcome(tool.fn, call.arguments, tool.max_result_chars) if tool.in_process else _in_child(tool, call.arguments)
    )
    if cut:
        text += f"\n[... {cut} more characters cut]"
    duration = time.monotonic() - started
    if ok:
        return ToolCallRecord(turn, call.name, arguments_text, text, None, duration, cut)
    return ToolCallRecord(turn, call.name, arguments_text, f"error: {text}", text, duration, cut)


class ToolEpisode(Episode):
    """The model calls tools until it answers without a call; the environment's rubric scores it."""

    def __init__(
        self,
        messages: list[Message],
        tools: Mapping[str, Tool],
        parse: Callable[[str], list[ToolCall | MalformedCall]],
        max_calls_per_turn: int,
    ):
        self.messages, self.tools, self.parse, self.max_calls = messages, tools, parse, max_calls_per_turn
        self.turn = 0

    def initial_messages(self) -> list[Message]:
        return list(self.messages)

    def step(self, turn: str) -> StepResult:
        calls = self.parse(turn)
        index, self.turn = self.turn, self.turn + 1
        if not calls:
            return StepResult(messages=(), done=True)
        records = [call_tool(self.tools, call, index) for call in calls[: self.max_calls]]
        messages = [{"role": "tool", "name": r.name or "invalid", "content": r.result} for r in records]
        if len(calls) > self.max_calls:
            why = f"error: {len(calls)} tool calls in one turn; only the first {self.max_calls} were run"
            messages.append({"role": "tool", "name": "invalid", "content": why})
        return StepResult(messages=messages, done=False, tool_calls=records)


class ToolEnvironment(Environment):
    """An environment whose episodes are tool use: the row's messages, the tools, a rubric.
    Subclasses set their own initial messages (``initial_messages``) and rubric."""

    def __init__(
        self,
        tools: Sequence[Tool],
        rubric: Rubric,
        *,
        tool_call_format: str = "hermes",
        max_calls_per_turn: int = DEFAULT_MAX_CALLS_PER_TURN,
    ):
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {', '.join(names)}")
        self.tools = {t.name: t for t in tools}
        self._rubric = rubric
        self._parse = tool_call_parser(tool_call_format)
        self.max_calls_per_turn = max_calls_per_turn

    @property
    def rubric(self) -> Rubric:
        return self._rubric

    def tool_schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools.values()]

    def initial_messages(self, row: Mapping[str, Any]) -> list[Message]:
        return row_messages(row)

    def start(self, row: Mapping[str, Any]) -> Episode:
        return ToolEpisode(self.initial_messages(row), self.tools, self._parse, self.max_calls_per_turn)


def python_tool(
    *, wall_s: float = 5.0, memory_mb: int = 1024, max_result_chars: int = DEFAULT_MAX_RESULT_CHARS
) -> Tool:
    """A tool that runs the model's Python program in the code sandbox (rewards/sandbox) and
    returns what it printed; the sandbox enforces the limits, so it runs in process.
    `memory_mb` defaults to the code reward's 1024: with 256 the sandbox's set-up itself died
    in a process that had torch loaded (measured here)."""
    from rewards.sandbox import Isolation, Limits, SandboxError, run_script

    limits = Limits(wall_s=wall_s, memory_mb=memory_mb)

    def run_python(code: str) -> str:
        """Run a Python program and return what it printed.

        Args:
            code: the program's source; print what you want to see.
        """
        try:
            result = run_script(code, limits=limits, isolation=Isolation())
        except SandboxError as err:
            raise RuntimeError(f"the sandbox could not run the program: {err}") from None
        out = result.stdout.decode("utf-8", "replace")
        err = result.stderr.decode("utf-8", "replace")
        if result.timed_out or result.limit:
            return f"{out}\n[stopped: {result.limit or 'wall'} limit]"
        if result.exit_code != 0:
            tail = err.strip().splitlines()[-1] if err.strip() else f"exit code {result.exit_code}"
            return f"{out}\n[failed: {tail}]"
        return out

    return make_tool(run_python, timeout_s=wall_s * 2 + 5, max_result_chars=max_result_chars, in_process=True)
