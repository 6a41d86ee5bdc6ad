"""Data preparation scripts (SPEC.md section 1); each is a `main()` that tests can import."""
