package testenv_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/goleak"

	"github.com/pgward/pgward/testenv"
)

// shared is one server for the tests that only read or add roles; tests
// that restart or kill a server start their own (about 100ms each).
var (
	shared    *testenv.Postgres
	sharedErr error
)

func TestMain(m *testing.M) {
	if _, err := testenv.FindBinDir(); err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), testenv.StartTimeout)
		t := time.Now()
		shared, sharedErr = testenv.StartPostgres(ctx, testenv.Options{})
		cancel()
		if sharedErr == nil {
			fmt.Fprintf(os.Stderr, "testenv: shared postgres started in %v\n", time.Since(t).Round(time.Millisecond))
		}
	}
	code := m.Run()
	if shared != nil {
		if err := shared.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stop shared postgres:", err)
			code = 1
		}
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func sharedPG(t *testing.T) *testenv.Postgres {
	t.Helper()
	if sharedErr != nil {
		t.Fatalf("shared postgres: %v", sharedErr)
	}
	if shared == nil {
		// Same rule as Require: skip without binaries, fail in CI.
		testenv.Require(t)
		t.Fatal("unreachable: Require found binaries TestMain did not")
	}
	return shared
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

var roles = []struct {
	user, password string
	method         string // pg_hba method; also the require_auth value that must work
	stored         string // prefix of pg_authid.rolpassword
}{
	{testenv.ScramUser, testenv.ScramPassword, "scram-sha-256", "SCRAM-SHA-256$"},
	{testenv.MD5User, testenv.MD5Password, "md5", "md5"},
	{testenv.PasswordUser, testenv.PasswordPassword, "password", "SCRAM-SHA-256$"},
	{testenv.SuperUser, testenv.SuperPassword, "scram-sha-256", "SCRAM-SHA-256$"},
}

// transports returns the connection strings to try for one role.
func transports(p *testenv.Postgres, user, password string) map[string]string {
	return map[string]string{
		"socket":        p.DSN(user, password, testenv.Database),
		"tls-ip":        p.TLSDSN(user, password, testenv.Database),
		"tls-localhost": strings.Replace(p.TLSDSN(user, password, testenv.Database), "host=127.0.0.1", "host=localhost", 1),
	}
}

func TestLogin(t *testing.T) {
	p := sharedPG(t)
	for _, r := range roles {
		for name, dsn := range transports(p, r.user, r.password) {
			t.Run(r.user+"/"+name, func(t *testing.T) {
				ctx := ctxT(t)
				conn, err := pgx.Connect(ctx, dsn)
				if err != nil {
					t.Fatalf("connect: %v", err)
				}
				defer conn.Close(ctx)
				var user string
				var ssl bool
				err = conn.QueryRow(ctx,
					`SELECT current_user, coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)`).Scan(&user, &ssl)
				if err != nil {
					t.Fatalf("query: %v", err)
				}
				if user != r.user {
					t.Errorf("current_user = %q, want %q", user, r.user)
				}
				if want := name != "socket"; ssl != want {
					t.Errorf("ssl = %v, want %v", ssl, want)
				}
				// Every role may create tables in public.
				tbl := "t_" + strings.ReplaceAll(r.user+"_"+name, "-", "_")
				if _, err := conn.Exec(ctx, "CREATE TABLE "+tbl+" (x int); DROP TABLE "+tbl); err != nil {
					t.Errorf("create table in public: %v", err)
				}
			})
		}
	}
}

func TestWrongPasswordFails(t *testing.T) {
	p := sharedPG(t)
	for _, r := range roles {
		for name, dsn := range transports(p, r.user, r.password+"x") {
			t.Run(r.user+"/"+name, func(t *testing.T) {
				ctx := ctxT(t)
				conn, err := pgx.Connect(ctx, dsn)
				if err == nil {
					conn.Close(ctx)
					t.Fatal("connected with a wrong password")
				}
				var pgErr *pgconn.PgError
				if !errors.As(err, &pgErr) || pgErr.Code != "28P01" {
					t.Fatalf("err = %v, want SQLSTATE 28P01 invalid_password", err)
				}
			})
		}
	}
}

// TestAuthMethods proves each role gets the method it is named for: the
// first message the server sends after a plain StartupMessage, on the socket
// and on TCP, and what the client accepts under require_auth over TLS.
func TestAuthMethods(t *testing.T) {
	p := sharedPG(t)
	want := map[string]string{
		testenv.ScramUser:    "*pgproto3.AuthenticationSASL",
		testenv.MD5User:      "*pgproto3.AuthenticationMD5Password",
		testenv.PasswordUser: "*pgproto3.AuthenticationCleartextPassword",
		testenv.SuperUser:    "*pgproto3.AuthenticationSASL",
		"no_such_role":       "*pgproto3.AuthenticationSASL", // hba matches, then the exchange fails
	}
	for user, wantMsg := range want {
		for _, tr := range []struct{ network, addr string }{{"unix", p.SocketPath()}, {"tcp", p.TCPAddr()}} {
			t.Run(user+"/"+tr.network, func(t *testing.T) {
				if got := firstAuthMessage(t, tr.network, tr.addr, user); got != wantMsg {
					t.Errorf("server asked %s, want %s", got, wantMsg)
				}
			})
		}
	}
	for _, r := range roles {
		t.Run(r.user+"/require_auth", func(t *testing.T) {
			ctx := ctxT(t)
			dsn := p.TLSDSN(r.user, r.password, testenv.Database)
			conn, err := pgconn.Connect(ctx, dsn+" require_auth="+r.method)
			if err != nil {
				t.Fatalf("require_auth=%s: %v", r.method, err)
			}
			conn.Close(ctx)
			other := "scram-sha-256"
			if r.method == "scram-sha-256" {
				other = "md5,password"
			}
			if conn, err := pgconn.Connect(ctx, dsn+" require_auth="+other); err == nil {
				conn.Close(ctx)
				t.Errorf("require_auth=%s accepted, but the role should use %s", other, r.method)
			}
		})
	}
	t.Run("pg_authid", func(t *testing.T) {
		ctx := ctxT(t)
		conn, err := p.Admin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		for _, r := range roles {
			var stored string
			if err := conn.QueryRow(ctx, "SELECT rolpassword FROM pg_authid WHERE rolname = $1", r.user).Scan(&stored); err != nil {
				t.Fatalf("%s: %v", r.user, err)
			}
			if !strings.HasPrefix(stored, r.stored) {
				t.Errorf("%s: stored password %.14q..., want prefix %q", r.user, stored, r.stored)
			}
		}
		// No trust anywhere, and the methods are the ones in the file.
		var trust int
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'trust' OR error IS NOT NULL").Scan(&trust); err != nil {
			t.Fatal(err)
		}
		if trust != 0 {
			t.Errorf("pg_hba has %d trust or broken lines", trust)
		}
	})
}

