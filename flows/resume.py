"""The settings of a resumed run folder: a folder is resumed with its stored settings
(config.json); a different value of a setting that changes what the artifacts mean is
refused before anything is written (`SettingsMismatch`, one line per setting, stored vs
given). The settings in flows.config.MID_RUN_SAFE may change; each change is kept in
config.json's "changes" with the first iteration it applies to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.errors import UserError
from data.run_folder import completed_iterations
from flows.config import GRPOConfig, may_change_mid_run


class SettingsMismatch(UserError):
    pass


def stored_settings(run_dir: str | Path) -> dict[str, Any]:
    """The settings in `run_dir`'s config.json ({} for a new folder)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SettingsMismatch(f"{path}: not valid JSON ({err}); it holds the settings of this run folder") from None
    return dict(saved.get("config", saved))


def _same(name: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    # One local folder or file named two ways ("./m" and "/abs/m") is the same setting.
    if name in ("model", "dataset", "eval_dataset") and isinstance(old, str) and isinstance(new, str):
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)


def setting_changes(run_dir: str | Path, config: GRPOConfig) -> dict[str, tuple[Any, Any]]:
    """The settings of `config` that differ from `run_dir`'s stored ones, as (stored, given);
    refuses (SettingsMismatch) when any of them may not change mid-run, or when fewer
    iterations are asked for than are already done. {} for a new folder."""
    stored = stored_settings(run_dir)
    if not stored:
        return {}
    try:
        before = GRPOConfig(**stored).model_dump(mode="json")
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        detail = (
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            if hasattr(err, "errors")
            else str(err)
        )
        raise SettingsMismatch(
            f"{Path(run_dir) / 'config.json'}: its settings are not valid for this grpoflow ({detail}); "
            "resume it with the grpoflow version that wrote it, or start a new --run-dir"
        ) from None
    after = config.model_dump(mode="json")
    changes = {k: (before.get(k), after[k]) for k in after if not _same(k, before.get(k), after[k]) and k != "run_dir"}
    refused = {k: v for k, v in changes.items() if not may_change_mid_run(k)}
    if refused:
        lines = [
            f"run folder {run_dir} holds a run made with other settings ({len(refused)} differ); a resume may "
            "not change what "
            "its artifacts mean: drop these flags to resume, or give a new --run-dir"
        ]
        lines += [f"  {k}: stored {_shown(old)}, given {_shown(new)}" for k, (old, new) in sorted(refused.items())]
        raise SettingsMismatch("\n".join(lines))
    done = completed_iterations(run_dir)
    if config.iterations < done:
        raise SettingsMismatch(
            f"run folder {run_dir} already has {done} complete iterations; --iterations {config.iterations} "
            f"would go back (give {done} or more)"
        )
    return changes


def resumed_config(given: dict[str, Any]) -> GRPOConfig:
    """The config of a run: `given` (flags and --config file) on top of the stored settings
    of its run folder when it has some, checked by `setting_changes` before anything is
    written."""
    run_dir = given.get("run_dir")
    stored = stored_settings(run_dir) if run_dir is not None else {}
    config = GRPOConfig(**(stored | given))
    if stored:
        setting_changes(run_dir, config)
    return config


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {_shown(old)} -> {_shown(new)}" for k, (old, new) in sorted(changes.items()))
