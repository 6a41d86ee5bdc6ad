"""The typed configs: every option once (default, type, help, group, range)."""
