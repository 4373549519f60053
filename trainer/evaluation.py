"""Evaluation: the token-weighted loss of a model on a run's validation split."""

from __future__ import annotations

import math

import torch

from trainer.constants import IGNORE_INDEX
from trainer.ops import check_labels
from trainer.parallel import all_reduce_sum
from trainer.runtime import autocast


class Evaluator:
    """evaluator(model) -> {"eval_loss", "perplexity", "eval_tokens"} over the validation blocks.

    The loss is the sum of token losses over every block (and rank) divided by their label-token
    count, summed on the device and read back once.
    """

    def __init__(
        self,
        val_tokens,
        *,
        seq_len: int,
        batch_size: int,
        max_batches: int,
        document_ids: bool,
        device: torch.device,
        compute_dtype: torch.dtype,
        world_size: int = 1,
        rank: int = 0,
        group=None,
    ):
        self.val_tokens, self.seq_len, self.batch_size = val_tokens, seq_len, batch_size
        self.max_batches, self.document_ids = max_batches or None, document_ids
        self.device, self.compute_dtype = device, compute_dtype
        # world_size, rank: the data-parallel ones; group: the ranks whose figures add up (None: all).
        self.world_size, self.rank, self.group = world_size, rank, group

    @classmethod
    def for_run(cls, config, val_tokens, device, compute_dtype, world_size: int = 1, rank: int = 0, group=None):
        t = config.train
        return cls(
            val_tokens,
            seq_len=t.seq_len,
            batch_size=t.micro_batch_size,
            max_batches=t.eval_batches,
            document_ids=config.data.document_mask,
            device=device,
            compute_dtype=compute_dtype,
            world_size=world_size,
            rank=rank,
            group=group,
        )

    @torch.no_grad()
    def __call__(self, model) -> dict:
        from trainer.data import eval_batches

        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for batch in eval_batches(
            self.val_tokens,
            self.seq_len,
            self.batch_size,
            max_batches=self.max_batches,
            world_size=self.world_size,
            rank=self.rank,
            document_ids=self.document_ids,
        ):
            check_labels(batch["labels"], model.args.vocab_size, IGNORE_INDEX)  # on the host: no device read
            count += int((batch["labels"] != IGNORE_INDEX).sum())
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with autocast(self.device, self.compute_dtype):
                total += model(
                    batch["input_ids"],
                    labels=batch["labels"],
                    position_ids=batch.get("position_ids"),
                    document_ids=batch.get("document_ids"),
                    reduction="sum",
                ).double()
        model.train(was_training)
        totals = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        total, count = all_reduce_sum(totals, self.group).tolist()
        loss = total / max(count, 1)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(count)}
