"""`grpo`: the command line. `grpo run --help` lists every config field with its description
(the pydantic model is the single source of that text).

Errors a user can fix (a missing model folder, a dataset row without an answer, an unknown
config key, a full disk, a read-only folder, an offline hub, a Prefect API that does not
answer) print one line naming what and where, and exit with status 2. That line comes first:
Prefect's own report of the failed run (its traceback) is kept off the console unless
`grpo --debug` (or GRPOFLOW_DEBUG=1), which also prints the traceback after the line.

SIGINT (Ctrl-C) and SIGTERM stop `grpo run`, `grpo rescore` and `grpo serve` (flows/stopping.py):
one line says where the command stopped and which command resumes it, and the exit status is
130 or 143. A Prefect API server that the command started and that dies under it ends the
command in one line too (status 2), instead of leaving it to retry a dead API.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import logging
import os
import re
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from data.errors import UserError
from flows.config import ESSENTIAL, GRPOConfig, field_sections
from flows.prefect_server import PrefectServerError, ServerChild, start_own_server
from flows.stopping import StopOnSignals, Stopped, exit_status, resume_command


def _quiet_offline_defaults() -> None:
    # No telemetry calls (they error without network) and no Prefect banner noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Each stage logs its own one-line summary; the engine's "Finished in state" lines add nothing.
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_FAILURE_REPORT = re.compile(
    r"Finished in state (Failed|Crashed)|Encountered exception|failed with exception|Retry \d+/\d+ will start"
    r"|Crash detected!"
)


class _NoFailureReports(logging.Filter):
    """Drop Prefect's console report of a failed task or flow run (a traceback of 40-300
    lines, repeated per retry): the CLI prints the error itself, in one line, or the
    traceback of a bug. The Prefect API still receives the full report."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        return not (record.exc_info or _FAILURE_REPORT.search(record.getMessage()))


