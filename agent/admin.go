package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// The local admin API (issue 19): JSON over HTTP on a Unix socket of its own
// (admin.socket), never on the metrics port. The socket is mode 0600 and
// every request is checked again by its peer credentials: only uid 0 in
// pgward's own pid namespace is served (root in a container that mounts the
// socket directory is refused, and the default path is outside the data
// socket's directory, which pods mount). Every request is audited with the
// operator's process (admin.sessions.list, admin.sessions.end), refusals too.
//
//	GET  /v1/sessions[?principal=&uid=&upstream=]  → AdminSessions
//	POST /v1/sessions/end  AdminEndRequest          → AdminEndReply
//
// An audit sink that cannot write (fsync/write durability) fails the
// request with 503 before anything is done: nothing happens unaudited.

// AdminConfig is the `admin:` section.
type AdminConfig struct {
	// Socket is the admin API's Unix socket; default DefaultAdminSocket of
	// listen.unix_dir.
	Socket string `yaml:"socket"`
}

// DefaultAdminSocket is the admin socket in a directory of its own beside
// the data socket's: /run/pgward → /run/pgward-admin/admin.sock. Not
// inside the data socket's directory: that one is shared with clients (and
// mounted into pods).
func DefaultAdminSocket(unixDir string) string {
	if unixDir == "" {
		unixDir = "/run/pgward"
	}
	unixDir = filepath.Clean(unixDir)
	return filepath.Join(filepath.Dir(unixDir), filepath.Base(unixDir)+"-admin", "admin.sock")
}

// AdminSocket is the configured admin socket, or the default.
func (c *Config) AdminSocket() string {
	if c.Admin.Socket != "" {
		return c.Admin.Socket
	}
	return DefaultAdminSocket(c.Listen.UnixDir)
}

func (c AdminConfig) validate() error {
	if c.Socket != "" && !filepath.IsAbs(c.Socket) {
		return &broker.FieldError{Path: "admin.socket", Err: fmt.Errorf("%q must be an absolute path", c.Socket)}
	}
	return nil
}

// AdminSessions is GET /v1/sessions.
type AdminSessions struct {
	Time     time.Time      `json:"time"`
	Sessions []AdminSession `json:"sessions"`
	// Parked are idle upstream connections in the reuse pool
	// (upstreams.<name>.reuse); empty when reuse is off.
	Parked []AdminParked `json:"parked"`
	// EBPF: the tracker is running, so direct connects are seen.
	EBPF bool `json:"ebpf"`
	// DirectConnects are the connects around pgward eBPF saw in the last
	// DirectConnectWindow (at most recentDirectMax, newest last).
	DirectConnects []AdminDirect `json:"direct_connects"`
}

// AdminSession is one live session.
type AdminSession struct {
	SID        string       `json:"sid"`
	RequestID  string       `json:"request_id"`
	Principal  string       `json:"principal"`
	Process    AdminProcess `json:"process"`
	Upstream   string       `json:"upstream"`
	Role       string       `json:"role"`
	BackendPID uint32       `json:"backend_pid"`
	Reused     bool         `json:"reused"`
	Started    time.Time    `json:"started"`
	// State is idle, active, idle in transaction, idle in transaction (aborted).
	State string `json:"state"`
	// Statement is the first line of the latest statement (password
	// literals redacted); StatementMS how long it has run, when active.
	Statement   string  `json:"statement,omitempty"`
	StatementMS float64 `json:"statement_ms,omitempty"`
	Statements  int64   `json:"statements"`
	BytesIn     int64   `json:"bytes_in"`
	BytesOut    int64   `json:"bytes_out"`
}

// AdminProcess is a caller's process, from kernel facts.
type AdminProcess struct {
	PID          int32  `json:"pid"`
	UID          uint32 `json:"uid"`
	User         string `json:"user,omitempty"`
	Comm         string `json:"comm,omitempty"`
	Exe          string `json:"exe,omitempty"`
	SystemdUnit  string `json:"systemd_unit,omitempty"`
	ContainerID  string `json:"container_id,omitempty"`
	PodNamespace string `json:"pod_namespace,omitempty"`
	PodName      string `json:"pod_name,omitempty"`
	// Attested: an eBPF connect record matched the connection.
	Attested bool `json:"attested"`
}

