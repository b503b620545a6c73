"""Multi-turn rollouts: episodes of an environment (rewards/environments) played by an engine.

All live episodes advance together, one engine call per turn (``Engine.sample`` on every live
episode's token ids, so vLLM batches them as it batches single-turn prompts); then every live
episode's environment step runs, each on a worker thread with its own deadline; then the
environment's turns are appended and the next turn is sampled, until no episode is live.

Token in, token out. An episode is one growing list of token ids: the rendered initial
prompt, then for each turn the tokens the model drew, exactly as drawn (never decoded and
re-encoded), then the environment's turns as the chat template renders them after an
assistant message. Those are found by rendering a stand-in conversation, ``[user, assistant
(marker)] + environment messages`` with the generation prompt, and keeping the text after
the marker, less the end-of-turn token when the model's turn ended with that very token
(a turn ended by a stop string or another end token gets the template's whole closing).
The stand-in keeps the cost per turn constant and independent of what the template does to
earlier turns; tests/test_rollout_templates.py checks, per template, that the result equals
``apply_chat_template`` of the whole conversation and shows exactly where it cannot (a
template that rewrites earlier turns, e.g. one that strips their reasoning).

``loss_mask`` marks the model's own tokens (1) against the environment's (0): only the
former get a loss, a ratio, a KL term or a place in a normaliser. ``sampler_logprobs`` holds
the engine's log-prob of each model token (0.0 on environment tokens, where the mask is 0).

Limits (``EpisodeLimits``): ``max_turns`` model turns; ``max_total_tokens`` over prompt and
all turns (a turn that would pass it is cut there, environment turns that do not fit end the
episode); a turn that hits the engine's ``max_new_tokens`` without ending ends the episode
("length", not stepped, as its text is unfinished). Environment text is capped per message
(``max_env_chars``), the cut counted.

Errors. An environment whose ``start``, ``initial_messages`` or ``step`` raises, returns a
malformed reply, or whose reply the chat template refuses ends that episode ("error", the
text kept; the rubric then gives 0). A step that does not return within ``step_timeout_s``
ends it too ("timeout"). The deadline is kept by the loop, outside the step: the step runs on
a daemon worker thread that is abandoned when late (a thread cannot be killed; the tools,
whose arguments the model chooses, run in killable child processes instead:
rewards/environments/tools.py), so a hung environment costs its episode and, until it
returns, one thread, never the stage.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.environments.base import (
    END_DONE,
    END_ERROR,
    END_LENGTH,
    END_MAX_TOKENS,
    END_MAX_TURNS,
    END_TIMEOUT,
    Environment,
    Episode,
    EpisodeLimits,
    Message,
    StepResult,
    ToolCallRecord,
    Trajectory,
    cap_text,
)
from tasks.engines import Engine, SamplingSettings

# Content that no template alters and no conversation contains: where the model's turn sits.
_MARKER = "grpoflowturnmarker7f3a"
_STAND_IN_USER = "x"
# Environment steps run on at most this many threads at once (more only replace late ones).
STEP_WORKERS = 8


@dataclass
class EpisodeRecord:
    """One episode at the token level, and the trajectory its rubric scores."""

    row_index: int
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)  # every token after the prompt, model's and env's
    loss_mask: list[int] = field(default_factory=list)  # 1 where the model drew the token
    sampler_logprobs: list[float] | None = field(default_factory=list)  # None when the engine gave none (greedy)
    messages: list[Message] = field(default_factory=list)
    prompt_messages: int = 0
    turns: int = 0  # model turns
    end_reason: str | None = None  # None while live
    error: str | None = None
    finish_reason: str = "eos"  # how the last model turn ended
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    env_chars_cut: int = 0  # characters of environment text cut: max_env_chars, and tools' own caps

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    def trajectory(self) -> Trajectory:
        return Trajectory(
            messages=tuple(self.messages),
            prompt_messages=self.prompt_messages,
            end_reason=self.end_reason or END_ERROR,
            info=dict(self.info),
            error=self.error,
            completion_tokens=sum(self.loss_mask),
            finish_reason=self.finish_reason,
            tool_calls=tuple(self.tool_calls),
        )

    def generation_row(self, prompt_id: str, prompt_text: str, completion: str | None = None) -> dict[str, Any]:
        """This episode as a row of the proposed generations schema (data.schemas.GENERATIONS_V4),
        old/ref log-probs left null for the stage to fill."""
        return {
            "prompt_id": prompt_id,
            "sample_index": self.sample_index,
            "prompt_text": prompt_text,
            "completion": self.trajectory().completion if completion is None else completion,
            "prompt_token_ids": self.prompt_ids,
            "completion_token_ids": self.completion_ids,
            "old_logprobs": None,
            "ref_logprobs": None,
            "finish_reason": self.finish_reason,
            "sampler_logprobs": self.sampler_logprobs,
            "loss_mask": self.loss_mask,
            "messages": [{"role": m["role"], "content": m["content"], "name": m.get("name")} for m in self.messages],
            "prompt_messages": self.prompt_messages,
            "turns": self.turns,
            "end_reason": self.end_reason,
            "env_error": self.error,
            "tool_calls": [dataclasses.asdict(call) for call in self.tool_calls],
            "env_info": json.dumps(self.info),
            "env_chars_cut": self.env_chars_cut,
        }

    def _end(self, reason: str, error: str | None = None) -> None:
        self.end_reason, self.error = reason, error


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_initial(tokenizer, episode: Episode, tools: list[dict] | None, use_chat_template: bool) -> str:
    """The text before the model's first turn, rendered as the single-turn stage renders a
    prompt (tasks/generate.render_prompt): a chat through the template; a plain prompt through
    it as one user turn, or as it is when the template is off or missing."""
    messages = episode.initial_messages()
    if episode.plain_prompt is not None and not (use_chat_template and has_chat_template(tokenizer)):
        return episode.plain_prompt
    if not has_chat_template(tokenizer):
        raise ValueError("the episode is a chat but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def environment_turn_ids(
    tokenizer, messages: Sequence[Message], tools: list[dict] | None, ended_with: int | None
) -> list[int]:
    """Token ids that follow a model turn to add the environment's `messages` and open the
    model's next turn, as the chat template renders them after an assistant message.
    `ended_with`: the model's last token when it ended its turn with an end token (dropped
    from the template's closing, which starts with it), else None (the whole closing added)."""
    stand_in = [{"role": "user", "content": _STAND_IN_USER}, {"role": "assistant", "content": _MARKER}, *messages]
    text = tokenizer.apply_chat_template(stand_in, tools=tools, tokenize=False, add_generation_prompt=True)
    at = text.rfind(_MARKER)
    if at < 0:
        raise ValueError("the chat template does not render an assistant message's content verbatim")
    after = text[at + len(_MARKER) :]
    if ended_with is not None:
        end_text = tokenizer.decode([ended_with], skip_special_tokens=False)
        if end_text and after.startswith(end_text):
            after = after[len(end_text) :]
    return tokenizer(after, add_special_tokens=False)["input_ids"]


