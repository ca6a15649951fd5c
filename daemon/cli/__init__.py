"""The `expertd` command line: every subcommand, the status view and the demos."""
