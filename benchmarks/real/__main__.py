from m2kt.benchmarks.real.run import main

raise SystemExit(main())
