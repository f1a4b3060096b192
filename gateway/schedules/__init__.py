"""Schedules: cron ticks in a time zone, and a task's runs on that clock."""
