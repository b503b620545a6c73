"""`grpo`: the command line. `grpo run --help` lists every config field with its description
(the pydantic model is the single source of that text).

Errors a user can fix (a missing model folder, a dataset row without an answer, an unknown
config key, a full disk, a read-only folder, an offline hub, a Prefect API that does not
answer) print one line naming what and where, and exit with status 2. That line comes first:
Prefect's own report of the failed run (its traceback) is kept off the console unless
`grpo --debug` (or GRPOFLOW_DEBUG=1), which also prints the traceback after the line.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import time
import typing
from pathlib import Path

from pydantic import ValidationError

from data.errors import UserError
from flows.config import GRPOConfig, field_sections
from flows.prefect_server import PrefectServerError, start_own_server


def _quiet_offline_defaults() -> None:
    # No telemetry calls (they error without network) and no Prefect banner noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Each stage logs its own one-line summary; the engine's "Finished in state" lines add nothing.
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_FAILURE_REPORT = re.compile(
    r"Finished in state (Failed|Crashed)|Encountered exception|failed with exception|Retry \d+/\d+ will start"
)


class _NoFailureReports(logging.Filter):
    """Drop Prefect's console report of a failed task or flow run (a traceback of 40-300
    lines, repeated per retry): the CLI prints the error itself, in one line, or the
    traceback of a bug. The Prefect API still receives the full report."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        return not (record.exc_info or _FAILURE_REPORT.search(record.getMessage()))


def quiet_failure_reports() -> None:
    """Install `_NoFailureReports` on Prefect's console handler (call after importing Prefect)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _NoFailureReports) for f in handler.filters
        ):
            handler.addFilter(_NoFailureReports())


def _debugging(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("GRPOFLOW_DEBUG") == "1"


def _flag_type(annotation):
    """argparse `type=` for a config field: JSON for mappings, text for the rest (pydantic
    validates and converts, so its messages are the ones a user sees)."""
    arms = [annotation, *typing.get_args(annotation)]  # `dict[...] | None` too
    if any(a in (dict, list) or typing.get_origin(a) in (dict, list) for a in arms):
        return json.loads
    return str


def _allowed_values(annotation) -> list[str] | None:
    """The values of a Literal field (also inside `Literal[...] | None`), for `choices=`."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    for arm in typing.get_args(annotation):
        if typing.get_origin(arm) is typing.Literal:
            return [str(v) for v in typing.get_args(arm)]
    return None


