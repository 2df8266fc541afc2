package testenv

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"
)

// Fixed credentials of every test Postgres. They are test fixtures, not
// secrets.
const (
	SuperUser     = "postgres"
	SuperPassword = "pgward-super-pass" // SCRAM-SHA-256

	ScramUser     = "scram_user" // scram-sha-256 in pg_hba, SCRAM verifier stored
	ScramPassword = "scram_pass"

	MD5User     = "md5_user" // md5 in pg_hba, md5 hash stored
	MD5Password = "md5_pass"

	PasswordUser     = "pw_user" // cleartext `password` in pg_hba, SCRAM verifier stored
	PasswordPassword = "pw_pass"

	// Database is owned by SuperUser; every role may connect to it and
	// create objects in its schema public.
	Database = "testdb"
)

// Options for StartPostgres. The zero value is fine.
type Options struct {
	// LogStatements sets log_statement=all, so every statement is written to
	// LogFile().
	LogStatements bool
	// MaxConnections is max_connections; 0 means 200.
	MaxConnections int
	// Logf receives progress lines (timings, paths); nil means silent.
	Logf func(format string, args ...any)
	// ExtraHBA lines are placed in pg_hba.conf before the default lines, so
	// they take precedence (e.g. "hostnossl all all 127.0.0.1/32 reject").
	ExtraHBA []string
	// ExtraConf lines are appended to postgresql.conf (later settings win).
	ExtraConf []string
	// ClientCA makes the server trust client certificates issued by CA
	// (ssl_ca_file), for pg_hba lines with cert or clientcert=verify-full
	// in ExtraHBA. CA.IssueClient and IssueClientValid issue them.
	ClientCA bool
}

func (o Options) maxConnections() int {
	if o.MaxConnections > 0 {
		return o.MaxConnections
	}
	return 200
}

func (o Options) logf(format string, args ...any) {
	if o.Logf != nil {
		o.Logf(format, args...)
	}
}

// Postgres is a private PostgreSQL server in a temporary directory, started
// by StartPostgres and removed by Stop. Its methods are safe for concurrent
// use.
type Postgres struct {
	BinDir    string // directory of postgres and initdb
	DataDir   string
	SocketDir string // holds .s.PGSQL.<Port>; mode 0755, socket mode 0777
	Host      string // "127.0.0.1"
	Port      int    // TCP port, and the socket file's suffix
	CAFile    string // PEM of the CA that signed the server certificate
	CA        *CA

	opts Options
	root string // temporary directory holding everything; removed by Stop
	user osUser

	mu      sync.Mutex
	pm      *postmaster // running server, nil when down
	stopped bool
}

// postmaster is one run of the server process.
type postmaster struct {
	pid  int
	proc *os.Process   // signals through a pidfd: never hits a reused pid
	done chan struct{} // closed when the process has been reaped
	err  error         // from Wait; read after done
}

// TempDirEnv names an environment variable that, when set, is the directory
// StartPostgres creates its instance directories and template cache in.
const TempDirEnv = "PGWARD_TESTENV_TMPDIR"

