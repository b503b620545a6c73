"""The multi-turn rollout loop: the HF engine on a tiny chat model (token in, token out, the
loss mask, the sampler's log-probs, one engine call per turn, turn 0 = today's sampling),
and the limits and failures of episodes (max turns, total tokens, an unfinished turn, an
environment that raises, hangs or answers nonsense, a row it cannot start)."""

from __future__ import annotations

import time

import pytest
import torch

from data import guess_number as game_data
from rewards.environments import make_environment
from rewards.environments.base import Environment, Episode, EpisodeLimits, Rubric, StepResult
from tasks.engines import SamplingSettings
from tasks.engines.hf import HFEngine
from tasks.logprobs import batched_completion_logprobs
from tasks.rollout import rollout
from tests.chat_fixtures import ScriptedEngine, char_chat_tokenizer, tiny_chat_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy 2-core machine its
    synchronisation makes every step several times slower (as in test_update_stage)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_policy():
    tokenizer = char_chat_tokenizer("smollm2")
    return tiny_chat_model(tokenizer), tokenizer


class _CountingEngine(HFEngine):
    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def sample(self, prompt_ids, num_samples, settings, seed=None, desc="generate"):
        self.calls.append(len(prompt_ids))
        return super().sample(prompt_ids, num_samples, settings, seed, desc)


def test_hf_engine_plays_the_guessing_game_token_in_token_out(chat_policy):
    model, tokenizer = chat_policy
    engine = _CountingEngine()
    engine.load(model, tokenizer)
    rows = [dict(p, prompt_id=f"p{k}") for k, p in enumerate(game_data.train_problems(3, seed=1, low=1, high=9))]
    # A turn ends at its first digit (a stop string): the random model then guesses every turn.
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, stop=tuple("123456789"))
    limits = EpisodeLimits(max_turns=3, max_total_tokens=400)
    records = rollout(make_environment("guess_number"), rows, 2, engine, tokenizer, settings, limits, seed=3)

    assert len(records) == 6 and [(r.row_index, r.sample_index) for r in records][:2] == [(0, 0), (0, 1)]
    # One batched engine call per turn over the live episodes, never one per episode.
    assert engine.calls[0] == 6 and engine.calls == sorted(engine.calls, reverse=True)
    assert len(engine.calls) == max(r.turns for r in records) <= 3
    multi = [r for r in records if r.turns > 1]
    assert multi, "no episode got past its first turn"
    for r in records:
        assert r.end_reason in ("done", "max_turns", "length") and 1 <= r.turns <= 3
        assert len(r.loss_mask) == len(r.completion_ids) == len(r.sampler_logprobs)
        assert r.total_tokens <= limits.max_total_tokens
    for r in multi:
        # The environment's tokens are its reply rendered by the template, and get no loss.
        env_text = tokenizer.decode([t for t, m in zip(r.completion_ids, r.loss_mask, strict=True) if not m])
        assert ("higher" in env_text or "lower" in env_text or "Reply" in env_text) and "<|im_start|>user" in env_text
        assert [m["role"] for m in r.messages[1:]] == ["assistant", "user"] * (r.turns - 1) + ["assistant"]
    # The sampler's log-probs are those of a forward pass over the very token ids stored: the
    # model's tokens were never re-tokenised, the environment's were appended as ids.
    recomputed = batched_completion_logprobs(
        model, [r.prompt_ids for r in records], [r.completion_ids for r in records], tokenizer.pad_token_id, 1.0, 8
    )
    for r, full in zip(records, recomputed, strict=True):
        mask = torch.tensor(r.loss_mask, dtype=torch.bool)
        got, want = torch.tensor(r.sampler_logprobs)[mask], torch.tensor(full)[mask]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_turn_zero_draws_what_single_turn_sampling_draws(chat_policy):
    model, tokenizer = chat_policy
    engine = HFEngine()
    engine.load(model, tokenizer)
    rows = [{"prompt_id": f"p{k}", "prompt": f"{k}+{k}=", "answer": str(2 * k)} for k in range(3)]
    settings = SamplingSettings(max_new_tokens=8, batch_size=4)
    env = make_environment("single_turn", {"rewards": {"exact_answer": 1.0}})
    records = rollout(env, rows, 2, engine, tokenizer, settings, EpisodeLimits(max_total_tokens=512), seed=11)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        for r in rows
    ]
    prompt_ids = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    direct = engine.sample(prompt_ids, 2, settings, seed=11)
    assert [r.completion_ids for r in records] == [s.completion_ids for s in direct]
    assert [r.sampler_logprobs for r in records] == [s.logprobs for s in direct]
    assert all(r.turns == 1 and set(r.loss_mask) <= {1} for r in records)
    assert [r.end_reason for r in records] == ["done" if s.finish_reason != "length" else "length" for s in direct]


# ---- limits and failures, with turns known in advance -----------------------------------------


def _play(environment, reply, limits, rows=None, group_size=1, max_new_tokens=64):
    tokenizer = char_chat_tokenizer("smollm2")
    engine = ScriptedEngine(tokenizer, reply)
    rows = rows or [{"prompt_id": "p", "prompt": "Guess 1 to 9.", "answer": "7"}]
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    return rollout(environment, rows, group_size, engine, tokenizer, settings, limits), engine, tokenizer