def _help_text(field) -> str:
    """The field's description, with its default appended unless the description already
    says what the default is (no doubled "Default:")."""
    text = field.description
    if "default:" not in text.lower():
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, (dict, list)) else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, help = the field's description, grouped by the config's
    section comments; Literal fields list their allowed values. Only flags the user gives
    are applied, on top of --config and the defaults."""
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON file of settings; flags override it.")
    for title, names in field_sections():
        group = parser.add_argument_group(title)
        for name in names:
            field = GRPOConfig.model_fields[name]
            flag = "--" + name.replace("_", "-")
            if field.annotation is bool:
                group.add_argument(
                    flag,
                    dest=name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=_help_text(field),
                )
                continue
            choices = _allowed_values(field.annotation)
            group.add_argument(
                flag,
                dest=name,
                type=_flag_type(field.annotation),
                default=argparse.SUPPRESS,
                choices=choices,
                metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                help=_help_text(field),
            )


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    """Defaults < --config file < flags; for a run folder that has a config.json, the stored
    settings take the place of the defaults, and a flag that would change what its artifacts
    mean is refused (flows.resume.setting_changes) before anything is written."""
    from flows.resume import resumed_config

    given = (GRPOConfig.settings_file(args.config) if args.config else {}) | {
        k: v for k, v in vars(args).items() if k in GRPOConfig.model_fields
    }
    if given.get("run_dir") is None:
        given["run_dir"] = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return resumed_config(given)


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "config"
        parts.append(
            f"'{where}': {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and "input" in e else "")
        )
    return "invalid config: " + "; ".join(parts)


def _announce_ready(server) -> None:
    seconds = server.wait_ready()
    if os.environ.get("GRPOFLOW_TIMINGS") == "1":  # benchmarks/bench_startup.py reads it
        print(f"grpo: prefect api ready {seconds:.2f}s after start", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # The run's Prefect API starts now, before torch and Prefect are imported, so its
    # start-up overlaps theirs; it dies with this process however that dies.
    server = start_own_server()
    from flows.start import preflight  # imported late: Prefect reads its settings at import
    from flows.train import grpo_train  # imported late: Prefect reads its settings at import

    if not _debugging(args):
        quiet_failure_reports()
    preflight(config)
    print(f"grpo: run folder {config.run_dir}", file=sys.stderr)
    if server is not None:
        _announce_ready(server)
    started = time.perf_counter()
    metrics = grpo_train(config)
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
    # The model's path is the last line, always: scripts take it with `tail -1`.
    print("\n".join(run_summary(Path(config.run_dir), metrics, time.perf_counter() - started)))
    return 0


def final_model_path(run_dir: Path, metrics: dict | None = None) -> Path | None:
    """Where the trained model is: the flow's final_model (DIR/final), else the run's final/
    folder when it has one, else the newest saved checkpoint."""
    if metrics and metrics.get("final_model"):
        return Path(metrics["final_model"])
    if (run_dir / "final").is_dir():
        return run_dir / "final"
    saved = sorted(p for p in run_dir.glob("iter-*/checkpoint") if (p / "config.json").is_file())
    return saved[-1] if saved else None


def run_summary(run_dir: Path, metrics: dict, seconds: float) -> list[str]:
    """The few lines a finished run ends with (every number is in metrics.parquet); the
    model's path is the last line, so `grpo run ... | tail -1` gives it."""
    lines = [f"grpo: finished {metrics.get('iteration', 0)} iteration(s) in {seconds:.0f}s; run folder {run_dir}"]
    if "held_out_accuracy" in metrics:
        after = metrics["held_out_accuracy"]
        before = metrics.get("held_out_accuracy_before")
        change = (
            f"{before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points)"
            if before is not None
            else f"{after:.1%}"
        )
        lines.append(f"  held-out accuracy: {change}")
    last = [
        f"reward {metrics['reward']:.3f}" if "reward" in metrics else "",
        f"kl {metrics['kl']:.4f}" if "kl" in metrics else "",
    ]
    if any(last):
        lines.append("  last iteration: " + ", ".join(x for x in last if x))
    lines.append(f"  every metric: {run_dir / 'metrics.parquet'} (grpo inspect {run_dir})")
    final = final_model_path(run_dir, metrics)
    lines.append(f"final model: {final if final is not None else 'none saved'}")
    return lines


