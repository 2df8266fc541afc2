package broker

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgward/pgward/broker/secrets"
)

// Upstream connection reuse (upstreams.<name>.reuse, off by default).
//
// A session whose upstream connection ends idle — its last server message
// was ReadyForQuery 'I', nothing in flight either way, the client left with
// Terminate or EOF, nothing ended the session from outside — does not close
// it: pgward withholds the client's Terminate, runs DISCARD ALL (temp
// tables, prepared statements, portals, LISTEN, advisory locks, SET values,
// SET ROLE/SESSION AUTHORIZATION: all gone) and parks the connection under
// (upstream, address, role, login user, credential). The next session with
// the same key takes it instead of dialling and authenticating: it sets the
// client's startup parameters with set_config, greets the client with the
// connection's current ParameterStatus values, and hands out the backend's
// pid with a fresh cancel secret of pgward's mapped to the backend's key.
//
// So that DISCARD ALL (whose RESET ALL returns settings to their session
// defaults, which include startup-packet values) leaves nothing of one
// client for the next, connections on a reuse upstream are opened without
// the client's startup parameters, which are applied with set_config right
// after, on fresh and reused connections alike. A client sending `options`
// is served on a connection of its own, dialled the usual way and never
// parked.
//
// A parked connection is closed after idle_timeout, when its key already
// has max_idle parked, when the lease of its (dynamic) credential ends, or
// when the server shuts down. A parked connection that fails when taken
// (its backend was terminated) is closed and a fresh one is dialled: the
// client does not see it.

// reuseKey names the connections a session may take. The credential is
// represented by an HMAC under a per-process key, never the secret itself.
type reuseKey struct {
	upstream, address, role, user string
	cred                          [32]byte
}

var reuseHMACKey = func() (k [32]byte) { _, _ = rand.Read(k[:]); return k }()

func newReuseKey(u *upstream, role string, cred secrets.Credential) reuseKey {
	user := cred.User
	if user == "" {
		user = role
	}
	h := hmac.New(sha256.New, reuseHMACKey[:])
	h.Write([]byte(cred.Password.Reveal()))
	k := reuseKey{upstream: u.name, address: u.cfg.Address + "\x00" + u.cfg.database(u.name), role: role, user: user}
	h.Sum(k.cred[:0])
	return k
}

// parked is one idle upstream connection.
type parked struct {
	up    *upstreamConn
	key   reuseKey
	timer *time.Timer
	lease *secrets.Lease // the parking session's lease reference, released when the conn leaves the pool
	gone  chan struct{}  // closed when it leaves the pool (taken or closed)
}

// reusePool holds the parked connections of a Server.
type reusePool struct {
	mu     sync.Mutex
	m      map[reuseKey][]*parked // LIFO per key
	closed bool
	wg     sync.WaitGroup // lease watchers
}

// take removes and returns the most recently parked connection of k, or nil.
func (p *reusePool) take(k reuseKey) *parked {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		st := p.m[k]
		if len(st) == 0 {
			return nil
		}
		e := st[len(st)-1]
		st[len(st)-1] = nil
		p.m[k] = st[:len(st)-1]
		if len(p.m[k]) == 0 {
			delete(p.m, k)
		}
		p.leaveLocked(e)
		if e.lease != nil && e.lease.Done != nil && isDone(e.lease.Done) {
			e.close()
			continue
		}
		return e
	}
}

// leaveLocked stops what watches e; p.mu is held.
func (p *reusePool) leaveLocked(e *parked) {
	e.timer.Stop()
	close(e.gone)
}

// put parks up under k, or closes it when the key is full or the pool closed.
func (p *reusePool) put(k reuseKey, up *upstreamConn, lease *secrets.Lease, cfg *ReuseConfig) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || len(p.m[k]) >= cfg.maxIdle() || (lease != nil && lease.Done != nil && isDone(lease.Done)) {
		return false
	}
	if p.m == nil {
		p.m = map[reuseKey][]*parked{}
	}
	e := &parked{up: up, key: k, lease: lease, gone: make(chan struct{})}
	e.timer = time.AfterFunc(cfg.idleTimeout(), func() { p.evict(e) })
	p.m[k] = append(p.m[k], e)
	if lease != nil && lease.Done != nil {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			select {
			case <-lease.Done:
				p.evict(e)
			case <-e.gone:
			}
		}()
	}
	return true
}

