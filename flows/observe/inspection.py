"""`grpo inspect`: what a run folder holds, or what one artifact says, between stages.

(Not named inspect.py: a process that puts flows/ on sys.path, as a Prefect worker does
for the entrypoint flows/serve.py, would import it in place of the standard library's.)

    grpo inspect runs/exp1                      one table: iterations x stages
    grpo inspect runs/exp1/iter-0003/rewards.parquet --sample 2 --sort reward
    grpo inspect runs/exp1/iter-0003/generations.parquet --prompt-id 3f2a... --json

Everything here reads files only: no model, no Prefect, so it answers in a second while a
run is going on in another process. Big artifacts are read a column or a few groups at a
time (Parquet filters), never whole.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.errors import UserError
from data.run_folder import CHECKPOINT, iteration_numbers
from data.schemas import ARTIFACTS, SchemaError
from data.store import MANIFEST, TMP_PREFIX, Manifest, read_rows_where
from flows.observe.state import read_state

# (column title, file or entry name in an iteration folder), in pipeline order.
STAGES = [
    ("prompts", "prompts.parquet"),
    ("generate", "generations.parquet"),
    ("score", "rewards.parquet"),
    ("advantages", "advantages.parquet"),
    ("update", CHECKPOINT),
    ("eval", "eval"),
]
CHAMPION = "champion"  # the registry alias of the model a scheduled run starts from
GROUP_ARTIFACTS = ("generations", "rewards", "advantages")


# --- the run folder -----------------------------------------------------------------------
def stage_state(folder: Path, entries: dict[str, dict], name: str) -> dict[str, Any]:
    """Status of one stage output: done (recorded, file unchanged in size), saved / in
    memory (a checkpoint written or not), changed (recorded but the file differs), partial
    (a temp file of a writer that was killed or is still writing), or missing."""
    entry = entries.get(name)
    if entry is None:
        partial = any(folder.glob(f"{TMP_PREFIX}{name}.*"))
        return {"status": "partial" if partial else "missing", "rows": None, "seconds": None}
    target = folder / name
    kind = entry.get("kind")
    if kind == "file":
        # Size, not sha256: inspect must stay instant on big files (the flow checks sha256).
        status = "done" if target.is_file() and target.stat().st_size == entry.get("bytes") else "changed"
    elif kind == "folder":
        status = (
            "saved" if target.is_dir() else "removed" if entry.get("removed_at") else "changed"
        )  # removed: save_total_limit
    else:
        status = "in memory" if name == CHECKPOINT else "done"  # an update whose checkpoint was not saved
    return {"status": status, "rows": entry.get("rows"), "seconds": entry.get("seconds")}


def _mean_std(path: Path, column: str = "reward") -> tuple[float, float]:
    values = pq.read_table(path, columns=[column]).column(column)
    values = pc.filter(values, pc.invert(pc.is_nan(values)))
    if len(values) == 0:
        return math.nan, math.nan
    mean = pc.mean(values).as_py()
    std = pc.stddev(values, ddof=1).as_py() if len(values) > 1 else 0.0
    return mean, std


def run_overview(run_dir: str | Path) -> list[dict[str, Any]]:
    """One record per iteration folder: each stage's state, the reward mean and std (from
    rewards.parquet), held-out accuracy, kl and frac_reward_zero_std (from metrics.json or
    the stage summaries), and the mean reward of every re-scoring of it."""
    run_dir = Path(run_dir)
    rows = []
    for it in iteration_numbers(run_dir):
        folder = run_dir / f"iter-{it:04d}"
        entries = Manifest(folder).entries()
        metrics_path = folder / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        summary = {name: entries.get(name, {}).get("summary", {}) for _, name in STAGES}
        record: dict[str, Any] = {
            "iteration": it,
            "stages": {title: stage_state(folder, entries, name) for title, name in STAGES},
        }
        rewards = folder / "rewards.parquet"
        record["reward_mean"], record["reward_std"] = (
            _mean_std(rewards) if "rewards.parquet" in entries and rewards.is_file() else (math.nan, math.nan)
        )
        record["held_out_accuracy"] = metrics.get("held_out_accuracy", summary["eval"].get("accuracy"))
        record["kl"] = metrics.get("kl", summary[CHECKPOINT].get("kl"))
        record["frac_reward_zero_std"] = metrics.get(
            "frac_reward_zero_std", summary["advantages.parquet"].get("frac_reward_zero_std")
        )
        record["settings"] = metrics.get("settings", {})  # those that may change on resume, as they were here
        record["rescored"] = {
            name.removeprefix("rewards@").removesuffix(".parquet"): _mean_std(folder / name)[0]
            for name in sorted(entries)
            if name.startswith("rewards@") and (folder / name).is_file()
        }
        rows.append(record)
    return rows


def _cell(state: dict[str, Any]) -> str:
    status = state["status"]
    if status == "missing":
        return "[dim]-[/dim]"
    colour = {
        "done": "green",
        "saved": "green",
        "in memory": "cyan",
        "partial": "yellow",
        "changed": "red",
        "removed": "dim",
    }[status]
    parts = [f"[{colour}]{status}[/{colour}]"]
    if state["rows"] is not None:
        parts.append(str(state["rows"]))
    if state["seconds"] is not None:
        parts.append(f"{state['seconds']:.1f}s")
    return " ".join(parts)


def _num(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def settings_changes(overview: list[dict[str, Any]]) -> list[str]:
    """One line per iteration whose settings (those a resume may change) differ from the
    iteration before it: "iter-0004: settings changed: learning_rate 0.01 -> 0.001"."""
    lines, before = [], None
    for r in overview:
        now = r.get("settings") or {}
        if before is not None and now:
            changed = [f"{k} {before.get(k)} -> {v}" for k, v in sorted(now.items()) if k in before and before[k] != v]
            if changed:
                lines.append(f"iter-{r['iteration']:04d}: settings changed: {', '.join(changed)}")
        before = now or before
    return lines


def render_run(run_dir: str | Path, console) -> None:
    from rich.table import Table

    run_dir = Path(run_dir)
    overview = run_overview(run_dir)
    table = Table(title=f"{run_dir}", title_justify="left")
    table.add_column("iter", justify="right")
    for title, _ in STAGES:
        table.add_column(title)
    for title in ("reward (mean ± std)", "held-out", "kl", "zero-std"):
        table.add_column(title, justify="right")
    for r in overview:
        reward = "" if math.isnan(r["reward_mean"]) else f"{r['reward_mean']:.3f} ± {r['reward_std']:.3f}"
        table.add_row(
            str(r["iteration"]),
            *(_cell(r["stages"][t]) for t, _ in STAGES),
            reward,
            _num(r["held_out_accuracy"], ".1%"),
            _num(r["kl"], ".4f"),
            _num(r["frac_reward_zero_std"], ".2f"),
        )
    console.print(table)
    for line in settings_changes(overview):
        console.print(line)
    for r in overview:
        if r["rescored"]:
            shown = ", ".join(f"@{tag} {mean:.3f}" for tag, mean in r["rescored"].items())
            console.print(f"iter-{r['iteration']:04d} re-scored: {shown}")
    plot = run_dir / "learning_curve.png"
    if plot.is_file():
        console.print(f"learning curve: {plot}")


def registry_versions(run_dir: Path) -> list[dict[str, Any]]:
    """The model versions this run folder registered (flows/observe/registry.py), each with
    `champion`: whether it is the champion now (asked of the registry when mlflow is
    installed and the store answers; else as decided at registration, with
    `champion_source` saying which)."""
    entries = [dict(e) for e in read_state(run_dir).get("registry", [])]
    current: dict[tuple[str, str], int | None] = {}
    for e in entries:
        key = (e["tracking_uri"], e["name"])
        if key not in current:
            current[key] = _current_champion(*key)
        found = current[key]
        e["champion"] = e["promoted"] if found is None else found == e["version"]
        e["champion_source"] = "recorded at registration" if found is None else "registry"
    return entries


def _current_champion(uri: str, name: str) -> int | None:
    try:  # only a tracked folder pays for these imports; without the extra, the recorded decision stands
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        return None
    try:
        version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, CHAMPION)
    except (MlflowException, OSError):
        return None
    return int(version.version)


def render_registry(versions: list[dict[str, Any]], console) -> None:
    from rich.table import Table

    if not versions:
        return
    table = Table(title="registered models", title_justify="left")
    for title in ("model", "version", "iteration", "metric", "value", "held-out set", "champion", "gate"):
        table.add_column(title, overflow="fold")
    for v in versions:
        table.add_row(
            v["name"],
            str(v["version"]),
            str(v["iteration"]),
            v["metric"],
            _num(v["value"], ".4g"),
            (v["heldout_sha256"] or "none")[:12],
            "[green]champion[/green]" if v["champion"] else "",
            v["reason"],
        )
    console.print(table)
    if any(v["champion_source"] != "registry" for v in versions):
        console.print(
            "[yellow]registry not reachable (or mlflow not installed): champion as decided at registration[/yellow]"
        )


# --- one artifact ---------------------------------------------------------------------------
def artifact_kind(path: Path) -> tuple[str, str | None]:
    """(artifact name, re-scoring tag or None): from the file's schema metadata, else from
    its name (``rewards@v2.parquet`` -> ("rewards", "v2"))."""
    stem, _, tag = path.name.removesuffix(".parquet").partition("@")
    try:
        meta = pq.read_schema(path).metadata or {}
    except pa.ArrowInvalid as err:
        raise SchemaError(f"{path}: not a Parquet artifact ({err})") from None
    kind = meta.get(b"grpoflow.artifact", b"").decode() or stem
    return kind, tag or None


def sibling_paths(path: Path, kind: str, tag: str | None) -> dict[str, Path]:
    """The artifacts of the same iteration that a group view joins: the rewards and
    advantages of the same re-scoring tag as `path` (or of `tag`)."""
    folder = path.parent
    suffix = f"@{tag}" if tag else ""
    found = {
        "prompts": folder / "prompts.parquet",
        "generations": folder / "generations.parquet",
        "rewards": folder / f"rewards{suffix}.parquet",
        "advantages": folder / f"advantages{suffix}.parquet",
    }
    found[kind] = path
    return {k: p for k, p in found.items() if p.is_file()}


def _rows_for(path: Path, prompt_ids: list[str], columns: list[str] | None = None) -> list[dict]:
    kind, _ = artifact_kind(path)
    schema = pq.read_schema(path)
    wanted = [c for c in columns if c in schema.names] if columns is not None else None
    return read_rows_where(path, ARTIFACTS[kind], "prompt_id", prompt_ids, wanted).to_pylist()


def choose_prompt_ids(path: Path, *, prompt_id: str | None, sample: int, seed: int) -> list[str]:
    """`prompt_id`, or `sample` groups drawn at random (seeded) from the artifact."""
    if prompt_id is not None:
        return [prompt_id]
    ids = pc.unique(pq.read_table(path, columns=["prompt_id"]).column("prompt_id")).to_pylist()
    if len(ids) <= sample:
        return ids
    picked = set(random.Random(seed).sample(ids, sample))
    return [i for i in ids if i in picked]  # in file order


def _gold(prompt: dict) -> str | None:
    if prompt.get("answer") is not None:
        return prompt["answer"]
    if prompt.get("tests"):
        return f"{len(prompt['tests'])} asserts"
    if prompt.get("io"):
        return f"{len(prompt['io'])} stdin/stdout cases"
    if prompt.get("test"):
        return f"check({prompt.get('entry_point') or 'candidate'})"
    return None


def _prompt_text(prompt: dict) -> str | None:
    if prompt.get("prompt") is not None:
        return prompt["prompt"]
    messages = prompt.get("messages") or []
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) or None


@dataclass
class GroupView:
    prompt_id: str
    prompt: str | None
    gold: str | None
    task: str | None
    completions: list[dict[str, Any]]  # sample_index, completion, rewards{fn}, reward, advantage, kept...

    def as_json(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "gold": self.gold,
            "task": self.task,
            "completions": self.completions,
        }


def load_groups(paths: dict[str, Path], prompt_ids: list[str], sort: str | None = None) -> list[GroupView]:
    """The completions of `prompt_ids` with everything known about them, joined on
    (prompt_id, sample_index) across whichever of the iteration's artifacts exist."""
    by_key: dict[tuple[str, int], dict[str, Any]] = {}

    def row_for(r: dict) -> dict[str, Any]:
        return by_key.setdefault((r["prompt_id"], r["sample_index"]), {"sample_index": r["sample_index"]})

    if "generations" in paths:
        for r in _rows_for(
            paths["generations"], prompt_ids, ["prompt_id", "sample_index", "completion", "finish_reason"]
        ):
            row_for(r).update(completion=r["completion"], finish_reason=r["finish_reason"])
    if "rewards" in paths:
        for r in _rows_for(paths["rewards"], prompt_ids):
            row = row_for(r)
            row["rewards"] = {k.removeprefix("reward/"): v for k, v in r.items() if k.startswith("reward/")}
            row["errors"] = {k.removeprefix("error/"): v for k, v in r.items() if k.startswith("error/") and v}
            row["reward"] = r["reward"]
    if "advantages" in paths:
        for r in _rows_for(
            paths["advantages"], prompt_ids, ["prompt_id", "sample_index", "reward", "advantage", "kept", "drop_reason"]
        ):
            row = row_for(r)
            row.setdefault("reward", r["reward"])
            row.update(advantage=r["advantage"], kept=r["kept"], drop_reason=r["drop_reason"])
    prompts = {p["prompt_id"]: p for p in _rows_for(paths["prompts"], prompt_ids)} if "prompts" in paths else {}

    groups = []
    for pid in prompt_ids:
        rows = [row for (p, _), row in sorted(by_key.items(), key=lambda kv: kv[0][1]) if p == pid]
        if sort is not None:
            rows.sort(key=lambda row: _sort_value(row.get(sort)), reverse=True)
        prompt = prompts.get(pid, {})
        groups.append(GroupView(pid, _prompt_text(prompt), _gold(prompt), prompt.get("task"), rows))
    return groups


