"""The memory planner: the peak memory of a training step, predicted from its configuration.

predict_peak(config) replays one step (trainer/plan/predict.py); choose_micro_batch picks the
largest micro-batch that fits a budget; plan_command is `python -m trainer plan`. How each term is
counted, and how the prediction compares with measurement: docs/memory.md.
"""

from trainer.plan.predict import Plan, predict_peak

__all__ = ["Plan", "predict_peak"]
