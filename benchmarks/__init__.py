"""Benchmarks: each module a script (``python benchmarks/bench_generate.py --help``); a package only so that the
import contract (pyproject.toml) covers them: nothing in the project imports them."""
