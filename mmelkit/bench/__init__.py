"""The benchmark runner: methods x datasets x metrics -> tables and plots (``mmelkit bench``).

See :mod:`mmelkit.bench.runner` for the runner, :mod:`mmelkit.bench.data` for the dataset specs,
:mod:`mmelkit.bench.presets` for the MMEL-paper layout and the clutter sweep, and
:mod:`mmelkit.bench.distributed` for sharding under torchrun.
"""

from mmelkit.bench.data import BenchData, load_bench_data
from mmelkit.bench.presets import PRESETS, paper_table, preset_config
from mmelkit.bench.runner import BenchConfig, BenchResult, run_bench

__all__ = ["PRESETS", "BenchConfig", "BenchData", "BenchResult", "load_bench_data", "paper_table", "preset_config",
           "run_bench"]