def cmd_rescore(args: argparse.Namespace) -> int:
    server = start_own_server()  # see cmd_run
    from flows.rescore import default_tag, format_comparison, grpo_rescore  # late: Prefect reads its settings at import

    if not _debugging(args):
        quiet_failure_reports()

    tag = args.tag or default_tag()
    if server is not None:
        _announce_ready(server)
    results = grpo_rescore(
        str(args.target),
        tag,
        rewards=args.rewards,
        reward_options=args.reward_options,
        max_error_fraction=args.max_reward_error_fraction,
    )
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for result in results:
            print(format_comparison(Path(result["folder"]), result))
        print(f"grpo: re-scored {len(results)} generations file(s) as @{tag}", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from data.schemas import SchemaError
    from flows.observe.inspection import dumps, inspect_path

    try:
        data = inspect_path(
            args.target,
            prompt_id=args.prompt_id,
            sample=args.sample,
            sort=args.sort,
            tag=args.tag,
            seed=args.seed,
            as_json=args.json,
        )
    except SchemaError as err:  # the file the user pointed at is not a grpoflow artifact (or not this version's)
        raise UserError(str(err)) from err
    if args.json:
        print(dumps(data))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    overrides = {k: v for k, v in vars(args).items() if k in GRPOConfig.model_fields}
    iterations = int(overrides.pop("iterations", 1))
    run_dir = overrides.pop("run_dir", None)
    if run_dir is None:
        raise UserError("grpo serve needs --run-dir: the run folder every scheduled run continues")
    settings = (
        GRPOConfig.from_file(args.config).model_dump(mode="json", exclude_unset=True) if args.config else {}
    ) | overrides
    from flows.observe.tracking import check_installed

    check_installed(GRPOConfig(**settings))  # invalid settings, or tracking without its extra, fail now, not at 3 a.m.
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "grpo: warning: PREFECT_API_URL is not set; runs can only be triggered from this process. "
            "Start a server (prefect server start) and set PREFECT_API_URL to trigger runs from elsewhere.",
            file=sys.stderr,
        )
    print(
        f"grpo: serving {args.name} for {run_dir} (cron {args.cron or 'none'}, {iterations} iteration(s) per run)",
        file=sys.stderr,
    )
    serve(
        run_dir,
        cron=args.cron,
        settings=json.loads(json.dumps(settings, default=str)),
        iterations=iterations,
        name=args.name,
    )
    return 0


def version_text() -> str:
    """grpoflow's version and those of the libraries that decide what a run computes."""
    import importlib.metadata

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return f"grpo {version('grpoflow')} (torch {version('torch')}, transformers {version('transformers')}, prefect {version('prefect')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo",
        description="GRPO training as a Prefect pipeline: every stage writes a Parquet artifact you can inspect or re-run.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback (and Prefect's failure reports) after an error's one line",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        usage="grpo run [--config FILE] [--SETTING VALUE ...] (every setting below, by section)",
        help="train with GRPO (no arguments: the built-in tiny model on 2-digit addition)",
        description="Run GRPO iterations. With no arguments: build (once, cached) a tiny model on the built-in "
        "arithmetic task, then train it and report held-out accuracy before and after. Re-using --run-dir resumes.",
    )
    run.add_argument("--json", action="store_true", help="print the final metrics as JSON instead of the short summary")
    add_config_flags(run)
    run.set_defaults(handler=cmd_run)

    rescore = commands.add_parser(
        "rescore",
        help="re-score cached generations with other rewards (no model loaded)",
        description="Run the score and advantages stages again over the generations of a run folder (every iteration) or "
        "of one generations.parquet, writing rewards@TAG.parquet and advantages@TAG.parquet beside the originals (never "
        "over them), and print how the rewards changed.",
    )
    rescore.add_argument("target", type=Path, help="a run folder, or one iteration's generations.parquet")
    rescore.add_argument(
        "--rewards",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="reward functions and weights, e.g. '{\"math\": 1.0}' (default: the run's own)",
    )
    rescore.add_argument(
        "--reward-options",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="options of the rewards, as for grpo run (default: the run's, for the rewards it keeps)",
    )
    rescore.add_argument(
        "--tag", default=None, help="name of this re-scoring in the file names (default: the current time)"
    )
    rescore.add_argument(
        "--max-reward-error-fraction",
        type=float,
        default=None,
        metavar="FRACTION",
        help="fail when more than this fraction of rows cannot be scored (default: the run's setting)",
    )
    rescore.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    rescore.set_defaults(handler=cmd_rescore)

    inspect = commands.add_parser(
        "inspect",
        help="show a run folder (iterations x stages) or the completions of an artifact",
        description="With a run folder: one table of iterations x stages (rows, status, time, reward, held-out accuracy, kl, "
        "frac_reward_zero_std). With an artifact (.parquet): its groups of completions side by side with their rewards, "
        "advantage and kept flag, the prompt and gold answer above them.",
    )
    inspect.add_argument("target", type=Path, help="a run folder or an artifact file")
    inspect.add_argument("--prompt-id", default=None, help="show this prompt's group only")
    inspect.add_argument(
        "--sample",
        type=int,
        default=3,
        metavar="N",
        help="groups (or rows) shown, picked at random with --seed (default: 3)",
    )
    inspect.add_argument(
        "--sort", choices=["reward", "advantage"], default=None, help="order each group's completions, highest first"
    )
    inspect.add_argument(
        "--tag", default=None, help="for generations.parquet: join the rewards and advantages of this re-scoring"
    )
    inspect.add_argument("--seed", type=int, default=0, help="seed of --sample (default: 0)")
    inspect.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    inspect.set_defaults(handler=cmd_inspect)

    serve = commands.add_parser(
        "serve",
        help="serve a Prefect deployment that retrains a run folder on a schedule",
        description="Serve the Prefect deployment grpo-scheduled/NAME. Each of its runs continues --run-dir from its latest "
        "checkpoint with up to --iterations new iterations, on dataset prompts that no earlier iteration used. Other flags "
        "override the run folder's config (on an empty folder they are the config). Trigger a run with "
        "`prefect deployment run grpo-scheduled/NAME`.",
    )
    serve.add_argument(
        "--cron", default=None, help='schedule, e.g. "0 3 * * *" (default: none, runs are triggered by hand)'
    )
    serve.add_argument("--name", default="default", help="deployment name (default: default)")
    add_config_flags(serve)
    serve.set_defaults(handler=cmd_serve)
    return parser