class _NoDetails(logging.Filter):
    """Drop the lines a flow marks as details (flows.runner.DETAIL: one per stage) from the
    console, which keeps one line per iteration and what needs a human; `grpo --verbose`
    shows them. The Prefect API still receives every line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "grpoflow_detail", False)


def tidy_console(args: argparse.Namespace) -> None:
    """Install the console filters on Prefect's console handler (call after importing Prefect):
    failure reports unless --debug, per-stage details unless --verbose."""
    from prefect.logging.handlers import PrefectConsoleHandler

    wanted = ([] if _debugging(args) else [_NoFailureReports]) + ([] if _verbose(args) else [_NoDetails])
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            for kind in wanted:
                if not any(isinstance(f, kind) for f in handler.filters):
                    handler.addFilter(kind())


VERBOSE_HELP = "print every stage's one-line summary (default: one line per iteration and what needs you)"


def _verbose(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "verbose", False)) or os.environ.get("GRPOFLOW_VERBOSE") == "1"


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


# TRL's names for our settings, accepted as they are (TRL's GRPOConfig; the docs' mapping table).
TRL_FLAGS: dict[str, str] = {
    "--num-generations": "group_size",
    "--max-completion-length": "max_new_tokens",
    "--max-prompt-length": "max_prompt_length",
    "--num-iterations": "mu",  # TRL's PPO epochs per generation batch, GRPO's mu (not our --iterations)
    "--per-device-train-batch-size": "micro_batch_size",
    "--save-steps": "save_every",
    "--save-total-limit": "save_total_limit",
    "--loss-type": "loss_aggregation",
    "--lr-scheduler-type": "lr_scheduler",
}
# TRL flags with no one-to-one setting here, and what to use instead.
TRL_INSTEAD: dict[str, str] = {
    "--gradient-accumulation-steps": "gradients always accumulate over --micro-batch-size chunks to one step per "
    "--mini-batches; set --micro-batch-size for memory",
    "--logging-steps": "every iteration is logged (metrics.parquet); --verbose prints every stage",
    "--report-to": "--tracking-uri (MLflow) and/or --tensorboard DIR",
    "--output-dir": "--run-dir",
    "--num-train-epochs": "--iterations (prompts are drawn in seeded epochs over the dataset)",
}


def add_config_flags(parser: argparse.ArgumentParser, show_all: bool = True) -> None:
    """One flag per config field, help = the field's description, grouped by the config's
    sections; Literal fields list their allowed values; TRL's names are accepted too. With
    `show_all` False, only the essential settings are listed (`--help`; `--help-all` lists
    all). Only flags the user gives are applied, on top of --config and the defaults."""
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON file of settings; flags override it.")
    aliases = {field: [flag for flag, f in TRL_FLAGS.items() if f == field] for field in GRPOConfig.model_fields}
    for title, names in field_sections():
        shown = [n for n in names if show_all or n in ESSENTIAL]
        group = parser.add_argument_group(title) if shown else parser
        for name in names:
            field = GRPOConfig.model_fields[name]
            flags = ["--" + name.replace("_", "-"), *aliases[name]]
            help_text = _help_text(field) if name in shown else argparse.SUPPRESS
            if field.annotation is bool:
                group.add_argument(
                    *flags,
                    dest=name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
                continue
            choices = _allowed_values(field.annotation)
            group.add_argument(
                *flags,
                dest=name,
                type=_flag_type(field.annotation),
                default=argparse.SUPPRESS,
                choices=choices,
                metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                help=help_text,
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


@dataclass
class CommandState:
    """What a stopping command says about itself: how to resume it, and its run folder."""

    argv: list[str]
    resume_options: dict[str, str] = field(default_factory=dict)  # defaults written out (see resume_command)
    run_dir: Path | None = None
    server: ServerChild | None = None

    def resume(self) -> str:
        return resume_command(self.argv, self.resume_options)

    def progress(self) -> str:
        """How far the run folder got, for the stop line ("" when there is no run folder yet)."""
        resume = sys.modules.get("flows.resume")  # loaded by then, unless stopped during start-up
        if self.run_dir is None or not self.run_dir.is_dir() or resume is None:
            return ""
        return f"{resume.completed_iterations(self.run_dir)} iteration(s) complete in {self.run_dir}"

    def stop_line(self, signum: int, during: str) -> str:
        where = "; ".join(x for x in (f"during {during}" if during else "", self.progress()) if x)
        return (
            f"grpo: stopping on {Stopped(signum).signal_name}{' (' + where + ')' if where else ''}; "
            f"resume with: {self.resume()}"
        )

    def kill_children_now(self) -> None:
        """For an exit without clean-up: the API server is in a process group of its own, so it
        is ended here (the kernel's parent-death signal would reach it too, a moment later)."""
        if self.server is not None:
            self.server.stopping.set()
            if self.server.proc.poll() is None:
                self.server.proc.kill()


def start_server(state: CommandState) -> ServerChild | None:
    """The command's own Prefect API (flows/prefect_server.py), kept where `kill_children_now`
    finds it."""
    state.server = start_own_server()
    return state.server


def _watch_server(state: CommandState, stop: StopOnSignals) -> None:
    """If the command's own API server dies while the command runs, the command ends at once
    in one line: a run that went on against a dead API retried every Prefect call and ran
    ~15x slower, and a finished one waited minutes for its last reports."""
    server = state.server
    if server is None:
        return

    def lost(code: int) -> None:
        stop.fail_now(
            f"grpo: error: the Prefect API server of this command (pid {server.proc.pid}, {server.url}) exited with "
            f"status {code}; stopped at once, since no stage can be recorded without it; resume with: {state.resume()}",
            2,
        )

    server.watch(lost)


def _announce_ready(server, state: CommandState | None = None, stop: StopOnSignals | None = None) -> None:
    seconds = server.wait_ready()
    if state is not None and stop is not None:
        _watch_server(state, stop)
    if os.environ.get("GRPOFLOW_TIMINGS") == "1":  # benchmarks/bench_startup.py reads it
        print(f"grpo: prefect api ready {seconds:.2f}s after start", file=sys.stderr)


def cmd_run(args: argparse.Namespace, state: CommandState, stop: StopOnSignals) -> int:
    config = config_from_args(args)
    state.run_dir = Path(config.run_dir)
    state.resume_options["--run-dir"] = str(config.run_dir)
    # The run's Prefect API starts now, before torch and Prefect are imported, so its
    # start-up overlaps theirs; it dies with this process however that dies.
    server = start_server(state)
    from flows.start import preflight  # imported late: Prefect reads its settings at import
    from flows.train import grpo_train  # imported late: Prefect reads its settings at import

    tidy_console(args)
    preflight(config)
    print(f"grpo: run folder {config.run_dir}", file=sys.stderr)
    if server is not None:
        _announce_ready(server, state, stop)
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


def cmd_rescore(args: argparse.Namespace, state: CommandState, stop: StopOnSignals) -> int:
    server = start_server(state)  # see cmd_run
    from flows.rescore import default_tag, format_comparison, grpo_rescore  # late: Prefect reads its settings at import

    tidy_console(args)

    tag = args.tag or default_tag()
    state.resume_options["--tag"] = tag  # the default tag is the time: resuming needs this one
    if server is not None:
        _announce_ready(server, state, stop)
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


def cmd_inspect(args: argparse.Namespace, state: CommandState, stop: StopOnSignals | None) -> int:
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


def cmd_serve(args: argparse.Namespace, state: CommandState, stop: StopOnSignals) -> int:

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
    state.run_dir = Path(run_dir)
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "grpo: warning: PREFECT_API_URL is not set; runs can only be triggered from this process. "
            "Start a server (prefect server start) and set PREFECT_API_URL to trigger runs from elsewhere.",
            file=sys.stderr,
        )
    # The temporary API (when none is configured) is ours, as for `grpo run`: out of the
    # terminal's Ctrl-C, stopped after the served runs, watched while serving.
    server = start_server(state)
    from flows.serve import serve  # late: Prefect reads its settings at import

    if server is not None:
        _announce_ready(server, state, stop)
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

    return (
        f"grpo {version('grpoflow')} (torch {version('torch')}, transformers {version('transformers')}, prefect "
        f"{version('prefect')})"
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with a hint for a flag it does not know: the closest known one, or what to
    use instead of a TRL flag that has no one-to-one setting here."""

    known_flags: list[str] = []

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            unknown = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            if unknown:
                message = "; ".join(unknown_flag_hint(flag, self.known_flags) for flag in unknown)
        super().error(message)


def unknown_flag_hint(flag: str, known: list[str]) -> str:
    if flag in TRL_INSTEAD:
        return f"{flag} (TRL's) has no one-to-one setting here: {TRL_INSTEAD[flag]}"
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
    return f"unknown flag {flag}" + (
        f"; did you mean {close[0]}?" if close else " (grpo run --help-all lists every flag)"
    )


def build_parser(show_all: bool = False) -> argparse.ArgumentParser:
    """`show_all`: `grpo run --help` lists every setting, not only the essential ones."""
    parser = _Parser(
        prog="grpo",
        description=(
            "GRPO training as a Prefect pipeline: every stage writes a Parquet artifact you can inspect or re-run."
        ),
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=VERBOSE_HELP,
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback (and Prefect's failure reports) after an error's one line",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        usage="grpo run [--config FILE] [--SETTING VALUE ...] (--help: the essential settings; --help-all: every one)",
        help="train with GRPO (no arguments: the built-in tiny model on 2-digit addition)",
        description="Run GRPO iterations. With no arguments: build (once, cached) a tiny model on the built-in "
        "arithmetic task, then train it and report held-out accuracy before and after. Re-using --run-dir resumes.",
    )
    run.add_argument("--json", action="store_true", help="print the final metrics as JSON instead of the short summary")
    run.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    add_config_flags(run, show_all)
    run.set_defaults(handler=cmd_run)

    rescore = commands.add_parser(
        "rescore",
        help="re-score cached generations with other rewards (no model loaded)",
        description="Run the score and advantages stages again over the generations of a run "
        "folder (every iteration) or "
        "of one generations.parquet, writing rewards@TAG.parquet and advantages@TAG.parquet beside the originals "
        "(never "
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
    rescore.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    rescore.set_defaults(handler=cmd_rescore)

    inspect = commands.add_parser(
        "inspect",
        help="show a run folder (iterations x stages) or the completions of an artifact",
        description="With a run folder: one table of iterations x stages (rows, status, time, "
        "reward, held-out accuracy, "
        "kl, "
        "frac_reward_zero_std). With an artifact (.parquet): its groups of completions side by side with "
        "their rewards, "
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
        description="Serve the Prefect deployment grpo-scheduled/NAME. Each of its runs continues "
        "--run-dir from its latest "
        "checkpoint with up to --iterations new iterations, on dataset prompts that no earlier iteration "
        "used. Other flags "
        "override the run folder's config (on an empty folder they are the config). Trigger a run with "
        "`prefect deployment run grpo-scheduled/NAME`.",
    )
    serve.add_argument(
        "--cron", default=None, help='schedule, e.g. "0 3 * * *" (default: none, runs are triggered by hand)'
    )
    serve.add_argument("--name", default="default", help="deployment name (default: default)")
    add_config_flags(serve, show_all)
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
            f"the temporary Prefect API server did not start ({how}; "
            f"PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')}): "
            "run `grpo --debug ...` for its output, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on "
            "a slow machine, "
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
        return (
            f"cannot write {err.filename}: {what}; give a --run-dir on a writable disk "
            "(or fix the folder's permissions)"
        )
    if isinstance(err, ConnectionError):
        return f"network: {err}"
    return None


STOPPABLE = ("run", "rescore", "serve")  # the commands that start processes and write artifacts


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(p for action in subparsers for p in action.choices.values())]


def main(argv: list[str] | None = None) -> int:
    _quiet_offline_defaults()
    argv = sys.argv[1:] if argv is None else list(argv)
    show_all = "--help-all" in argv
    parser = build_parser(show_all)
    parser.known_flags = sorted({flag for p in _all_parsers(parser) for a in p._actions for flag in a.option_strings})
    args = parser.parse_args(["--help" if a == "--help-all" else a for a in argv])
    state = CommandState(argv)
    stop = StopOnSignals(state.stop_line, state.kill_children_now, during=_current_stage)
    try:
        if args.command not in STOPPABLE:
            return args.handler(args, state, None)
        with stop:
            try:
                return args.handler(args, state, stop)
            finally:
                if state.server is not None:
                    state.server.stopping.set()  # what the server does from here is no loss to the command
    except Stopped as stopped:  # its line was printed when the signal came
        return exit_status(stopped.signum)
    except KeyboardInterrupt:  # SIGINT without our handler: the command called in-process, from a thread
        print(f"grpo: interrupted; resume with: {state.resume()}", file=sys.stderr)
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


def _current_stage() -> str:
    """The stage running now (tasks.progress), read from a signal handler: nothing imported
    there (the signal may land in the middle of an import); no stage before it is loaded."""
    progress = sys.modules.get("tasks.progress")
    return progress.current_stage() if progress is not None else ""


if __name__ == "__main__":
    sys.exit(main())
