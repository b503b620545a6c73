"""What people coming from TRL or verl expect (issue 13, section 4): learning-rate schedules,
prompt length limits, more sampling settings, datasets mixed with weights, --task picking
the reward, and the warnings that save hours."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from pydantic import ValidationError

from data import builtin
from data.run_folder import iteration_dir
from data.schemas import GENERATIONS, PROMPTS
from data.sources import normalise_row, prompts_table
from data.store import read_table, write_table
from flows.config import GRPOConfig
from tasks.schedule import LRSchedule, known_schedules


# --- learning-rate schedule -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.35])
def test_schedule_equals_transformers_step_for_step(kind, warmup_ratio):
    from transformers import get_scheduler

    total = 40
    schedule = LRSchedule(1e-3, kind, total, warmup_ratio)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)  # transformers' "constant" ignores warm-up
    theirs = get_scheduler(name, optimizer, num_warmup_steps=schedule.warmup_steps, num_training_steps=total)
    for step in range(total):
        assert schedule.at(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        optimizer.step()
        theirs.step()
    assert schedule.warmup_steps == -(-int(warmup_ratio * 1000) * total // 1000)  # ceil, as TRL


def test_schedule_rejects_unknown_kind_listing_the_known():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'; known: constant, linear, cosine"):
        LRSchedule(1e-3, "step")
    assert known_schedules() == ["constant", "linear", "cosine"]


def _train_rows(n: int, seed: int = 1, source: str = "train.jsonl") -> list[dict]:
    return [normalise_row(p, data_source=source, row=i) for i, p in enumerate(builtin.train_problems(n, seed=seed))]


def _prompts_file(tmp_path, rows, name="prompts.parquet"):
    path = tmp_path / name
    write_table(prompts_table(rows), path, PROMPTS)
    return path


def test_update_uses_the_schedule_of_its_steps_and_logs_it(tmp_path, tiny_model_dir):
    """The learning rate of an iteration's steps comes from (first_step, schedule) alone."""
    from tasks.advantages import compute_advantages
    from tasks.generate import generate_completions
    from tasks.objective import LossSettings
    from tasks.score import score_generations
    from tasks.update import update_policy

    prompts = _prompts_file(tmp_path, _train_rows(4))
    gens, rewards, advs = tmp_path / "g.parquet", tmp_path / "r.parquet", tmp_path / "a.parquet"
    generate_completions(prompts, gens, str(tiny_model_dir), group_size=3, max_new_tokens=3, with_old_logprobs=True)
    score_generations(gens, prompts, rewards, rewards={"tests.test_flow_e2e:shorter_is_better": 1.0}, workers=1)
    compute_advantages(rewards, advs)
    schedule = LRSchedule(1e-3, "cosine", total_steps=8, warmup_ratio=0.25)
    out = update_policy(
        gens,
        advs,
        str(tiny_model_dir),
        tmp_path / "ckpt",
        learning_rate=1e-3,
        loss=LossSettings(beta=0.0),
        lr_schedule=schedule,
        first_step=4,
        mini_batches=2,
        save=False,
    )
    assert out["learning_rate"] == pytest.approx(schedule.at(5))  # steps 4 and 5; the last one is logged
    assert schedule.at(5) < schedule.at(4) < 1e-3


def test_tiny_model_sft_steps_is_the_new_name_and_old_configs_still_load():
    assert GRPOConfig(warmup_steps=12).tiny_model_sft_steps == 12  # config.json of older runs
    assert "warmup_steps" not in GRPOConfig.model_fields
    with pytest.raises(ValidationError, match="old name"):
        GRPOConfig(warmup_steps=1, tiny_model_sft_steps=2)


# --- --task picks the reward ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "reward"), [("math", "math"), ("code", "code"), ("countdown", "countdown"), (None, "exact_answer")]
)
def test_task_picks_its_reward_unless_rewards_are_given(task, reward):
    assert GRPOConfig(task=task).rewards == {reward: 1.0}
    assert GRPOConfig(task=task, rewards={"format": 1.0}).rewards == {"format": 1.0}


def test_task_reward_through_the_command_line(tmp_path):
    from flows.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--task", "math", "--run-dir", str(tmp_path)])
    assert config_from_args(args).rewards == {"math": 1.0}


