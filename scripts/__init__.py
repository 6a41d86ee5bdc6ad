"""Data preparation scripts (data/README.md); each is a `main()` that tests can import."""