@dataclass
class _StepOutcome:
    result: StepResult | None = None
    error: str | None = None
    timed_out: bool = False


def run_steps(jobs: Sequence[tuple[Episode, str]], timeout_s: float, workers: int = STEP_WORKERS) -> list[_StepOutcome]:
    """``episode.step(turn)`` for every job, on up to `workers` daemon threads; a call running
    past `timeout_s` is abandoned (its thread replaced) and reported as timed out."""
    outcomes = [_StepOutcome() for _ in jobs]
    lock = threading.Condition()
    pending = list(range(len(jobs)))[::-1]  # popped from the end: jobs start in order
    started: dict[int, float] = {}  # job -> when it started, while running
    finished: set[int] = set()
    abandoned: set[int] = set()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                k = pending.pop()
                started[k] = time.monotonic()
            episode, turn = jobs[k]
            try:
                outcome = _StepOutcome(result=episode.step(turn))
            except Exception as err:  # the environment's failure ends its episode, not the stage
                outcome = _StepOutcome(error=f"{type(err).__name__}: {err}")
            with lock:
                if k in abandoned:
                    return  # too late: the job was reported timed out and this thread replaced
                outcomes[k] = outcome
                finished.add(k)
                started.pop(k)
                lock.notify()

    def spawn() -> None:
        threading.Thread(target=work, name="environment-step", daemon=True).start()

    with lock:
        for _ in range(min(workers, len(jobs))):
            spawn()
        while len(finished) + len(abandoned) < len(jobs):
            now = time.monotonic()
            for k, since in list(started.items()):
                if now - since >= timeout_s:
                    started.pop(k)
                    abandoned.add(k)
                    outcomes[k] = _StepOutcome(timed_out=True, error=f"the step did not return within {timeout_s:g} s")
                    if pending:
                        spawn()
            wait = min((since + timeout_s - now for since in started.values()), default=timeout_s)
            lock.wait(max(wait, 0.001))
    return outcomes