# --- sampling settings and the log-probs they imply --------------------------------------------
@pytest.mark.parametrize("setting", [{"top_k": 5}, {"min_p": 0.1}, {"repetition_penalty": 1.2}, {"top_p": 0.9}])
@pytest.mark.parametrize("steps", [{"mu": 2}, {"mini_batches": 2}, {"store_old_logprobs": True}])
def test_sampling_that_reshapes_the_distribution_is_refused_with_stored_logprobs(setting, steps):
    with pytest.raises(ValidationError, match="change the distribution sampled from"):
        GRPOConfig(**setting, **steps)
    GRPOConfig(**setting)  # one on-policy step: no stored log-prob is used, accepted
    GRPOConfig(stop=["\n"], **steps)  # stop strings change no probability


def test_hf_engine_applies_top_k_min_p_repetition_penalty_and_stop(tiny_model_dir):
    from tasks.engines import SamplingSettings, make_engine
    from tasks.model import live_policy

    policy = live_policy(str(tiny_model_dir))
    engine = make_engine("hf")
    engine.load(policy.model, policy.tokenizer)
    prompt = [policy.tokenizer("12+34=", add_special_tokens=False)["input_ids"]]
    seen = {}
    original = policy.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    policy.model.generate = spy
    try:
        settings = SamplingSettings(
            max_new_tokens=12, batch_size=8, top_k=3, min_p=0.05, repetition_penalty=1.3, stop=("5",)
        )
        out = engine.sample(prompt, 8, settings, seed=0)
    finally:
        policy.model.generate = original
    assert (seen["top_k"], seen["min_p"], seen["repetition_penalty"]) == (3, 0.05, 1.3)
    for s in out:
        text = policy.tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        assert len(s.logprobs) == len(s.completion_ids)
        if s.finish_reason == "stop":
            assert text.endswith("5") and "5" not in text[:-1]
        else:
            assert "5" not in text


def test_hf_engine_logprobs_are_of_the_top_k_distribution_sampled(tiny_model_dir):
    """With top_k the recorded log-probs are of the renormalised top-k distribution: every
    drawn token has a log-prob above that of the untruncated softmax, and exp sums to 1."""
    from tasks.engines import SamplingSettings, make_engine
    from tasks.logprobs import batched_completion_logprobs
    from tasks.model import live_policy

    policy = live_policy(str(tiny_model_dir))
    engine = make_engine("hf")
    engine.load(policy.model, policy.tokenizer)
    prompt = [policy.tokenizer("12+34=", add_special_tokens=False)["input_ids"]]
    out = engine.sample(prompt, 6, SamplingSettings(max_new_tokens=4, batch_size=6, top_k=2), seed=0)
    full = batched_completion_logprobs(
        policy.model, [prompt[0]] * len(out), [s.completion_ids for s in out], policy.tokenizer.pad_token_id, 1.0, 6
    )
    for s, untruncated in zip(out, full):
        assert all(a >= b - 1e-5 for a, b in zip(s.logprobs, untruncated))
        assert any(
            a > b + 1e-3 for a, b in zip(s.logprobs, untruncated)
        )  # mass of the dropped tokens moved to the kept two


def test_stop_index_finds_the_token_that_completes_a_stop_string(tiny_model_dir):
    from tasks.engines.hf import stop_index
    from tasks.model import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ids = tok("12+34=46 7", add_special_tokens=False)["input_ids"]
    assert stop_index(tok, ids, ["=4"]) == 6
    assert stop_index(tok, ids, ["6 ", "+"]) == 2
    assert stop_index(tok, ids, ["99"]) is None


# --- max prompt length ------------------------------------------------------------------------
def test_fit_prompts_truncates_from_the_left_or_skips_and_counts():
    from tasks.generate import fit_prompts

    ids = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    assert fit_prompts(ids, 3, "truncate_left") == ([0, 1, 2], [[3, 4, 5], [6, 7], [8, 9, 10]], 1)
    assert fit_prompts(ids, 2, "skip") == ([1], [[6, 7]], 2)
    assert fit_prompts(ids, None, "skip") == ([0, 1, 2], ids, 0)


