"""Public access tokens: read-only, one-run, expiring links for browsers.

The trigger answer carries one. It lets a browser read that run and follow its
event stream without the project's secret key (as ``Authorization: Bearer``
or ``?token=``), and nothing else.
"""

from __future__ import annotations

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from gateway.errors import Unauthorized
from gateway.settings import Settings

__all__ = ["PublicTokens"]

PREFIX = "pat_"


class PublicTokens:
    def __init__(self, settings: Settings) -> None:
        self.ttl = settings.public_token_ttl
        self._serializer = URLSafeTimedSerializer(
            settings.require_secret(), salt="gateway.public-run"
        )

    def issue(self, run_id: str) -> str:
        return PREFIX + self._serializer.dumps({"run": run_id})

    @staticmethod
    def looks_like(token: str) -> bool:
        return token.startswith(PREFIX)

    def run_of(self, token: str) -> str:
        """The run a token opens; :class:`Unauthorized` if it is bad or expired."""
        try:
            data = self._serializer.loads(token.removeprefix(PREFIX), max_age=self.ttl)
        except SignatureExpired:
            raise Unauthorized(
                "the public access token has expired", code="token_expired"
            ) from None
        except BadSignature:
            raise Unauthorized(
                "the public access token is not valid", code="invalid_token"
            ) from None
        return str(data["run"])
