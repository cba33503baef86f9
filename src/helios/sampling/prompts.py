"""Prompt schedules for interactive, long videos (docs/design.md §3.3).

A prompt is a string or a schedule: a list of (prompt, n_chunks). When the prompt changes, the text embeddings
move from the old prompt to the new one linearly over the first `steps` chunks of the new prompt, with weights
linspace(0, 1, steps) (so with 3 steps: 0, 0.5, 1). Past the end of the schedule the last prompt continues (the
official code falls back to the first prompt there).

Schedules can be read from files (`read_schedule`): lines of `n_chunks<TAB>prompt`, or a CSV such as the official
interactive example (`id,prompt_index,prompt`: one video per id, each prompt held for a fixed number of chunks).
"""

from __future__ import annotations

import bisect
import csv
from itertools import accumulate
from pathlib import Path

PromptSchedule = list[tuple[str, int]]


def as_schedule(prompt) -> PromptSchedule:
    """Normalise a prompt (str) or schedule (list of (str, n_chunks)) to a schedule; checks it."""
    if isinstance(prompt, str):
        return [(prompt, 1)]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"prompt must be a string or a non-empty list of (prompt, n_chunks), got {prompt!r}")
    schedule = []
    for j, entry in enumerate(prompt):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"prompt schedule entry {j} must be (prompt, n_chunks), got {entry!r}")
        text, n = entry
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"prompt schedule entry {j} ({text[:40]!r}) needs a positive number of chunks, got {n!r}")
        schedule.append((text, n))
    return schedule


def scheduled_chunks(schedule: PromptSchedule) -> int:
    """Chunks the schedule asks for (1 for a plain prompt)."""
    return sum(n for _, n in schedule)


def blend_for_chunk(schedule: PromptSchedule, chunk: int, steps: int) -> tuple[int, int, float]:
    """(a, b, w): chunk `chunk` uses lerp(E_a, E_b, w) of the prompts' text embeddings."""
    ends = list(accumulate(n for _, n in schedule))
    j = min(bisect.bisect_right(ends, chunk), len(schedule) - 1)
    into = chunk - (ends[j - 1] if j else 0)
    if j == 0 or into >= steps - 1:  # weight 1 (and steps = 1): the new prompt exactly, not lerp(a, b, 1.0)
        return j, j, 1.0
    return j - 1, j, into / (steps - 1)


def read_schedule(path, chunks_per_prompt: int = 7, video_id: str | None = None) -> PromptSchedule:
    """A prompt schedule from a file; errors name the file and line.

    - `*.csv` with a header: a `prompt` column (a non-empty `refined_prompt` wins, as in the official script), an
      optional `n_chunks` or `chunks` column (else every prompt gets `chunks_per_prompt`, the official
      `--interpolate_time`, 7), optional `prompt_index` (order) and `id` (the official file holds several videos:
      pick one with `video_id`).
    - `*.csv` without a header: rows `n_chunks,prompt`.
    - any other file: lines `n_chunks<TAB>prompt`; blank lines and lines starting with # are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a byte-order mark
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompt schedule {path}: cannot read it ({err})") from err
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _tab_rows(path, text)
    if rows and rows[0][1][0].strip().lower() in _HEADER_NAMES:
        schedule = _from_header(path, rows, chunks_per_prompt, video_id)
    else:
        schedule = [(",".join(cells[1:]).strip(), _chunks(path, line, cells[0])) for line, cells in rows]
        for (line, _), (prompt, _) in zip(rows, schedule):
            if not prompt:
                raise ValueError(f"{path}:{line}: expected n_chunks and a prompt, got no prompt")
    if not schedule:
        raise ValueError(f"prompt schedule {path}: no prompts in it")
    return schedule


_HEADER_NAMES = {"id", "prompt_index", "prompt", "refined_prompt", "n_chunks", "chunks"}


def _tab_rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if "\t" not in raw:
            raise ValueError(f"{path}:{line}: expected 'n_chunks<TAB>prompt', got {raw[:60]!r}")
        rows.append((line, raw.split("\t", 1)))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    reader = csv.reader(text.splitlines())
    try:
        return [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({err})") from err


def _chunks(path: Path, line: int, text: str) -> int:
    try:
        n = int(text.strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{path}:{line}: the number of chunks must be a positive integer, got {text.strip()!r}")
    return n


def _from_header(path: Path, rows, chunks_per_prompt: int, video_id: str | None) -> PromptSchedule:
    """A CSV with named columns (see read_schedule)."""
    names = [c.strip().lower() for c in rows[0][1]]
    if "prompt" not in names:
        raise ValueError(f"{path}:{rows[0][0]}: a CSV header needs a 'prompt' column, got {names}")
    records = [(line, dict(zip(names, (c.strip() for c in cells)))) for line, cells in rows[1:]]
    ids = list(dict.fromkeys(r.get("id", "") for _, r in records))
    if video_id is not None:
        records = [(line, r) for line, r in records if r.get("id", "") == str(video_id)]
        if not records:
            raise ValueError(f"prompt schedule {path}: no rows with id {video_id}; ids: {', '.join(ids)}")
    elif len(ids) > 1:
        raise ValueError(f"prompt schedule {path} holds {len(ids)} videos (ids {', '.join(ids)}): "
                         "pick one by its id (helios generate --schedule-id)")
    count = "n_chunks" if "n_chunks" in names else "chunks" if "chunks" in names else None
    schedule = []
    for line, r in sorted(records, key=lambda item: _order(path, *item)):
        prompt = r.get("refined_prompt") or r.get("prompt", "")
        if not prompt:
            raise ValueError(f"{path}:{line}: empty prompt")
        schedule.append((prompt, _chunks(path, line, r.get(count, "")) if count else chunks_per_prompt))
    return schedule


def _order(path: Path, line: int, record: dict) -> int:
    if "prompt_index" not in record:
        return line
    try:
        return int(record["prompt_index"])
    except ValueError:
        raise ValueError(f"{path}:{line}: prompt_index must be an integer, got {record['prompt_index']!r}") from None
