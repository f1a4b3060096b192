"""The worker side: the task registry, the built-in tasks and the arq worker."""

from jobs.tasks.registry import TaskContext, TaskError, load_tasks, registry, task

__all__ = ["TaskContext", "TaskError", "load_tasks", "registry", "task"]
