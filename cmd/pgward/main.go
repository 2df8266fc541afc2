// Command pgward is the node agent that lets applications use PostgreSQL
// without holding a password. See README.md.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

const usage = `pgward: PostgreSQL without passwords for the applications on this node.

Usage:
  pgward agent --config FILE     run the node agent
  pgward check-config FILE       every problem that would stop the agent, or what the file does
  pgward audit verify FILE...    check an audit log's hash chain (with --key, its signed checkpoints)
  pgward audit keygen            write an ed25519 key pair for audit checkpoints
  pgward audit show [FILE]       show audit events, filtered (--since, --principal, …), -f to follow
  pgward sessions                list the agent's live sessions (root; --json, filters)
  pgward sessions end SID...     end sessions, the running statement cancelled first (root)
  pgward reload --pid PID        ask a running agent to reload (same as SIGHUP)
  pgward demo                    start a private Postgres and an agent with an example policy
  pgward version                 print the version (and Go's, and the main dependencies')

Every command takes -h/--help. Exit codes: 0 ok, 1 failure (check-config:
the agent would not start), 2 usage, 3 invalid input (agent: invalid
configuration; audit verify: broken chain).

Environment: PGWARD_LOG_FORMAT=json|text, PGWARD_LOG_LEVEL=debug|info|warn|error,
and the standard OTEL_* variables for traces.
`

// Exit codes.
const (
	exitOK       = 0
	exitFailure  = 1
	exitUsage    = 2
	exitBadInput = 3 // invalid config, audit chain broken
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "agent":
		return cmdAgent(args[1:], stdout, stderr)
	case "check-config":
		return cmdCheckConfig(args[1:], stdout, stderr)
	case "audit":
		return cmdAudit(args[1:], stdout, stderr)
	case "sessions":
		return cmdSessions(args[1:], stdout, stderr)
	case "reload":
		return cmdReload(args[1:], stdout, stderr)
	case "demo":
		return cmdDemo(args[1:], stdout, stderr)
	case "version", "--version", "-v":
		return cmdVersion(args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "pgward: unknown command %q\n\n%s", args[0], usage)
	return exitUsage
}

// signalContext is cancelled by the first SIGTERM or SIGINT; a second one
// exits at once. SIGHUP calls onHUP.
func signalContext(onHUP func()) (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan os.Signal, 4)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		stopping := false
		for {
			select {
			case <-done:
				return
			case s := <-ch:
				switch {
				case s == syscall.SIGHUP:
					if onHUP != nil {
						onHUP()
					}
				case stopping:
					fmt.Fprintln(os.Stderr, "pgward: second signal, exiting now")
					os.Exit(exitFailure)
				default:
					stopping = true
					cancel()
				}
			}
		}
	}()
	return ctx, func() {
		signal.Stop(ch)
		close(done)
		cancel()
	}
}
