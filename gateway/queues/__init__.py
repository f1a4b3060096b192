"""Queues and flow control: admission, the pump, slots, queue rows and bulk
actions, all decided in the database (docs/architecture.md, "Flow control")."""
