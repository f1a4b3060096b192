"""Public access tokens: read-only, one-run, expiring links for browsers.

The trigger answer carries one. It lets a browser read that run and follow its
event stream without the project's secret key (as ``Authorization: Bearer``
or ``?token=``), and nothing else.
"""

from __future__ import annotations

import orjson
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.encoding import base64_encode

from gateway.errors import Unauthorized
from gateway.settings import Settings

__all__ = ["PublicTokens", "WaitpointTokens"]

PREFIX = "pat_"


class PublicTokens:
    def __init__(self, settings: Settings) -> None:
        self.ttl = settings.public_token_ttl
        self._serializer = URLSafeTimedSerializer(settings.secret_keys(), salt="gateway.public-run")
        #: The serializer's signer, made once: every trigger's answer carries a
        #: token, and ``dumps`` made a signer and tried zlib on each.
        self._signer = self._serializer.make_signer()

    def issue(self, run_id: str) -> str:
        """What ``self._serializer.dumps({"run": run_id})`` gives: its compact
        JSON in base64, signed with the newest key and the time. (``dumps``
        would use zlib's form where it is shorter, which a run's random ID
        never is; ``loads`` opens either.)"""
        payload = base64_encode(orjson.dumps({"run": run_id}))
        return PREFIX + self._signer.sign(payload).decode("ascii")

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


class WaitpointTokens:
    """The signed part of a waitpoint's URL: whoever holds the URL may
    complete that one waitpoint, once, with no API key (a third party's
    callback). It does not expire by itself; the waitpoint does."""

    def __init__(self, settings: Settings) -> None:
        self.public_url = settings.public_url
        self._serializer = URLSafeTimedSerializer(
            settings.secret_keys(), salt="gateway.waitpoint-callback"
        )

    def url_of(self, waitpoint_id: str) -> str:
        """The absolute URL a POST to which completes the waitpoint."""
        return (
            f"{self.public_url}/api/v1/waitpoints/{waitpoint_id}/callback/"
            f"{self.issue(waitpoint_id)}"
        )

    def issue(self, waitpoint_id: str) -> str:
        return self._serializer.dumps({"wp": waitpoint_id})

    def waitpoint_of(self, token: str) -> str:
        """The waitpoint a URL's token completes; :class:`Unauthorized` if it is bad."""
        try:
            data = self._serializer.loads(token)
        except BadSignature:
            raise Unauthorized("the waitpoint URL is not valid", code="invalid_token") from None
        return str(data["wp"])
