from m2kt.benchmarks.transfer.run import main

raise SystemExit(main())
