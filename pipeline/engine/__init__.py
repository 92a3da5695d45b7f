"""What every training and writing stage runs on: devices, precision, processes, the loop, checkpoints, files."""