// firstAuthMessage sends a StartupMessage and returns the type of the
// server's first reply.
func firstAuthMessage(t *testing.T, network, addr, user string) string {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	fe := pgproto3.NewFrontend(c, c)
	fe.Send(&pgproto3.StartupMessage{
		ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters:      map[string]string{"user": user, "database": testenv.Database},
	})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	msg, err := fe.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := msg.(*pgproto3.ErrorResponse); ok {
		return "ErrorResponse " + e.Code + " " + e.Message
	}
	return fmt.Sprintf("%T", msg)
}

func TestDSNQuoting(t *testing.T) {
	p := sharedPG(t)
	ctx := ctxT(t)
	const user, password = "quoting_user", `a b'c\d`
	if err := p.Exec(ctx, `CREATE ROLE quoting_user LOGIN PASSWORD 'a b''c\d'`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Exec(context.Background(), "DROP ROLE quoting_user") })
	for _, dsn := range []string{p.DSN(user, password, testenv.Database), p.TLSDSN(user, password, testenv.Database)} {
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatalf("connect with %q: %v", dsn, err)
		}
		conn.Close(ctx)
	}
}

func TestSocketReachableByOthers(t *testing.T) {
	p := sharedPG(t)
	for _, c := range []struct {
		path string
		perm fs.FileMode
	}{{p.SocketDir, 0o755}, {filepath.Dir(p.SocketDir), 0o755}, {p.SocketPath(), 0o777}} {
		fi, err := os.Stat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != c.perm {
			t.Errorf("%s mode %v, want %v", c.path, fi.Mode().Perm(), c.perm)
		}
	}
	if got, want := p.SocketPath(), filepath.Join(p.SocketDir, ".s.PGSQL."+strconv.Itoa(p.Port)); got != want {
		t.Errorf("SocketPath = %s, want %s", got, want)
	}
	if got := len(p.SocketPath()); got > 107 {
		t.Errorf("socket path is %d bytes, over the 107 limit", got)
	}
}

func TestServerRunsUnprivileged(t *testing.T) {
	p := sharedPG(t)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID()))
	if err != nil {
		t.Fatal(err)
	}
	var uid string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "Uid:") {
			uid = strings.Fields(l)[1]
		}
	}
	if want := strconv.Itoa(int(p.ServerUID())); uid != want {
		t.Errorf("postmaster uid %s, want %s", uid, want)
	}
	if os.Geteuid() == 0 && uid == "0" {
		t.Error("postmaster runs as root")
	}
}

