"""Evaluation and metrics: decoding a split, pycocoevalcap's metrics, CIDEr-D."""
