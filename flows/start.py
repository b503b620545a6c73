"""What a training run does before its first stage: the checks that fail fast (preflight),
the run's config record, the few lines that say what is trained on what (the start block)
and whether the tokenizer keeps the prompts' text."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from data.run_folder import completed_iterations
from data.schemas import PROMPTS
from data.sources import hub_offline, read_source
from data.store import TMP_PREFIX, Manifest, atomic_write_json, read_table
from flows.config import GRPOConfig
from flows.observe.tracking import check_installed
from flows.resume import describe_changes, setting_changes
from tasks.engines import check_available
from tasks.footprint import gib, lora_trained_parameters, machine_memory_bytes, model_shape, update_peak_bytes
from tasks.generate import render_prompt, tokenization_loss
from tasks.model import check_model_source, load_tokenizer, pick_device, pick_dtype

TOKENIZATION_SAMPLE = 256  # prompts checked for characters the tokenizer loses


@task(name="check-prompts", cache_policy=NO_CACHE)
def check_prompts_task(
    prompts_path: str, model: str, use_chat_template: bool, sample: int = TOKENIZATION_SAMPLE
) -> dict:
    return check_prompts(prompts_path, model, use_chat_template, sample)


def check_prompts(
    prompts_path: str | Path, model: str, use_chat_template: bool, sample: int = TOKENIZATION_SAMPLE
) -> dict:
    """Whether the policy's tokenizer keeps the training prompts' text: the first `sample`
    prompts rendered as the generate stage renders them, encoded and decoded back."""
    tokenizer = load_tokenizer(model)
    rows = read_table(prompts_path, PROMPTS).slice(0, sample).to_pylist()
    return tokenization_loss(tokenizer, [render_prompt(r, tokenizer, use_chat_template) for r in rows])


def tokenization_warning(check: dict, model: str) -> str | None:
    """One line when the tokenizer loses characters of the prompts, with the counts."""
    if not check["lossy"]:
        return None
    k, text, back = check["example"]
    return (
        f"the tokenizer of {model} loses characters of {check['lossy']} of {check['prompts']} prompts checked "
        f"({check['unknown_tokens']} unknown tokens), e.g. {text[:40]!r} -> {back[:40]!r}: the model never "
        "sees that text"
    )


def preflight(config: GRPOConfig) -> None:
    """The checks that need no Prefect and no model: a missing model folder or dataset file,
    a hub dataset that is not cached while the hub is offline, a run folder that cannot be
    written: each reported in one line before the flow starts."""
    if config.model is not None:
        check_model_source(config.model)
    for engine in {config.generation_engine, config.eval_engine or config.generation_engine}:
        check_available(engine)
    for source in (*(config.datasets or {}), config.dataset, config.eval_dataset):
        local = source is not None and (Path(source).expanduser().exists() or source.startswith(("/", ".", "~")))
        if local or (source is not None and hub_offline()):  # offline, a hub name reads the local cache only
            next(read_source(source, split=config.dataset_split), None)  # parses the first row
    check_installed(config)  # --tracking-uri / --tensorboard without `make install-tracking`
    check_writable(Path(config.run_dir))


def check_writable(run_dir: Path) -> None:
    """Create `run_dir` (and its parents) and a probe file in it, removed at once, so that a
    read-only disk or folder is an error now, not after the first stage. Raises the OSError
    (with its file name) that the command line reports in one line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / f"{TMP_PREFIX}probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def versions() -> dict[str, str]:
    """What produced a run, for config.json: results are only comparable at equal versions."""
    return {pkg: importlib.metadata.version(pkg) for pkg in ("grpoflow", "torch", "transformers", "prefect", "pyarrow")}


def longest_prompt_tokens(prompts_path: str, tokenizer, use_chat_template: bool, candidates: int = 16) -> int:
    """Tokens of the longest prompt, as the model sees it (chat template included): the
    `candidates` longest by characters are tokenized, not the whole file."""
    table = read_table(prompts_path, PROMPTS, columns=["prompt_id", "prompt", "messages"]).to_pylist()
    rows = sorted(table, key=lambda r: len(r["prompt"] or json.dumps(r["messages"])), reverse=True)[:candidates]
    return max(
        (
            len(tokenizer(render_prompt(r, tokenizer, use_chat_template), add_special_tokens=False)["input_ids"])
            for r in rows
        ),
        default=0,
    )


