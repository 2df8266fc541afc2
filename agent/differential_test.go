package agent

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgward/pgward/testenv"
)

// TestAuditMatchesServer is a differential test of the audit against the
// server's own account: random sequences of extended-protocol messages and
// simple queries — failing ones included (duplicate and unknown names, type
// and syntax errors, errors mid-pipeline, row limits, SQL-level PREPARE,
// DEALLOCATE, DISCARD ALL, DECLARE, and functions and DO blocks that swap or
// deallocate named statements, or replace portal p1, from inside the
// server) — go through pgward to a PostgreSQL that logs every statement it
// executes (log_statement = all). For every
// statement the server executed, in order, the audit must have an event
// with the same text; every audit event the server did not execute must be
// recorded as failed.
//
// PGWARD_DIFF_SESSIONS sets the number of random sessions (make test runs
// a bounded number; make fuzz many), PGWARD_DIFF_SEED the first seed,
// PGWARD_DIFF_DURATION (a Go duration) stops starting sessions after that
// long, whichever comes first.
func TestAuditMatchesServer(t *testing.T) {
	// Both relays: the goroutine pumps, and the event loop, which stages
	// the audit of a round's reads and writes them together.
	for _, loop := range []bool{false, true} {
		t.Run(map[bool]string{false: "goroutines", true: "event-loop"}[loop], func(t *testing.T) { testAuditMatchesServer(t, loop) })
	}
}

func testAuditMatchesServer(t *testing.T, loop bool) {
	sessions := 12
	if v, err := strconv.Atoi(os.Getenv("PGWARD_DIFF_SESSIONS")); err == nil && v > 0 {
		sessions = v
	}
	seed := uint64(time.Now().UnixNano())
	if v, err := strconv.ParseUint(os.Getenv("PGWARD_DIFF_SEED"), 10, 64); err == nil {
		seed = v
	}
	pg := privatePG(t, testenv.Options{LogStatements: true})
	h := newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders"]
		u.Address = pg.SocketPath()
		c.Upstreams["orders"] = u
		c.Listen.EventLoop = loop
	})
	ctx := context.Background()
	if err := pg.Exec(ctx, "CREATE TABLE IF NOT EXISTS difft (n int); GRANT ALL ON difft TO "+testenv.ScramUser); err != nil {
		t.Fatal(err)
	}
	// Code inside the server that changes the session's prepared statements
	// with no message pgward sees: DEALLOCATE name (if it exists), then
	// PREPARE name AS body (unless body is empty).
	swapFunctions(t, pg, "difft")
	// Code inside the server that replaces portal p1 by a cursor over
	// another query (verify.go's guard refuses the next Execute of p1).
	if err := pg.Exec(ctx, `CREATE OR REPLACE FUNCTION difft_portal(p text, q text) RETURNS int LANGUAGE plpgsql AS $f$
DECLARE c refcursor := p;
BEGIN
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE name = p) THEN
    EXECUTE format('CLOSE %I', p);
  END IF;
  OPEN c FOR EXECUTE q;
  RETURN 1;
END $f$`); err != nil {
		t.Fatal(err)
	}
	var stop time.Time
	if d, err := time.ParseDuration(os.Getenv("PGWARD_DIFF_DURATION")); err == nil && d > 0 {
		stop = time.Now().Add(d)
	}
	var total diffCounts
	for i := range sessions {
		if !stop.IsZero() && time.Now().After(stop) {
			sessions = i
			break
		}
		s := seed + uint64(i)
		t.Run(fmt.Sprintf("seed=%d", s), func(t *testing.T) {
			c := diffSession(t, h, pg, s)
			total.messages += c.messages
			total.executed += c.executed
			total.events += c.events
		})
		if t.Failed() {
			t.Logf("reproduce with PGWARD_DIFF_SEED=%d PGWARD_DIFF_SESSIONS=1", s)
			return
		}
	}
	t.Logf("%d programs from seed %d: %d messages sent, %d statements the server executed matched against %d audit events",
		sessions, seed, total.messages, total.executed, total.events)
}

// diffCounts is what one program checked.
type diffCounts struct{ messages, executed, events int }

// diffStep is one message of a random program.
type diffStep struct {
	msg  pgproto3.FrontendMessage
	desc string
}

