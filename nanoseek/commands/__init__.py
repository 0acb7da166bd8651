"""The subcommands (see nanoseek/cli.py). `nanoseek --help` imports every one of them for its arguments, so
they import the library (torch and the rest) inside `run`, not at the top: the help stays fast."""