// tempRoot is where instance directories and the template cache go: a tmpfs
// when there is a roomy one (copying a cluster there takes ~50ms instead of
// up to ~700ms on disk), else /tmp. It must be short: a Unix socket path may
// not exceed 107 bytes.
func tempRoot() string {
	if d := os.Getenv(TempDirEnv); d != "" {
		return d
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err == nil && st.Type == unix.TMPFS_MAGIC &&
		st.Bavail*uint64(st.Bsize) >= 1<<30 {
		if fi, err := os.Stat("/dev/shm"); err == nil && fi.Mode()&os.ModeSticky != 0 {
			return "/dev/shm"
		}
	}
	if fi, err := os.Stat("/tmp"); err == nil && fi.IsDir() {
		return "/tmp"
	}
	return os.TempDir()
}

// instancePrefix names instance directories: /tmp/pgw-XXXXXXXX.
const instancePrefix = "pgw-"

// StartPostgres starts a new server and returns when it accepts connections
// with every fixed role and Database in place. The cluster is copied from a
// template built once per machine (see doc.go), so only the first call pays
// for initdb. On error nothing is left behind.
func StartPostgres(ctx context.Context, opts Options) (_ *Postgres, err error) {
	t0 := time.Now()
	bin, err := FindBinDir()
	if err != nil {
		return nil, err
	}
	su, err := serverUser()
	if err != nil {
		return nil, err
	}
	sweepStale(tempRoot(), instancePrefix)

	root, err := os.MkdirTemp(tempRoot(), instancePrefix)
	if err != nil {
		return nil, fmt.Errorf("create temp dir: %w", err)
	}
	p := newPostgres(bin, root, su, opts)
	defer func() {
		if err != nil {
			_ = p.Stop()
		}
	}()
	if err := p.prepareDirs(); err != nil {
		return nil, err
	}

	tmpl, err := templateDir(ctx, bin, su, opts)
	if err != nil {
		return nil, err
	}
	fresh := tmpl == ""
	if fresh {
		opts.logf("testenv: template cache unavailable, running initdb")
		if err := p.initdb(ctx); err != nil {
			return nil, err
		}
	} else {
		t := time.Now()
		if err := copyTree(tmpl, p.DataDir, su); err != nil {
			return nil, fmt.Errorf("copy template cluster: %w", err)
		}
		opts.logf("testenv: copied template cluster in %v", time.Since(t).Round(time.Millisecond))
	}
	if err := p.configure(); err != nil {
		return nil, err
	}
	if err := p.startFreshPort(ctx); err != nil {
		return nil, err
	}
	if fresh {
		if err := p.bootstrap(ctx); err != nil {
			return nil, err
		}
	}
	opts.logf("testenv: postgres ready on %s and %s in %v", p.TCPAddr(), p.SocketPath(), time.Since(t0).Round(time.Millisecond))
	return p, nil
}

func newPostgres(bin, root string, su osUser, opts Options) *Postgres {
	return &Postgres{
		BinDir:    bin,
		DataDir:   filepath.Join(root, "data"),
		SocketDir: filepath.Join(root, "sock"),
		Host:      "127.0.0.1",
		CAFile:    filepath.Join(root, "ca.pem"),
		opts:      opts,
		root:      root,
		user:      su,
	}
}

// prepareDirs makes root reachable by every uid, and the data and socket
// directories owned by the server account.
func (p *Postgres) prepareDirs() error {
	if n := len(filepath.Join(p.SocketDir, ".s.PGSQL.65535")); n > 107 {
		return fmt.Errorf("socket path under %s too long (%d bytes > 107): set %s to a shorter directory", p.root, n, TempDirEnv)
	}
	if err := os.Chmod(p.root, 0o755); err != nil {
		return fmt.Errorf("chmod %s: %w", p.root, err)
	}
	if err := os.WriteFile(filepath.Join(p.root, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return fmt.Errorf("write owner file: %w", err)
	}
	for _, d := range []struct {
		path string
		mode os.FileMode
	}{{p.DataDir, 0o700}, {p.SocketDir, 0o755}} {
		if err := os.Mkdir(d.path, d.mode); err != nil {
			return fmt.Errorf("create %s: %w", d.path, err)
		}
		if err := os.Chmod(d.path, d.mode); err != nil { // umask
			return fmt.Errorf("chmod %s: %w", d.path, err)
		}
		if err := p.user.chown(d.path); err != nil {
			return fmt.Errorf("chown %s: %w", d.path, err)
		}
	}
	return nil
}

// initdb creates an empty cluster in DataDir whose superuser has SuperPassword.
func (p *Postgres) initdb(ctx context.Context) error {
	t := time.Now()
	pwfile := filepath.Join(p.root, "pwfile")
	if err := os.WriteFile(pwfile, []byte(SuperPassword+"\n"), 0o600); err != nil {
		return fmt.Errorf("write pwfile: %w", err)
	}
	defer os.Remove(pwfile)
	if err := p.user.chown(pwfile); err != nil {
		return fmt.Errorf("chown pwfile: %w", err)
	}
	cmd := exec.CommandContext(ctx, filepath.Join(p.BinDir, "initdb"),
		"-D", p.DataDir, "-U", SuperUser, "-A", "scram-sha-256", "--pwfile="+pwfile,
		"-E", "UTF8", "--locale=C", "--no-sync", "--wal-segsize=1")
	cmd.Dir = p.root
	cmd.Env = serverEnv()
	cmd.SysProcAttr = p.user.sysProcAttr()
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("initdb: %w: %s", err, lastLines(out, 20))
	}
	p.opts.logf("testenv: initdb in %v", time.Since(t).Round(time.Millisecond))
	return nil
}

// configure writes the CA, the server certificate, postgresql.conf and
// pg_hba.conf for this instance, replacing whatever the template had.
// postgresql.conf gets port 0 here; startFreshPort and launch set it.
func (p *Postgres) configure() error {
	ca, err := NewCA()
	if err != nil {
		return err
	}
	p.CA = ca
	certPEM, keyPEM, err := ca.Issue("localhost", "127.0.0.1", "::1")
	if err != nil {
		return err
	}
	if err := os.WriteFile(p.CAFile, ca.CertPEM, 0o644); err != nil {
		return fmt.Errorf("write ca file: %w", err)
	}
	if err := p.writeDataFile("server.crt", certPEM, 0o644); err != nil {
		return err
	}
	if err := p.writeDataFile("server.key", keyPEM, 0o600); err != nil {
		return err
	}
	if err := p.writeDataFile("root.crt", ca.CertPEM, 0o644); err != nil {
		return err
	}
	return p.writeDataFile("pg_hba.conf", []byte(hbaConf(p.opts.ExtraHBA)), 0o600)
}

func (p *Postgres) writeDataFile(name string, data []byte, mode os.FileMode) error {
	path := filepath.Join(p.DataDir, name)
	_ = os.Remove(path) // a template copy may have it with another mode
	if err := os.WriteFile(path, data, mode); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := p.user.chown(path); err != nil {
		return fmt.Errorf("chown %s: %w", name, err)
	}
	return nil
}

func (p *Postgres) writePostgresqlConf() error {
	logStatement := "none"
	if p.opts.LogStatements {
		logStatement = "all"
	}
	var b strings.Builder
	fmt.Fprintf(&b, `# Written by pgward testenv. Test settings: durability is off.
listen_addresses = '127.0.0.1'
port = %d
unix_socket_directories = '%s'
unix_socket_permissions = 0777
max_connections = %d
shared_buffers = 32MB
dynamic_shared_memory_type = mmap # in DataDir/pg_dynshmem: nothing outlives the directory
huge_pages = off
fsync = off
full_page_writes = off
synchronous_commit = off
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
password_encryption = 'scram-sha-256'
logging_collector = off
log_connections = on
log_statement = '%s'
log_line_prefix = '%%m [%%p] %%q%%u@%%d '
log_timezone = 'UTC'
timezone = 'UTC'
datestyle = 'iso, mdy'
lc_messages = 'C'
lc_monetary = 'C'
lc_numeric = 'C'
lc_time = 'C'
default_text_search_config = 'pg_catalog.english'
`, p.Port, confQuote(p.SocketDir), p.opts.maxConnections(), logStatement)
	if p.opts.ClientCA {
		b.WriteString("ssl_ca_file = 'root.crt'\n")
	}
	for _, l := range p.opts.ExtraConf {
		b.WriteString(l + "\n")
	}
	return p.writeDataFile("postgresql.conf", []byte(b.String()), 0o600)
}

func hbaConf(extra []string) string {
	var b strings.Builder
	b.WriteString("# Written by pgward testenv. No trust lines.\n")
	for _, l := range extra {
		b.WriteString(l + "\n")
	}
	b.WriteString("local all " + MD5User + " md5\n")
	b.WriteString("local all " + PasswordUser + " password\n")
	b.WriteString("local all all scram-sha-256\n")
	for _, net := range []string{"127.0.0.1/32", "::1/128"} {
		b.WriteString("host all " + MD5User + " " + net + " md5\n")
		b.WriteString("host all " + PasswordUser + " " + net + " password\n")
		b.WriteString("host all all " + net + " scram-sha-256\n")
	}
	return b.String()
}

// errPortInUse means the postmaster could not bind its TCP port.
var errPortInUse = errors.New("port in use")

// startFreshPort picks a free loopback port and starts the server on it,
// picking again when another process takes the port first.
func (p *Postgres) startFreshPort(ctx context.Context) error {
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		var port int
		port, err = freePort()
		if err != nil {
			return err
		}
		p.Port = port
		if err = p.writePostgresqlConf(); err != nil {
			return err
		}
		p.mu.Lock()
		err = p.launchLocked(ctx)
		p.mu.Unlock()
		if !errors.Is(err, errPortInUse) {
			return err
		}
		p.opts.logf("testenv: port %d taken, retrying", port)
	}
	return err
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// launchLocked starts the postmaster on p.Port and waits until it reports
// ready. p.mu is held.
func (p *Postgres) launchLocked(ctx context.Context) error {
	if p.pm != nil {
		return fmt.Errorf("postgres already running (pid %d)", p.pm.pid)
	}
	t := time.Now()
	logPath := p.LogFile()
	lf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	logStart, _ := lf.Seek(0, 2)

	cmd := exec.Command(filepath.Join(p.BinDir, "postgres"), "-D", p.DataDir)
	cmd.Dir = p.root
	cmd.Env = serverEnv()
	cmd.Stdout, cmd.Stderr = lf, lf
	attr := p.user.sysProcAttr()
	attr.Setpgid = true
	// If the test binary dies, the postmaster dies with it (and its
	// backends follow on postmaster death).
	attr.Pdeathsig = syscall.SIGKILL
	cmd.SysProcAttr = attr

	pm := &postmaster{done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the forking thread exits, not the process:
		// keep this thread alive and locked until the postmaster is reaped.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		pm.pid, pm.proc = cmd.Process.Pid, cmd.Process
		started <- nil
		pm.err = cmd.Wait()
		close(pm.done)
	}()
	err = <-started
	lf.Close()
	if err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	p.pm = pm

	pidFile := filepath.Join(p.DataDir, "postmaster.pid")
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if postmasterReady(pidFile, pm.pid) {
			p.opts.logf("testenv: postmaster %d ready in %v", pm.pid, time.Since(t).Round(time.Millisecond))
			return nil
		}
		select {
		case <-pm.done:
			p.pm = nil
			tail := readFrom(logPath, logStart)
			if bytes.Contains(tail, []byte("could not bind")) || bytes.Contains(tail, []byte("Address already in use")) {
				return fmt.Errorf("start postgres on port %d: %w: %s", p.Port, errPortInUse, lastLines(tail, 5))
			}
			return fmt.Errorf("postgres exited during startup (%v): %s", pm.err, lastLines(tail, 20))
		case <-ctx.Done():
			p.haltLocked(syscall.SIGKILL, 0)
			return fmt.Errorf("wait for postgres: %w: %s", ctx.Err(), lastLines(readFrom(logPath, logStart), 20))
		case <-tick.C:
		}
	}
}

