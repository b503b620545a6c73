"""Keep the prompts a run has not trained on yet (scheduled retraining, flows/serve.py).

Prompt ids are content hashes (data/schemas.py), so a problem that reappears in a later
version of a dataset file, in another row or another file, is recognised as seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import PROMPTS
from data.store import ParquetStreamWriter, iter_batches


def seen_prompt_ids(prompt_files: Sequence[str | Path]) -> set[str]:
    seen: set[str] = set()
    for path in prompt_files:
        for batch in iter_batches(path, PROMPTS, columns=["prompt_id"]):
            seen.update(batch.column("prompt_id").to_pylist())
    return seen


def keep_unseen_prompts(candidates_path: str | Path, seen_files: Sequence[str | Path], out_path: str | Path) -> dict:
    """Write the rows of `candidates_path` whose prompt_id is in none of `seen_files`, in
    their order, streamed."""
    seen = pa.array(sorted(seen_prompt_ids(seen_files)), pa.string())
    candidates = 0
    with ParquetStreamWriter(out_path, PROMPTS) as out:
        for batch in iter_batches(candidates_path, PROMPTS):
            candidates += batch.num_rows
            out.write(
                pa.Table.from_batches([batch]).filter(pc.invert(pc.is_in(batch.column("prompt_id"), value_set=seen)))
            )
        kept = out.rows
    return {"prompts": kept, "candidates": candidates, "seen": len(seen)}


@task(name="unseen-prompts", cache_policy=NO_CACHE)
def unseen_prompts_task(candidates_path: str, seen_files: list[str], out_path: str) -> dict:
    return keep_unseen_prompts(candidates_path, seen_files, out_path)
