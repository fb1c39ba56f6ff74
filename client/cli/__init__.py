"""The ``m2kt`` command line: ``app`` (the Typer app, ``fail``, exit codes), ``main`` (everything
registered; the console script), one module per group of subcommands (``local``, ``node``, ``remote``,
``bench``, ``demo``), ``models`` (model references such as ``minilm``) and ``reference`` (docs/cli.md)."""
