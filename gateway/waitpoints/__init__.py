"""Waitpoints: what a run waits for outside it, completed once."""