// postmasterReady reports whether postmaster.pid belongs to pid and says
// "ready" (PM_STATUS_READY, line 8).
func postmasterReady(pidFile string, pid int) bool {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return false
	}
	lines := strings.Split(string(b), "\n")
	return len(lines) >= 8 && strings.TrimSpace(lines[0]) == strconv.Itoa(pid) &&
		strings.TrimSpace(lines[7]) == "ready"
}

// haltLocked sends sig to the postmaster, escalates to SIGKILL after grace
// (0: at once), and waits for it to be reaped. p.mu is held.
func (p *Postgres) haltLocked(sig syscall.Signal, grace time.Duration) error {
	pm := p.pm
	if pm == nil {
		return nil
	}
	p.pm = nil
	select {
	case <-pm.done: // died on its own
		p.releaseStaleShmem()
		return nil
	default:
	}
	_ = pm.proc.Signal(sig)
	if sig != syscall.SIGKILL {
		select {
		case <-pm.done:
			return nil
		case <-time.After(grace):
			p.opts.logf("testenv: postmaster %d ignored %v for %v, killing", pm.pid, sig, grace)
		}
	}
	p.killTreeLocked(pm)
	return nil
}

// killTreeLocked SIGKILLs the postmaster and every backend it forked (they
// run in sessions of their own, so a process-group kill would miss them),
// waits for all of them to go, and releases the shared memory they left.
func (p *Postgres) killTreeLocked(pm *postmaster) {
	// Stopped, the postmaster neither forks nor reaps, so the pids of its
	// children stay theirs (at worst zombies) until it is killed last.
	_ = pm.proc.Signal(syscall.SIGSTOP)
	kids := ChildrenOf(pm.pid)
	for _, k := range kids {
		_ = syscall.Kill(k, syscall.SIGKILL)
	}
	_ = pm.proc.Signal(syscall.SIGKILL)
	<-pm.done
	deadline := time.Now().Add(5 * time.Second)
	for _, k := range kids {
		for processAlive(k) && time.Now().Before(deadline) {
			time.Sleep(2 * time.Millisecond)
		}
	}
	p.releaseStaleShmem()
}