func adminProcess(id broker.Identity) AdminProcess {
	p := AdminProcess{PID: id.PID, UID: id.UID, User: id.User, Comm: id.Comm, Exe: id.Exe,
		SystemdUnit: id.SystemdUnit, ContainerID: id.ContainerID, Attested: id.Attested}
	if id.Pod != nil {
		p.PodNamespace, p.PodName = id.Pod.Namespace, id.Pod.Name
	}
	return p
}

// AdminParked is an idle upstream connection in the reuse pool.
type AdminParked struct {
	Upstream   string `json:"upstream"`
	Role       string `json:"role"`
	BackendPID uint32 `json:"backend_pid"`
}

// AdminDirect is a connect around pgward seen by eBPF.
type AdminDirect struct {
	Time     time.Time    `json:"time"`
	Process  AdminProcess `json:"process"`
	Dest     string       `json:"dest"`
	Upstream string       `json:"upstream,omitempty"`
	Blocked  bool         `json:"blocked"`
}

// AdminEndRequest is the body of POST /v1/sessions/end.
type AdminEndRequest struct {
	SIDs   []string `json:"sids"`
	Reason string   `json:"reason,omitempty"`
}

// AdminEndReply says which sessions were ended and which sids are not live
// sessions.
type AdminEndReply struct {
	Ended   []AdminSession `json:"ended"`
	Unknown []string       `json:"unknown"`
}

// adminError is every error answer's body.
type adminError struct {
	Error string `json:"error"`
}

// DirectConnectWindow is how long `pgward sessions` shows a direct connect.
const DirectConnectWindow = 10 * time.Minute

const (
	recentDirectMax = 256
	maxReasonLen    = 200
	maxEndSIDs      = 1000
)

// recentDirect keeps the latest direct connects for the admin API.
type recentDirect struct {
	mu  sync.Mutex
	buf []AdminDirect // ring, oldest at head once full
	hd  int
}

func (r *recentDirect) add(d AdminDirect) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.buf) < recentDirectMax {
		r.buf = append(r.buf, d)
		return
	}
	r.buf[r.hd] = d
	r.hd = (r.hd + 1) % recentDirectMax
}

func (r *recentDirect) since(t time.Time) []AdminDirect {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := []AdminDirect{}
	for i := range r.buf {
		d := r.buf[(r.hd+i)%len(r.buf)]
		if !d.Time.Before(t) {
			out = append(out, d)
		}
	}
	return out
}

// adminServer serves the admin API.
type adminServer struct {
	a      *Agent
	ln     *net.UnixListener
	srv    *http.Server
	ids    *Resolver // peer credentials and /proc, without eBPF
	dir    string    // the socket's directory, when pgward made it (removed at close)
	direct recentDirect
}

type peerKey struct{}

// peer is what the kernel says about an admin connection.
type peer struct {
	id  broker.Identity
	err error // no credentials, or another pid namespace
}

// openAdmin creates the admin socket (mode 0600, a stale one replaced).
// A configured admin.socket that cannot be created stops the agent; the
// default one (an agent run by hand as a user that cannot create it) is
// said once at WARN and the agent runs without the admin API.
func (a *Agent) openAdmin() error {
	err := a.listenAdmin()
	if err != nil && a.cfg.Admin.Socket == "" {
		a.log.Warn("admin API off: cannot create the default admin socket; set admin.socket", "err", err)
		return nil
	}
	return err
}

