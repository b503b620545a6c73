"""`grpo`: the command line. `grpo run --help` lists every config field with its description
(the pydantic model is the single source of that text).

Errors a user can fix (a missing model folder, a dataset row without an answer, an unknown
config key) print one line naming what and where, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from pathlib import Path

from pydantic import ValidationError

from flows.config import GRPOConfig


def _quiet_offline_defaults() -> None:
    # No telemetry calls (they error without network) and no Prefect banner noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Each stage logs its own one-line summary; the engine's "Finished in state" lines add nothing.
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _flag_type(annotation):
    """argparse `type=` for a config field: JSON for mappings, text for the rest (pydantic
    validates and converts, so its messages are the ones a user sees)."""
    origin = typing.get_origin(annotation)
    if annotation is dict or origin is dict:
        return json.loads
    return str


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, help = the field's description. Only flags the user gives
    are applied, on top of --config and the defaults."""
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON file of settings; flags override it.")
    for name, field in GRPOConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} (default: {default})"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=_flag_type(field.annotation), default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    overrides = {k: v for k, v in vars(args).items() if k in GRPOConfig.model_fields}
    config = GRPOConfig.from_file(args.config, **overrides) if args.config else GRPOConfig(**overrides)
    if config.run_dir is None:
        config.run_dir = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return config


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "config"
        parts.append(f"'{where}': {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and "input" in e else ""))
    return "invalid config: " + "; ".join(parts)


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from flows.train import grpo_train, preflight  # imported late: Prefect reads its settings at import

    preflight(config)
    print(f"grpo: run folder {config.run_dir}", file=sys.stderr)
    metrics = grpo_train(config)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo",
        description="GRPO training as a Prefect pipeline: every stage writes a Parquet artifact you can inspect or re-run.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="train with GRPO (no arguments: the built-in tiny model on 2-digit addition)",
        description="Run GRPO iterations. With no arguments: build (once, cached) a tiny model on the built-in "
        "arithmetic task, then train it and report held-out accuracy before and after. Re-using --run-dir resumes.",
    )
    add_config_flags(run)
    run.set_defaults(handler=cmd_run)
    return parser


# Errors that mean "your input is wrong", reported in one line; anything else is a bug and
# keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from data.schemas import SchemaError
    from data.sources import InvalidRow, SourceError
    from rewards.registry import UnknownRewardError
    from tasks.model import ModelLoadError

    return (SchemaError, InvalidRow, SourceError, UnknownRewardError, ModelLoadError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    _quiet_offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as err:
        print(f"grpo: error: {format_validation_error(err)}", file=sys.stderr)
        return 2
    except _user_errors() as err:
        print(f"grpo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grpo: interrupted; re-run with the same --run-dir to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
