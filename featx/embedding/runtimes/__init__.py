"""Where the network runs on the CPU: torch or OpenVINO, and the kept OpenVINO cards."""