def print_start_block(config: GRPOConfig, base_model: str, data_manifest: Manifest, eval_path: str | None) -> None:
    """The few lines a run prints before its first stage: what is trained on what, the key
    settings, and the update's estimated peak memory against the machine's (a warning when
    it does not fit)."""
    entries = data_manifest.entries()
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    shape = model_shape(base_model)
    prompt_tokens = longest_prompt_tokens(
        str(data_manifest.folder / "prompts.parquet"), load_tokenizer(base_model), config.use_chat_template
    )
    trained = lora_trained_parameters(shape, config.lora_rank) if config.lora_rank else None
    peak = update_peak_bytes(
        shape,
        micro_batch=config.micro_batch_size,
        sequence=prompt_tokens + config.max_new_tokens,
        completion=config.max_new_tokens,
        dtype_bytes=dtype.itemsize,
        checkpointing=config.gradient_checkpointing,
        logprob_chunk_tokens=config.logprob_chunk_tokens,
        trained_parameters=trained,
    )
    have, what = machine_memory_bytes(str(device))
    held_out = (
        f", {entries['eval.parquet']['rows']:,} held-out"
        if eval_path is not None and "eval.parquet" in entries
        else ", no held-out set"
    )
    keep = "all kept" if config.save_total_limit is None else f"newest {config.save_total_limit} kept"
    lines = [
        f"model     {config.model or 'built-in tiny model'} ({shape.parameters / 1e6:,.1f}M "
        f"parameters{', LoRA rank ' + str(config.lora_rank) if config.lora_rank else ''}, "
        f"{str(dtype).removeprefix('torch.')} on {device})",
        (
            f"data      {entries.get('prompts.parquet', {}).get('rows', 0):,} training prompts{held_out}; longest "
            f"prompt {prompt_tokens} tokens"
        ),
        f"rewards   {', '.join(f'{name} x{weight:g}' for name, weight in config.rewards.items())}",
        f"settings  {config.iterations} iterations x {config.prompts_per_iteration} prompts x {config.group_size} "
        "completions, "
        f"{config.max_new_tokens} new tokens, lr {config.learning_rate:g}, micro-batch {config.micro_batch_size}, "
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}, "
        f"checkpoint every {config.save_every} "
        f"({keep})",
        f"memory    update peak ~{gib(peak)} (estimated) of {gib(have)} {what}",
    ]
    print("\n".join(f"grpo: {line}" for line in lines), file=sys.stderr)
    if peak > have:
        print(
            f"grpo: warning: the update's estimated peak ({gib(peak)}) exceeds this machine's {what} ({gib(have)}): "
            "lower "
            "--micro-batch-size, turn on --gradient-checkpointing or shorten --max-new-tokens",
            file=sys.stderr,
        )


def write_config_record(run_dir: Path, config: GRPOConfig, log) -> None:
    """config.json: the settings in force, what produced the run, and every mid-run change
    of a setting (flows.config.MID_RUN_SAFE) with the first iteration it applies to. A
    meaning-changing difference from the stored settings is refused here too (for callers
    of the flow that bypass the command line), before config.json is touched."""
    changes = setting_changes(run_dir, config)
    path = run_dir / "config.json"
    history = json.loads(path.read_text()).get("changes", []) if path.is_file() else []
    if changes:
        first = completed_iterations(run_dir) + 1
        history.append(
            {
                "from_iteration": first,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "changed": {k: {"stored": old, "given": new} for k, (old, new) in sorted(changes.items())},
            }
        )
        log.info(f"settings changed on resume, from iteration {first}: {describe_changes(changes)}")
    atomic_write_json(
        path,
        {
            "config": config.model_dump(mode="json"),
            "versions": versions(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "changes": history,
        },
    )
