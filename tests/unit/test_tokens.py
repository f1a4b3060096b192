"""Public access tokens: issued without a signer per token, still itsdangerous's."""

from __future__ import annotations

import time

import pytest

from gateway.auth.tokens import PREFIX, PublicTokens
from gateway.errors import Unauthorized
from gateway.settings import Settings


def _tokens(key: str, *previous: str) -> PublicTokens:
    settings = Settings(
        secret_key=key,
        previous_secret_keys=previous,  # type: ignore[arg-type]
        database_url="sqlite://",
        redis_url="",
    )
    return PublicTokens(settings)


def test_a_token_is_what_the_serializer_itself_would_give() -> None:
    """A run's ID: the same text as ``URLSafeTimedSerializer.dumps`` (issued
    in the same second), opened by ``run_of``. An ID that would compress
    (none does: theirs are random) is left uncompressed, and opens too."""
    tokens = _tokens("k" * 32)
    run_id = "run_01JXYZABCDEFGHJKMNPQRSTVWX"
    for _ in range(5):  # the second may turn between the two
        second = int(time.time())
        ours = tokens.issue(run_id)
        theirs = PREFIX + tokens._serializer.dumps({"run": run_id})
        if int(time.time()) == second:
            break
    assert ours == theirs
    assert tokens.run_of(ours) == run_id
    repetitive = "run_" + "A" * 26
    assert tokens.run_of(tokens.issue(repetitive)) == repetitive


def test_a_token_is_signed_with_the_newest_key_and_opened_with_any() -> None:
    """Mid-rotation (``GATEWAY_PREVIOUS_SECRET_KEYS`` holds the old key): a
    token is signed with the new key, so a gateway that knows only the new
    one opens it; one signed by a gateway still on the old key opens too."""
    rotating, new_only, old_only = _tokens("n" * 32, "o" * 32), _tokens("n" * 32), _tokens("o" * 32)
    token = rotating.issue("run_x")
    assert new_only.run_of(token) == "run_x"
    assert rotating.run_of(old_only.issue("run_y")) == "run_y"
    with pytest.raises(Unauthorized):
        old_only.run_of(token)
