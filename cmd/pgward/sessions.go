package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pgward/pgward/agent"
)

// adminFlags are the flags that find the admin socket.
type adminFlags struct {
	socket *string
	config *string
}

func addAdminFlags(fs *flag.FlagSet) adminFlags {
	return adminFlags{
		socket: fs.String("socket", "", "the agent's admin socket (default: admin.socket of --config, else "+agent.DefaultAdminSocket("")+")"),
		config: fs.String("config", "", "the agent's configuration file, to find its admin.socket"),
	}
}

// path is --socket, else admin.socket of --config, else the default.
func (f adminFlags) path() (string, error) {
	if *f.socket != "" {
		return *f.socket, nil
	}
	if *f.config != "" {
		cfg, err := agent.LoadConfig(*f.config)
		if err != nil {
			return "", err
		}
		return cfg.AdminSocket(), nil
	}
	return agent.DefaultAdminSocket(""), nil
}

func cmdSessions(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "end" {
		return cmdSessionsEnd(args[1:], stdout, stderr)
	}
	v := newVerb("sessions", "", `List the agent's live sessions: who (principal, process), what (role@upstream),
state (idle, active with the running statement, idle in transaction), traffic;
then the upstream connections parked for reuse and the direct connects eBPF
saw in the last 10 minutes. Needs root (the admin socket).

  pgward sessions end [--reason TEXT] SID...   ends sessions (see its --help)`, 0, 0)
	af := addAdminFlags(v.fs)
	asJSON := v.fs.Bool("json", false, "print the agent's answer as JSON")
	principal := v.fs.String("principal", "", "only the sessions of this principal")
	uidFlag := v.fs.String("uid", "", "only the sessions of processes running as this uid")
	upstream := v.fs.String("upstream", "", "only the sessions on this upstream")
	if _, code, ok := v.parse(args, stdout, stderr); !ok {
		return code
	}
	f := agent.AdminFilter{Principal: *principal, Upstream: *upstream}
	if *uidFlag != "" {
		n, err := strconv.ParseUint(*uidFlag, 10, 32)
		if err != nil {
			fmt.Fprintf(stderr, "pgward sessions: --uid %q is not a uid\n", *uidFlag)
			return exitUsage
		}
		u := uint32(n)
		f.UID = &u
	}
	path, err := af.path()
	if err != nil {
		fmt.Fprintf(stderr, "pgward sessions: %v\n", err)
		return exitFailure
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	list, err := agent.NewAdminClient(path).Sessions(ctx, f)
	if err != nil {
		fmt.Fprintf(stderr, "pgward sessions: %v\n", err)
		return exitFailure
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(list)
		return exitOK
	}
	writeSessions(stdout, list)
	return exitOK
}

// writeSessions prints the table of `pgward sessions`.
func writeSessions(w io.Writer, l *agent.AdminSessions) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if len(l.Sessions) == 0 {
		fmt.Fprintln(w, "no live sessions")
	} else {
		fmt.Fprintln(tw, "SID\tPRINCIPAL\tPROCESS\tROLE@UPSTREAM\tSTATE\tSTARTED\tSTMTS\tIN\tOUT\tATTESTED\tSTATEMENT")
		for _, s := range l.Sessions {
			state := s.State
			if s.State == "active" {
				state += " " + fmtMillis(s.StatementMS)
			}
			stmt := printable(dash(s.Statement))
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s@%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n",
				s.SID, dash(s.Principal), fmtProcess(s.Process), s.Role, s.Upstream, state,
				s.Started.Local().Format("15:04:05"), s.Statements, fmtBytes(s.BytesIn), fmtBytes(s.BytesOut),
				yesNo(s.Process.Attested), stmt)
		}
		tw.Flush()
	}
	if len(l.Parked) > 0 {
		fmt.Fprintf(w, "\nparked upstream connections (reuse): %d\n", len(l.Parked))
		fmt.Fprintln(tw, "UPSTREAM\tROLE\tBACKEND PID")
		for _, p := range l.Parked {
			fmt.Fprintf(tw, "%s\t%s\t%d\n", p.Upstream, p.Role, p.BackendPID)
		}
		tw.Flush()
	}
	switch {
	case !l.EBPF:
		fmt.Fprintln(w, "\ndirect connects: not seen (eBPF is not attached)")
	case len(l.DirectConnects) == 0:
		fmt.Fprintf(w, "\ndirect connects in the last %s: none\n", fmtWindow(agent.DirectConnectWindow))
	default:
		fmt.Fprintf(w, "\ndirect connects in the last %s: %d\n", fmtWindow(agent.DirectConnectWindow), len(l.DirectConnects))
		fmt.Fprintln(tw, "TIME\tPROCESS\tDEST\tUPSTREAM\tBLOCKED")
		for _, d := range l.DirectConnects {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", d.Time.Local().Format("15:04:05"), fmtProcess(d.Process), d.Dest, dash(d.Upstream), yesNo(d.Blocked))
		}
		tw.Flush()
	}
}