func (a *Agent) listenAdmin() error {
	path := a.cfg.AdminSocket()
	dir := filepath.Dir(path)
	_, statErr := os.Stat(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("admin.socket: create directory: %w", err)
	}
	madeDir := errors.Is(statErr, os.ErrNotExist)
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("admin.socket: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return fmt.Errorf("admin.socket: %s is in use: is another pgward running?", path)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("admin.socket: remove stale socket %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		if madeDir {
			os.Remove(dir)
		}
		return fmt.Errorf("admin.socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	// A connect in the moment before the chmod is still refused below by
	// its peer credentials.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		if madeDir {
			os.Remove(dir)
		}
		return fmt.Errorf("admin.socket: chmod %s: %w", path, err)
	}
	s := &adminServer{a: a, ln: ln, ids: &Resolver{ProcRoot: a.resolver.ProcRoot, Pods: a.resolver.Pods}}
	if madeDir {
		s.dir = dir
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/sessions", s.sessions)
	mux.HandleFunc("POST /v1/sessions/end", s.end)
	s.srv = &http.Server{
		Handler:           s.guard(mux),
		ReadHeaderTimeout: 5 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, peerKey{}, s.peerOf(c))
		},
	}
	a.admin = s
	a.closers = append(a.closers, s.close)
	return nil
}

// serve runs the admin API until close (nothing when it is off).
func (s *adminServer) serve() {
	if s == nil {
		return
	}
	go func() {
		if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.a.log.Error("admin socket failed", "err", err)
		}
	}()
}

func (s *adminServer) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	s.ln.Close()
	if s.dir != "" {
		os.Remove(s.dir) // only if empty
	}
	return err
}

// peerOf reads the connection's peer credentials and the process's /proc
// facts. A caller gone before it could be identified is refused.
func (s *adminServer) peerOf(c net.Conn) peer {
	id, err := s.ids.Resolve(context.Background(), c)
	return peer{id: id, err: err}
}

// guard refuses every caller but root (in pgward's pid namespace) with
// 403, audited as a refused action.
func (s *adminServer) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, _ := r.Context().Value(peerKey{}).(peer)
		var why string
		switch {
		case p.err != nil:
			why = "needs root: pgward could not read the caller's credentials (" + p.err.Error() + ")"
		case p.id.UID != 0:
			why = fmt.Sprintf("needs root: the admin API serves uid 0 only, and the caller runs as uid %d", p.id.UID)
		}
		if why == "" {
			next.ServeHTTP(w, r)
			return
		}
		ev := exporter.EventAdminSessionsList
		if r.URL.Path == "/v1/sessions/end" {
			ev = exporter.EventAdminSessionsEnd
		}
		_ = s.a.observer.Admin(r.Context(), exporter.AdminEvent{Event: ev, RequestID: newRequestID(), Operator: p.id, Error: why})
		writeJSON(w, http.StatusForbidden, adminError{why})
	})
}

