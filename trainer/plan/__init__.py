"""The memory planner: the peak memory of a training step, predicted from its configuration.

- predict_peak(config, world_size=1) -> Plan: one step replayed on a ledger of live bytes
  (trainer/plan/predict.py), without building the model;
- choose_micro_batch(config, budget_bytes, world_size) -> (micro_batch_size, grad_accum_steps, note):
  train.micro_batch_size=auto;
- plan_command(argv) -> int: `python -m trainer plan`;
- loss_chunk_bytes(config, world_size): the cap on the fused loss's logit chunks the run is built with;
- DEVICES: the device table (name -> Device with .memory_bytes); resolve_budget(config): the bytes
  a run may use.
How each term is counted, and how the prediction compares with measurement: docs/memory.md.
"""

from trainer.plan.choose import choose_micro_batch, is_auto, resolve_budget, suggest_changes
from trainer.plan.command import plan_command
from trainer.plan.devices import DEVICE_NAMES, resolve_device
from trainer.plan.devices import GPUS as DEVICES
from trainer.plan.predict import Plan, loss_chunk_bytes, loss_logits_whole, predict_peak

__all__ = [
    "DEVICES",
    "DEVICE_NAMES",
    "Plan",
    "choose_micro_batch",
    "is_auto",
    "loss_chunk_bytes",
    "loss_logits_whole",
    "plan_command",
    "predict_peak",
    "resolve_budget",
    "resolve_device",
    "suggest_changes",
]