def _sort_value(value) -> float:
    # Missing and NaN (unscorable) rows sort last.
    return -math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def render_groups(groups: list[GroupView], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    for g in groups:
        gold = f"  gold: [bold]{g.gold}[/bold]" if g.gold is not None else ""
        console.print(f"\n[bold]prompt {g.prompt_id}[/bold] ({g.task or 'unknown task'}){gold}")
        if g.prompt is not None:
            console.print(g.prompt, markup=False, highlight=False)
        if not g.completions:
            console.print("[yellow]no completions for this prompt in these artifacts[/yellow]")
            continue
        functions = list(dict.fromkeys(fn for row in g.completions for fn in row.get("rewards", {})))
        table = Table(show_lines=True)
        table.add_column("#", justify="right")
        table.add_column("completion", overflow="fold")
        for fn in functions:
            table.add_column(fn, justify="right")
        for title in ("reward", "advantage", "kept"):
            table.add_column(title, justify="right")
        for row in g.completions:
            completion = row.get("completion")
            if completion is None:
                completion = "[dim](not in these artifacts)[/dim]"
            else:
                completion = escape(completion) if completion else "[dim](empty)[/dim]"
                completion += "  [dim](cut)[/dim]" if row.get("finish_reason") == "length" else ""
            kept = row.get("kept")
            table.add_row(
                str(row["sample_index"]),
                completion,
                *(_num(row.get("rewards", {}).get(fn), ".3g") or "[red]error[/red]" for fn in functions),
                _num(row.get("reward"), ".3f"),
                _num(row.get("advantage"), "+.3f"),
                "" if kept is None else ("yes" if kept else f"no ({row.get('drop_reason')})"),
            )
        console.print(table)
        for row in g.completions:
            for fn, error in row.get("errors", {}).items():
                console.print(f"  #{row['sample_index']} {fn}: [red]{error}[/red]", highlight=False)


def render_rows(path: Path, prompt_ids: list[str] | None, limit: int, console) -> list[dict]:
    """Any other artifact (prompts, rejected rows...): its rows, without token-id lists."""
    from rich.table import Table

    schema = pq.read_schema(path)
    columns = [f.name for f in schema if not pa.types.is_list(f.type) or f.name == "messages"]
    if prompt_ids is not None and "prompt_id" in schema.names:
        rows = _rows_for(path, prompt_ids, columns)
    else:
        first = next(pq.ParquetFile(path).iter_batches(batch_size=limit, columns=columns), None)
        rows = first.to_pylist() if first is not None else []
    if console is not None:
        table = Table(title=f"{path} (first {len(rows)} rows)", title_justify="left", show_lines=True)
        shown = [c for c in columns if any(r.get(c) is not None for r in rows)]
        for c in shown:
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*("" if r.get(c) is None else str(r[c]) for c in shown))
        console.print(table)
    return rows


