package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pgward/pgward/agent"
	"github.com/pgward/pgward/exporter"
)

// followInterval is how often `audit show -f` looks for new lines.
const followInterval = 200 * time.Millisecond

func cmdAuditShow(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signalContext(nil)
	defer stop()
	return auditShow(args, stdout, stderr, ctx.Done())
}

// auditShow is `pgward audit show`; -f follows until stop is closed.
func auditShow(args []string, stdout, stderr io.Writer, stop <-chan struct{}) int {
	v := newVerb("audit show", "[FILE]", `Show audit events, one line each (time, principal, process, role@upstream,
what happened), or as JSON lines with --json. FILE is the active audit file
(default: audit.path of --config); its rotated files FILE.N … FILE.1 (or
FILE.K.gz) are read first. The hash chain of everything read is checked:
where it does not verify, a warning says where, and the exit code is 3.`, 0, 1)
	fs := v.fs
	config := fs.String("config", "/etc/pgward/pgward.yaml", "the agent's configuration file, for audit.path when no FILE is given")
	since := fs.String("since", "", "only events at or after this: a duration ago (10m, 2h) or a time (RFC 3339)")
	until := fs.String("until", "", "only events before this: a duration ago or a time (RFC 3339)")
	principal := fs.String("principal", "", "only events of this principal")
	uidFlag := fs.String("uid", "", "only events whose process runs as this uid")
	pidFlag := fs.String("pid", "", "only events whose process has this pid")
	sid := fs.String("sid", "", "only events of this session")
	requestID := fs.String("request-id", "", "only events of this request id")
	events := fs.String("event", "", "only these events, comma-separated (db.session.query, db.session.start, admin.sessions.end …)")
	failed := fs.Bool("failed", false, "only events with success false (refusals, failed statements, …)")
	asJSON := fs.Bool("json", false, "print the events' JSON lines as written")
	follow := fs.Bool("f", false, "follow: after what is there, show new events as they are written (like tail -f)")
	fs.BoolVar(follow, "follow", false, "same as -f")
	pos, code, ok := v.parse(args, stdout, stderr)
	if !ok {
		return code
	}
	now := time.Now()
	var f exporter.AuditFilter
	var err error
	usage := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "pgward audit show: "+format+"\n", a...)
		return exitUsage
	}
	if f.Since, err = parseWhen(*since, now); err != nil {
		return usage("--since: %v", err)
	}
	if f.Until, err = parseWhen(*until, now); err != nil {
		return usage("--until: %v", err)
	}
	f.Principal, f.SID, f.RequestID, f.Failed = *principal, *sid, *requestID, *failed
	if *uidFlag != "" {
		n, err := strconv.ParseUint(*uidFlag, 10, 32)
		if err != nil {
			return usage("--uid %q is not a uid", *uidFlag)
		}
		u := uint32(n)
		f.UID = &u
	}
	if *pidFlag != "" {
		n, err := strconv.ParseInt(*pidFlag, 10, 32)
		if err != nil || n <= 0 {
			return usage("--pid %q is not a pid", *pidFlag)
		}
		p := int32(n)
		f.PID = &p
	}
	if *events != "" {
		for _, e := range strings.Split(*events, ",") {
			if e = strings.TrimSpace(e); e != "" {
				f.Events = append(f.Events, e)
			}
		}
	}
	var path string
	if len(pos) == 1 {
		path = pos[0]
	} else {
		cfg, err := agent.LoadConfig(*config)
		if err != nil {
			fmt.Fprintf(stderr, "pgward audit show: no FILE given and the configuration does not say: %v\n", err)
			return exitFailure
		}
		path = cfg.Audit.Path
	}
	files, err := exporter.AuditFiles(path)
	if err != nil {
		fmt.Fprintf(stderr, "pgward audit show: %s\n", readProblem(err))
		return exitFailure
	}
	w := bufio.NewWriterSize(stdout, 64<<10)
	defer w.Flush()
	var line []byte
	scan := &exporter.AuditScan{Filter: f}
	scan.Emit = func(raw []byte, ev *exporter.AuditEvent) error {
		if *asJSON {
			w.Write(raw)
			return w.WriteByte('\n')
		}
		line = appendEventLine(line[:0], ev)
		_, err := w.Write(line)
		return err
	}
	reported := 0
	report := func() {
		for ; reported < len(scan.Breaks); reported++ {
			fmt.Fprintf(stderr, "warning: the audit chain does not verify at %s: events around it may have been removed, inserted or edited\n", scan.Breaks[reported])
		}
	}
	if *follow {
		scan.Polled = func() { w.Flush(); report() }
		err = scan.Follow(files, followInterval, stop)
	} else {
		err = scan.Scan(files)
	}
	w.Flush()
	if err != nil {
		fmt.Fprintf(stderr, "pgward audit show: %s\n", readProblem(err))
		return exitFailure
	}
	report()
	if !*follow {
		verdict := "hash chain verified"
		if len(scan.Breaks) > 0 {
			verdict = fmt.Sprintf("hash chain does NOT verify at %d place(s), see above", len(scan.Breaks))
		}
		fmt.Fprintf(stderr, "%d of %d events shown from %d file(s); %s\n", scan.Matched, scan.Lines, len(files), verdict)
	}
	if len(scan.Breaks) > 0 {
		return exitBadInput
	}
	return exitOK
}

// readProblem says what keeps the audit files from being read; a
// permission problem needs root.
func readProblem(err error) string {
	if errors.Is(err, fs.ErrPermission) {
		return "needs root: " + err.Error() + " (the audit files are root's, mode 0600)"
	}
	return err.Error()
}

