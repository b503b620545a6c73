"""A run folder a practitioner can trust (issue 13): checkpoint rotation, the final model,
and one-line errors for a full disk, a read-only folder, an offline hub, a missing Prefect API."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data import builtin
from data.run_folder import CHECKPOINT, OPTIMIZER_FILE, iteration_dir, prune_checkpoints, resume_point
from data.store import Manifest, atomic_write_json
from flows.cli import main, prefect_api_error_line
from flows.train import grpo_train  # noqa: F401  imported now: Prefect's console handler must not bind to a test's capsys stream
from tests.test_resume import cli_args

REPO = Path(__file__).resolve().parents[1]


def small_run_flags(run_dir: Path, model: Path, dataset: Path, **extra) -> list[str]:
    """`grpo run` flags of a seconds-long run on the tiny model."""
    return cli_args(
        dict(
            run_dir=run_dir,
            model=model,
            dataset=dataset,
            task="arithmetic",
            iterations=3,
            prompts_per_iteration=4,
            group_size=3,
            max_new_tokens=4,
            micro_batch_size=12,
            learning_rate=0.01,
            eval_size=4,
            score_workers=1,
            rewards={"tests.test_resume:prefers_short": 1.0},
        )
        | extra
    )


@pytest.fixture()
def dataset(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(40, seed=3)))
    return path


def last_error_lines(capsys) -> tuple[list[str], str]:
    captured = capsys.readouterr()
    return [line for line in captured.err.splitlines() if line.strip()], captured.err


# --- rotation ------------------------------------------------------------------------------
def fake_iteration(run_dir: Path, it: int, checkpoint: bool = True, complete: bool = True) -> None:
    folder = iteration_dir(run_dir, it)
    folder.mkdir(parents=True)
    if checkpoint:
        (folder / CHECKPOINT).mkdir()
        (folder / CHECKPOINT / "model.safetensors").write_bytes(b"w")
        (folder / CHECKPOINT / OPTIMIZER_FILE).write_bytes(b"adam")
        Manifest(folder).record(CHECKPOINT)
    if complete:
        atomic_write_json(folder / "metrics.json", {"iteration": it})


def test_rotation_keeps_the_newest_n_and_only_the_resumable_one_has_optimiser_state(tmp_path):
    for it in range(1, 6):
        fake_iteration(tmp_path, it, checkpoint=it != 3)
    # Iteration 6's checkpoint is written but the iteration is not complete (killed before its
    # metrics.json): a resume starts from iteration 5, which must keep everything.
    fake_iteration(tmp_path, 6, complete=False)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert removed == {"checkpoints": [1, 2], "optimizer_states": [4]}
    kept = {
        it: sorted(p.name for p in (iteration_dir(tmp_path, it) / CHECKPOINT).iterdir())
        for it in range(1, 7)
        if (iteration_dir(tmp_path, it) / CHECKPOINT).is_dir()
    }
    assert kept == {
        4: ["model.safetensors"],
        5: ["model.safetensors", OPTIMIZER_FILE],
        6: ["model.safetensors", OPTIMIZER_FILE],
    }
    assert resume_point(tmp_path, 100).iteration == 5
    assert not list(tmp_path.rglob(".tmp-*"))
    # keep=None keeps every checkpoint, still with one optimiser state (the resumable one's).
    atomic_write_json(iteration_dir(tmp_path, 6) / "metrics.json", {"iteration": 6})
    assert prune_checkpoints(tmp_path, keep=None) == {"checkpoints": [], "optimizer_states": [5]}
    assert prune_checkpoints(tmp_path, keep=1) == {"checkpoints": [4, 5], "optimizer_states": []}
    assert (iteration_dir(tmp_path, 6) / CHECKPOINT / OPTIMIZER_FILE).is_file()


# --- the final model -------------------------------------------------------------------------
@pytest.mark.slow  # a `grpo run` on a Prefect API
def test_final_model_loads_has_no_optimiser_state_and_is_the_last_line(
    tmp_path, tiny_model_dir, dataset, prefect_harness, capsys, monkeypatch
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import flows.start
    from tasks.model import final_model_dir

    run = tmp_path / "run"
    assert final_model_dir(run) is None
    monkeypatch.setattr(flows.start, "machine_memory_bytes", lambda device: (2**29, "RAM"))  # a 0.5 GiB machine
    assert main(small_run_flags(run, tiny_model_dir, dataset, save_total_limit=2)) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert out[-1] == f"final model: {run / 'final'}"
    # The start block: what is trained on what, the key settings, the memory estimate.
    assert f"grpo: model     {tiny_model_dir} (1.0M parameters, float32 on cpu)" in captured.err
    assert "grpo: data      40 training prompts, no held-out set; longest prompt " in captured.err
    assert (
        "grpo: settings  3 iterations x 4 prompts x 3 completions, 4 new tokens, "
        "lr 0.01, micro-batch 12, gradient checkpointing on" in captured.err
    )
    assert "grpo: memory    update peak ~0.8 GiB (estimated) of 0.5 GiB RAM" in captured.err
    assert "grpo: warning: the update's estimated peak (0.8 GiB) exceeds this machine's RAM (0.5 GiB)" in captured.err
    final = final_model_dir(run)
    assert final == run / "final"
    assert sorted(p.name for p in final.iterdir() if p.name.endswith((".safetensors", ".pt", ".bin"))) == [
        "model.safetensors"
    ]
    # Rotation ran in the flow: two checkpoints, the optimiser state in the newest only.
    assert not (iteration_dir(run, 1) / CHECKPOINT).exists()
    assert not (iteration_dir(run, 2) / CHECKPOINT / OPTIMIZER_FILE).exists()
    assert (iteration_dir(run, 3) / CHECKPOINT / OPTIMIZER_FILE).exists()
    # final/ is the last iteration's policy, and loads as any Hugging Face model folder.
    model = AutoModelForCausalLM.from_pretrained(final)
    last = AutoModelForCausalLM.from_pretrained(iteration_dir(run, 3) / CHECKPOINT)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values(), strict=True))
    assert not all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values(), strict=True)
    )
    assert (
        AutoTokenizer.from_pretrained(final)
        .decode(AutoTokenizer.from_pretrained(final)("12+3=")["input_ids"])
        .replace(" ", "")
        == "12+3="
    )
    # Re-running the finished folder with more iterations re-exports final/ from the new last one.
    assert main(small_run_flags(run, tiny_model_dir, dataset, save_total_limit=2, iterations=4)) == 0
    assert Manifest(run).entries()["final"]["iteration"] == 4
    assert (final / "model.safetensors").read_bytes() != (
        iteration_dir(run, 3) / CHECKPOINT / "model.safetensors"
    ).read_bytes()


# --- one-line errors -------------------------------------------------------------------------
def assert_one_line_first(lines: list[str], text: str, message: str) -> None:
    errors = [i for i, line in enumerate(lines) if line.startswith("grpo: error: ")]
    assert len(errors) == 1, text
    assert message in lines[errors[0]], lines[errors[0]]
    assert "Traceback" not in text and not any(line.startswith("  File ") for line in lines), text


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    """Mount (as root, where allowed: CI runs as root) and unmount after; None when not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *options, str(target)], capture_output=True) if os.geteuid() == 0 else None
    if done is None or done.returncode != 0:
        yield None
        return
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def run_cli(flags: list[str], **env: str) -> subprocess.CompletedProcess:
    """`grpo` in a child process: its stderr is exactly what a user's console shows."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *flags],
        cwd=REPO,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow  # a `grpo run` subprocess on a Prefect API
def test_a_full_disk_is_one_line_saying_where_and_how_much(tmp_path, tiny_model_dir, prefect_harness, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(9000, seed=3)))
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=64k", "tmpfs") as small:
        if small is None:  # no mount here: the same failure of the Parquet writer, in this process
            import pyarrow.parquet as pq

            from data.schemas import PROMPTS
            from data.sources import normalise_row, prompts_table
            from data.store import DiskFull, ParquetStreamWriter

            monkeypatch.setattr(
                pq.ParquetWriter,
                "write_table",
                lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")),
            )
            table = prompts_table([normalise_row(builtin.train_problems(1)[0], data_source="x", row=0)])
            with pytest.raises(DiskFull, match=r"disk full writing .*prompts.parquet: .* free there"):
                with ParquetStreamWriter(tmp_path / "prompts.parquet", PROMPTS) as writer:
                    writer.write(table)
            assert list(tmp_path.glob(".tmp-*")) == []
            return
        # config.json and the lock fit in 64 KiB; the dataset's first artifact does not.
        done = run_cli(small_run_flags(small / "run", tiny_model_dir, big), PREFECT_API_URL=PREFECT_API_URL.value())
        assert not list((small / "run").rglob(".tmp-*")), "the partial file was left behind"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert_one_line_first(
        lines, done.stderr, f"disk full writing {small / 'run' / 'dataset' / 'prompts.parquet'}: the write needs "
    )
    assert "free there" in done.stderr


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(tmp_path, tiny_model_dir):
    from data.store import DiskFull, check_free_space
    from tasks.model import live_policy, save_checkpoint

    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as small:
        if small is None:
            pytest.skip("cannot mount a tmpfs here (not root); the pre-check is the same as check_free_space's")
        with pytest.raises(
            DiskFull,
            match=r"disk full writing .*/small/checkpoint: the write needs about 3\.\d MiB, 1\.0 MiB free there",
        ):
            save_checkpoint(live_policy(tiny_model_dir), small / "checkpoint")
        assert list(small.iterdir()) == []
    with pytest.raises(DiskFull, match="needs about"):
        check_free_space(tmp_path, 2**62)


def test_a_read_only_run_folder_is_one_line(tmp_path, tiny_model_dir, dataset, capsys):
    source = tmp_path / "source"
    source.mkdir()
    with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(source)) as ro:
        if ro is None:
            if os.geteuid() == 0:
                pytest.skip("root ignores permissions and cannot bind-mount here")
            ro = source
            ro.chmod(0o555)
        code = main(small_run_flags(ro / "run", tiny_model_dir, dataset))
        lines, text = last_error_lines(capsys)
        source.chmod(0o755)
    assert code == 2
    assert_one_line_first(lines, text, f"cannot write {ro / 'run'}: ")
    assert "read-only file system" in text or "permission denied" in text


def test_an_uncached_hub_dataset_offline_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        [
            "run",
            "--run-dir",
            str(tmp_path / "run"),
            "--model",
            str(tiny_model_dir),
            "--dataset",
            "no-such-org/no-such-data",
        ]
    )
    lines, text = last_error_lines(capsys)
    assert code == 2
    assert_one_line_first(
        lines, text, "dataset 'no-such-org/no-such-data' is not in the local Hugging Face cache and the hub is offline"
    )
    assert not (tmp_path / "run").exists()


def test_a_prefect_api_that_does_not_answer_is_one_line(tmp_path, tiny_model_dir, dataset, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        code = main(small_run_flags(tmp_path / "run", tiny_model_dir, dataset))
    lines, text = last_error_lines(capsys)
    assert code == 2
    assert_one_line_first(lines, text, "the Prefect API at http://127.0.0.1:9/api/ (PREFECT_API_URL) does not answer")
    # The temporary server's failure to start, as Prefect words it, is one line too.
    line = prefect_api_error_line(
        "Timed out while attempting to connect to ephemeral Prefect API server. "
        "Ephemeral server process exited with code 1. stdout: b'' stderr: b'...'"
    )
    assert line is not None and line.startswith(
        "the temporary Prefect API server did not start (its process exited with code 1;"
    )


def test_debug_prints_the_traceback_after_the_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        [
            "--debug",
            "run",
            "--run-dir",
            str(tmp_path / "run"),
            "--model",
            str(tiny_model_dir),
            "--dataset",
            "no-such/data",
        ]
    )
    text = capsys.readouterr().err
    assert code == 2
    assert text.index("grpo: error: ") < text.index("Traceback")


# --- resuming with the stored settings ---------------------------------------------------------
def folder_state(run: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(run)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
        for p in sorted(run.rglob("*"))
    }


@pytest.mark.slow  # three `grpo run`s on a Prefect API
def test_a_resume_refuses_other_settings_resumes_with_the_stored_ones_and_records_safe_changes(
    tmp_path, tiny_model_dir, dataset, prefect_harness, capsys
):
    from flows.observe.inspection import run_overview, settings_changes

    run = tmp_path / "run"
    assert main(small_run_flags(run, tiny_model_dir, dataset, iterations=2)) == 0
    before = folder_state(run)
    capsys.readouterr()

    # Flags that change what the artifacts mean: refused, one line each, nothing written.
    assert main(["run", "--run-dir", str(run), "--group-size", "4", "--temperature", "0.7", "--iterations", "3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[0].startswith(f"grpo: error: run folder {run} holds a run made with other settings (2 differ)")
    assert err[1:] == ["  group_size: stored 3, given 4", "  temperature: stored 1.0, given 0.7"]
    assert folder_state(run) == before

    # Only settings that may change mid-run: the stored model, dataset, rewards and group
    # size carry on, the changes are logged in config.json and per iteration.
    assert main(["run", "--run-dir", str(run), "--iterations", "3", "--learning-rate", "0.001"]) == 0
    third = iteration_dir(run, 3)
    assert Manifest(third).entries()["generations.parquet"]["rows"] == 4 * 3
    assert str(iteration_dir(run, 2) / CHECKPOINT) in Manifest(third).entries()["generations.parquet"]["inputs"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["model"] == str(tiny_model_dir) and saved["config"]["rewards"] == {
        "tests.test_resume:prefers_short": 1.0
    }
    assert saved["changes"] == [
        {
            "from_iteration": 3,
            "at": saved["changes"][0]["at"],
            "changed": {"iterations": {"stored": 2, "given": 3}, "learning_rate": {"stored": 0.01, "given": 0.001}},
        }
    ]
    assert json.loads((third / "metrics.json").read_text())["settings"]["learning_rate"] == 0.001
    assert Manifest(third).entries()[CHECKPOINT]["learning_rate"] == 0.001
    assert settings_changes(run_overview(run)) == [
        "iter-0003: settings changed: iterations 2 -> 3, learning_rate 0.01 -> 0.001"
    ]

    # No flags at all: the stored settings, nothing left to do, the same final model.
    capsys.readouterr()
    assert main(["run", "--run-dir", str(run)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"final model: {run / 'final'}"
    assert not iteration_dir(run, 4).exists() and len(json.loads((run / "config.json").read_text())["changes"]) == 1


def test_every_setting_changes_what_artifacts_mean_unless_listed_and_iterations_cannot_go_back(tmp_path):
    from flows.config import MID_RUN_SAFE, GRPOConfig, may_change_mid_run
    from flows.resume import SettingsMismatch, setting_changes

    assert set(MID_RUN_SAFE) <= set(GRPOConfig.model_fields)
    assert {"iterations", "eval_every", "save_every", "save_total_limit", "learning_rate"} <= set(MID_RUN_SAFE)
    assert not may_change_mid_run("a_setting_added_next_year") and not may_change_mid_run("group_size")
    config = GRPOConfig(run_dir=tmp_path, iterations=2)
    atomic_write_json(tmp_path / "config.json", {"config": config.model_dump(mode="json")})
    for it in (1, 2):
        atomic_write_json(iteration_dir(tmp_path, it) / "metrics.json", {"iteration": it})
    assert setting_changes(tmp_path, config) == {}
    with pytest.raises(SettingsMismatch, match="already has 2 complete iterations; --iterations 1 would go back"):
        setting_changes(tmp_path, config.model_copy(update={"iterations": 1}))
    (tmp_path / "config.json").write_text('{"config": {"no_such_setting": 1}}')
    with pytest.raises(SettingsMismatch, match="config.json: its settings are not valid for this grpoflow"):
        setting_changes(tmp_path, config)


# --- defaults that fit the model ----------------------------------------------------------------
def test_a_given_model_gets_real_model_defaults_and_explicit_settings_win():
    from flows.config import REAL_MODEL_DEFAULTS, GRPOConfig

    demo, real = GRPOConfig(), GRPOConfig(model="some/model")
    for name, value in REAL_MODEL_DEFAULTS.items():
        assert getattr(real, name) == value != getattr(demo, name), name
        assert "with --model the default is" in GRPOConfig.model_fields[name].description.lower()
    assert GRPOConfig(model="some/model", learning_rate=0.01, gradient_checkpointing=False).learning_rate == 0.01
    assert GRPOConfig(model="some/model", gradient_checkpointing=False).gradient_checkpointing is False
    # A stored config sets every field: reading it back changes nothing.
    stored = GRPOConfig(model="some/model", micro_batch_size=64).model_dump(mode="json")
    assert GRPOConfig(**stored).micro_batch_size == 64


def test_update_memory_estimate_matches_the_smollm2_measurements():
    from tasks.footprint import ModelShape, update_peak_bytes

    smollm2 = ModelShape(parameters=134_515_008, layers=30, hidden=576, intermediate=1536, heads=9, vocab=49152)
    measured = {False: 5565, True: 3333}  # MiB, benchmarks/RESULTS.md section 6 (micro-batch 8, 217-token rows, fp32)
    for checkpointing, mib in measured.items():
        estimate = (
            update_peak_bytes(
                smollm2,
                micro_batch=8,
                sequence=217,
                completion=32,
                dtype_bytes=4,
                checkpointing=checkpointing,
                logprob_chunk_tokens=1024,
            )
            / 2**20
        )
        assert abs(estimate - mib) / mib < 0.1, (checkpointing, estimate)
    # Micro-batch 64 was OOM-killed at 20.4 GiB: the estimate says it does not fit in that.
    assert (
        update_peak_bytes(
            smollm2,
            micro_batch=64,
            sequence=217,
            completion=32,
            dtype_bytes=4,
            checkpointing=False,
            logprob_chunk_tokens=1024,
        )
        > 20.4 * 2**30
    )


@pytest.mark.slow  # `grpo run`s on a Prefect API
def test_the_console_says_one_line_per_iteration_and_every_stage_with_verbose(
    tmp_path, tiny_model_dir, dataset, prefect_harness
):
    """What a user's terminal shows, from a real `grpo run` on a non-TTY: one line per iteration and the
    summary; the per-stage lines only with --verbose (the Prefect API receives them either way)."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    quiet = run_cli(small_run_flags(tmp_path / "quiet", tiny_model_dir, dataset, iterations=2), PREFECT_API_URL=api)
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert len([line for line in lines if re.search(r"iteration [12]/2: reward", line)]) == 2
    assert not [line for line in lines if re.search(r"iter-000\d/\S+: ", line)]  # no stage lines

    verbose = run_cli(
        ["run", "--verbose", *small_run_flags(tmp_path / "verbose", tiny_model_dir, dataset, iterations=2)[1:]],
        PREFECT_API_URL=api,
    )
    assert verbose.returncode == 0, verbose.stderr
    for stage in ("prompts.parquet", "generations.parquet", "rewards.parquet", "advantages.parquet", "checkpoint"):
        assert re.search(rf"iter-0002/{re.escape(stage)}: .*\(\d+\.\ds\)", verbose.stderr), stage