// releaseStaleShmem removes the SysV segment recorded in a postmaster.pid
// left by a killed server, and the file itself.
func (p *Postgres) releaseStaleShmem() {
	pidFile := filepath.Join(p.DataDir, "postmaster.pid")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return
	}
	lines := strings.Split(string(b), "\n")
	if len(lines) >= 7 {
		if f := strings.Fields(lines[6]); len(f) == 2 {
			if id, err := strconv.Atoi(f[1]); err == nil && id > 0 {
				_, _ = unix.SysvShmCtl(id, unix.IPC_RMID, nil)
			}
		}
	}
	_ = os.Remove(pidFile)
}

// ChildrenOf lists the processes whose parent is ppid (from /proc).
func ChildrenOf(ppid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var kids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parens.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) >= 2 && f[1] == strconv.Itoa(ppid) {
			kids = append(kids, pid)
		}
	}
	return kids
}

// processAlive is false for processes that are gone or zombies.
func processAlive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && len(s) > i+2 && s[i+2] != 'Z' && s[i+2] != 'X'
}

// bootstrap creates the fixed roles and Database in a freshly initdb'd
// cluster.
func (p *Postgres) bootstrap(ctx context.Context) error {
	t := time.Now()
	for _, step := range []struct{ db, sql string }{
		{"postgres", bootstrapRoles},
		{"postgres", "CREATE DATABASE " + Database + " OWNER " + SuperUser},
		{Database, bootstrapDB},
	} {
		conn, err := pgx.Connect(ctx, p.DSN(SuperUser, SuperPassword, step.db))
		if err != nil {
			return fmt.Errorf("bootstrap: connect: %w", err)
		}
		_, err = conn.PgConn().Exec(ctx, step.sql).ReadAll()
		conn.Close(ctx)
		if err != nil {
			return fmt.Errorf("bootstrap: %w", err)
		}
	}
	p.opts.logf("testenv: bootstrap in %v", time.Since(t).Round(time.Millisecond))
	return nil
}