func diffProgram(r *rand.Rand, marker int) []diffStep {
	n := 0
	next := func() int { n++; return marker*1000 + n }
	names := []string{"", "s1", "s2"}
	portals := []string{"", "p1"}
	parseText := func() (string, []uint32) {
		k := next()
		switch r.IntN(10) {
		case 0:
			return fmt.Sprintf("SELECT %d::int AS m", k), nil
		case 1:
			return fmt.Sprintf("SELECT $1::int + %d", k), []uint32{0}
		case 2:
			return fmt.Sprintf("INSERT INTO difft VALUES (%d) RETURNING n", k), nil
		case 3:
			return fmt.Sprintf("SELECT generate_series(1, 3) + %d", k), nil
		case 4:
			return fmt.Sprintf("SELECT 1/0 AS e%d", k), nil
		case 5:
			return fmt.Sprintf("SELEC %d", k), nil // syntax error
		case 6:
			return fmt.Sprintf("PREPARE s2 AS SELECT %d", k), nil
		case 7:
			return fmt.Sprintf("DEALLOCATE s1 -- %d", k), nil
		case 8:
			return swapCall(r, k), nil
		default:
			return fmt.Sprintf("SELECT $1::text || '%d'", k), []uint32{25}
		}
	}
	simple := func() string {
		k := next()
		switch r.IntN(17) {
		case 15:
			return "ROLLBACK TO sp"
		case 16:
			return "SAVEPOINT sp"
		case 0:
			return "BEGIN"
		case 1:
			return "COMMIT"
		case 2:
			return "ROLLBACK"
		case 3:
			return fmt.Sprintf("PREPARE s%d AS SELECT %d", 1+r.IntN(2), k)
		case 4:
			return fmt.Sprintf("DEALLOCATE s%d", 1+r.IntN(2))
		case 5:
			return "DEALLOCATE ALL"
		case 6:
			return "DISCARD ALL"
		case 7:
			return fmt.Sprintf("EXECUTE s%d", 1+r.IntN(2))
		case 8:
			return fmt.Sprintf("SELECT 1/0 AS e%d", k)
		case 9:
			return fmt.Sprintf("DECLARE p1 CURSOR FOR SELECT generate_series(1, 3) + %d", k)
		case 10:
			return fmt.Sprintf("PREPARE s1 AS INSERT INTO difft VALUES (%d); SELECT %d", k, k)
		case 11, 12:
			return swapCall(r, k)
		case 13:
			return fmt.Sprintf("DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; EXECUTE 'PREPARE s1 AS SELECT %d AS do_block'; END$$", k)
		default:
			return fmt.Sprintf("INSERT INTO difft VALUES (%d)", k)
		}
	}
	var steps []diffStep
	if r.IntN(2) == 0 {
		// Half the programs run in a transaction block, where portals
		// outlive a Sync and a failed simple Query leaves the unnamed
		// portal as it was (ROLLBACK TO clears the error).
		steps = append(steps, diffStep{&pgproto3.Query{String: "BEGIN"}, "Query BEGIN"}, diffStep{&pgproto3.Query{String: "SAVEPOINT sp"}, "Query SAVEPOINT sp"})
	}
	count := 20 + r.IntN(40)
	for range count {
		switch w := r.IntN(100); {
		case w < 22:
			name := names[r.IntN(len(names))]
			text, oids := parseText()
			steps = append(steps, diffStep{&pgproto3.Parse{Name: name, Query: text, ParameterOIDs: oids}, "Parse " + name + ": " + text})
		case w < 44:
			portal, stmt := portals[r.IntN(len(portals))], names[r.IntN(len(names))]
			var params [][]byte
			switch r.IntN(4) {
			case 1:
				params = [][]byte{[]byte("7")}
			case 2:
				params = [][]byte{[]byte("x")} // invalid for int
			}
			steps = append(steps, diffStep{&pgproto3.Bind{DestinationPortal: portal, PreparedStatement: stmt, Parameters: params}, "Bind " + portal + " " + stmt})
		case w < 66:
			portal := portals[r.IntN(len(portals))]
			max := uint32(0)
			if r.IntN(3) == 0 {
				max = 1
			}
			steps = append(steps, diffStep{&pgproto3.Execute{Portal: portal, MaxRows: max}, "Execute " + portal})
		case w < 70:
			if r.IntN(2) == 0 {
				name := names[r.IntN(len(names))]
				steps = append(steps, diffStep{&pgproto3.Close{ObjectType: 'S', Name: name}, "Close S " + name})
			} else {
				name := portals[r.IntN(len(portals))]
				steps = append(steps, diffStep{&pgproto3.Close{ObjectType: 'P', Name: name}, "Close P " + name})
			}
		case w < 73:
			name := names[r.IntN(len(names))]
			steps = append(steps, diffStep{&pgproto3.Describe{ObjectType: 'S', Name: name}, "Describe S " + name})
		case w < 86:
			steps = append(steps, diffStep{&pgproto3.Sync{}, "Sync"})
		case w < 89:
			steps = append(steps, diffStep{&pgproto3.Flush{}, "Flush"})
		default:
			q := simple()
			steps = append(steps, diffStep{&pgproto3.Query{String: q}, "Query " + q})
		}
	}
	return steps
}

