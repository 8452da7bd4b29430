"""One resumable pass over a test file's rows into one output file: the skeleton that generation
(moa/infer/generate.py, example.py) and the held-out loss (moa/infer/loss.py, evaluate_loss.py) share.

    run_locked(save_path, device, run)      under torchrun every rank calls it; rank 0 holds the output's lock
    job = RowJob(save, rows, rank, world)   inside `run`:
    job.settle(settings, overwrite, tool)   the settings that decide the rows (rank 0); True: a complete
                                            file with these settings is there, left alone
    job.pending()                           the rows no partial file of an interrupted run holds yet
    job.deal(items, length, index)          longest first, dealt round-robin: this rank's share
    job.write_partial(batches, run_batch)   this rank's records appended to its partial file, flushed and
                                            synced after every batch
    job.gather(stats)                       every rank's stats (the barrier after which all partials are closed)
    job.finish(then)                        rank 0 merges the partial files into the output file (test
                                            order, with its settings sidecar), then `then(counts)`

The partial files, the merge and the sidecar: moa/infer/predictions.py. The lock: moa/files/lock.py.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from moa.files.lock import OutputLock
from moa.infer.predictions import complete_already, merge_partials, partial_header, partial_path, read_partials
from moa.train.distributed import init_distributed, on_rank0

T = TypeVar("T")
Item = TypeVar("Item")
Batch = TypeVar("Batch", bound=Sequence[Any])


def run_locked(save_path: str | os.PathLike, device: Optional[str],
               run: Callable[[int, int, torch.device], T]) -> T:
    """`run(rank, world_size, device)` in this process's place under torchrun (a plain process is rank 0
    of 1; `device` None: CUDA when available, else cpu), with rank 0, the writer of `save_path`, holding
    its lock (`OutputLock`) for the whole run. A process group opened here is closed at the end."""
    own_group = not dist.is_initialized()
    env = init_distributed(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lock = OutputLock(save_path)
    try:
        on_rank0(lock.acquire, env.rank, env.world_size)
        return run(env.rank, env.world_size, env.device)
    finally:
        lock.release()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class RowJob:
    """This rank's part of one pass over `rows` (the test file's rows) into the output file `save`."""

    save: Path
    rows: list[dict]
    rank: int = 0
    world: int = 1
    settings: Optional[dict] = None  # set by `settle`
    resumed: int = 0  # rows found in partial files, set by `pending`

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0, its result (or error) handed to every rank."""
        return on_rank0(fn, self.rank, self.world)

    def settle(self, settings: Callable[[], dict], overwrite: bool, tool: str) -> bool:
        """Compute the settings that decide the rows (rank 0; they go into the partial files' header and
        the output's sidecar) and decide what to do with an existing output (`complete_already`): True
        when it is complete with these settings (left alone), False when this run (re)writes it."""
        self.settings = self.on_rank0(settings)
        return self.on_rank0(lambda: complete_already(self.save, self._settings(), len(self.rows), overwrite, tool))

    def pending(self) -> list[int]:
        """Indices of the rows still to do: those in no partial file written with these settings (a line a
        kill cut short is dropped from its file). Sets `resumed` to the number of rows found."""
        done = set(self.on_rank0(lambda: sorted(read_partials(self.save, self._settings(), self.rows, repair=True))))
        self.resumed = len(done)
        return [i for i in range(len(self.rows)) if i not in done]

    def deal(self, items: Sequence[Item], length: Callable[[Item], int], index: Callable[[Item], int]) -> list[Item]:
        """This rank's share of `items`: all of them sorted longest first (ties by row index; a batch that
        runs out of memory does so at the start), dealt round-robin so that every rank gets a similar mix."""
        ordered = sorted(items, key=lambda it: (-length(it), index(it)))
        return ordered[self.rank::self.world]

    @property
    def partial(self) -> Path:
        """This rank's partial file."""
        return partial_path(self.save, self.rank, self.world)

    def write_partial(self, batches: Sequence[Batch], run_batch: Callable[[Batch], list[dict]], *,
                      show_progress: bool = False, postfix: Optional[Callable[[float], dict[str, Any]]] = None) -> float:
        """Run `batches` and append the records `run_batch` returns for each (one per row, each starting
        with the row's `index`) to this rank's partial file, which gets the settings header as its first
        line when new; flushed and synced after every batch. `postfix(seconds so far)`: what the progress
        bar shows after each batch. Returns the seconds it took."""
        t0 = time.perf_counter()
        partial = self.partial
        fresh = not partial.exists() or partial.stat().st_size == 0
        bar = tqdm(total=sum(map(len, batches)), unit="row", disable=not show_progress, desc=self.save.name)
        with open(partial, "a", encoding="utf-8") as f:
            if fresh:
                f.write(json.dumps(partial_header(self.save, self._settings())) + "\n")
            for batch in batches:
                records = run_batch(batch)
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
                if postfix is not None:
                    bar.set_postfix(postfix(time.perf_counter() - t0))
        bar.close()
        return time.perf_counter() - t0

    def gather(self, stats: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's `stats`; also the barrier after which every partial file is closed."""
        if self.world == 1:
            return [stats]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, stats)
        return gathered

    def finish(self, then: Optional[Callable[[dict[str, int]], T]] = None) -> Any:
        """On rank 0: merge the partial files into the output file (test order, atomically, with its
        settings sidecar; `merge_partials`), then `then(counts)` (counts: the rows' `finish` and `truncated`
        values). Its result, or the counts, go to every rank."""

        def merge() -> Any:
            counts = merge_partials(self.save, self._settings(), self.rows)
            return counts if then is None else then(counts)

        return self.on_rank0(merge)

    def _settings(self) -> dict:
        if self.settings is None:
            raise RuntimeError("RowJob.settle must run first (it computes the settings)")
        return self.settings