var (
	bootstrapRoles = fmt.Sprintf(`
CREATE ROLE %s LOGIN PASSWORD '%s';
CREATE ROLE %s LOGIN PASSWORD '%s';
CREATE ROLE %s LOGIN PASSWORD '%s';
`, ScramUser, ScramPassword,
		MD5User, md5Hash(MD5User, MD5Password), // stored as md5 whatever password_encryption says
		PasswordUser, PasswordPassword)
	bootstrapDB = `GRANT ALL ON SCHEMA public TO PUBLIC;`
)

// md5Hash is Postgres's stored md5 password form.
func md5Hash(user, password string) string {
	sum := md5.Sum([]byte(password + user))
	return "md5" + hex.EncodeToString(sum[:])
}

// Stop shuts the server down (immediate mode: nothing of it is kept) and
// removes its directory. It is idempotent.
func (p *Postgres) Stop() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return nil
	}
	p.stopped = true
	_ = p.haltLocked(syscall.SIGQUIT, 10*time.Second)
	p.releaseStaleShmem() // after an earlier Kill without StartAgain
	if err := os.RemoveAll(p.root); err != nil {
		return fmt.Errorf("remove %s: %w", p.root, err)
	}
	return nil
}

// Restart shuts the server down in fast mode (clients see 57P01
// admin_shutdown) and starts it again on the same port and socket.
func (p *Postgres) Restart(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return errors.New("restart postgres: stopped")
	}
	_ = p.haltLocked(syscall.SIGINT, 30*time.Second)
	return p.launchLocked(ctx)
}

