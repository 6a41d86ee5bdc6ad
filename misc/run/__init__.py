"""The run on disk and its processes: run folder, checkpoints and their infos, torchrun, signals, the fault hook."""
