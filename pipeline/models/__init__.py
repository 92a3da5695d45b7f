"""Models and their taps: the model registry and builders (`zoo`), tap discovery and recording (`taps`)."""
