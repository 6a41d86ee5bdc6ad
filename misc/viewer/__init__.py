"""The caption viewers: vis/index.html of one run, and several runs side by side."""