// evict closes e if it is still parked.
func (p *reusePool) evict(e *parked) {
	p.mu.Lock()
	st := p.m[e.key]
	i := slices.Index(st, e)
	if i < 0 {
		p.mu.Unlock()
		return
	}
	p.m[e.key] = slices.Delete(st, i, i+1)
	if len(p.m[e.key]) == 0 {
		delete(p.m, e.key)
	}
	p.leaveLocked(e)
	p.mu.Unlock()
	e.close()
}

// closeAll closes every parked connection; later puts are refused.
func (p *reusePool) closeAll() {
	p.mu.Lock()
	p.closed = true
	var all []*parked
	for _, st := range p.m {
		for _, e := range st {
			p.leaveLocked(e)
			all = append(all, e)
		}
	}
	p.m = nil
	p.mu.Unlock()
	for _, e := range all {
		e.close()
	}
	p.wg.Wait()
}

// idle is the number of parked connections (tests, diagnostics).
func (p *reusePool) idle() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, st := range p.m {
		n += len(st)
	}
	return n
}

// close ends the parked connection and gives back its lease reference.
func (e *parked) close() {
	e.up.terminate()
	e.release()
}

func (e *parked) release() {
	if e.lease != nil && e.lease.Release != nil {
		e.lease.Release()
	}
}

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// terminate says goodbye to the server (Terminate) and closes.
func (uc *upstreamConn) terminate() {
	_ = uc.conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = uc.conn.Write([]byte{'X', 0, 0, 0, 4})
	uc.conn.Close()
}

// upstreamFor returns an authenticated upstream connection for the
// session: a parked one when reuse is on and one fits, else a new one.
// params are the client's startup parameters (filterParams) with pgward's
// application_name.
func (s *Server) upstreamFor(ctx context.Context, u *upstream, role string, cred secrets.Credential, params map[string]string) (*upstreamConn, bool, error) {
	rc := u.cfg.Reuse
	_, hasOptions := params["options"]
	if rc == nil || hasOptions {
		// Without reuse, or with startup options (which may hold settings
		// only a startup packet can set): a connection of its own, dialled
		// as usual, never parked.
		up, err := u.connect(ctx, role, cred, params)
		return up, false, err
	}
	k := newReuseKey(u, role, cred)
	for {
		e := s.reuse.take(k)
		if e == nil {
			break
		}
		e.release() // the taking session holds its own lease reference
		// The round trip (an empty query when there is nothing to set)
		// also proves the backend is still there.
		if err := e.up.applyParams(ctx, params, true); err != nil {
			if errors.Is(err, errStartupParam) {
				// The client's parameter, not the connection: a
				// fresh one would refuse it too.
				e.up.terminate()
				return nil, false, err
			}
			// Its backend was terminated while parked, or it failed
			// otherwise: dial fresh, the client sees nothing of it.
			s.log.Debug("parked upstream connection unusable; trying another", "upstream", u.name, "backend_pid", e.up.pid, "err", err)
			e.up.conn.Close()
			continue
		}
		e.up.reuse = &reuseState{key: k, cfg: rc}
		return e.up, true, nil
	}
	up, err := u.connect(ctx, role, cred, nil)
	if err != nil {
		return nil, false, err
	}
	if err := up.applyParams(ctx, params, false); err != nil {
		up.conn.Close()
		return nil, false, err
	}
	up.reuse = &reuseState{key: k, cfg: rc}
	return up, false, nil
}

// reuseState marks an upstream connection that may be parked at session end.
type reuseState struct {
	key reuseKey
	cfg *ReuseConfig
}

// errStartupParam is a client startup parameter the server refused when
// pgward set it (as it would have refused it in a startup packet), wrapped
// with the server's *serverError. The connection is still usable.
var errStartupParam = errors.New("upstream refused a startup parameter")

