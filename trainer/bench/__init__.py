"""`python -m trainer bench`: the configured run against its eager reference (and a peer), side by side.

runner.py runs the sides and writes the report; worker.py is one side in its own process
(peers.py: the Hugging Face Trainer side); verdict.py judges the losses; report.py computes the
figures, the plot and the table.
"""

from trainer.bench.report import format_report
from trainer.bench.runner import BenchError, run_bench

__all__ = ["BenchError", "format_report", "run_bench"]