// swapCall is a statement that swaps or deallocates a named statement, or
// replaces portal p1, from inside the server (swapFunctions, difft_portal).
func swapCall(r *rand.Rand, k int) string {
	name := fmt.Sprintf("s%d", 1+r.IntN(2))
	switch r.IntN(5) {
	case 4:
		return fmt.Sprintf("SELECT difft_portal('p1', 'SELECT generate_series(1, 3) + %d AS portal_swapped')", k)
	case 0:
		return fmt.Sprintf("SELECT difft_plpgsql('%s', '') AS dealloc%d", name, k)
	case 1:
		return fmt.Sprintf("SELECT difft_plpgsql('%s', 'SELECT %d AS swapped')", name, k)
	case 2:
		return fmt.Sprintf("SELECT difft_sql(), %d AS sqlfn", k)
	default:
		return fmt.Sprintf("SELECT difft_plpgsql('%s', 'INSERT INTO difft VALUES (%d)')", name, k)
	}
}

func diffSession(t *testing.T, h *harness, pg *testenv.Postgres, seed uint64) diffCounts {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pc, err := pgconn.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close(context.Background())
	pid := pc.PID()
	marker := fmt.Sprintf("SELECT 'diff-start-%d'", seed)
	if _, err := pc.Exec(ctx, marker).ReadAll(); err != nil {
		t.Fatal(err)
	}
	steps := diffProgram(r, int(seed%100000))
	end := fmt.Sprintf("SELECT 'diff-end-%d'", seed)
	// Sync ends any skipping, ROLLBACK any transaction block the program left
	// open (an aborted one would refuse the end marker).
	steps = append(steps, diffStep{&pgproto3.Sync{}, "Sync"}, diffStep{&pgproto3.Query{String: "ROLLBACK"}, "Query ROLLBACK"},
		diffStep{&pgproto3.Query{String: end}, "Query " + end})

	fe := pc.Frontend()
	// Read answers while sending, as a pipelining client does.
	readErr := make(chan error, 1)
	go func() {
		for {
			m, err := fe.Receive()
			if err != nil {
				readErr <- err
				return
			}
			if dr, ok := m.(*pgproto3.DataRow); ok && len(dr.Values) == 1 && string(dr.Values[0]) == fmt.Sprintf("diff-end-%d", seed) {
				for {
					m, err := fe.Receive()
					if err != nil {
						readErr <- err
						return
					}
					if _, ok := m.(*pgproto3.ReadyForQuery); ok {
						readErr <- nil
						return
					}
				}
			}
		}
	}()
	var program []string
	for i := 0; i < len(steps); {
		k := 1 + r.IntN(6) // messages per write: pipelined batches
		for j := 0; j < k && i < len(steps); j++ {
			fe.Send(steps[i].msg)
			program = append(program, steps[i].desc)
			i++
		}
		if err := fe.Flush(); err != nil {
			t.Fatalf("send: %v", err)
		}
		if r.IntN(3) == 0 {
			time.Sleep(time.Duration(r.IntN(3)) * time.Millisecond)
		}
	}
	select {
	case err := <-readErr:
		if err != nil {
			t.Fatalf("reading answers: %v\nprogram:\n%s", err, strings.Join(program, "\n"))
		}
	case <-ctx.Done():
		var stacks strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&stacks, 1)
		t.Fatalf("no answer to the end marker\nprogram:\n%s\ngoroutines:\n%s", strings.Join(program, "\n"), stacks.String())
	}
	pc.Close(ctx)

	server := serverExecuted(t, pg, pid, fmt.Sprintf("diff-start-%d", seed), fmt.Sprintf("diff-end-%d", seed))
	audit := auditExecuted(t, h, fmt.Sprintf("diff-start-%d", seed), fmt.Sprintf("diff-end-%d", seed))
	if msg := matchExecuted(server, audit); msg != "" {
		var b strings.Builder
		fmt.Fprintf(&b, "%s\nprogram:\n  %s\nserver executed:\n", msg, strings.Join(program, "\n  "))
		for _, s := range server {
			fmt.Fprintf(&b, "  %s\n", s)
		}
		b.WriteString("audit:\n")
		for _, a := range audit {
			fmt.Fprintf(&b, "  ok=%v %s %q %s\n", a.ok, a.code, a.text, a.err)
		}
		t.Fatal(b.String())
	}
	return diffCounts{messages: len(program), executed: len(server), events: len(audit)}
}