def _checked_messages(result: Any) -> list[Message]:
    """The environment's reply as chat messages, or ValueError saying what is wrong with it."""
    if not isinstance(result, StepResult):
        raise ValueError(f"step returned {type(result).__name__}, not a StepResult")
    messages = []
    for k, message in enumerate(result.messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"step's message {k} is not a mapping with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"step's message {k} ({message['role']}) has no string 'content'")
        messages.append(dict(message))
    return messages


def rollout(
    environment: Environment,
    rows: Sequence[Mapping[str, Any]],
    group_size: int,
    engine: Engine,
    tokenizer,
    settings: SamplingSettings,
    limits: EpisodeLimits,
    *,
    use_chat_template: bool = True,
    seed: int | None = 0,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    on_turn: Callable[[int, int], None] | None = None,
) -> list[EpisodeRecord]:
    """Play `group_size` episodes of `environment` per row of `rows` with `engine` (loaded
    with the policy), group members adjacent, and return them finished.

    `prompt_ids` (one list per row) replaces the rendered initial prompt (the generate stage
    passes its prompts after `max_prompt_length`). Turn t samples with seed ``seed + t *
    1_000_003``: turn 0 draws exactly what a single-turn ``engine.sample`` with `seed` draws.
    `on_turn(turn, live episodes)` is called before each turn's sampling (progress, metrics).
    """
    tools = environment.tool_schemas() or None
    records: list[EpisodeRecord] = []
    episodes: list[Episode | None] = []
    for r, row in enumerate(rows):
        for g in range(group_size):
            record = EpisodeRecord(row_index=r, sample_index=g, prompt_ids=[])
            records.append(record)
            try:
                episode = environment.start(row)
                record.messages = [dict(m) for m in episode.initial_messages()]
                record.prompt_messages = len(record.messages)
                if prompt_ids is not None:
                    record.prompt_ids = list(prompt_ids[r])
                else:
                    text = render_initial(tokenizer, episode, tools, use_chat_template)
                    record.prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            except Exception as err:  # a row the environment cannot start ends as an error, reward 0
                episode = None
                record._end(END_ERROR, f"could not start the episode: {type(err).__name__}: {err}")
            else:
                if record.total_tokens >= limits.max_total_tokens:
                    record._end(END_MAX_TOKENS)
            episodes.append(episode)

    turn = 0
    while True:
        live = [k for k, rec in enumerate(records) if rec.end_reason is None]
        if not live:
            break
        if on_turn is not None:
            on_turn(turn, len(live))
        room = {k: limits.max_total_tokens - records[k].total_tokens for k in live}
        turn_settings = dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, max(room.values())))
        samples = engine.sample(
            [records[k].prompt_ids + records[k].completion_ids for k in live],
            1,
            turn_settings,
            seed=None if seed is None else seed + turn * 1_000_003,
            desc=f"turn {turn}",
        )
        jobs: list[tuple[Episode, str]] = []
        stepped: list[int] = []
        for k, sample in zip(live, samples, strict=True):
            record = records[k]
            tokens, logprobs = sample.completion_ids, sample.logprobs
            reason = sample.finish_reason
            if len(tokens) > room[k]:  # the batch's budget was another episode's: cut at this one's
                tokens, reason = tokens[: room[k]], "length"
                logprobs = logprobs[: room[k]] if logprobs is not None else None
            record.completion_ids += tokens
            record.loss_mask += [1] * len(tokens)
            if record.sampler_logprobs is not None:
                record.sampler_logprobs = record.sampler_logprobs + list(logprobs) if logprobs is not None else None
            record.finish_reason = reason
            record.turns += 1
            content = tokenizer.decode(tokens, skip_special_tokens=True)
            record.messages.append({"role": "assistant", "content": content})
            if reason == "length":
                record._end(END_MAX_TOKENS if record.total_tokens >= limits.max_total_tokens else END_LENGTH)
                continue
            jobs.append((episodes[k], content))
            stepped.append(k)

        for k, outcome in zip(stepped, run_steps(jobs, limits.step_timeout_s), strict=True):
            record = records[k]
            if outcome.timed_out:
                record._end(END_TIMEOUT, outcome.error)
                continue
            if outcome.error is not None:
                record._end(END_ERROR, outcome.error)
                continue
            try:
                messages = _checked_messages(outcome.result)
                json.dumps(dict(outcome.result.info))  # stored as JSON with the trajectory: refuse what cannot be
                record.info.update(outcome.result.info)
                record.tool_calls += list(outcome.result.tool_calls)
                record.env_chars_cut += sum(call.chars_cut for call in outcome.result.tool_calls)
            except (ValueError, TypeError) as err:
                record._end(END_ERROR, f"the environment's reply is unusable: {err}")
                continue
            if outcome.result.done:
                record._end(END_DONE)
                continue
            if record.turns >= limits.max_turns:
                record._end(END_MAX_TURNS)
                continue
            for message in messages:
                message["content"], cut = cap_text(message["content"], limits.max_env_chars)
                record.env_chars_cut += cut
            # Engines keep the end token in a turn that ended with one (finish_reason "eos").
            ended_with = record.completion_ids[-1] if record.finish_reason == "eos" else None
            try:
                suffix = environment_turn_ids(tokenizer, messages, tools, ended_with)
            except Exception as err:  # a template that refuses the reply (a role it lacks) ends the episode
                record._end(END_ERROR, f"the chat template could not render the environment's reply: {err}")
                continue
            if record.total_tokens + len(suffix) >= limits.max_total_tokens:
                record._end(END_MAX_TOKENS)  # no room for the reply and a model token after it
                continue
            record.messages += messages
            record.completion_ids += suffix
            record.loss_mask += [0] * len(suffix)
            if record.sampler_logprobs is not None:
                record.sampler_logprobs += [0.0] * len(suffix)
        turn += 1
    return records
