"""Generation stage on a tiny random model: what is stored per completion, and that the
stored log-probs are the ones the update recomputes."""

from __future__ import annotations

import math

import pytest
import torch

from data import builtin
from data.schemas import GENERATIONS, PROMPTS
from data.sources import normalise_row, prompts_table
from data.store import read_table, write_table
from tasks.generate import generate_completions, render_prompt
from tasks.model import live_policy


@pytest.fixture()
def prompts_path(tmp_path):
    rows = [normalise_row(p, data_source="builtin", row=i) for i, p in enumerate(builtin.held_out_problems(5))]
    return write_table(prompts_table(rows), tmp_path / "prompts.parquet", PROMPTS)


def test_generations_artifact_has_groups_tokens_logprobs_and_finish_reasons(tmp_path, prompts_path, tiny_model_dir):
    out = tmp_path / "generations.parquet"
    summary = generate_completions(
        prompts_path,
        out,
        str(tiny_model_dir),
        group_size=3,
        max_new_tokens=4,
        reference_path=str(tiny_model_dir),
        seed=1,
    )
    table = read_table(out, GENERATIONS).to_pylist()
    assert summary["completions"] == len(table) == 15
    prompt_ids = read_table(prompts_path, PROMPTS)["prompt_id"].to_pylist()
    assert [r["prompt_id"] for r in table] == [p for p in prompt_ids for _ in range(3)]
    assert [r["sample_index"] for r in table] == [0, 1, 2] * 5
    tokenizer = live_policy(str(tiny_model_dir)).tokenizer
    for row in table:
        ids = row["completion_token_ids"]
        assert len(row["old_logprobs"]) == len(ids) == len(row["ref_logprobs"]) <= 4
        assert all(lp <= 0 and math.isfinite(lp) for lp in row["old_logprobs"])
        if row["finish_reason"] == "eos":
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        else:
            assert row["finish_reason"] == "length" and len(ids) == 4 and tokenizer.eos_token_id not in ids
        assert row["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
        # The reference is the same model here, so its log-probs equal the sampler's.
        assert row["ref_logprobs"] == pytest.approx(row["old_logprobs"], abs=1e-4)


def test_stored_logprobs_match_an_unpadded_forward_pass(tmp_path, prompts_path, tiny_model_dir):
    """The ratio pi/pi_old must start at 1 whatever the padding: the stored log-probs (batched,
    left-padded prompts, right-padded completions) equal those of each sequence run alone,
    with no padding at all, at a temperature other than 1."""
    out = tmp_path / "generations.parquet"
    generate_completions(
        prompts_path, out, str(tiny_model_dir), group_size=4, max_new_tokens=6, temperature=0.7, seed=3
    )
    rows = read_table(out, GENERATIONS).to_pylist()
    assert all(r["ref_logprobs"] is None for r in rows)  # beta = 0: no reference model
    assert len({len(r["completion_token_ids"]) for r in rows}) > 1  # padding was really exercised
    model = live_policy(str(tiny_model_dir)).model
    with torch.no_grad():
        for row in rows:
            prompt, completion = row["prompt_token_ids"], row["completion_token_ids"]
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]  # (C, V)
            alone = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
            assert alone.tolist() == pytest.approx(row["old_logprobs"], abs=1e-4)


def test_same_seed_same_completions(tmp_path, prompts_path, tiny_model_dir):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out in (a, b):
        generate_completions(prompts_path, out, str(tiny_model_dir), group_size=2, max_new_tokens=4, seed=7)
    assert read_table(a, GENERATIONS).equals(read_table(b, GENERATIONS))


def test_old_logprobs_are_skipped_on_request_and_nothing_else_changes(tmp_path, prompts_path, tiny_model_dir):
    """A single-step update needs no old-policy log-probs: the stage leaves them null and
    samples exactly the same completions."""
    full, lean = tmp_path / "full.parquet", tmp_path / "lean.parquet"
    generate_completions(prompts_path, full, str(tiny_model_dir), group_size=2, max_new_tokens=4, seed=7)
    generate_completions(
        prompts_path, lean, str(tiny_model_dir), group_size=2, max_new_tokens=4, seed=7, with_old_logprobs=False
    )
    full, lean = read_table(full, GENERATIONS), read_table(lean, GENERATIONS)
    assert lean.column("old_logprobs").null_count == lean.num_rows
    assert full.column("old_logprobs").null_count == 0
    assert lean.drop_columns(["old_logprobs"]).equals(full.drop_columns(["old_logprobs"]))


