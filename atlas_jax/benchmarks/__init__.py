"""The paper's benchmarks (V* Bench, WeMath, BLINK) read from a user's local copies of their
public releases, evaluated with the authors' protocol.

    protocol.py   `BenchmarkConfig` (config section `benchmark`): files, prompt suffix, pixels, budget
    loaders.py    the release layouts -> `BenchmarkItem`s; bad rows name their file and row
    grading.py    the boxed answer vs the reference: option letter / text, math_verify, a judge hook
    tables.py     per-subset tables (JSON, Markdown) and the paper's numbers to compare with

The job that runs them is `atlas_jax/jobs/benchmark.py`.
"""
