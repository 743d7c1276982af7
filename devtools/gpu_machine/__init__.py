"""Staging for the lent GPU machine: the scripts of README.md here. Tests import stage_parts."""
