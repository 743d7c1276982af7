"""Tooling for working on this project, not part of the package (see gpu_machine/README.md)."""