# Errors that mean "your input is wrong", reported in one line; anything else is a bug and
# keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from data.run_folder import RunFolderBusy
    from data.store import DiskFull
    from flows.observe.tracking import MissingExtra
    from rewards.registry import UnknownRewardError
    from tasks.model import ModelLoadError

    # Not ValueError as such: a library's or our own internal ValueError (a schema mismatch
    # in a run's own artifact, say) is a bug, and its traceback is what a report needs.
    return (
        UserError,
        UnknownRewardError,
        ModelLoadError,
        RunFolderBusy,
        DiskFull,
        MissingExtra,
        PrefectServerError,
        FileNotFoundError,
    )


def prefect_api_error_line(message: str) -> str | None:
    """Prefect's two ways of saying it has no API (a RuntimeError each), in one line."""
    if message.startswith("Failed to reach API at"):
        url = message.removeprefix("Failed to reach API at").strip()
        return (
            f"the Prefect API at {url} (PREFECT_API_URL) does not answer: start it (prefect server start) or unset "
            "PREFECT_API_URL to run with a temporary local one"
        )
    if message.startswith("Timed out while attempting to connect to ephemeral Prefect API server"):
        code = re.search(r"exited with code (-?\d+)", message)
        how = f"its process exited with code {code.group(1)}" if code else "it did not answer in time"
        return (
            f"the temporary Prefect API server did not start ({how}; PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')}): "
            "run `grpo --debug ...` for its output, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow machine, "
            "or set PREFECT_API_URL to a running server (prefect server start)"
        )
    return None


def user_error_line(err: BaseException) -> str | None:
    """The one line for an error the user can fix, or None for a bug (which keeps its
    traceback)."""
    if isinstance(err, ValidationError):
        return format_validation_error(err)
    if isinstance(err, _user_errors()):
        return str(err)
    if isinstance(err, RuntimeError) and (line := prefect_api_error_line(str(err))) is not None:
        return line
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and err.filename:
        what = "read-only file system" if err.errno == errno.EROFS else "permission denied"
        return f"cannot write {err.filename}: {what}; give a --run-dir on a writable disk (or fix the folder's permissions)"
    if isinstance(err, ConnectionError):
        return f"network: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    _quiet_offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("grpo: interrupted; re-run with the same --run-dir to resume", file=sys.stderr)
        return 130
    except Exception as err:
        line = user_error_line(err)
        if line is None:
            raise
        print(f"grpo: error: {line}", file=sys.stderr)
        if _debugging(args):
            import traceback

            traceback.print_exception(err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
