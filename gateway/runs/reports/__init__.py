"""A worker's reports on a run: an attempt started, ended (completed, failed),
waits, or is alive; each a compare-and-set on the attempt it names
(docs/architecture.md, invariant 3).

- ``one_by_one``: each report on its own (``apply_event``), and a batch of
  them (``apply_events``), which hands the common ones to ``as_sets``
- ``as_sets``: a batch's common reports, kind by kind, a few statements for all
"""

from gateway.runs.reports.one_by_one import apply_event, apply_events, apply_final

__all__ = ["apply_event", "apply_events", "apply_final"]
