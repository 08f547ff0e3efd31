"""forgetjax evaluation: benchmark registry, per-item records, and the battery runner.

- `forgetjax.eval.engine`: the `Engine` protocol the runner talks to (generate / loglikelihood / chat template).
- `forgetjax.eval.benchmarks`: `get_benchmark(name)`, `list_benchmarks()`, loaders, prompt builders, scorers.
- `forgetjax.eval.records`: `EvalRecord`, atomic Parquet `write_records` / `read_records`.
- `forgetjax.eval.battery`: YAML batteries (configs/eval), `select_subset`, `run_battery`, `summarize`.
"""