# --- entry point -------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN is not JSON; scripts read null as "not scored"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def make_console():
    from rich.console import Console

    # Piped output has no terminal width; the run table needs more than rich's 80 columns.
    return Console(width=shutil.get_terminal_size((160, 24)).columns, highlight=False)


def inspect_path(
    target: str | Path,
    *,
    prompt_id: str | None = None,
    sample: int = 3,
    sort: str | None = None,
    tag: str | None = None,
    seed: int = 0,
    as_json: bool = False,
) -> dict[str, Any]:
    """Print (or return as JSON-ready data) the view of a run folder or an artifact."""
    target = Path(target)
    if not target.exists():
        raise FileNotFoundError(f"{target}: no such run folder or artifact")
    console = None if as_json else make_console()
    if target.is_dir():
        if not (target / "config.json").exists() and not any(target.glob(f"iter-*/{MANIFEST}")):
            raise FileNotFoundError(f"{target}: not a run folder (no config.json and no iter-*/ folders)")
        registry = registry_versions(target)
        if console is not None:
            render_run(target, console)
            render_registry(registry, console)
        return {
            "run_dir": str(target),
            "iterations": run_overview(target),
            **({"registry": registry} if registry else {}),
        }

    kind, file_tag = artifact_kind(target)
    if kind not in ARTIFACTS:
        raise SchemaError(f"{target}: not a grpoflow artifact (schema metadata says '{kind}')")
    if kind in GROUP_ARTIFACTS:
        paths = sibling_paths(target, kind, file_tag or tag)
        ids = choose_prompt_ids(target, prompt_id=prompt_id, sample=sample, seed=seed)
        groups = load_groups(paths, ids, sort=sort)
        if prompt_id is not None and not any(g.completions for g in groups):
            raise UserError(f"{target}: no rows with prompt_id {prompt_id}")
        if console is not None:
            joined = ", ".join(p.name for p in paths.values() if p != target) or "nothing"
            console.print(f"{target}: {pq.read_metadata(target).num_rows} rows; joined with {joined}")
            render_groups(groups, console)
        return {"artifact": str(target), "kind": kind, "tag": file_tag or tag, "groups": [g.as_json() for g in groups]}
    rows = render_rows(
        target, [prompt_id] if prompt_id else None, max(sample, 1) if prompt_id is None else 10_000, console
    )
    return {"artifact": str(target), "kind": kind, "rows": rows}


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(_jsonable(data), indent=2, default=str)
