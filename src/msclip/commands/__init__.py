"""CLI subcommands (one module each); see msclip/cli.py."""