type auditedStmt struct {
	text, code, err string
	ok              bool
}

// matchExecuted checks the server's executed statements against the
// audit's: the server's list, in order, must be the texts of a subsequence
// of the audit's events, and every audit event left out must have failed.
// An event the audit calls "not executed" may not stand for a statement the
// server ran. Identical texts make a greedy match ambiguous: this aligns.
func matchExecuted(server []string, audit []auditedStmt) string {
	memo := map[[2]int]bool{}
	var ok func(i, j int) bool
	ok = func(i, j int) bool {
		if j == len(audit) {
			return i == len(server)
		}
		k := [2]int{i, j}
		if v, seen := memo[k]; seen {
			return v
		}
		a := audit[j]
		v := (!a.ok && ok(i, j+1)) ||
			(i < len(server) && a.text == server[i] && !strings.HasPrefix(a.err, "not executed") && ok(i+1, j+1))
		memo[k] = v
		return v
	}
	if ok(0, 0) {
		return ""
	}
	// Say where the longest matching prefix ends.
	i, j := 0, 0
	for j < len(audit) {
		a := audit[j]
		if i < len(server) && a.text == server[i] && !strings.HasPrefix(a.err, "not executed") && ok(i+1, j+1) {
			i, j = i+1, j+1
			continue
		}
		if !a.ok {
			j++
			continue
		}
		break
	}
	if j < len(audit) {
		return fmt.Sprintf("audit event %d says %q ran; the server's next statement is %q", j, audit[j].text, strings.Join(server[i:min(i+1, len(server))], ""))
	}
	return fmt.Sprintf("server statement %d %q has no audit event", i, server[i])
}

var logStmt = regexp.MustCompile(`^\S+ \S+ \S+ \[(\d+)\] \S+ LOG:  (?:statement|execute(?: fetch from)? ([^:]*)): (.*)$`)

// guardLogged: the server's log line of a portal guard pgward sent
// (broker/verify.go), not a statement of the client's.
const guardLogged = "pgward_portal_check/"

// serverExecuted reads what backend pid executed between the two markers,
// from the server's log.
func serverExecuted(t *testing.T, pg *testenv.Postgres, pid uint32, start, end string) []string {
	t.Helper()
	var out []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		f, err := os.Open(pg.LogFile())
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		in, done := false, false
		out = out[:0]
		want := strconv.FormatUint(uint64(pid), 10)
		for sc.Scan() {
			m := logStmt.FindStringSubmatch(sc.Text())
			if m == nil || m[1] != want || strings.HasPrefix(m[2], guardLogged) {
				continue
			}
			switch text := m[3]; {
			case strings.Contains(text, start):
				in = true
			case strings.Contains(text, end):
				done = in
			case in && !done:
				out = append(out, text)
			}
		}
		f.Close()
		if done {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("server log has no end marker for backend %d", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// auditExecuted reads the statements of the session between the two
// markers from the audit file, with their outcome.
func auditExecuted(t *testing.T, h *harness, start, end string) []auditedStmt {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		evs := h.auditEvents(t)
		var sid string
		var startEI, endEI uint64
		for _, ev := range evs {
			if ev["event"] == "db.session.query" && strings.Contains(asString(ev["db_query"]), start) {
				sid, startEI = asString(ev["sid"]), num(ev["ei"])
			}
			if sid != "" && ev["sid"] == sid && ev["event"] == "db.session.query" && strings.Contains(asString(ev["db_query"]), end) {
				endEI = num(ev["ei"])
			}
		}
		ended := false
		results := map[uint64]map[string]any{}
		type q struct {
			ei   uint64
			text string
		}
		var qs []q
		for _, ev := range evs {
			if ev["sid"] != sid {
				continue
			}
			switch ev["event"] {
			case "db.session.end":
				ended = true
			case "db.session.query":
				ei := num(ev["ei"])
				if ei > startEI && ei < endEI && ev["bind_only"] != true {
					qs = append(qs, q{ei, asString(ev["db_query"])})
				}
			case "db.session.query.result":
				results[num(ev["query_ei"])] = ev
			}
		}
		if sid != "" && endEI > 0 && ended {
			sort.Slice(qs, func(i, j int) bool { return qs[i].ei < qs[j].ei })
			var out []auditedStmt
			for _, x := range qs {
				res := results[x.ei]
				a := auditedStmt{text: x.text}
				if res != nil {
					a.ok = res["success"] == true
					a.code, a.err = asString(res["sqlstate"]), asString(res["error"])
				}
				out = append(out, a)
			}
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("audit has no complete session for marker %q (sid %q, end ei %v, ended %v)", start, sid, endEI, ended)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
