"""Batches for the next optimizer step, built on a background thread while the current one trains."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from trainer.constants import IGNORE_INDEX
from trainer.ops import check_labels


@dataclass
class StepBatch:
    """One optimizer step's micro-batches on the host (pinned when the device is CUDA)."""

    micro_batches: list[dict[str, torch.Tensor]]
    label_tokens: torch.Tensor  # 0-dim int64: this rank's non-ignored labels over the micro-batches
    loader_state: dict  # the loader's state after this step: what a checkpoint taken after it saves

    def to(self, device: torch.device) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in self.micro_batches]


def make_step_batch(
    micro_batches: list[dict], loader_state: dict, pin: bool = False, vocab_size: int | None = None
) -> StepBatch:
    """`vocab_size`: refuse a label the model cannot score, here on the host where checking costs no sync."""
    if vocab_size is not None:
        for mb in micro_batches:
            check_labels(mb["labels"], vocab_size, IGNORE_INDEX)
    label_tokens = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches)
    if pin:  # a pinned source lets the copy to the GPU run asynchronously
        micro_batches = [{k: v.pin_memory() for k, v in mb.items()} for mb in micro_batches]
        label_tokens = label_tokens.pin_memory()
    return StepBatch(micro_batches, label_tokens, loader_state)


class StepPrefetcher:
    """next() returns the next step's StepBatch; a daemon thread keeps `depth` steps ready.

    The thread is the loader's only user once it starts, so the loader's state is read there,
    right after each step is drawn, and travels with the batch.
    """

    def __init__(self, loader, pin: bool, vocab_size: int | None = None, depth: int = 1):
        self.loader, self.pin, self.vocab_size = loader, pin, vocab_size
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def _fill(self) -> None:
        try:
            while not self.stopped.is_set():
                micro_batches = self.loader.next_step()
                item = make_step_batch(micro_batches, self.loader.state_dict(), self.pin, self.vocab_size)
                while not self.stopped.is_set():
                    try:
                        self.ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the training thread, which raises it
            self.ready.put(e)

    def next(self) -> StepBatch:
        if self.thread is None:
            self.thread = threading.Thread(target=self._fill, name="step-prefetch", daemon=True)
            self.thread.start()
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