// Kill SIGKILLs the postmaster and all its backends at once, like a crash
// of the database host: clients see their connections drop and new
// connections are refused until StartAgain.
func (p *Postgres) Kill() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pm == nil {
		return errors.New("kill postgres: not running")
	}
	pm := p.pm
	p.pm = nil
	p.killTreeLocked(pm)
	return nil
}

// StartAgain starts a server that Kill (or a crash) took down, on the same
// port and socket; Postgres runs crash recovery first.
func (p *Postgres) StartAgain(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return errors.New("start postgres again: stopped")
	}
	if p.pm != nil {
		select {
		case <-p.pm.done: // died on its own
			p.pm = nil
			p.releaseStaleShmem()
		default:
			return fmt.Errorf("start postgres again: still running (pid %d)", p.pm.pid)
		}
	}
	return p.launchLocked(ctx)
}

// Running reports whether the server process is up.
func (p *Postgres) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pm == nil {
		return false
	}
	select {
	case <-p.pm.done:
		return false
	default:
		return true
	}
}

// PID is the postmaster's process id, 0 when it is down.
func (p *Postgres) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pm == nil {
		return 0
	}
	return p.pm.pid
}

// ServerUID is the uid the server processes run as.
func (p *Postgres) ServerUID() uint32 { return p.user.uid }

// SocketPath is the server's Unix socket file, SocketDir/.s.PGSQL.<Port>.
func (p *Postgres) SocketPath() string {
	return filepath.Join(p.SocketDir, ".s.PGSQL."+strconv.Itoa(p.Port))
}

// TCPAddr is "127.0.0.1:<Port>".
func (p *Postgres) TCPAddr() string {
	return net.JoinHostPort(p.Host, strconv.Itoa(p.Port))
}

// LogFile is the server's log (stderr of the postmaster), in DataDir.
func (p *Postgres) LogFile() string { return filepath.Join(p.DataDir, "postgres.log") }

// DSN is a keyword/value connection string over the Unix socket with
// sslmode=disable. An empty password is left out.
func (p *Postgres) DSN(user, password, db string) string {
	return connString(
		"host", p.SocketDir, "port", strconv.Itoa(p.Port),
		"user", user, "password", password, "dbname", db, "sslmode", "disable")
}

// TLSDSN is a keyword/value connection string over TCP to 127.0.0.1 with
// sslmode=verify-full against CAFile.
func (p *Postgres) TLSDSN(user, password, db string) string {
	return connString(
		"host", p.Host, "port", strconv.Itoa(p.Port),
		"user", user, "password", password, "dbname", db,
		"sslmode", "verify-full", "sslrootcert", p.CAFile)
}

func connString(kv ...string) string {
	var parts []string
	for i := 0; i < len(kv); i += 2 {
		if kv[i+1] == "" {
			continue
		}
		parts = append(parts, kv[i]+"="+quoteConnValue(kv[i+1]))
	}
	return strings.Join(parts, " ")
}

func quoteConnValue(v string) string {
	if v != "" && !strings.ContainsAny(v, " '\\\t\n") {
		return v
	}
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

func confQuote(v string) string { return strings.ReplaceAll(v, "'", "''") }

// Admin opens a superuser connection to Database over the socket. The caller
// closes it.
func (p *Postgres) Admin(ctx context.Context) (*pgx.Conn, error) {
	conn, err := pgx.Connect(ctx, p.DSN(SuperUser, SuperPassword, Database))
	if err != nil {
		return nil, fmt.Errorf("connect as %s: %w", SuperUser, err)
	}
	return conn, nil
}

// Exec runs sql (one or more statements, simple protocol) as the superuser
// in Database.
func (p *Postgres) Exec(ctx context.Context, sql string) error {
	conn, err := p.Admin(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if _, err := conn.PgConn().Exec(ctx, sql).ReadAll(); err != nil {
		return fmt.Errorf("exec as %s: %w", SuperUser, err)
	}
	return nil
}

func serverEnv() []string {
	return []string{"PATH=/usr/local/bin:/usr/bin:/bin", "LC_ALL=C", "LANG=C", "TZ=UTC", "HOME=/"}
}

func readFrom(path string, off int64) []byte {
	b, err := os.ReadFile(path)
	if err != nil || off > int64(len(b)) {
		return b
	}
	return b[off:]
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
