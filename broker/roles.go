package broker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/pgward/pgward/broker/secrets"
)

// The role a statement runs as (issue 12 point 3).
//
// A login role can become any role it is a member of (SET ROLE, and
// set_config('role', …)), and a superuser any role at all (also SET
// SESSION AUTHORIZATION). pgward grants (upstream, role); what that role
// can become is the server's business, so pgward learns it when a
// credential is first used, reports it (db.session.start, a metric, a
// WARN once per credential) and, with upstreams.<name>.refuse_role_switching,
// refuses such credentials. Statements that change the role are flagged
// lexically (roleChange), and the server's ParameterStatus reports of
// session_authorization and is_superuser are recorded (noteParam).

// RoleMemberships is what the login role of a credential can become.
type RoleMemberships struct {
	// Superuser: the role can become any role.
	Superuser bool
	// Roles are the other roles it is a member of (pg_has_role … 'MEMBER'),
	// sorted; empty for a superuser, who can become any.
	Roles []string
}

// Switchable reports whether the role can become another role.
func (m *RoleMemberships) Switchable() bool { return m.Superuser || len(m.Roles) > 0 }

// roleCache remembers the memberships learned per credential. A reload
// empties it, so a changed grant on the server is learned again.
type roleCache struct {
	mu sync.Mutex
	m  map[reuseKey]*RoleMemberships
}

func (c *roleCache) get(k reuseKey) *RoleMemberships {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[k]
}

// add stores m unless k is known; it reports whether m was stored (the
// caller is the first use of the credential) and returns what is stored.
func (c *roleCache) add(k reuseKey, m *RoleMemberships) (*RoleMemberships, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.m[k]; old != nil {
		return old, false
	}
	if c.m == nil || len(c.m) >= 4096 {
		c.m = map[reuseKey]*RoleMemberships{}
	}
	c.m[k] = m
	return m, true
}

func (c *roleCache) clear() {
	c.mu.Lock()
	c.m = nil
	c.mu.Unlock()
}

// membershipQuery lists, for the session user, whether it is a superuser
// and every other role it is a member of. One row per role; a single row
// with a NULL name when there is none (or for a superuser).
//
// It runs in the client's session, under the client's search_path (a
// startup parameter): every function and operator is qualified with
// pg_catalog, so one of the client's schema cannot stand in for it and
// hide a membership (an unqualified <> resolves to evil.<> when
// search_path is "evil, pg_catalog"). It runs under the client's timeouts
// too (statement_timeout, lock_timeout, startup parameters like any other):
// the two SET LOCALs lift them for pgward's statement alone (the statements
// of one Query message share an implicit transaction, and PostgreSQL arms
// statement_timeout afresh for each one), so a client asking for 1ms cannot
// make the check fail. Only the first SET runs under the client's
// timeouts: when one of them catches it (the backend was descheduled
// longer than the client's 1ms), the query is sent again, up to
// membershipAttempts times (see clientTimeout).
const membershipQuery = `SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0; ` +
	`SELECT r.rolsuper, b.rolname FROM pg_catalog.pg_roles r ` +
	`LEFT JOIN pg_catalog.pg_roles b ON b.oid OPERATOR(pg_catalog.<>) r.oid AND NOT r.rolsuper ` +
	`AND pg_catalog.pg_has_role(r.oid, b.oid, 'MEMBER') ` +
	`WHERE r.rolname OPERATOR(pg_catalog.=) pg_catalog.session_user() ORDER BY b.rolname`

// roleMemberships returns what the credential's role can become: from the
// cache, or by asking the server on up (idle, before the relay) at first
// use. first is true for the first use, which the caller reports.
func (s *Server) roleMemberships(ctx context.Context, u *upstream, role string, cred secrets.Credential, up *upstreamConn) (m *RoleMemberships, first bool, took time.Duration, err error) {
	k := newReuseKey(u, role, cred)
	if m := s.roles.get(k); m != nil {
		return m, false, 0, nil
	}
	if len(up.pre) > 0 && !u.cfg.RefuseRoleSwitching {
		// The server already said something behind the login (a notice, or
		// a FATAL before it closes): the client reads it first. The check
		// waits for the credential's next login.
		return nil, false, 0, errors.New("the server sent messages right after the login; checked at the next login")
	}
	t := time.Now()
	rows, err := up.query(ctx, membershipQuery, true, true)
	for try := 1; try < membershipAttempts && clientTimeout(err); try++ {
		rows, err = up.query(ctx, membershipQuery, true, true)
	}
	took = time.Since(t)
	if err != nil {
		return nil, false, took, fmt.Errorf("query role memberships: %w", err)
	}
	m = &RoleMemberships{}
	for _, r := range rows {
		if len(r) != 2 {
			return nil, false, took, fmt.Errorf("%w: role membership row of %d columns", errProtocol, len(r))
		}
		if r[0] != nil && *r[0] == "t" {
			m.Superuser = true
		}
		if r[1] != nil {
			m.Roles = append(m.Roles, *r[1])
		}
	}
	if len(rows) == 0 {
		return nil, false, took, fmt.Errorf("%w: the session user is not in pg_roles", errProtocol)
	}
	slices.Sort(m.Roles)
	m, first = s.roles.add(k, m)
	return m, first, took, nil
}

