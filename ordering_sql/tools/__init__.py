"""The tools around the engine: the self-checking simulation, the demo and the bench.

Not part of the library's API: the CLI imports them only for ``ordering-sql demo`` and
``ordering-sql bench``, and the test suites use the simulation's streams, workers and checks.
"""
