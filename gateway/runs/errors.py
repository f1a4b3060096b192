"""What a unit of work on runs can refuse, as errors the API answers unchanged."""

from __future__ import annotations

from gateway.errors import Conflict, NotFound

__all__ = ["LostRace", "RunAlreadyFinal", "RunNotDelayed", "RunNotFound"]


class LostRace(Exception):
    """Another gateway process moved the run between our read and our
    compare-and-set; the service runs the unit again."""


class RunNotFound(NotFound):
    """No such run (also another project's run: it looks the same)."""

    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}")


class RunAlreadyFinal(Conflict):
    """Only a run that is not final can be canceled.

    :param status: the run's final status
    """

    code = "run_already_final"

    def __init__(self, status: str) -> None:
        self.status = status
        super().__init__(
            f"the run is {status} already; only a run that is not final can be canceled"
        )


class RunNotDelayed(Conflict):
    """Only a DELAYED run can be rescheduled.

    :param status: the run's status
    """

    code = "run_not_delayed"

    def __init__(self, status: str) -> None:
        self.status = status
        super().__init__(f"the run is {status}; only a DELAYED run can be rescheduled")
