// Package testenv starts real servers for pgward's tests and for
// `pgward demo`, so that tests exercise the real PostgreSQL and not a fake.
//
// It owns:
//
//   - Postgres: a private PostgreSQL server (StartPostgres, or Require in a
//     test) listening on 127.0.0.1:<Port> with TLS and on the Unix socket
//     <SocketDir>/.s.PGSQL.<Port>, with fixed roles that each use one
//     authentication method (SuperUser and ScramUser: scram-sha-256, MD5User:
//     md5, PasswordUser: cleartext password; pg_hba.conf has no trust line)
//     and a Database every role may use. Durability is off (fsync,
//     full_page_writes, synchronous_commit): with synchronous_commit=off,
//     transactions committed in the last few hundred milliseconds before
//     Kill may be lost, so fault tests should not count on them.
//     WaitBackendsGone waits for a client's backends to leave.
//   - CA: throwaway certificate authorities and the server and client
//     certificates they issue.
//   - RunAs, RequireRoot and UnprivilegedIDs: running commands as other
//     uids, and skipping, with the reason, tests that need root.
//   - SkipUnlessCI: a skip for what the machine lacks (root, cgroup2, a
//     tool) that fails instead under CI=true, where every test must run;
//     RaiseNoFile, for tests that hold many descriptors.
//   - NewCgroup: a temporary cgroup v2 directory to start processes in
//     (Cgroup.Start) or move the test into (Cgroup.Enter).
//   - TestBinary, StartChild and Report: a client in a process of its own,
//     the test binary re-executed to run a hook test that reports as JSON.
//   - Collector: a real OpenTelemetry Collector (StartCollector, or
//     RequireCollector in a test) with OTLP gRPC and HTTP receivers on
//     loopback and the file exporter, built from testenv/otelcol, a Go module
//     of its own, into bin/otelcol (`make otelcol`; built on first use when
//     missing). Kill/Start, Stall/Resume (SIGSTOP/SIGCONT) for fault tests;
//     Logs reads what arrived.
//   - SendCancel: a raw CancelRequest, as a client holding BackendKeyData
//     sends it.
//   - SharedPostgres and StopShared: one server for a test binary's
//     end-to-end tests, stopped from its TestMain; SyncBuffer, a log buffer
//     goroutines write at once; PgCode and BackendPID for client-side checks.
//
// # Lifecycle
//
// StartPostgres creates /dev/shm/pgw-XXXX (a tmpfs when there is a roomy one,
// else /tmp; override with PGWARD_TESTENV_TMPDIR), copies a template cluster
// into it, writes a fresh CA, server certificate, postgresql.conf and
// pg_hba.conf, starts the postmaster as a child process and returns once
// postmaster.pid says "ready". The template is built once per machine,
// server version and account (initdb, roles, database, clean shutdown) under
// <tmp>/pgward-testenv-<euid>/, guarded by a file lock so concurrent test
// binaries build it once; that first start takes about a second, later ones
// about 100ms. Restart (fast shutdown, same port), Kill (SIGKILL of the
// postmaster and all its backends) and StartAgain (crash recovery, same
// port) support fault tests. Stop is idempotent and removes the directory.
//
// Postgres will not run as root. When the tests run as root the server runs
// as the system account ServerUserName, created with useradd if missing
// (nobody if that fails); otherwise it runs as the calling user. The
// postmaster gets SIGKILL if the process that started it dies, and the next
// StartPostgres removes directories whose owner process is gone.
//
// Binaries are found by FindBinDir (PGWARD_PG_BINDIR, PATH, pg_config,
// /usr/lib/postgresql/*/bin). When they are missing Require skips, naming
// InstallCommand, except under CI=true, where it fails: CI never silently
// skips the real server.
//
// # What it does not do
//
// It does not pool or share servers between test binaries (share one per
// binary from TestMain when tests do not disturb each other), does not make
// durable or tuned servers, and never uses trust authentication: every login
// to a test server proves a password, as pgward's upstreams require.
package testenv
