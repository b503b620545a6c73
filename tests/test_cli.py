"""`grpo` command line: help from the config's descriptions, one-line errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from flows.cli import build_parser, config_from_args, main
from flows.config import GRPOConfig, field_sections


def test_run_help_all_shows_every_config_field_with_its_description(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no line wrapping: compare the text itself
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help-all"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, field in GRPOConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(field.description.split()) in text


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("group_size: 4\nlearning_rate: 0.01\nrewards: {exact_answer: 2.0}\n")
    args = build_parser().parse_args(["run", "--config", str(cfg), "--group-size", "6", "--no-use-chat-template"])
    config = config_from_args(args)
    assert config.group_size == 6 and config.learning_rate == 0.01 and config.rewards == {"exact_answer": 2.0}
    assert config.use_chat_template is False and config.run_dir is not None


@pytest.mark.parametrize(
    ("argv", "config_text", "message"),
    [
        (["--group-size", "many"], None, "invalid config: 'group_size': Input should be a valid integer"),
        ([], "iterations: 2\nbogus_key: 1\n", "invalid config: 'bogus_key': Extra inputs are not permitted"),
        ([], "iterations: [1\n", "not valid YAML"),
        (
            ["--rewards", '{"nope": 1}'],
            None,
            "unknown reward 'nope'; known rewards: code, countdown, exact_answer, format, math, overlong",
        ),
        (
            ["--rewards", '{"math": 1}', "--reward-options", '{"math": {"bogus": 1}}'],
            None,
            "reward 'math' has no option 'bogus'; valid options:",
        ),
        (["--model", "/no/such/model/folder"], None, "model folder '/no/such/model/folder' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, config_text, message):
    if config_text is not None:
        (tmp_path / "c.yaml").write_text(config_text)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    code = main(["run", "--run-dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("grpo: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run" in out.stdout


def _run_parser_actions():
    parser = build_parser()
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    return run, {a.dest: a for a in run._actions if a.dest in GRPOConfig.model_fields}


def test_run_help_is_grouped_by_the_config_sections(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")
    with pytest.raises(SystemExit):
        main(["run", "--help-all"])
    text = capsys.readouterr().out
    sections = field_sections()
    assert {n for _, names in sections for n in names} == set(GRPOConfig.model_fields)
    assert [t for t, _ in sections][:3] == ["run", "model and machine", "data"]
    assert "issue" not in text.lower()  # help is for users: no tracker numbers
    for title, names in sections:  # every flag is printed after its section's header, before the next one
        start = text.index(f"\n{title}:\n")
        following = [text.index(f"\n{t}:\n") for t, _ in sections if text.index(f"\n{t}:\n") > start]
        block = text[start : min(following, default=len(text))]
        for name in names:
            assert "--" + name.replace("_", "-") in block, (title, name)


def test_run_help_shows_allowed_values_and_one_default_per_flag(capsys, monkeypatch):
    run, actions = _run_parser_actions()
    assert actions["advantage_estimator"].choices == ["grpo", "dr_grpo", "rloo"]
    assert actions["scale_rewards"].choices == ["group", "batch", "none"]
    for name, action in actions.items():
        assert action.help.lower().count("default:") <= 1, name
    assert "(default: " not in actions["run_dir"].help  # its description already says it
    assert actions["group_size"].help.endswith("(default: 8)")
    monkeypatch.setenv("COLUMNS", "100000")
    with pytest.raises(SystemExit):
        main(["run", "--help-all"])
    assert "--advantage-estimator {grpo,dr_grpo,rloo}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["run", "--advantage-estimator", "ppo"])
    assert exit_info.value.code == 2


def test_version_names_grpoflow_and_the_libraries(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"grpo {importlib.metadata.version('grpoflow')} (torch ") and "prefect " in out


def test_stage_line_stays_short_and_counts_what_it_leaves_out():
    from flows.runner import STAGE_LINE_LIMIT, stage_line

    summary = {f"update/metric_number_{k}": k / 7 for k in range(20)} | {"curve": [1, 2]}
    line = stage_line("iter-0003/checkpoint", summary, 12.5)
    assert len(line) <= STAGE_LINE_LIMIT and line.endswith(" more (12.5s)")
    shown = line.count("update/metric_number_")
    assert f"+{20 - shown} more" in line and shown >= 2
    assert (
        stage_line("iter-0001/rewards.parquet", {"rows": 128, "reward_mean": 0.41}, 2.3)
        == "iter-0001/rewards.parquet: rows 128, reward_mean 0.41 (2.3s)"
    )


def test_run_ends_with_a_short_summary_whose_last_line_is_the_model(tmp_path):
    from flows.cli import run_summary

    (tmp_path / "iter-0002" / "checkpoint").mkdir(parents=True)
    (tmp_path / "iter-0002" / "checkpoint" / "config.json").write_text("{}")
    lines = run_summary(
        tmp_path,
        {"iteration": 2, "reward": 0.5, "held_out_accuracy": 0.8, "held_out_accuracy_before": 0.6, "kl": 0.01},
        12.0,
    )
    assert len(lines) <= 6  # not the 40-line JSON dump (--json prints that)
    assert "held-out accuracy: 60.0% -> 80.0% (+20.0 points)" in lines[1]
    assert lines[-1] == f"final model: {tmp_path / 'iter-0002' / 'checkpoint'}"
    (tmp_path / "final").mkdir()
    assert run_summary(tmp_path, {"iteration": 2}, 1.0)[-1] == f"final model: {tmp_path / 'final'}"
    assert run_summary(tmp_path, {"final_model": "/x/final"}, 1.0)[-1] == "final model: /x/final"


def test_run_help_lists_the_essential_settings_and_help_all_every_one(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    short = capsys.readouterr().out
    assert "--model" in short and "--learning-rate" in short and "--help-all" in short
    assert "--vllm-cpu-kv-cache-gb" not in short and "--score-chunk-rows" not in short
    with pytest.raises(SystemExit):
        main(["run", "--help-all"])
    assert "--vllm-cpu-kv-cache-gb" in capsys.readouterr().out


def test_trl_names_are_accepted_and_trl_flags_without_a_match_say_what_to_use(tmp_path, capsys):
    args = build_parser().parse_args(
        ["run", "--num-generations", "4", "--max-completion-length", "64", "--num-iterations", "2", "--save-steps", "5"]
    )
    assert (args.group_size, args.max_new_tokens, args.mu, args.save_every) == ("4", "64", "2", "5")
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--run-dir", str(tmp_path / "r"), "--gradient-accumulation-steps", "2", "--iteratons", "3"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--gradient-accumulation-steps (TRL's) has no one-to-one setting here" in err
    assert "unknown flag --iteratons; did you mean --iterations?" in err
    assert not (tmp_path / "r").exists()  # refused before anything ran
