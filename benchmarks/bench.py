"""Run the benchmark suite from a checkout: ``python benchmarks/bench.py [options]``.

The same as ``ordering-sql bench [options]``; see ``ordering_sql/tools/bench.py`` for the workloads.
"""

import sys

from ordering_sql.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
