"""The run on disk and its processes: the run folder, checkpoints and their infos, torchrun, signals, the test fault hook."""
