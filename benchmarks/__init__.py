"""`make bench`: speed figures for fhir-massage. Never part of the tests.

Each module ``benchmarks/bench_*.py`` defines ``run(report)``; ``report(name, value, unit="", note="")`` prints one
line. Modules run in name order, each in its own temporary directory with its own servers on loopback.
"""
