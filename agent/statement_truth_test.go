package agent

import (
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgward/pgward/testenv"
)

// protoSession is a client that speaks the protocol message by message
// through pgward, as a hostile but granted client would.
type protoSession struct {
	t  *testing.T
	pc *pgconn.PgConn
	fe *pgproto3.Frontend
}

func newProtoSession(t *testing.T, h *harness) *protoSession {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	pc, err := pgconn.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close(context.Background()) })
	return &protoSession{t: t, pc: pc, fe: pc.Frontend()}
}

// send writes msgs in one write and reads until as many ReadyForQuery as
// the count given, returning the error codes seen.
func (r *protoSession) send(readies int, msgs ...pgproto3.FrontendMessage) []string {
	r.t.Helper()
	for _, m := range msgs {
		r.fe.Send(m)
	}
	if err := r.fe.Flush(); err != nil {
		r.t.Fatal(err)
	}
	var codes []string
	_ = r.pc.Conn().SetReadDeadline(time.Now().Add(15 * time.Second))
	for readies > 0 {
		m, err := r.fe.Receive()
		if err != nil {
			r.t.Fatalf("receive: %v", err)
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			codes = append(codes, m.Code)
		case *pgproto3.ReadyForQuery:
			readies--
		}
	}
	return codes
}

// sessionQueries returns the db.session.query events of the session whose
// statements include marker, with their results.
func sessionQueries(t *testing.T, h *harness, marker string) (queries []map[string]any, results map[uint64]map[string]any) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		evs := h.auditEvents(t)
		sid := ""
		for _, ev := range evs {
			if ev["event"] == "db.session.query" && ev["db_query"] == marker {
				sid = asString(ev["sid"])
			}
		}
		queries, results = nil, map[uint64]map[string]any{}
		ended := false
		for _, ev := range evs {
			if sid == "" || ev["sid"] != sid {
				continue
			}
			switch ev["event"] {
			case "db.session.query":
				queries = append(queries, ev)
			case "db.session.query.result":
				results[num(ev["query_ei"])] = ev
			case "db.session.end":
				ended = true
			}
		}
		if ended {
			return queries, results
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ended session with statement %q in the audit", marker)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// executed returns the texts of the session's statements the audit says ran.
func executed(queries []map[string]any, results map[uint64]map[string]any) []string {
	var out []string
	for _, q := range queries {
		if q["bind_only"] == true {
			continue
		}
		if r := results[num(q["ei"])]; r != nil && r["success"] == true {
			out = append(out, asString(q["db_query"]))
		}
	}
	return out
}

func countRows(t *testing.T, h *harness, table string) int {
	t.Helper()
	c := h.connect(t, testenv.ScramUser, "orders")
	var n int
	if err := c.QueryRow(context.Background(), "SELECT count(*) FROM "+table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// A Parse the server refuses (42P05: the name exists) must not change what
// pgward believes the name holds: the Execute that follows runs the old
// statement, and the audit must say so — in both directions (hiding an
// INSERT behind a SELECT, and the other way round).
func TestAuditRefusedParseKeepsOldStatement(t *testing.T) {
	h := newHarness(t, nil)
	if err := h.pg.Exec(context.Background(), "CREATE TABLE IF NOT EXISTS truth_parse (n int); GRANT ALL ON truth_parse TO "+testenv.ScramUser); err != nil {
		t.Fatal(err)
	}
	before := countRows(t, h, "truth_parse")
	r := newProtoSession(t, h)
	marker := "SELECT 'truth-parse-marker'"
	r.send(1, &pgproto3.Query{String: marker})
	insert := "INSERT INTO truth_parse VALUES (1)"
	if codes := r.send(1, &pgproto3.Parse{Name: "s1", Query: insert}, &pgproto3.Sync{}); len(codes) != 0 {
		t.Fatalf("parse: %v", codes)
	}
	// One write: a Parse that fails (the name exists), its Sync, then a
	// Bind/Execute of the name in the next segment.
	codes := r.send(2,
		&pgproto3.Parse{Name: "s1", Query: "SELECT 1"}, &pgproto3.Sync{},
		&pgproto3.Bind{PreparedStatement: "s1"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if len(codes) != 1 || codes[0] != "42P05" {
		t.Fatalf("errors %v; want the server's 42P05 for the duplicate Parse", codes)
	}
	r.pc.Close(context.Background())
	if n := countRows(t, h, "truth_parse"); n != before+1 {
		t.Fatalf("rows %d, want %d: the INSERT should have run", n, before+1)
	}
	queries, results := sessionQueries(t, h, marker)
	got := executed(queries, results)
	if len(got) != 2 || got[0] != marker || got[1] != insert {
		t.Fatalf("audit says these ran: %q; want the marker and %q", got, insert)
	}
	for _, q := range queries {
		if q["db_query"] == insert && q["bind_only"] != true && q["statement_name"] != "s1" {
			t.Errorf("statement_name %v; want s1", q["statement_name"])
		}
	}
}

// A Close the server skipped (after an error, until Sync) must not make
// pgward forget the statement: the later Execute runs it, and the audit
// names its text.
func TestAuditSkippedCloseKeepsStatement(t *testing.T) {
	h := newHarness(t, nil)
	r := newProtoSession(t, h)
	marker := "SELECT 'truth-close-marker'"
	r.send(1, &pgproto3.Query{String: marker})
	text := "SELECT 4242 AS kept"
	r.send(1, &pgproto3.Parse{Name: "s1", Query: text}, &pgproto3.Sync{})
	codes := r.send(2,
		&pgproto3.Parse{Name: "bad", Query: "SELEC 1"}, &pgproto3.Close{ObjectType: 'S', Name: "s1"}, &pgproto3.Sync{},
		&pgproto3.Bind{PreparedStatement: "s1"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if len(codes) != 1 || codes[0] != "42601" {
		t.Fatalf("errors %v; want only the syntax error", codes)
	}
	r.pc.Close(context.Background())
	queries, results := sessionQueries(t, h, marker)
	if got := executed(queries, results); len(got) != 2 || got[1] != text {
		t.Fatalf("audit says these ran: %q; want the marker and %q", got, text)
	}
}

// A Bind runs the planner with the bound values (which can run functions)
// even with no Execute: it is audited before it is forwarded.
func TestAuditBindWithoutExecute(t *testing.T) {
	h := newHarness(t, nil)
	r := newProtoSession(t, h)
	marker := "SELECT 'truth-bind-marker'"
	r.send(1, &pgproto3.Query{String: marker})
	text := "SELECT $1::int + 1"
	r.send(1, &pgproto3.Parse{Name: "b1", Query: text}, &pgproto3.Bind{PreparedStatement: "b1", Parameters: [][]byte{[]byte("41")}}, &pgproto3.Sync{})
	r.pc.Close(context.Background())
	queries, results := sessionQueries(t, h, marker)
	var bind map[string]any
	for _, q := range queries {
		if q["bind_only"] == true {
			bind = q
		}
	}
	if bind == nil || bind["db_query"] != text || bind["statement_name"] != "b1" {
		t.Fatalf("no bind_only event for the Bind: %v", queries)
	}
	params, _ := bind["db_query_parameters"].([]any)
	if len(params) != 1 || fmt.Sprint(params[0].(map[string]any)["value"]) != "41" {
		t.Fatalf("bind parameters %v", bind["db_query_parameters"])
	}
	if res := results[num(bind["ei"])]; res == nil || res["success"] != true {
		t.Fatalf("bind result %v", res)
	}
}

// FunctionCall runs a function by oid outside SQL text: its event carries
// the oid and the arguments, under the parameters mode.
func TestAuditFunctionCallArguments(t *testing.T) {
	h := newHarness(t, nil)
	r := newProtoSession(t, h)
	marker := "SELECT 'truth-fcall-marker'"
	r.send(1, &pgproto3.Query{String: marker})
	var oid uint32
	{
		c := h.connect(t, testenv.ScramUser, "orders")
		if err := c.QueryRow(context.Background(), "SELECT 'int4pl'::regproc::oid").Scan(&oid); err != nil {
			t.Fatal(err)
		}
	}
	arg := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	codes := r.send(1, &pgproto3.FunctionCall{Function: oid, ArgFormatCodes: []uint16{1}, Arguments: [][]byte{arg(40), arg(2)}, ResultFormatCode: 1})
	if len(codes) != 0 {
		t.Fatalf("function call: %v", codes)
	}
	r.pc.Close(context.Background())
	queries, _ := sessionQueries(t, h, marker)
	var fc map[string]any
	for _, q := range queries {
		if q["function_oid"] != nil {
			fc = q
		}
	}
	if fc == nil || num(fc["function_oid"]) != uint64(oid) {
		t.Fatalf("no FunctionCall event with the oid %d: %v", oid, queries)
	}
	params, _ := fc["db_query_parameters"].([]any)
	if len(params) != 2 {
		t.Fatalf("function call arguments %v", fc["db_query_parameters"])
	}
	// The argument types are not in the message: binary values of an
	// unknown type are recorded as base64 (parameters: full).
	for i, want := range []string{"AAAAKA==", "AAAAAg=="} {
		if p := params[i].(map[string]any); p["format"] != "binary" || p["base64"] != want {
			t.Errorf("argument %d: %v; want base64 %s", i, p, want)
		}
	}
}

// swapFunctions creates, once per server, functions that change the
// session's prepared statements from inside the server: dynamic SQL in
// PL/pgSQL and a SQL function whose body is PREPARE/DEALLOCATE. pgward sees
// only the call.
func swapFunctions(t *testing.T, pg *testenv.Postgres, table string) {
	t.Helper()
	sql := fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %[1]s (n int);
GRANT ALL ON %[1]s TO %[2]s;
CREATE OR REPLACE FUNCTION %[1]s_plpgsql(name text, body text) RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_prepared_statements WHERE pg_prepared_statements.name = $1) THEN
    EXECUTE format('DEALLOCATE %%I', $1);
  END IF;
  IF $2 <> '' THEN
    EXECUTE format('PREPARE %%I AS %%s', $1, $2);
  END IF;
  RETURN 1;
END $f$;
CREATE OR REPLACE FUNCTION %[1]s_sql() RETURNS void LANGUAGE sql AS $f$
  DEALLOCATE s1; PREPARE s1 AS INSERT INTO %[1]s VALUES (666);
$f$;`, table, testenv.ScramUser)
	if err := pg.Exec(context.Background(), sql); err != nil {
		t.Fatal(err)
	}
}

// Code running inside the server (a PL/pgSQL function with dynamic SQL, a
// SQL function whose body is DEALLOCATE + PREPARE) swaps a named statement
// behind pgward's back. The protocol Bind/Execute of that name must run the
// text pgward audited, never the one the function put there.
func TestAuditServerSideStatementSwap(t *testing.T) {
	h := newHarness(t, nil)
	swapFunctions(t, h.pg, "truth_swap")
	for _, tc := range []struct{ name, call string }{
		{"plpgsql", "SELECT truth_swap_plpgsql('s1', 'INSERT INTO truth_swap VALUES (666)')"},
		{"sql-function", "SELECT truth_swap_sql()"},
		{"do-block", "DO $$BEGIN EXECUTE 'DEALLOCATE s1'; EXECUTE 'PREPARE s1 AS INSERT INTO truth_swap VALUES (666)'; END$$"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := countRows(t, h, "truth_swap")
			r := newProtoSession(t, h)
			marker := "SELECT 'truth-swap-" + tc.name + "'"
			r.send(1, &pgproto3.Query{String: marker})
			text := "SELECT 4242 AS audited"
			if codes := r.send(1, &pgproto3.Parse{Name: "s1", Query: text}, &pgproto3.Sync{}); len(codes) != 0 {
				t.Fatalf("parse: %v", codes)
			}
			if codes := r.send(1, &pgproto3.Query{String: tc.call}); len(codes) != 0 {
				t.Fatalf("swap: %v", codes)
			}
			// Bind/Execute of s1 in one segment, then again in a pipeline
			// whose first segment swaps it once more.
			if codes := r.send(1, &pgproto3.Bind{PreparedStatement: "s1"}, &pgproto3.Execute{}, &pgproto3.Sync{}); len(codes) != 0 {
				t.Fatalf("execute: %v", codes)
			}
			if codes := r.send(2, &pgproto3.Query{String: tc.call},
				&pgproto3.Bind{DestinationPortal: "p1", PreparedStatement: "s1"}, &pgproto3.Execute{Portal: "p1"}, &pgproto3.Sync{}); len(codes) != 0 {
				t.Fatalf("execute: %v", codes)
			}
			// SQL EXECUTE is audited with its own text, whatever s1 holds.
			r.send(1, &pgproto3.Query{String: "EXECUTE s1"})
			r.pc.Close(context.Background())
			queries, results := sessionQueries(t, h, marker)
			got := executed(queries, results)
			want := []string{marker, tc.call, text, tc.call, text, "EXECUTE s1"}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("audit says these ran:\n%q\nwant\n%q", got, want)
			}
			// The server's s1 held the INSERT when the client ran the SQL
			// EXECUTE; the two protocol executions ran the audited SELECT.
			if n := countRows(t, h, "truth_swap"); n != before+1 {
				t.Fatalf("rows %d, want %d: only the SQL EXECUTE (audited as such) may have run the INSERT", n, before+1)
			}
		})
	}
}

// A statement that only code inside the server prepared (pgward never saw
// it prepared) is refused at Bind: nothing runs that the audit cannot name.
func TestAuditServerSidePreparedStatementRefused(t *testing.T) {
	h := newHarness(t, nil)
	swapFunctions(t, h.pg, "truth_swap")
	before := countRows(t, h, "truth_swap")
	r := newProtoSession(t, h)
	marker := "SELECT 'truth-hidden-marker'"
	r.send(1, &pgproto3.Query{String: marker})
	if codes := r.send(1, &pgproto3.Query{String: "SELECT truth_swap_plpgsql('hidden', 'INSERT INTO truth_swap VALUES (777)')"}); len(codes) != 0 {
		t.Fatalf("prepare in function: %v", codes)
	}
	codes := r.send(1, &pgproto3.Bind{PreparedStatement: "hidden"}, &pgproto3.Execute{}, &pgproto3.Sync{})
	if len(codes) != 1 || codes[0] != "26000" {
		t.Fatalf("errors %v; want 26000 (pgward does not know the statement)", codes)
	}
	r.pc.Close(context.Background())
	if n := countRows(t, h, "truth_swap"); n != before {
		t.Fatalf("rows %d, want %d: the hidden INSERT ran", n, before)
	}
	queries, results := sessionQueries(t, h, marker)
	for _, q := range queries {
		if q["statement_name"] == "hidden" {
			if res := results[num(q["ei"])]; res == nil || res["success"] == true || res["sqlstate"] != "26000" {
				t.Fatalf("Bind of the hidden statement audited as %v", res)
			}
		}
	}
}

// Statement names with pgward's reserved prefix are refused in every
// message that names a statement; the rest of the session goes on.
func TestReservedStatementNameRefused(t *testing.T) {
	h := newHarness(t, nil)
	r := newProtoSession(t, h)
	for _, m := range []pgproto3.FrontendMessage{
		&pgproto3.Parse{Name: "pgward_v1", Query: "SELECT 1"},
		&pgproto3.Bind{PreparedStatement: "pgward_v1"},
		&pgproto3.Describe{ObjectType: 'S', Name: "pgward_v1"},
		&pgproto3.Close{ObjectType: 'S', Name: "pgward_v1"},
		// Portal names too: pgward's portal guard uses them.
		&pgproto3.Bind{DestinationPortal: "pgward_portal_check"},
		&pgproto3.Execute{Portal: "pgward_portal_check"},
		&pgproto3.Describe{ObjectType: 'P', Name: "pgward_p"},
		&pgproto3.Close{ObjectType: 'P', Name: "pgward_p"},
	} {
		r.fe.Send(m)
		r.fe.Send(&pgproto3.Sync{})
		if err := r.fe.Flush(); err != nil {
			t.Fatal(err)
		}
		var got *pgproto3.ErrorResponse
		_ = r.pc.Conn().SetReadDeadline(time.Now().Add(15 * time.Second))
		for {
			msg, err := r.fe.Receive()
			if err != nil {
				t.Fatal(err)
			}
			if e, ok := msg.(*pgproto3.ErrorResponse); ok {
				c := *e
				got = &c
			}
			if _, ok := msg.(*pgproto3.ReadyForQuery); ok {
				break
			}
		}
		if got == nil || got.Code != "42939" || !strings.Contains(got.Message, "pgward_") {
			t.Fatalf("%T: error %+v; want 42939 naming the reserved prefix", m, got)
		}
	}
	if codes := r.send(1, &pgproto3.Parse{Name: "ok1", Query: "SELECT 1"}, &pgproto3.Bind{PreparedStatement: "ok1"}, &pgproto3.Execute{}, &pgproto3.Sync{}); len(codes) != 0 {
		t.Fatalf("session after refusals: %v", codes)
	}
}

// portalSwapFunction creates truth_portal_swap(portal, query): PL/pgSQL
// that closes the portal and opens a refcursor of the same name over query.
func portalSwapFunction(t *testing.T, h *harness) {
	t.Helper()
	if err := h.pg.Exec(context.Background(), `CREATE OR REPLACE FUNCTION truth_portal_swap(p text, q text) RETURNS int LANGUAGE plpgsql AS $f$
DECLARE c refcursor := p;
BEGIN
  EXECUTE format('CLOSE %I', p);
  OPEN c FOR EXECUTE q;
  RETURN 1;
END $f$;
CREATE OR REPLACE FUNCTION truth_portal_swap_using(p text, q text, v int) RETURNS int LANGUAGE plpgsql AS $f$
DECLARE c refcursor := p;
BEGIN
  EXECUTE format('CLOSE %I', p);
  OPEN c FOR EXECUTE q USING v;
  RETURN 1;
END $f$`); err != nil {
		t.Fatal(err)
	}
}

// results reads a protocol exchange up to ReadyForQuery: the first column
// of each DataRow, and "error CODE" for each ErrorResponse.
func (r *protoSession) results(msgs ...pgproto3.FrontendMessage) []string {
	r.t.Helper()
	for _, m := range msgs {
		r.fe.Send(m)
	}
	if err := r.fe.Flush(); err != nil {
		r.t.Fatal(err)
	}
	_ = r.pc.Conn().SetReadDeadline(time.Now().Add(15 * time.Second))
	var got []string
	for {
		m, err := r.fe.Receive()
		if err != nil {
			r.t.Fatal(err)
		}
		switch m := m.(type) {
		case *pgproto3.DataRow:
			got = append(got, string(m.Values[0]))
		case *pgproto3.ErrorResponse:
			got = append(got, "error "+m.Code)
		case *pgproto3.ReadyForQuery:
			return got
		}
	}
}

// portalSwap binds portal p1 to bound, fetches one row of it, lets
// truth_portal_swap replace p1 by a cursor over replacement (a simple Query
// in the same transaction), then executes p1 again. It returns the rows and
// errors of each Execute of p1 and the session's audit events for p1's
// Executes (with their results).
func portalSwap(t *testing.T, h *harness, bound, replacement string) (first, after []string, execs, results []map[string]any) {
	t.Helper()
	r := newProtoSession(t, h)
	marker := fmt.Sprintf("SELECT 'truth-portal-marker-%d'", time.Now().UnixNano())
	r.send(1, &pgproto3.Query{String: marker})
	if codes := r.send(1, &pgproto3.Query{String: "BEGIN"}); len(codes) != 0 {
		t.Fatal(codes)
	}
	first = r.results(&pgproto3.Parse{Name: "ps", Query: bound}, &pgproto3.Bind{DestinationPortal: "p1", PreparedStatement: "ps"},
		&pgproto3.Execute{Portal: "p1", MaxRows: 1}, &pgproto3.Sync{})
	swap := fmt.Sprintf("SELECT truth_portal_swap('p1', '%s')", strings.ReplaceAll(replacement, "'", "''"))
	if codes := r.send(1, &pgproto3.Query{String: swap}); len(codes) != 0 {
		t.Fatal(codes)
	}
	after = r.results(&pgproto3.Execute{Portal: "p1"}, &pgproto3.Sync{})
	r.send(1, &pgproto3.Query{String: "ROLLBACK"})
	r.pc.Close(context.Background())
	queries, res := sessionQueries(t, h, marker)
	for _, q := range queries {
		if q["portal_name"] == "p1" && q["bind_only"] != true {
			execs = append(execs, q)
			results = append(results, res[num(q["ei"])])
		}
	}
	if len(execs) != 2 {
		t.Fatalf("Executes of p1 audited: %v", execs)
	}
	return first, after, execs, results
}

// A function can close a portal and open a cursor under its name (PL/pgSQL
// OPEN of a refcursor holding that name), so that the client's next
// Execute of the portal runs the function's query. pgward puts a guard in
// front of such an Execute (verify.go): the replaced portal is refused
// with 34000, nothing of the function's query reaches the client, and the
// audit records the Execute as failed.
func TestAuditPortalReplacedInServerIsRefused(t *testing.T) {
	h := newHarness(t, nil)
	portalSwapFunction(t, h)
	bound := "SELECT g AS bound FROM generate_series(4242, 4244) g"
	first, after, execs, results := portalSwap(t, h, bound, "SELECT 666 AS replaced")
	if strings.Join(first, ",") != "4242" {
		t.Fatalf("first fetch of p1: %q", first)
	}
	if strings.Join(after, ",") != "error 34000" {
		t.Fatalf("Execute of the replaced portal returned %q; want only pgward's refusal (34000)", after)
	}
	for i, q := range execs {
		if q["db_query"] != bound || q["portal_unverified"] != nil {
			t.Errorf("Execute %d audited as %v", i, q)
		}
	}
	if results[0]["success"] != true {
		t.Errorf("first Execute's result: %v", results[0])
	}
	if r := results[1]; r == nil || r["success"] != false || !strings.Contains(asString(r["error"]), "refused") {
		t.Errorf("refused Execute's result: %v; want a failure naming the refusal", r)
	}
}

// A cursor opened in the portal's place over the very text pgward audited,
// with another parameter value, has the same pg_cursors.statement; its
// creation time tells it apart from the portal recorded after the Bind.
func TestAuditPortalReplacedSameTextIsRefused(t *testing.T) {
	h := newHarness(t, nil)
	portalSwapFunction(t, h)
	r := newProtoSession(t, h)
	marker := fmt.Sprintf("SELECT 'truth-portal-same-%d'", time.Now().UnixNano())
	r.send(1, &pgproto3.Query{String: marker})
	bound := "SELECT g + $1::int AS v FROM generate_series(0, 2) g"
	var got []string
	got = append(got, r.results(&pgproto3.Query{String: "BEGIN"})...)
	got = append(got, r.results(&pgproto3.Parse{Name: "ps", Query: bound}, &pgproto3.Bind{DestinationPortal: "p1", PreparedStatement: "ps", Parameters: [][]byte{[]byte("1")}},
		&pgproto3.Execute{Portal: "p1", MaxRows: 1}, &pgproto3.Sync{})...)
	swap := fmt.Sprintf("SELECT truth_portal_swap_using('p1', '%s', 665)", bound)
	got = append(got, r.results(&pgproto3.Query{String: swap})...)
	got = append(got, r.results(&pgproto3.Execute{Portal: "p1"}, &pgproto3.Sync{})...)
	got = append(got, r.results(&pgproto3.Query{String: "ROLLBACK"})...)
	if want := "1,1,error 34000"; strings.Join(got, ",") != want {
		t.Fatalf("got %q, want %q: the cursor of the same text with parameter 665 must not run", strings.Join(got, ","), want)
	}
	r.pc.Close(context.Background())
	queries, results := sessionQueries(t, h, marker)
	var execs []bool
	for _, q := range queries {
		if q["portal_name"] == "p1" && q["bind_only"] != true {
			execs = append(execs, results[num(q["ei"])]["success"] == true)
		}
	}
	if fmt.Sprint(execs) != "[true false]" {
		t.Fatalf("Executes of p1 audited with success %v, want [true false]", execs)
	}
}

// Other statements between a portal's fetches (the guard's case) leave a
// portal nobody replaced working: the guard passes and the Execute runs the
// rows the audit names; so does one Execute straight after another.
func TestAuditPortalGuardPassesUntouchedPortal(t *testing.T) {
	h := newHarness(t, nil)
	r := newProtoSession(t, h)
	marker := fmt.Sprintf("SELECT 'truth-portal-untouched-%d'", time.Now().UnixNano())
	r.send(1, &pgproto3.Query{String: marker})
	bound := "SELECT g FROM generate_series(1, 5) g"
	var got []string
	got = append(got, r.results(&pgproto3.Query{String: "BEGIN"})...)
	got = append(got, r.results(&pgproto3.Parse{Name: "ps", Query: bound}, &pgproto3.Bind{DestinationPortal: "p1", PreparedStatement: "ps"},
		&pgproto3.Execute{Portal: "p1", MaxRows: 1}, &pgproto3.Sync{})...)
	got = append(got, r.results(&pgproto3.Execute{Portal: "p1", MaxRows: 1}, &pgproto3.Sync{})...)
	got = append(got, r.results(&pgproto3.Query{String: "SELECT 'between'"})...)
	got = append(got, r.results(&pgproto3.Execute{Portal: "p1", MaxRows: 1}, &pgproto3.Sync{})...)
	// In one pipeline: another statement, then the portal again.
	got = append(got, r.results(&pgproto3.Parse{Query: "SELECT 'piped'"}, &pgproto3.Bind{}, &pgproto3.Execute{},
		&pgproto3.Execute{Portal: "p1", MaxRows: 1}, &pgproto3.Close{ObjectType: 'P', Name: "p1"}, &pgproto3.Sync{})...)
	// All in one write: a portal bound, fetched, another statement, the
	// portal again (its record is read before the other statement runs).
	got = append(got, r.results(&pgproto3.Bind{DestinationPortal: "p2", PreparedStatement: "ps"}, &pgproto3.Execute{Portal: "p2", MaxRows: 1},
		&pgproto3.Parse{Query: "SELECT 'same write'"}, &pgproto3.Bind{}, &pgproto3.Execute{},
		&pgproto3.Execute{Portal: "p2", MaxRows: 1}, &pgproto3.Sync{})...)
	got = append(got, r.results(&pgproto3.Query{String: "COMMIT"})...)
	if want := "1,2,between,3,piped,4,1,same write,2"; strings.Join(got, ",") != want {
		t.Fatalf("got %q, want %q", strings.Join(got, ","), want)
	}
	r.pc.Close(context.Background())
	queries, results := sessionQueries(t, h, marker)
	n := 0
	for _, q := range queries {
		if q["portal_name"] != "p1" || q["bind_only"] == true {
			continue
		}
		n++
		if q["db_query"] != bound || q["portal_unverified"] != nil || results[num(q["ei"])]["success"] != true {
			t.Errorf("Execute of p1: %v, result %v", q, results[num(q["ei"])])
		}
	}
	if n != 4 {
		t.Fatalf("%d Executes of p1 audited, want 4", n)
	}
}

// The swap and the Execute in one write with the Bind: refused all the same.
func TestAuditPortalReplacedInOneWriteIsRefused(t *testing.T) {
	h := newHarness(t, nil)
	portalSwapFunction(t, h)
	r := newProtoSession(t, h)
	got := r.results(&pgproto3.Query{String: "BEGIN"})
	got = append(got, r.results(&pgproto3.Parse{Name: "ps", Query: "SELECT g FROM generate_series(1, 3) g"},
		&pgproto3.Bind{DestinationPortal: "p3", PreparedStatement: "ps"}, &pgproto3.Execute{Portal: "p3", MaxRows: 1},
		&pgproto3.Parse{Query: "SELECT truth_portal_swap('p3', 'SELECT 666')"}, &pgproto3.Bind{}, &pgproto3.Execute{},
		&pgproto3.Execute{Portal: "p3", MaxRows: 1}, &pgproto3.Sync{})...)
	got = append(got, r.results(&pgproto3.Query{String: "ROLLBACK"})...)
	if want := "1,1,error 34000"; strings.Join(got, ",") != want {
		t.Fatalf("got %q, want %q", strings.Join(got, ","), want)
	}
}

// With upstreams.<name>.trust_named_statements pgward sends no guard: the
// replaced portal runs, and the audit flags the Execute portal_unverified
// (one that follows its Bind directly is not flagged).
func TestAuditPortalReplacedTrustedIsFlagged(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders"]
		u.TrustNamedStatements = true
		c.Upstreams["orders"] = u
	})
	portalSwapFunction(t, h)
	bound := "SELECT 4242 AS bound"
	_, after, execs, _ := portalSwap(t, h, bound, "SELECT 666 AS replaced")
	if strings.Join(after, ",") != "666" {
		t.Fatalf("Execute after the swap returned %q; PostgreSQL runs the function's cursor", after)
	}
	if execs[0]["portal_unverified"] != nil {
		t.Errorf("Execute right after its Bind flagged: %v", execs[0])
	}
	if execs[1]["portal_unverified"] != true || execs[1]["db_query"] != bound {
		t.Errorf("Execute after the function ran: %v; want portal_unverified with the bound text", execs[1])
	}
}

// upstreams.<name>.trust_named_statements turns verified execution off: a
// Bind goes to the server's statement by name (so a swap inside the server
// takes effect, as docs/security-model.md says), and pgward_ names are the
// client's to use.
func TestTrustNamedStatementsBindsByName(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders"]
		u.TrustNamedStatements = true
		c.Upstreams["orders"] = u
	})
	swapFunctions(t, h.pg, "truth_trust")
	before := countRows(t, h, "truth_trust")
	r := newProtoSession(t, h)
	r.send(1, &pgproto3.Parse{Name: "s1", Query: "SELECT 1"}, &pgproto3.Sync{})
	if codes := r.send(1, &pgproto3.Query{String: "SELECT truth_trust_plpgsql('s1', 'INSERT INTO truth_trust VALUES (1)')"}); len(codes) != 0 {
		t.Fatal(codes)
	}
	if codes := r.send(1, &pgproto3.Bind{PreparedStatement: "s1"}, &pgproto3.Execute{}, &pgproto3.Sync{}); len(codes) != 0 {
		t.Fatal(codes)
	}
	if codes := r.send(1, &pgproto3.Parse{Name: "pgward_mine", Query: "SELECT 2"}, &pgproto3.Bind{PreparedStatement: "pgward_mine"}, &pgproto3.Execute{}, &pgproto3.Sync{}); len(codes) != 0 {
		t.Fatalf("pgward_ name with trust_named_statements: %v", codes)
	}
	r.pc.Close(context.Background())
	if n := countRows(t, h, "truth_trust"); n != before+1 {
		t.Fatalf("rows %d, want %d: the Bind should have run the server's s1", n, before+1)
	}
}

// A simple Query that fails before it runs (here a syntax error) leaves the
// server's unnamed portal as it was; pgward cannot tell where the Query
// failed and forgets the portal. Once a ROLLBACK TO (sent through a named
// portal) clears the error, an Execute of the unnamed portal would run the
// INSERT it still holds, audited with no text at all. pgward refuses an
// Execute of an unnamed portal it did not see bound (34000), and the
// INSERT does not run.
func TestAuditUnnamedPortalAfterFailedQueryIsRefused(t *testing.T) {
	h := newHarness(t, nil)
	r := newProtoSession(t, h)
	marker := fmt.Sprintf("SELECT 'truth-unnamed-%d'", time.Now().UnixNano())
	r.send(1, &pgproto3.Query{String: marker})
	var got []string
	got = append(got, r.results(&pgproto3.Query{String: "CREATE TEMP TABLE truth_unnamed (x int)"})...)
	got = append(got, r.results(&pgproto3.Query{String: "BEGIN"})...)
	insert := "INSERT INTO truth_unnamed VALUES (7) RETURNING x"
	got = append(got, r.results(
		&pgproto3.Parse{Query: insert}, &pgproto3.Bind{},
		&pgproto3.Parse{Name: "sp", Query: "SAVEPOINT s"}, &pgproto3.Bind{DestinationPortal: "psp", PreparedStatement: "sp"}, &pgproto3.Execute{Portal: "psp"},
		&pgproto3.Sync{})...)
	got = append(got, r.results(&pgproto3.Query{String: "SELEC broken"})...)
	got = append(got, r.results(
		&pgproto3.Parse{Name: "rb", Query: "ROLLBACK TO s"}, &pgproto3.Bind{DestinationPortal: "prb", PreparedStatement: "rb"}, &pgproto3.Execute{Portal: "prb"},
		&pgproto3.Sync{})...)
	got = append(got, r.results(&pgproto3.Execute{}, &pgproto3.Sync{})...)
	got = append(got, r.results(&pgproto3.Query{String: "ROLLBACK"})...)
	// On the code before, the Execute ran the INSERT: its row, 7, came
	// back where pgward's 34000 is now.
	if want := "error 42601,error 34000"; strings.Join(got, ",") != want {
		t.Fatalf("got %q, want %q: the INSERT the unnamed portal held must not run", strings.Join(got, ","), want)
	}
	r.pc.Close(context.Background())
	queries, results := sessionQueries(t, h, marker)
	var unnamed []string
	for _, q := range queries {
		if q["extended"] == true && q["portal_name"] == "" && q["bind_only"] != true {
			unnamed = append(unnamed, fmt.Sprintf("%q success=%v", q["db_query"], results[num(q["ei"])]["success"]))
		}
	}
	if want := `["" success=false]`; fmt.Sprint(unnamed) != want {
		t.Errorf("Executes of the unnamed portal audited as %v, want %v (refused, nothing ran)", unnamed, want)
	}
}
