package agent

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// The role a statement runs as (issue 12 point 3): a login role that is a
// member of another role is reported at first use (start event, metric,
// one WARN), refused where the upstream says so, and statements that
// switch to the other role are flagged.
func TestRoleMembershipsReportedAndFlagged(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders_tls"]
		u.RefuseRoleSwitching = true
		c.Upstreams["orders_tls"] = u
	})
	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	for _, q := range []string{
		"do $$ begin if not exists (select from pg_roles where rolname = 'pgw_target') then create role pgw_target nologin; end if; end $$",
		"do $$ begin if not exists (select from pg_roles where rolname = 'pgw_super') then create role pgw_super superuser nologin; end if; end $$",
		"grant pgw_target, pgw_super to " + testenv.PasswordUser,
		"grant pgw_target to " + testenv.ScramUser,
		"drop table if exists roles_t",
		"create table roles_t (n int)",
		"grant select, insert on roles_t to public",
	} {
		if _, err := admin.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	t.Cleanup(func() {
		_, _ = admin.Exec(context.Background(), "revoke pgw_target, pgw_super from "+testenv.PasswordUser+", "+testenv.ScramUser)
	})

	// Two sessions on one credential: both start events list the
	// membership, the server is asked (and the WARN logged) once.
	for range 2 {
		c := h.connect(t, testenv.PasswordUser, "orders")
		for _, q := range []string{
			"select 1",
			"SET ROLE pgw_target; INSERT INTO roles_t VALUES (1)",
			"/* harmless? */ select pg_catalog.SET_CONFIG( -- a comment\n 'ROLE', 'pgw_target', false)",
			"reset role",
			"set role pgw_super",
			"reset role",
		} {
			if _, err := c.Exec(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		var who string
		if err := c.QueryRow(ctx, "select current_user").Scan(&who); err != nil || who != testenv.PasswordUser {
			t.Fatalf("current_user %q %v", who, err)
		}
		c.Close(ctx)
	}
	var starts int
	flagged := map[string]bool{}
	var reports []string
	for _, ev := range h.auditEvents(t) {
		if ev["db_user"] != testenv.PasswordUser {
			continue
		}
		switch ev["event"] {
		case "db.session.start":
			starts++
			roles, _ := ev["db_role_memberships"].([]any)
			if !slices.Contains(roles, any("pgw_target")) || !slices.Contains(roles, any("pgw_super")) || ev["db_role_superuser"] != false {
				t.Fatalf("start event %v: want db_role_memberships [pgw_super pgw_target], db_role_superuser false", ev)
			}
		case "db.session.query":
			flagged[ev["db_query"].(string)] = ev["role_change"] == true
		case "db.session.query.result":
			if r, ok := ev["server_role_report"].(string); ok {
				reports = append(reports, r)
			}
		}
	}
	if starts != 2 {
		t.Fatalf("%d start events", starts)
	}
	want := map[string]bool{
		"select 1": false, "SET ROLE pgw_target; INSERT INTO roles_t VALUES (1)": true,
		"/* harmless? */ select pg_catalog.SET_CONFIG( -- a comment\n 'ROLE', 'pgw_target', false)": true,
		"reset role": true, "select current_user": false, "set role pgw_super": true,
	}
	for q, w := range want {
		if got, ok := flagged[q]; !ok || got != w {
			t.Errorf("role_change of %q = %v (audited %v), want %v", q, got, ok, w)
		}
	}

	// SET ROLE to a superuser role shows in the server's is_superuser
	// report; the role parameter itself is never reported.
	if want := []string{"is_superuser=on", "is_superuser=off", "is_superuser=on", "is_superuser=off"}; !slices.Equal(reports, want) {
		t.Errorf("server role reports %q, want %q", reports, want)
	}
	var warns int
	for _, line := range strings.Split(h.logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil {
			continue
		}
		if m["level"] == "WARN" && strings.Contains(m["msg"].(string), "can become other roles") && m["role"] == testenv.PasswordUser {
			warns++
		}
		if strings.Contains(m["msg"].(string), "learned the credential's role memberships") && m["role"] == testenv.PasswordUser {
			d, _ := m["query_duration"].(float64)
			t.Logf("membership query at first use took %v", time.Duration(d))
		}
	}
	// The cost of the membership query, as a login pays it once per credential.
	c := h.connect(t, testenv.PasswordUser, "orders")
	var took []time.Duration
	for range 20 {
		st := time.Now()
		rows, err := c.Query(ctx, `SELECT r.rolsuper, b.rolname FROM pg_catalog.pg_roles r LEFT JOIN pg_catalog.pg_roles b ON b.oid <> r.oid AND NOT r.rolsuper AND pg_catalog.pg_has_role(r.oid, b.oid, 'MEMBER') WHERE r.rolname = pg_catalog.session_user() ORDER BY b.rolname`, pgx.QueryExecModeSimpleProtocol)
		if err != nil {
			t.Fatal(err)
		}
		rows.Close()
		took = append(took, time.Since(st))
	}
	slices.Sort(took)
	t.Logf("membership query round trip through pgward: median %v, min %v (20 runs)", took[10], took[0])
	c.Close(ctx)
	if warns != 1 {
		t.Fatalf("%d WARN lines for the credential, want 1", warns)
	}
	if v, ok := scrapeAll(t, h)[`pgward_credential_switchable_roles{role="`+testenv.PasswordUser+`",upstream="orders"}`]; !ok || v != 2 {
		t.Fatalf("pgward_credential_switchable_roles = %v (present %v), want 2", v, ok)
	}

	// refuse_role_switching: the same kind of credential is refused before
	// any statement is relayed.
	e := connectErr(t, h.dsn(testenv.ScramUser, "orders_tls"))
	if e.Code != broker.CodeInsufficientPriv || !strings.Contains(e.Message, "pgw_target") || !strings.Contains(e.Hint, "refuse_role_switching") {
		t.Fatalf("refused with %s %q (hint %q), want %s naming the membership", e.Code, e.Message, e.Hint, broker.CodeInsufficientPriv)
	}
	// A role with no membership is not refused there.
	if _, err := admin.Exec(ctx, "revoke pgw_target from "+testenv.ScramUser); err != nil {
		t.Fatal(err)
	}
	writeReloadConfig(t, h, []string{testenv.ScramUser, testenv.PasswordUser}, "  - { principal: me, upstream: orders_tls, roles: ["+testenv.ScramUser+"] }\n", "")
	// The reload file has no orders_tls: add it with the opt-in.
	path := h.agent.cfgPath
	b := readFile(t, path)
	b = strings.Replace(b, "secrets: {", "  orders_tls: { address: \""+h.pg.TCPAddr()+"\", database: \""+testenv.Database+"\", tls: { mode: verify-full, ca_file: \""+h.pg.CAFile+"\", server_name: localhost }, refuse_role_switching: true }\nsecrets: {", 1)
	if err := os.WriteFile(path, []byte(b), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := h.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	c = h.connect(t, testenv.ScramUser, "orders_tls")
	c.Close(ctx)
}
