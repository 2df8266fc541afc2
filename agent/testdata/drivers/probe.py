"""One session through a real driver, psycopg 3, for agent/drivers_test.go.

usage: probe.py CONNINFO [SQL ...]

Connects with CONNINFO (a libpq connection string; psycopg hands it to
libpq), runs each SQL in autocommit mode and prints one JSON line:
{"driver": "psycopg 3.1.7 (libpq 150018)", "connect": {"ok": true} or the
error, "results": [{"rows": [[text, ...], ...]} or the error, ...]}; an
error is {"sqlstate": ..., "message": ...}. Values are text (None for NULL).
"""
import json
import sys

import psycopg


def err(e):
    diag = getattr(e, "diag", None)
    return {"sqlstate": getattr(e, "sqlstate", None) or "",
            "message": (diag.message_primary if diag is not None else None) or str(e)}


def main():
    out = {"driver": "psycopg %s (libpq %d)" % (psycopg.__version__, psycopg.pq.version()), "results": []}
    try:
        conn = psycopg.connect(sys.argv[1], autocommit=True)
    except psycopg.Error as e:
        out["connect"] = err(e)
        print(json.dumps(out))
        return
    out["connect"] = {"ok": True}
    with conn:
        for sql in sys.argv[2:]:
            try:
                cur = conn.execute(sql)
                rows = cur.fetchall() if cur.description else []
                out["results"].append({"rows": [[None if v is None else str(v) for v in r] for r in rows]})
            except psycopg.Error as e:
                out["results"].append(err(e))
    print(json.dumps(out))


main()