// parseWhen reads a --since/--until value: a duration before now or an
// RFC 3339 time.
func parseWhen(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("%q: give how long ago, without a sign", s)
		}
		return now.Add(-d), nil
	}
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("%q is neither a duration (10m, 2h) nor a time (2026-01-02T15:04:05Z)", s)
}

// appendEventLine is the human line of an event: time, principal,
// process, role@upstream, then what happened.
func appendEventLine(b []byte, ev *exporter.AuditEvent) []byte {
	b = ev.Time.Local().AppendFormat(b, "2006-01-02 15:04:05.000")
	b = append(b, "  "...)
	b = appendPrintable(b, dash(ev.Principal))
	b = append(b, "  "...)
	if p := ev.Process; p != nil && (p.PID != 0 || p.UID != 0 || p.Exe != "") {
		name := p.Comm
		if p.Exe != "" {
			name = filepath.Base(p.Exe)
		}
		b = appendPrintable(b, dash(name))
		b = append(b, '[')
		b = strconv.AppendInt(b, int64(p.PID), 10)
		b = append(b, "] uid "...)
		b = strconv.AppendUint(b, uint64(p.UID), 10)
	} else {
		b = append(b, '-')
	}
	b = append(b, "  "...)
	if ev.User != "" || ev.Service != "" {
		b = appendPrintable(b, ev.User)
		b = append(b, '@')
		b = appendPrintable(b, ev.Service)
	} else {
		b = append(b, '-')
	}
	b = append(b, "  "...)
	ok := ev.Success == nil || *ev.Success
	switch ev.Event {
	case exporter.EventSessionStart:
		if ok {
			b = append(b, "session start"...)
		} else {
			b = append(b, "session refused: "...)
			b = appendFailure(b, ev)
		}
	case exporter.EventSessionEnd:
		b = append(b, "session end ("...)
		b = appendPrintable(b, ev.Reason)
		b = append(b, ", "...)
		b = strconv.AppendInt(b, ev.Queries, 10)
		b = append(b, " statements)"...)
	case exporter.EventQuery:
		b = append(b, "query #"...)
		b = strconv.AppendInt(b, ev.QueryIndex, 10)
		b = append(b, ": "...)
		b = appendFirstLine(b, ev.Query)
	case exporter.EventQueryResult:
		b = append(b, "result #"...)
		b = strconv.AppendInt(b, ev.QueryIndex, 10)
		b = append(b, ": "...)
		if ok {
			b = append(b, "ok"...)
			if ev.Tag != "" {
				b = append(b, ' ')
				b = appendPrintable(b, ev.Tag)
			}
		} else {
			b = append(b, "failed "...)
			b = appendFailure(b, ev)
		}
		if ev.DurationMS != nil {
			b = append(b, " ("...)
			b = strconv.AppendFloat(b, *ev.DurationMS, 'f', 1, 64)
			b = append(b, " ms)"...)
		}
	case exporter.EventCancel:
		if ok {
			b = append(b, "cancel request forwarded"...)
		} else {
			b = append(b, "cancel request rejected: "...)
			b = appendPrintable(b, ev.Reason)
		}
	case exporter.EventDirect:
		b = append(b, "direct connect to "...)
		b = appendPrintable(b, ev.URI)
		if ev.Blocked {
			b = append(b, " (blocked)"...)
		}
	case exporter.EventAdminSessionsList:
		if ok {
			b = append(b, "admin: listed "...)
			b = strconv.AppendInt(b, ev.Sessions, 10)
			b = append(b, " sessions"...)
		} else {
			b = append(b, "admin: refused to list sessions: "...)
			b = appendPrintable(b, ev.Error)
		}
	case exporter.EventAdminSessionsEnd:
		if ok {
			b = append(b, "admin: ended session "...)
		} else {
			b = append(b, "admin: could not end session "...)
		}
		b = appendPrintable(b, ev.SID)
		if ev.Reason != "" {
			b = append(b, " (reason: "...)
			b = appendPrintable(b, ev.Reason)
			b = append(b, ')')
		}
		if !ok {
			b = append(b, ": "...)
			b = appendPrintable(b, ev.Error)
		}
	default:
		b = appendPrintable(b, ev.Event)
		if !ok {
			b = append(b, " failed: "...)
			b = appendFailure(b, ev)
		}
	}
	return append(b, '\n')
}

func appendFailure(b []byte, ev *exporter.AuditEvent) []byte {
	if ev.SQLState != "" {
		b = appendPrintable(b, ev.SQLState)
		b = append(b, ": "...)
	}
	return appendFirstLine(b, ev.Error)
}

// appendFirstLine appends the first line of s, cut at 200 bytes.
func appendFirstLine(b []byte, s string) []byte {
	s = strings.TrimLeft(s, " \t\r\n")
	cut := false
	if i := strings.IndexAny(s, "\r\n"); i >= 0 {
		s, cut = s[:i], true
	}
	if len(s) > 200 {
		i := 200
		for i > 0 && s[i]&0xC0 == 0x80 {
			i--
		}
		s, cut = s[:i], true
	}
	b = appendPrintable(b, s)
	if cut {
		b = append(b, "…"...)
	}
	return b
}

// appendPrintable appends s with control characters shown as '?': a
// statement or a reason must not drive the operator's terminal.
func appendPrintable(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 && c != '\t' || c == 0x7f {
			b = append(b, '?')
		} else {
			b = append(b, c)
		}
	}
	return b
}
