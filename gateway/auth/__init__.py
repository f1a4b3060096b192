"""Who calls: projects' API keys, runs' public access tokens, and rate limits.

``keys`` resolves ``Authorization: Bearer <key>`` to a project (and creates
keys for the CLI); ``tokens`` signs and reads a run's read-only public access
token; ``ratelimit`` is a token bucket per key, in Redis. The API and the
dashboard both use them; neither owns them.
"""
