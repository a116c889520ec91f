"""mk's command line: one thin module per subcommand over mk.core."""
