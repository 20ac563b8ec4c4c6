"""The test server itself: answers queries, and server_backends() counts what it should."""
import re

import psycopg2

from devtools.pgcluster import dsn_to_url, parse_dsn, server_backends, url_to_dsn


def test_select_1(pg, dsn):
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    # the URL form reaches the same server
    conn = psycopg2.connect(pg.url)
    conn.close()


def test_server_backends_counts_matching_connections(dsn):
    before = server_backends(dsn, "sharedpool-test")
    conn = psycopg2.connect(dsn, application_name="sharedpool-test")
    other = psycopg2.connect(dsn, application_name="somebody-else")
    try:
        assert server_backends(dsn, "sharedpool-test") == before + 1
        assert server_backends(dsn, "sharedpool%") >= 1
    finally:
        conn.close()
        other.close()
    # an idle backend of a closed connection is gone almost at once, but poll a bit
    import time
    deadline = time.monotonic() + 5
    while server_backends(dsn, "sharedpool-test") != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server_backends(dsn, "sharedpool-test") == before


def test_unique_name_shape(unique_name, shm_prefix):
    assert re.fullmatch(r"[a-z0-9]{1,24}", unique_name)
    assert unique_name.startswith(shm_prefix)


def test_dsn_url_round_trip():
    dsn = "host=127.0.0.1 port=5555 user=postgres dbname=postgres"
    url = dsn_to_url(dsn)
    assert url == "postgresql://postgres@127.0.0.1:5555/postgres"
    assert parse_dsn(url_to_dsn(url)) == parse_dsn(dsn)
