"""The load run: N publishers × M subscribers on one topic, on real processes (see :mod:`.run`).

    python -m m2kt.benchmarks.load --publishers 50 --packets 20 --subscribers 10

Modules: ``parties`` (settings, nodes, packets), ``publish``, ``subscribe``, ``report`` (percentiles, losses,
duplicates, the table), ``run`` (the stack, the phases, the raw-S3 reference, the command line).
"""

from __future__ import annotations

from m2kt.benchmarks.load.parties import LoadConfig
from m2kt.benchmarks.load.publish import Outcome, publish_one
from m2kt.benchmarks.load.report import cpu_budget, failures
from m2kt.benchmarks.load.run import main, parse_args, run_load

__all__ = ["LoadConfig", "Outcome", "cpu_budget", "failures", "main", "parse_args", "publish_one", "run_load"]
