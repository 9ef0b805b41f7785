"""The throwaway PostgreSQL databases of the tests and benchmarks (``scripts/postgres-test-server.sh``
makes them). Kept out of the shipped packages on purpose: it drops schemas."""

from __future__ import annotations

TEST_PG = "postgresql+psycopg://slimconv:slimconv@127.0.0.1:5432/slimconv_test"
"""The service's database; ``<it>_studies`` holds the Optuna studies."""


def fresh_postgres(url: str = TEST_PG) -> dict[str, str]:
    """Empty the database at ``url`` and ``<url>_studies`` (drop and recreate their public schema),
    and return the service settings that point at them."""
    import psycopg

    for db in (url, url + "_studies"):
        with psycopg.connect(db.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
    return {"SLIMCONV_DATABASE_URL": url, "SLIMCONV_STUDY_STORAGE": url + "_studies"}
