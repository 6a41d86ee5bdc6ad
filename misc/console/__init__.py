"""The console: the command-line wrapper (one-line errors) and progress output."""