@pytest.mark.parametrize("overflow", ["truncate_left", "skip"])
def test_generate_stage_counts_long_prompts(tmp_path, tiny_model_dir, overflow):
    from tasks.generate import generate_completions

    rows = _train_rows(4)
    rows[1] = normalise_row(
        {"prompt": "1+2+3+4+5+6+7=", "answer": "28"}, data_source="x", row=1
    )  # 14 tokens, the others 5-6
    prompts = _prompts_file(tmp_path, rows)
    out = generate_completions(
        prompts,
        tmp_path / "g.parquet",
        str(tiny_model_dir),
        group_size=2,
        max_new_tokens=2,
        max_prompt_length=8,
        prompt_overflow=overflow,
    )
    gens = read_table(tmp_path / "g.parquet", GENERATIONS).to_pylist()
    assert max(len(g["prompt_token_ids"]) for g in gens) <= 8
    if overflow == "truncate_left":
        assert (out["prompts/truncated"], out["prompts/skipped"], len(gens)) == (1, 0, 8)
        cut = [g for g in gens if g["prompt_id"] == rows[1]["prompt_id"]][0]
        assert (
            cut["prompt_text"] == "4+5+6+7=" and len(cut["prompt_token_ids"]) == 8
        )  # its end survives, as the model saw it
    else:
        assert (out["prompts/truncated"], out["prompts/skipped"], len(gens)) == (0, 1, 6)
        assert rows[1]["prompt_id"] not in {g["prompt_id"] for g in gens}


# --- datasets mixed with weights --------------------------------------------------------------
def test_mix_counts_keep_every_source_within_one_of_its_share():
    from tasks.select import mix_counts

    weights = [0.5, 0.3, 0.2]
    previous = [0, 0, 0]
    for slots in range(0, 400, 7):
        counts = mix_counts(weights, slots)
        assert sum(counts) == slots
        assert all(abs(c - slots * w) < 1 for c, w in zip(counts, weights))
        assert all(c >= p for c, p in zip(counts, previous))  # never takes back a prompt
        previous = counts


def test_selected_prompts_follow_the_mixing_weights(tmp_path):
    from tasks.select import select_prompts

    rows = _train_rows(30, seed=1, source="a.jsonl") + _train_rows(10, seed=2, source="b.jsonl")
    pool = _prompts_file(tmp_path, rows)
    drawn = []
    for it in range(1, 11):
        out = tmp_path / f"it{it}.parquet"
        summary = select_prompts(
            pool, out, iteration=it, per_iteration=8, seed=0, mix=[("a.jsonl", 3.0), ("b.jsonl", 1.0)]
        )
        picked = read_table(out, PROMPTS).column("data_source").to_pylist()
        assert len(picked) == 8 and summary["mix/0"] + summary["mix/1"] == 8
        drawn += picked
    assert drawn.count("a.jsonl") == 60 and drawn.count("b.jsonl") == 20  # 3:1 of 80, exactly
    b_ids = [r for r in drawn if r == "b.jsonl"]
    assert len(b_ids) == 20  # b (10 rows) went through two epochs while a went through two as well
    with pytest.raises(ValueError, match="no prompts from 'c.jsonl'"):
        select_prompts(pool, tmp_path / "x.parquet", iteration=1, per_iteration=4, seed=0, mix=[("c.jsonl", 1.0)])


def test_datasets_and_dataset_are_exclusive_and_weights_positive():
    with pytest.raises(ValidationError, match="not both"):
        GRPOConfig(dataset="a.jsonl", datasets={"b.jsonl": 1.0})
    with pytest.raises(ValidationError, match="every weight > 0"):
        GRPOConfig(datasets={"b.jsonl": 0.0})


# --- warnings that save hours -----------------------------------------------------------------
def test_no_signal_warning_names_the_groups():
    from flows.train import no_signal_warning

    assert no_signal_warning({"dynamic_sampling/groups": 16, "frac_reward_zero_std": 1.0, "reward": 0.0}) == (
        "no learning signal: 16 of 16 groups have zero reward spread (mean reward 0)"
    )
    assert no_signal_warning({"dynamic_sampling/groups": 16, "frac_reward_zero_std": 15 / 16, "reward": 0.1}) is None