func TestRunAs(t *testing.T) {
	testenv.RequireRoot(t)
	p := sharedPG(t)
	ids := testenv.UnprivilegedIDs(t, 3)
	seen := map[uint32]bool{}
	for _, id := range ids {
		if id == 0 || id == p.ServerUID() || seen[id] {
			t.Fatalf("UnprivilegedIDs returned %v (server uid %d)", ids, p.ServerUID())
		}
		seen[id] = true
	}
	id := ids[0]
	out, err := testenv.RunAs(id, id+1, "sh", "-c", `id -u; id -g; id -G; echo "$HOME"`).Output()
	if err != nil {
		t.Fatalf("run as %d: %v", id, err)
	}
	want := fmt.Sprintf("%d\n%d\n%d\n/\n", id, id+1, id+1) // no supplementary groups
	if string(out) != want {
		t.Errorf("output %q, want %q", out, want)
	}
}

func TestPsqlAsUnprivilegedUser(t *testing.T) {
	testenv.RequireRoot(t)
	p := sharedPG(t)
	psql, err := exec.LookPath("psql")
	if err != nil {
		testenv.SkipUnlessCI(t, "psql not on PATH: %s", testenv.InstallCommand)
	}
	id := testenv.UnprivilegedIDs(t, 1)[0]
	conninfo := fmt.Sprintf("host=%s port=%d user=%s dbname=%s", p.SocketDir, p.Port, testenv.ScramUser, testenv.Database)
	cmd := testenv.RunAs(id, id, psql, "-X", "-A", "-t", "-c", "SELECT current_user", conninfo)
	cmd.Env = append(cmd.Env, "PGPASSWORD="+testenv.ScramPassword)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("psql as uid %d: %v: %s", id, err, out)
	}
	if got := strings.TrimSpace(string(out)); got != testenv.ScramUser {
		t.Errorf("psql printed %q, want %q", got, testenv.ScramUser)
	}
}

func TestRestartKeepsPort(t *testing.T) {
	p := testenv.Require(t)
	ctx := ctxT(t)
	port, sock := p.Port, p.SocketPath()
	if err := p.Exec(ctx, "CREATE TABLE survives (x int); INSERT INTO survives VALUES (1); GRANT SELECT ON survives TO PUBLIC"); err != nil {
		t.Fatal(err)
	}
	before, err := pgx.Connect(ctx, p.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database))
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close(ctx)
	if err := p.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if p.Port != port || p.SocketPath() != sock {
		t.Errorf("after restart port %d socket %s, want %d %s", p.Port, p.SocketPath(), port, sock)
	}
	// The old session was ended by the shutdown.
	if _, err := before.Exec(ctx, "SELECT 1"); err == nil {
		t.Error("session survived a restart")
	}
	conn, err := pgx.Connect(ctx, p.TLSDSN(testenv.MD5User, testenv.MD5Password, testenv.Database))
	if err != nil {
		t.Fatalf("connect after restart: %v", err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM survives").Scan(&n); err != nil || n != 1 {
		t.Errorf("data after restart: n=%d err=%v", n, err)
	}
}

func TestKillAndStartAgain(t *testing.T) {
	p := testenv.Require(t)
	ctx := ctxT(t)
	conn, err := pgx.Connect(ctx, p.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	pid := p.PID()
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if p.Running() || p.PID() != 0 {
		t.Error("still running after Kill")
	}
	if err := p.Kill(); err == nil {
		t.Error("second Kill: want an error, the server is down")
	}
	if _, err := conn.Exec(ctx, "SELECT 1"); err == nil {
		t.Error("session survived Kill")
	}
	if c, err := pgconn.Connect(ctx, p.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database)); err == nil {
		c.Close(ctx)
		t.Error("connect succeeded while killed")
	}
	if err := p.StartAgain(ctx); err != nil {
		t.Fatal(err)
	}
	if p.PID() == pid || p.PID() == 0 {
		t.Errorf("pid after StartAgain %d (before %d)", p.PID(), pid)
	}
	if err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Errorf("after StartAgain: %v", err)
	}
}

