package main

import (
	"context"
	"testing"

	"github.com/pgward/pgward/testenv"
)

// prewarm reads pgbench's tables and indexes into shared buffers, and
// nothing else.
func TestPrewarm(t *testing.T) {
	ctx := context.Background()
	pg, err := testenv.StartPostgres(ctx, testenv.Options{ExtraConf: []string{"shared_buffers = 64MB"}})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Stop()
	if err := pg.Exec(ctx, `CREATE EXTENSION pg_buffercache;
		CREATE TABLE pgbench_accounts AS SELECT g AS aid, repeat('x', 80) AS filler FROM generate_series(1, 100000) g;
		CREATE INDEX pgbench_accounts_pkey ON pgbench_accounts (aid);
		CREATE TABLE other AS SELECT g AS id, repeat('y', 80) AS filler FROM generate_series(1, 100000) g;`); err != nil {
		t.Fatal(err)
	}
	// A restart empties shared buffers.
	if err := pg.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	cached := func(rel string) (buffers, blocks int64) {
		t.Helper()
		if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_buffercache b
			WHERE b.relfilenode = pg_relation_filenode($1::regclass) AND b.reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database())),
			pg_relation_size($1::regclass) / 8192`, rel).Scan(&buffers, &blocks); err != nil {
			t.Fatal(err)
		}
		return buffers, blocks
	}
	if n, blocks := cached("pgbench_accounts"); n > blocks/2 {
		t.Fatalf("before prewarm %d of pgbench_accounts' %d blocks are cached: the restart did not empty shared buffers", n, blocks)
	}
	sharedBuffers = "64MB"
	defer func() { sharedBuffers = "" }()
	if err := prewarm(ctx, pg); err != nil {
		t.Fatal(err)
	}
	for _, rel := range []string{"pgbench_accounts", "pgbench_accounts_pkey"} {
		if n, blocks := cached(rel); blocks == 0 || n != blocks {
			t.Errorf("after prewarm %d of %s's %d blocks are cached, want all", n, rel, blocks)
		}
	}
	if n, blocks := cached("other"); n > blocks/2 {
		t.Errorf("prewarm read %d of %d blocks of a table that is not pgbench's", n, blocks)
	}
}

func TestSharedBuffersFlag(t *testing.T) {
	for v, ok := range map[string]bool{"256MB": true, "64kB": true, "1GB": true, "256": false, "0MB": false, "1TB": false, "256mb": false, "-1MB": false, "256MB'; fsync=on": false} {
		if got := sharedBuffersRE.MatchString(v); got != ok {
			t.Errorf("-shared-buffers %q accepted: %v, want %v", v, got, ok)
		}
	}
}
