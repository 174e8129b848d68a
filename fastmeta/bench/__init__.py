"""The benchmark suite behind ``fastmeta bench`` and the programs in ``benchmarks/``.

It lives in the package so that an installed fastmeta can measure itself; ``benchmarks/``
holds the thin ``python -m benchmarks.bench_<op>`` programs and the pytest-benchmark entries.
"""