// applyParams sets the client's startup parameters with one set_config
// statement (the value is taken as a startup packet would take it, lists
// such as search_path included) and records the ParameterStatus messages.
// The statement fails as a whole, so a refused parameter leaves none set.
func (uc *upstreamConn) applyParams(ctx context.Context, params map[string]string, always bool) error {
	err := uc.setParams(ctx, params, always)
	var se *serverError
	if errors.As(err, &se) && !se.Fatal {
		return fmt.Errorf("%w: %w", errStartupParam, se)
	}
	return err
}

func (uc *upstreamConn) setParams(ctx context.Context, params map[string]string, always bool) error {
	if len(params) == 0 {
		if always {
			return uc.simpleQuery(ctx, "", true)
		}
		return nil
	}
	names := slices.Sorted(maps.Keys(params))
	var b strings.Builder
	b.WriteString("SELECT ")
	for i, n := range names {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("pg_catalog.set_config(")
		b.WriteString(quoteLiteral(strings.ToLower(n)))
		b.WriteString(", ")
		b.WriteString(quoteLiteral(params[n]))
		b.WriteString(", false)")
	}
	return uc.simpleQuery(ctx, b.String(), true)
}

// discard resets the session state for the next client (DISCARD ALL).
func (uc *upstreamConn) discard(ctx context.Context) error {
	return uc.simpleQuery(ctx, "DISCARD ALL", false)
}

// quoteLiteral quotes s as an escape string literal (E'…'), correct whatever
// standard_conforming_strings says.
func quoteLiteral(s string) string {
	var b strings.Builder
	b.WriteString("E'")
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\'':
			b.WriteString("''")
		case '\\':
			b.WriteString(`\\`)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('\'')
	return b.String()
}

// simpleQuery runs one simple Query of pgward's own on an idle connection
// and reads its answer up to ReadyForQuery, recording ParameterStatus. It
// reads exactly the answer's messages, through uc.Read (what the login read
// ahead comes first), so nothing of a later one is lost. With keep, the
// NoticeResponse and NotificationResponse messages read on the way (what
// the server sent behind the login, or said about the client's startup
// parameters) are kept in uc.pre for the client, ahead of anything still
// there. An ErrorResponse, a status other than idle, or a failure is an
// error.
func (uc *upstreamConn) simpleQuery(ctx context.Context, q string, keep bool) error {
	_, err := uc.query(ctx, q, keep, false)
	return err
}

// query is simpleQuery that also returns the rows (text, nil for NULL)
// when withRows is set. A FATAL from the server (it is ending the
// connection) is kept for the client with keep, like the notices before it.
func (uc *upstreamConn) query(ctx context.Context, q string, keep, withRows bool) ([][]*string, error) {
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(5 * time.Second)
	}
	_ = uc.conn.SetDeadline(dl)
	defer uc.conn.SetDeadline(time.Time{})
	msg := make([]byte, 5, 6+len(q))
	msg[0] = 'Q'
	binary.BigEndian.PutUint32(msg[1:], uint32(4+len(q)+1))
	msg = append(append(msg, q...), 0)
	if _, err := uc.conn.Write(msg); err != nil {
		return nil, fmt.Errorf("send to upstream: %w", err)
	}
	var hdr [5]byte
	var failed error
	var kept []byte
	var rows [][]*string
	for {
		if _, err := io.ReadFull(uc, hdr[:]); err != nil {
			return nil, fmt.Errorf("read from upstream: %w", err)
		}
		l := int(int32(binary.BigEndian.Uint32(hdr[1:])))
		if l < 4 || l-4 > 1<<20 {
			return nil, fmt.Errorf("%w: message %q with length %d", errProtocol, hdr[0], l)
		}
		body := make([]byte, l-4)
		if _, err := io.ReadFull(uc, body); err != nil {
			return nil, fmt.Errorf("read from upstream: %w", err)
		}
		switch hdr[0] {
		case 'N', 'A':
			if keep {
				kept = append(append(kept, hdr[:]...), body...)
			}
		case 'S':
			name, rest, ok1 := cstring(body)
			val, _, ok2 := cstring(rest)
			if ok1 && ok2 {
				uc.params[name] = val
			}
		case 'D':
			if withRows {
				row, err := dataRow(body)
				if err != nil {
					return nil, err
				}
				rows = append(rows, row)
			}
		case 'E':
			se := newServerError(body)
			if failed == nil {
				failed = se
			}
			if se.Fatal {
				if keep {
					// What the server said as it ends the connection (a
					// backend terminated right after its login) is the
					// client's to read.
					fatal := append(append(kept, hdr[:]...), body...)
					uc.pre = append(fatal, uc.pre...)
				}
				return nil, se
			}
		case 'Z':
			if failed != nil {
				return nil, failed
			}
			if len(body) != 1 || body[0] != 'I' {
				return nil, fmt.Errorf("upstream not idle after pgward's statement (status %q)", body)
			}
			if len(kept) > 0 {
				uc.pre = append(kept, uc.pre...)
			}
			return rows, nil
		}
	}
}

