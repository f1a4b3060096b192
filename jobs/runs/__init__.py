"""Running one attempt of a task: the attempt itself (``attempt``), a durable
task's waits and child runs (``durable``), its log lines (``runlog``) and the
images it fetches (``media``)."""
