"""Files: atomic writes, safe loading, readers with one-line errors, the vocabulary's fingerprint, output folders."""
