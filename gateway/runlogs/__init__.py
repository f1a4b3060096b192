"""Run logs: a task's lines, kept with its run, capped, read back."""
