"""The base layer: errors, atomic files and JSON, runtime (device, workers). Imports nothing else from featx."""