func cmdSessionsEnd(args []string, stdout, stderr io.Writer) int {
	v := newVerb("sessions end", "SID...", `End live sessions the way a revoked grant does: the running statement is
cancelled upstream first, then the client gets FATAL 57P01 saying an operator
ended the session. Each end is audited (admin.sessions.end) with the caller's
process and the reason. Exit 1 if a SID is not a live session.`, 1, -1)
	af := addAdminFlags(v.fs)
	reason := v.fs.String("reason", "", "why (audited, and told to the client); at most 200 bytes")
	sids, code, ok := v.parse(args, stdout, stderr)
	if !ok {
		return code
	}
	if len(*reason) > 200 {
		fmt.Fprintln(stderr, "pgward sessions end: --reason is longer than 200 bytes")
		return exitUsage
	}
	path, err := af.path()
	if err != nil {
		fmt.Fprintf(stderr, "pgward sessions end: %v\n", err)
		return exitFailure
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := agent.NewAdminClient(path).End(ctx, sids, *reason)
	if err != nil {
		fmt.Fprintf(stderr, "pgward sessions end: %v\n", err)
		return exitFailure
	}
	for _, s := range rep.Ended {
		fmt.Fprintf(stdout, "ended %s (%s, %s, %s@%s, %s)\n", s.SID, dash(s.Principal), fmtProcess(s.Process), s.Role, s.Upstream, s.State)
	}
	for _, sid := range rep.Unknown {
		fmt.Fprintf(stderr, "pgward sessions end: no live session has id %q (see pgward sessions)\n", sid)
	}
	if len(rep.Unknown) > 0 {
		return exitFailure
	}
	return exitOK
}

func fmtProcess(p agent.AdminProcess) string {
	name := p.Comm
	if p.Exe != "" {
		name = filepath.Base(p.Exe)
	}
	s := fmt.Sprintf("%s[%d] uid %d", dash(name), p.PID, p.UID)
	if p.User != "" {
		s += " (" + p.User + ")"
	}
	if p.Exe != "" {
		s += " " + p.Exe
	}
	switch {
	case p.PodName != "":
		s += " pod " + p.PodNamespace + "/" + p.PodName
	case p.SystemdUnit != "":
		s += " " + p.SystemdUnit
	}
	return s
}

func fmtMillis(ms float64) string {
	d := time.Duration(ms * float64(time.Millisecond))
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

func fmtBytes(n int64) string {
	switch {
	case n < 1<<10:
		return strconv.FormatInt(n, 10) + "B"
	case n < 1<<20:
		return strconv.FormatFloat(float64(n)/(1<<10), 'f', 1, 64) + "KiB"
	case n < 1<<30:
		return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + "MiB"
	}
	return strconv.FormatFloat(float64(n)/(1<<30), 'f', 1, 64) + "GiB"
}

func fmtWindow(d time.Duration) string { return strings.TrimSuffix(d.String(), "0s") }

func printable(s string) string { return string(appendPrintable(nil, s)) }

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