// sessionReuse is a session's part in connection reuse.
type sessionReuse struct {
	reused bool // the upstream connection came from the reuse pool
	// leaseParked: the upstream connection was parked and took the
	// session's lease reference with it (the login does not release it).
	leaseParked bool
	parking     atomic.Bool // the upstream pump is being stopped to park the connection
	upIdle      bool        // set by the upstream pump when it ends: last message ReadyForQuery 'I'
	clientIdle  bool        // set by the client pump: Terminate came after a complete request
	connParked  bool        // the upstream connection went to the reuse pool; under termMu
}

// closeUpstream ends the upstream side once the client pump returned:
// with reuse on, a client that left cleanly (its Terminate withheld) has
// its upstream pump stopped without closing, and an idle connection is
// parked for a later session; otherwise the server is told (half-close on
// a clean end) and the connection closed. It returns when the upstream
// pump has ended.
func (sess *session) closeUpstream(tr *tracker, clientErr error, upDone <-chan struct{}) {
	parked := false
	switch {
	case clientErr == nil && sess.up.reuse != nil:
		sess.parking.Store(true)
		_ = sess.up.conn.SetReadDeadline(time.Unix(1, 0))
		<-upDone
		_ = sess.up.conn.SetReadDeadline(time.Time{})
		reason, _, _ := sess.termination()
		tr.mu.Lock()
		quiet := tr.head == len(tr.queue)
		tr.mu.Unlock()
		if reason == "" && quiet && sess.upIdle && sess.clientIdle {
			parked = sess.park()
		}
		if !parked {
			sess.up.terminate()
		}
	case clientErr == nil:
		// Client finished (Terminate or EOF): half-close, let the server end.
		if cw, ok := sess.up.conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		select {
		case <-upDone:
		case <-time.After(5 * time.Second):
			sess.up.conn.Close()
		}
	default:
		sess.up.conn.Close()
	}
	<-upDone
	if !parked {
		sess.up.conn.Close()
	}
}

// park tries to keep the session's upstream connection for a later
// session: it runs DISCARD ALL and puts it in the pool. It reports whether
// it did; if not, the caller closes the connection.
func (sess *session) park() bool {
	rs := sess.up.reuse
	if rs == nil || sess.srv.Draining() {
		return false
	}
	if sess.lease != nil && sess.lease.Done != nil && isDone(sess.lease.Done) {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := sess.up.discard(ctx); err != nil {
		sess.log.Debug("upstream connection not reusable: DISCARD ALL failed", "err", err)
		return false
	}
	// Under termMu: a terminate either came first (and the connection is
	// not parked) or finds it parked (and leaves it alone).
	sess.termMu.Lock()
	defer sess.termMu.Unlock()
	if sess.reason != "" {
		return false
	}
	cur := sess.srv.state.Load().upstreams[sess.ups.name]
	if cur == nil || cur.cfg.Reuse == nil || cur.cfg.Address != sess.ups.cfg.Address {
		return false // a reload turned reuse off or moved the upstream
	}
	rs.cfg = cur.cfg.Reuse
	// This session's cancel key must not reach the next session's statements.
	sess.srv.cancels.remove(sess.key)
	sess.up.reuse = nil
	if !sess.srv.reuse.put(rs.key, sess.up, sess.lease, rs.cfg) {
		sess.up.reuse = rs
		return false
	}
	sess.connParked = true
	sess.leaseParked = sess.lease != nil
	return true
}
