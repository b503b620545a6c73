"""`grpo` command line: help from the config's descriptions, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import build_parser, config_from_args, main
from flows.config import GRPOConfig


def test_run_help_shows_every_config_field_with_its_description(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no line wrapping: compare the text itself
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
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
        (["--rewards", '{"nope": 1}'], None, "unknown reward 'nope'; known rewards: code, countdown, exact_answer, format, math, overlong"),
        (["--rewards", '{"math": 1}', "--reward-options", '{"math": {"bogus": 1}}'], None, "reward 'math' has no option 'bogus'; valid options:"),
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
