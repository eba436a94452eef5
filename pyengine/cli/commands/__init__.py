"""One module per ``pyengine`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
