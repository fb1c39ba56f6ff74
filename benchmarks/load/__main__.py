"""``python -m m2kt.benchmarks.load``: see the package docstring."""

from m2kt.benchmarks.load.run import main

raise SystemExit(main())