def test_max_turns_ends_an_episode_the_environment_did_not_end():
    [r], engine, _ = _play(make_environment("guess_number"), lambda text: ("3", True), EpisodeLimits(max_turns=4))
    assert r.end_reason == "max_turns" and r.turns == 4 and engine.calls == [1, 1, 1, 1]
    assert [m["content"] for m in r.messages[1:]] == ["3", "higher", "3", "higher", "3", "higher", "3"]
    assert r.info == {"solved": False, "guesses": 4, "secret": 7}
    assert make_environment("guess_number").rubric.score(r.trajectory(), {}).total == 0.0


def test_a_solved_game_is_done_and_scored_from_the_trajectory():
    guesses = iter(["5", "8", "7"])
    [r], _, _ = _play(
        make_environment("guess_number", {"speed_weight": 1.0}), lambda t: (next(guesses), True), EpisodeLimits()
    )
    assert r.end_reason == "done" and r.turns == 3
    score = make_environment("guess_number", {"speed_weight": 1.0}).rubric.score(r.trajectory(), {})
    assert score.values == {"solved": 1.0, "speed": pytest.approx(1 / 3)} and score.total == pytest.approx(4 / 3)


def test_total_token_limit_cuts_the_turn_that_crosses_it():
    limits = EpisodeLimits(max_total_tokens=170)
    [r], engine, tokenizer = _play(make_environment("guess_number"), lambda text: ("3" * 20, True), limits)
    assert r.end_reason == "max_tokens" and r.total_tokens == 170 and r.turns == 2
    # The last turn was cut at the limit, so it was never shown to the environment.
    assert r.messages[-1]["role"] == "assistant" and r.info["guesses"] == r.turns - 1
    assert r.loss_mask[-1] == 1 and r.finish_reason == "length"


def test_a_prompt_over_the_token_limit_never_samples():
    [r], engine, _ = _play(
        make_environment("guess_number"), lambda text: ("3", True), EpisodeLimits(max_total_tokens=10)
    )
    assert r.end_reason == "max_tokens" and r.turns == 0 and engine.calls == []


def test_an_unfinished_turn_ends_the_episode_unstepped():
    [r], _, _ = _play(make_environment("guess_number"), lambda text: ("4444", False), EpisodeLimits(), max_new_tokens=4)
    assert r.end_reason == "length" and r.turns == 1 and r.info == {}


class _Faulty(Episode):
    """Raises, hangs or answers nonsense on its second step, as `mode` says."""

    def __init__(self, mode):
        self.mode, self.steps = mode, 0

    def initial_messages(self):
        return [{"role": "user", "content": "Talk to me."}]

    def step(self, turn):
        self.steps += 1
        if self.steps == 2 and self.mode == "raise":
            raise RuntimeError("the game server is down")
        if self.steps == 2 and self.mode == "hang":
            time.sleep(30)
        if self.steps == 2 and self.mode == "nonsense":
            return StepResult([{"role": "user", "content": None}], done=False)
        if self.steps == 2 and self.mode == "long":
            return StepResult([{"role": "user", "content": "z" * 500}], done=False)
        return StepResult([{"role": "user", "content": "go on"}], done=self.steps >= 3)


class _FaultyEnvironment(Environment):
    @property
    def rubric(self):
        return Rubric(())

    def start(self, row):
        if row["mode"] == "unstartable":
            raise KeyError("secret")
        return _Faulty(row["mode"])


def test_environment_failures_end_only_their_episode():
    modes = ["fine", "raise", "hang", "nonsense", "long", "unstartable"]
    rows = [{"prompt_id": m, "mode": m} for m in modes]
    limits = EpisodeLimits(step_timeout_s=0.5, max_env_chars=40)
    records, _, tokenizer = _play(_FaultyEnvironment(), lambda text: ("ok", True), limits, rows=rows)
    by_mode = dict(zip(modes, records, strict=True))
    assert by_mode["fine"].end_reason == "done" and by_mode["fine"].turns == 3
    assert by_mode["raise"].end_reason == "error" and by_mode["raise"].error == "RuntimeError: the game server is down"
    assert by_mode["hang"].end_reason == "timeout" and "did not return within 0.5 s" in by_mode["hang"].error
    assert by_mode["nonsense"].end_reason == "error" and "no string 'content'" in by_mode["nonsense"].error
    assert by_mode["unstartable"].end_reason == "error" and by_mode["unstartable"].turns == 0
    assert "could not start the episode: KeyError" in by_mode["unstartable"].error
    # Untrusted environment text is capped per message, the cut counted.
    long = by_mode["long"]
    assert long.end_reason == "done" and long.env_chars_cut == 460 and long.messages[4]["content"] == "z" * 40
    # A failed episode scores 0 with its error beside, whatever its rubric.
    score = make_environment("guess_number").rubric.score(by_mode["raise"].trajectory(), {})
    assert score.total == 0.0 and "the game server is down" in score.errors["solved"]