func (s *adminServer) sessions(w http.ResponseWriter, r *http.Request) {
	p, _ := r.Context().Value(peerKey{}).(peer)
	q := r.URL.Query()
	var uid *uint32
	if v := q.Get("uid"); v != "" {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			s.badRequest(w, r, exporter.EventAdminSessionsList, fmt.Sprintf("uid %q is not a number", v))
			return
		}
		u := uint32(n)
		uid = &u
	}
	principal, upstream := q.Get("principal"), q.Get("upstream")
	now := time.Now()
	out := AdminSessions{Time: now, Sessions: []AdminSession{}, Parked: []AdminParked{}, DirectConnects: []AdminDirect{}}
	for _, st := range s.a.broker.Sessions() {
		if principal != "" && st.Principal != principal || upstream != "" && st.Upstream != upstream || uid != nil && st.Process.UID != *uid {
			continue
		}
		out.Sessions = append(out.Sessions, adminSession(st, now))
	}
	for _, pc := range s.a.broker.Parked() {
		if upstream != "" && pc.Upstream != upstream {
			continue
		}
		out.Parked = append(out.Parked, AdminParked{Upstream: pc.Upstream, Role: pc.Role, BackendPID: pc.BackendPID})
	}
	if s.a.ebpf != nil && s.a.ebpf.tracker != nil {
		out.EBPF = true
		for _, d := range s.direct.since(now.Add(-DirectConnectWindow)) {
			if uid != nil && d.Process.UID != *uid || upstream != "" && d.Upstream != upstream {
				continue
			}
			out.DirectConnects = append(out.DirectConnects, d)
		}
	}
	if err := s.a.observer.Admin(r.Context(), exporter.AdminEvent{
		Event: exporter.EventAdminSessionsList, RequestID: newRequestID(), Operator: p.id, Count: len(out.Sessions), Success: true,
	}); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, adminError{"pgward's audit log is unavailable, so the request was not served: " + err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func adminSession(st broker.SessionStatus, now time.Time) AdminSession {
	as := AdminSession{
		SID: st.SessionID, RequestID: st.RequestID, Principal: st.Principal, Process: adminProcess(st.Process),
		Upstream: st.Upstream, Role: st.Role, BackendPID: st.BackendPID, Reused: st.Reused, Started: st.Start,
		State: st.State, Statement: exporter.RedactStatement(st.Statement),
		Statements: st.Statements, BytesIn: st.BytesIn, BytesOut: st.BytesOut,
	}
	if st.State == broker.StateActive && !st.StatementStart.IsZero() {
		as.StatementMS = float64(now.Sub(st.StatementStart).Microseconds()) / 1000
	}
	return as
}

func (s *adminServer) end(w http.ResponseWriter, r *http.Request) {
	p, _ := r.Context().Value(peerKey{}).(peer)
	var req AdminEndRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		s.badRequest(w, r, exporter.EventAdminSessionsEnd, "the request body is not an end request: "+err.Error())
		return
	}
	switch {
	case len(req.SIDs) == 0:
		s.badRequest(w, r, exporter.EventAdminSessionsEnd, "no session id given")
		return
	case len(req.SIDs) > maxEndSIDs:
		s.badRequest(w, r, exporter.EventAdminSessionsEnd, fmt.Sprintf("at most %d session ids per request", maxEndSIDs))
		return
	case len(req.Reason) > maxReasonLen || !utf8.ValidString(req.Reason):
		s.badRequest(w, r, exporter.EventAdminSessionsEnd, fmt.Sprintf("the reason must be valid UTF-8 of at most %d bytes", maxReasonLen))
		return
	}
	rid := newRequestID()
	reply := AdminEndReply{Ended: []AdminSession{}, Unknown: []string{}}
	now := time.Now()
	for _, sid := range req.SIDs {
		st, ok := s.statusOf(sid)
		ev := exporter.AdminEvent{Event: exporter.EventAdminSessionsEnd, RequestID: rid, Operator: p.id, TargetSID: sid, Reason: req.Reason, Success: ok}
		if ok {
			ev.Session = &st
		} else {
			ev.Error = "no live session has this id"
		}
		// Audited before it is done.
		if err := s.a.observer.Admin(r.Context(), ev); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, adminError{"pgward's audit log is unavailable, so no more sessions were ended: " + err.Error()})
			return
		}
		if !ok {
			reply.Unknown = append(reply.Unknown, sid)
			continue
		}
		if st, ok = s.a.broker.EndSession(sid, req.Reason); !ok {
			reply.Unknown = append(reply.Unknown, sid) // ended on its own meanwhile
			continue
		}
		reply.Ended = append(reply.Ended, adminSession(st, now))
	}
	status := http.StatusOK
	if len(reply.Unknown) > 0 {
		status = http.StatusNotFound
	}
	writeJSON(w, status, reply)
}

// badRequest answers 400 to a request that asked for nothing valid, and
// audits it as a failed action.
func (s *adminServer) badRequest(w http.ResponseWriter, r *http.Request, event, msg string) {
	p, _ := r.Context().Value(peerKey{}).(peer)
	_ = s.a.observer.Admin(r.Context(), exporter.AdminEvent{Event: event, RequestID: newRequestID(), Operator: p.id, Error: msg})
	writeJSON(w, http.StatusBadRequest, adminError{msg})
}

func (s *adminServer) statusOf(sid string) (broker.SessionStatus, bool) {
	for _, st := range s.a.broker.Sessions() {
		if st.SessionID == sid {
			return st, true
		}
	}
	return broker.SessionStatus{}, false
}

// noteDirect keeps a direct connect for `pgward sessions`.
func (a *Agent) noteDirect(id broker.Identity, dest, upstream string, blocked bool) {
	if a.admin != nil {
		a.admin.direct.add(AdminDirect{Time: time.Now(), Process: adminProcess(id), Dest: dest, Upstream: upstream, Blocked: blocked})
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
