package broker

import (
	"errors"
	"fmt"
	"strings"
)

// The upstream session's application_name (upstreams.<name>.application_name)
// carries pgward's request_id and the principal into PostgreSQL, so that
// pg_stat_activity, a server log line (%a in log_line_prefix) or pgaudit
// can be joined to pgward's audit. The client's own name ({app}) is kept as
// far as PostgreSQL's limit allows.

// maxAppName is PostgreSQL's limit for application_name (NAMEDATALEN-1):
// pg_stat_activity cuts a longer one.
const maxAppName = 63

// appNamePlaceholders are the names a format may use.
var appNamePlaceholders = []string{"{app}", "{principal}", "{request_id}"}

// requestIDLen is the length of a request_id (a W3C trace id in hex).
const requestIDLen = 32

// checkAppNameFormat validates a format: only the known placeholders, and
// room within 63 bytes for its fixed text and the request_id.
func checkAppNameFormat(f string) error {
	if f == "" {
		return nil
	}
	rest := f
	fixed := 0
	for {
		i := strings.IndexByte(rest, '{')
		if i < 0 {
			fixed += len(rest)
			break
		}
		fixed += i
		rest = rest[i:]
		known := false
		for _, p := range appNamePlaceholders {
			if strings.HasPrefix(rest, p) {
				if p == "{request_id}" {
					fixed += requestIDLen
				}
				rest = rest[len(p):]
				known = true
				break
			}
		}
		if !known {
			j := strings.IndexByte(rest, '}')
			if j < 0 {
				j = len(rest) - 1
			}
			return fmt.Errorf("%q: unknown placeholder %s; use {app}, {principal}, {request_id}", f, rest[:j+1])
		}
	}
	if fixed > maxAppName {
		return fmt.Errorf("%q: its fixed text and request_id take %d bytes, more than PostgreSQL's %d", f, fixed, maxAppName)
	}
	for i := 0; i < len(f); i++ {
		if f[i] < 32 || f[i] > 126 {
			return errors.New("only printable ASCII is allowed (PostgreSQL replaces anything else in application_name)")
		}
	}
	return nil
}

// formatAppName renders format. app and principal are first made
// printable ASCII byte by byte (what PostgreSQL does to application_name
// anyway, so the length here is the length there); if the result is over
// 63 bytes, app is cut from its end, then principal; the request_id is
// never cut. Spaces left at either end by an empty {app} are trimmed.
func formatAppName(format, app, principal, requestID string) string {
	app, principal = printableASCII(app), printableASCII(principal)
	render := func(a, p string) string {
		r := strings.NewReplacer("{app}", a, "{principal}", p, "{request_id}", requestID)
		return strings.TrimSpace(r.Replace(format))
	}
	if s := render(app, principal); len(s) <= maxAppName {
		return s
	}
	// Each placeholder occurrence costs the length of its value: measure
	// the rest with a one-byte value (an empty one would let TrimSpace
	// hide a separating space).
	if n := strings.Count(format, "{app}"); n > 0 {
		if base := len(render("x", principal)) - n; base <= maxAppName {
			return render(app[:min(len(app), (maxAppName-base)/n)], principal)
		}
	}
	if n := strings.Count(format, "{principal}"); n > 0 {
		if base := len(render("", "x")) - n; base <= maxAppName {
			return render("", principal[:min(len(principal), (maxAppName-base)/n)])
		}
	}
	// Only a format with more fixed text than validation allows gets here.
	s := render("", "")
	return s[:min(len(s), maxAppName)]
}

// printableASCII replaces every byte outside printable ASCII with '?', as
// PostgreSQL 15 does to application_name (later versions escape it as
// \xNN, longer: replacing it here keeps the request_id within the limit).
func printableASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] < 32 || s[i] > 126 {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if b[j] < 32 || b[j] > 126 {
					b[j] = '?'
				}
			}
			return string(b)
		}
	}
	return s
}