func TestStopRemovesEverything(t *testing.T) {
	ctx := ctxT(t)
	p := testenv.Require(t, testenv.Options{LogStatements: true, MaxConnections: 20})
	if err := p.Exec(ctx, "SELECT 'marker-7781'"); err != nil {
		t.Fatal(err)
	}
	log, err := os.ReadFile(p.LogFile())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "marker-7781") {
		t.Errorf("LogStatements: statement not in %s", p.LogFile())
	}
	var maxConn string
	conn, err := p.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(ctx, "SHOW max_connections").Scan(&maxConn); err != nil || maxConn != "20" {
		t.Errorf("max_connections = %q (%v), want 20", maxConn, err)
	}
	conn.Close(ctx)
	pid := p.PID()
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, err := os.Stat(filepath.Dir(p.DataDir)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("instance dir still there: %v", err)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(b), "postgres") {
			t.Errorf("postmaster %d still running", pid)
		}
	}
	if err := p.Restart(ctx); err == nil {
		t.Error("Restart after Stop: want an error")
	}
}

func TestCA(t *testing.T) {
	ca, err := testenv.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.Issue("db.example", "10.1.2.3", "::1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		t.Fatalf("key pair: %v", err)
	}
	blk, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"db.example", "10.1.2.3", "::1"} {
		if _, err := cert.Verify(x509.VerifyOptions{DNSName: host, Roots: ca.Pool()}); err != nil {
			t.Errorf("verify %s: %v", host, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "other.example", Roots: ca.Pool()}); err == nil {
		t.Error("verified for a host not in the SANs")
	}
	other, _ := testenv.NewCA()
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "db.example", Roots: other.Pool()}); err == nil {
		t.Error("verified against another CA")
	}
	if _, _, err := ca.Issue(); err == nil {
		t.Error("Issue with no hosts: want an error")
	}
	ccert, ckey, err := ca.IssueClient("scram_user")
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(ccert, ckey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(pair.Certificate[0])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil || leaf.Subject.CommonName != "scram_user" {
		t.Errorf("client cert: cn=%q err=%v", leaf.Subject.CommonName, err)
	}
}

func TestFindBinDir(t *testing.T) {
	dir, err := testenv.FindBinDir()
	if err != nil {
		if !errors.Is(err, testenv.ErrNoPostgres) {
			t.Fatal(err)
		}
		testenv.SkipUnlessCI(t, "%v", err)
	}
	for _, b := range []string{"postgres", "initdb"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Error(err)
		}
	}
	t.Setenv(testenv.BinDirEnv, t.TempDir())
	if _, err := testenv.FindBinDir(); !errors.Is(err, testenv.ErrNoPostgres) {
		t.Errorf("with %s pointing at an empty dir: err = %v, want ErrNoPostgres", testenv.BinDirEnv, err)
	}
}

// recordTB captures how Require ends a test without ending this one.
type recordTB struct {
	testing.TB
	skipped, failed string
}

func (r *recordTB) Helper() {}
func (r *recordTB) Skipf(format string, args ...any) {
	r.skipped = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (r *recordTB) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func TestRequireWithoutBinaries(t *testing.T) {
	t.Setenv(testenv.BinDirEnv, t.TempDir())
	for _, ci := range []string{"", "true"} {
		t.Setenv("CI", ci)
		r := &recordTB{TB: t}
		done := make(chan struct{})
		go func() {
			defer close(done)
			testenv.Require(r)
		}()
		<-done
		if ci == "true" {
			if r.failed == "" || r.skipped != "" {
				t.Errorf("CI=true: skipped=%q failed=%q, want a failure", r.skipped, r.failed)
			}
		} else if !strings.Contains(r.skipped, testenv.InstallCommand) || r.failed != "" {
			t.Errorf("CI unset: skipped=%q failed=%q, want a skip naming %q", r.skipped, r.failed, testenv.InstallCommand)
		}
	}
}

func TestExtraHBAAndConf(t *testing.T) {
	ctx := ctxT(t)
	p := testenv.Require(t, testenv.Options{
		ExtraHBA:  []string{"hostnossl all all 127.0.0.1/32 reject"},
		ExtraConf: []string{"work_mem = '7MB'"},
	})
	plain := fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=%s sslmode=disable",
		p.Host, p.Port, testenv.ScramUser, testenv.ScramPassword, testenv.Database)
	if c, err := pgconn.Connect(ctx, plain); err == nil {
		c.Close(ctx)
		t.Error("plain TCP accepted despite the reject line")
	}
	conn, err := pgx.Connect(ctx, p.TLSDSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database))
	if err != nil {
		t.Fatalf("TLS: %v", err)
	}
	defer conn.Close(ctx)
	var wm string
	if err := conn.QueryRow(ctx, "SHOW work_mem").Scan(&wm); err != nil || wm != "7MB" {
		t.Errorf("work_mem = %q (%v), want 7MB", wm, err)
	}
}