def test_chat_prompts_need_a_template_and_plain_ones_pass_through(tiny_model_dir):
    tokenizer = live_policy(str(tiny_model_dir)).tokenizer
    assert render_prompt({"prompt_id": "x", "prompt": "1+2=", "messages": None}, tokenizer, True) == "1+2="
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(
            {"prompt_id": "x", "prompt": None, "messages": [{"role": "user", "content": "1+2="}]}, tokenizer, True
        )
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    try:
        chat = {"prompt_id": "x", "prompt": None, "messages": [{"role": "user", "content": "1+2="}]}
        assert render_prompt(chat, tokenizer, True) == "<user>1+2=>"
        assert render_prompt({"prompt_id": "x", "prompt": "1+2=", "messages": None}, tokenizer, True) == "<user>1+2=>"
        assert render_prompt({"prompt_id": "x", "prompt": "1+2=", "messages": None}, tokenizer, False) == "1+2="
    finally:
        tokenizer.chat_template = None


def test_a_kept_reference_is_loaded_once_and_gives_the_same_log_probs(
    tmp_path, prompts_path, tiny_model_dir, monkeypatch
):
    """A process that never trains (a Ray generation worker) keeps the reference model between
    calls: one load for any number of stages, and the artifact is the one a fresh load writes."""
    import tasks.generate as generate

    loads = []
    real_load = generate.load_model
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(generate, "_KEPT_REFERENCES", {})
    fresh, kept = tmp_path / "fresh.parquet", [tmp_path / f"kept{i}.parquet" for i in range(3)]
    settings = dict(group_size=2, max_new_tokens=4, reference_path=str(tiny_model_dir), seed=5)
    generate_completions(prompts_path, fresh, str(tiny_model_dir), keep_reference=False, **settings)
    assert len(loads) == 1
    for out in kept:
        generate_completions(prompts_path, out, str(tiny_model_dir), keep_reference=True, **settings)
    assert len(loads) == 2  # the first kept call loads, the next two reuse it
    # A call that does not keep loads and frees its own copy, leaving the kept one usable.
    generate_completions(
        prompts_path, tmp_path / "again.parquet", str(tiny_model_dir), keep_reference=False, **settings
    )
    generate_completions(prompts_path, kept[0], str(tiny_model_dir), keep_reference=True, **settings)
    assert len(loads) == 3
    for out in [*kept, tmp_path / "again.parquet"]:
        assert read_table(out, GENERATIONS).equals(read_table(fresh, GENERATIONS))


def test_by_default_a_small_reference_stays_loaded_and_a_changed_or_large_one_is_reloaded(
    tmp_path, prompts_path, tiny_model_dir, monkeypatch
):
    """The training flow's default: a reference of at most KEEP_REFERENCE_MAX_BYTES is loaded
    once (its reload is pure fixed cost), a larger one every call (the update must hold the
    policy alone), and weights rewritten at the same path are never served from memory."""
    import shutil

    import tasks.generate as generate
    from tasks.model import LivePolicy, save_checkpoint
    from tasks.tiny_model import build_model, build_tokenizer

    loads = []
    real_load = generate.load_model
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(generate, "_KEPT_REFERENCES", {})
    reference = tmp_path / "reference"
    shutil.copytree(tiny_model_dir, reference)
    settings = dict(group_size=2, max_new_tokens=4, reference_path=str(reference), seed=5)
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    generate_completions(prompts_path, first, str(tiny_model_dir), **settings)
    generate_completions(prompts_path, second, str(tiny_model_dir), **settings)
    assert len(loads) == 1  # the tiny model's 4 MB of weights stayed loaded
    assert read_table(second, GENERATIONS).equals(read_table(first, GENERATIONS))

    tokenizer = build_tokenizer()  # other weights at the same path: loaded again, not the kept ones
    save_checkpoint(LivePolicy(build_model(len(tokenizer), seed=1), tokenizer), reference)
    changed = tmp_path / "changed.parquet"
    generate_completions(prompts_path, changed, str(tiny_model_dir), **settings)
    assert len(loads) == 2
    assert read_table(changed, GENERATIONS)["ref_logprobs"] != read_table(first, GENERATIONS)["ref_logprobs"]

    monkeypatch.setattr(generate, "KEEP_REFERENCE_MAX_BYTES", 1024)  # as if the reference were large
    for _ in range(2):
        generate_completions(prompts_path, tmp_path / "large.parquet", str(tiny_model_dir), **settings)
    assert len(loads) == 4
    assert read_table(tmp_path / "large.parquet", GENERATIONS).equals(read_table(changed, GENERATIONS))
