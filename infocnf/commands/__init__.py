"""Subcommands of the infocnf command line, one module each."""