def test_repeated_warnings_are_said_three_times_then_every_tenth(caplog):
    from flows.runner import RunWarnings

    log = logging.getLogger("test-warnings")
    warnings = RunWarnings()
    with caplog.at_level(logging.WARNING, logger="test-warnings"):
        said = [warnings.say(log, "x", "same problem") for _ in range(25)]
        warnings.say(log, "y", None)
    assert [k + 1 for k, s in enumerate(said) if s] == [1, 2, 3, 10, 20]
    assert caplog.records[-1].getMessage() == "same problem (20 iterations so far)"


def test_tokenizer_that_loses_characters_is_detected(tiny_model_dir):
    from tasks.generate import tokenization_loss
    from tasks.model import load_tokenizer
    from tasks.tiny_model import build_tokenizer

    gsm = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    # Saved and loaded back, the character vocabulary drops unknown characters (a BPE without
    # unk); as built, it maps them to its unk token: both are caught by the round trip.
    for tok, unknown in (
        (load_tokenizer(tiny_model_dir), 0),
        (build_tokenizer(), sum(not (c.isdigit() or c == " ") for c in gsm)),
    ):
        check = tokenization_loss(tok, ["12+34=", gsm, "7+8="])
        assert (check["prompts"], check["lossy"], check["unknown_tokens"]) == (3, 1, unknown)
        assert check["example"][1] == gsm
        assert tokenization_loss(tok, ["12+34=", "1 + 2 ="])["lossy"] == 0


def test_flow_warns_about_lost_characters_and_no_signal_and_counts_long_prompts(
    tmp_path, tiny_model_dir, prefect_harness, capfd, caplog
):
    """One short run of the flow on GSM-like text with the character tokenizer: both warnings
    fire (the random model scores 0 everywhere), the prompt cut is counted, the schedule runs."""
    from flows.train import grpo_train

    data = tmp_path / "gsm.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Tom has {k} apples and buys 3 more. How many?", "answer": str(k + 3)}) + "\n"
            for k in range(8)
        )
    )
    config = GRPOConfig(
        run_dir=tmp_path / "run",
        model=str(tiny_model_dir),
        dataset=str(data),
        task="math",
        iterations=2,
        prompts_per_iteration=2,
        group_size=2,
        max_new_tokens=2,
        beta=0.0,
        max_prompt_length=1,
        lr_scheduler="linear",
        warmup_ratio=0.5,
        use_chat_template=False,
    )
    assert config.rewards == {"math": 1.0}
    with caplog.at_level(logging.INFO):
        metrics = grpo_train(config)
    # The flow's log: on stderr from Prefect's console handler, or in caplog when an earlier
    # test in the session changed where Prefect's loggers go.
    text = capfd.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)
    assert "loses characters of 8 of 8 prompts checked" in text and "'Tom has 0 apples" in text
    assert "no learning signal: 2 of 2 groups have zero reward spread" in text
    assert "2 prompts longer than max_prompt_length=1 tokens were truncated from the left" in text
    assert "prompts over max_prompt_length=1: 4 truncated, 0 skipped" in text
    saved = [json.loads((iteration_dir(tmp_path / "run", it) / "metrics.json").read_text()) for it in (1, 2)]
    assert [m["prompts/truncated"] for m in saved] == [2, 2]
    assert [m["learning_rate"] for m in saved] == [
        0.0,
        pytest.approx(config.learning_rate),
    ]  # warm-up step 0, then step 1 of 2
    assert metrics["iteration"] == 2


# --- first contact: the built-in model's build says how long it takes -------------------------
def test_tiny_model_build_shows_progress_and_one_estimate_line(tmp_path, monkeypatch):
    import contextlib

    import tasks.tiny_model as tiny

    bars = []
    real_progress = tiny.progress

    @contextlib.contextmanager
    def recording(description, total):
        with real_progress(description, total) as bar:
            bars.append((description, total))
            yield bar

    monkeypatch.setattr(tiny, "progress", recording)
    said: list[str] = []
    folder = tiny.ensure_tiny_model(steps=4, batch_size=8, cache_dir=tmp_path, say=said.append)
    assert bars == [("building the tiny model", 4)]
    assert len(said) == 1 and said[0].startswith("building the built-in tiny model once (4 supervised steps, about ")
    assert str(folder) in said[0]
    assert (
        tiny.ensure_tiny_model(steps=4, batch_size=8, cache_dir=tmp_path, say=said.append) == folder and len(said) == 1
    )  # cached: silent