// membershipAttempts bounds how often membershipQuery is sent when the
// client's timeouts catch its first statement.
const membershipAttempts = 5

// clientTimeout reports whether err is the server cancelling a statement of
// membershipQuery for a timeout (57014 query_canceled, 55P03
// lock_not_available): with its SET LOCALs in effect that can only be the
// client's statement_timeout or lock_timeout firing during the first SET,
// and the statement changed nothing (its implicit transaction is rolled
// back), so it is sent again.
func clientTimeout(err error) bool {
	var se *serverError
	return errors.As(err, &se) && !se.Fatal && (se.Code == "57014" || se.Code == "55P03")
}

// dataRow decodes a DataRow body into text values.
func dataRow(b []byte) ([]*string, error) {
	bad := fmt.Errorf("%w: malformed DataRow", errProtocol)
	if len(b) < 2 {
		return nil, bad
	}
	n := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	row := make([]*string, n)
	for i := range n {
		if len(b) < 4 {
			return nil, bad
		}
		l := int(int32(binary.BigEndian.Uint32(b)))
		b = b[4:]
		if l < 0 {
			continue
		}
		if len(b) < l {
			return nil, bad
		}
		v := string(b[:l])
		row[i] = &v
		b = b[l:]
	}
	return row, nil
}

// checkRoles learns (at first use) and applies what the session's
// credential can become: it fills info, reports a first use, and returns a
// refusal (with its cause and error, for the refusal's log line) when the
// upstream refuses role switching and the role can switch or what it can
// become could not be learned.
func (s *Server) checkRoles(ctx context.Context, ups *upstream, role string, cred secrets.Credential, up *upstreamConn, info *SessionInfo, log *slog.Logger) (*ClientError, string, error) {
	m, first, took, err := s.roleMemberships(ctx, ups, role, cred, up)
	if err != nil {
		if ups.cfg.RefuseRoleSwitching {
			return refuse(CodeCannotConnect, ReasonBackendError,
					fmt.Sprintf("pgward could not check which roles role %q can become on upstream %q", role, ups.name),
					"Try again; if it persists, check the upstream server (upstreams."+ups.name+".refuse_role_switching is on)."),
				"could not learn the credential's role memberships (refuse_role_switching)", err
		}
		log.Warn("could not learn the credential's role memberships; the session start event will not list them", "err", err)
		return nil, "", nil
	}
	info.RoleMemberships = m
	if first {
		log.Info("learned the credential's role memberships at first use", "upstream", ups.name, "role", role,
			"superuser", m.Superuser, "roles", len(m.Roles), "query_duration", took)
		if m.Switchable() {
			log.Warn("the credential's role can become other roles: statements may run as a role other than the one granted",
				"upstream", ups.name, "role", role, "superuser", m.Superuser, "can_become", m.Roles,
				"refuse_role_switching", ups.cfg.RefuseRoleSwitching)
		}
		s.obs.CredentialRoles(ups.name, role, *m)
	}
	if ups.cfg.RefuseRoleSwitching && m.Switchable() {
		what := "is a superuser and can become any role"
		if !m.Superuser {
			what = "is a member of " + strings.Join(m.Roles, ", ") + " and can become them with SET ROLE"
		}
		return refuse(CodeInsufficientPriv, ReasonUnauthorized,
				fmt.Sprintf("pgward refuses the credential of role %q on upstream %q: the role %s", role, ups.name, what),
				"Give pgward a login role that is a member of no other role (REVOKE the memberships, or NOSUPERUSER), or set upstreams."+ups.name+".refuse_role_switching to false."),
			"the credential's role can become other roles (refuse_role_switching)", nil
	}
	return nil, "", nil
}

// noteParam records a ParameterStatus the server sent during the session:
// a change of session_authorization or is_superuser (SET SESSION
// AUTHORIZATION, or SET ROLE to or from a superuser role) is logged and put
// on the next statement result. role itself is not reported by the server.
func (sess *session) noteParam(name, old, val string) {
	if name != "session_authorization" && name != "is_superuser" {
		return
	}
	sess.log.Warn("the server reports a role change in the session", "parameter", name, "from", old, "to", val)
	sess.roleMu.Lock()
	if sess.roleReport != "" {
		sess.roleReport += ", "
	}
	sess.roleReport += name + "=" + val
	sess.roleReported.Store(true)
	sess.roleMu.Unlock()
}

// takeRoleReport returns and clears what noteParam recorded.
func (sess *session) takeRoleReport() string {
	if !sess.roleReported.Load() {
		return ""
	}
	sess.roleMu.Lock()
	sess.roleReported.Store(false)
	defer sess.roleMu.Unlock()
	r := sess.roleReport
	sess.roleReport = ""
	return r
}
