package broker

import (
	"encoding/binary"
	"errors"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Verified execution. Code running inside the server — dynamic SQL in a
// PL/pgSQL function or DO block, a SQL function whose body is PREPARE or
// DEALLOCATE — can replace a named prepared statement without any message
// pgward sees, and a function can read pg_prepared_statements, so no
// renaming hides the names. pgward therefore never lets the server pick the
// statement a Bind runs by its name. For Bind(portal, S) it sends instead
//
//	Close('S', verifyStmt)
//	Parse(verifyStmt, <the text audited for S>, <the types S's Parse declared>)
//	Bind(portal, verifyStmt, <the client's formats and values>)
//
// and takes the answers to its Close and Parse out of the stream: the
// client reads BindComplete, or an ErrorResponse, where it expects its
// Bind's answer. Nothing runs between pgward's Parse and the Bind, so what
// the server plans and executes is the text the audit names. The client's
// own Parse, Describe and Close of S still go to the server's S, which
// answers as it would directly (42P05 for a duplicate name, the
// parameter and row descriptions). The Close comes first so that a
// verifyStmt left behind (its Bind failed; a function created one) never
// makes the Parse fail.
//
// A Bind pgward cannot verify — of a statement it never saw prepared (code
// in the server may have), of one prepared by SQL PREPARE (pgward knows
// only the whole query string), or of a reserved name — is refused: pgward
// sends a Describe of verifyStmt just closed, which fails and makes the
// server skip to Sync exactly as a failed Bind would, and replaces that
// error with its own. A client's Parse, Close or Describe of a statement
// named with reservedPrefix is refused the same way.
//
// upstreams.<name>.trust_named_statements turns this off: Binds go to the
// server's statement by name, and the audit names the text pgward tracked.

// reservedPrefix starts the statement names pgward keeps for itself.
const reservedPrefix = "pgward_"

// verifyStmt is the statement a verified Bind runs.
const verifyStmt = reservedPrefix + "verified"

func reserved(name []byte) bool {
	return len(name) >= len(reservedPrefix) && string(name[:len(reservedPrefix)]) == reservedPrefix
}

// errRewrite stops a scan at a message that is not forwarded as it is:
// t.rewrite is sent in its place.
var errRewrite = errors.New("rewrite")

// errCut stops a scan at an answer taken out of the stream (or replaced).
var errCut = errors.New("cut")

const (
	injOwn    uint8 = iota + 1 // pgward's own message: its answer is not the client's
	injRefuse                  // stands in for a refused message: its error is replaced
)

const (
	cutDrop    uint8 = iota + 1 // the answer is taken out of the stream
	cutReplace                  // the answer is replaced by tracker.replacement
)

// refusal is the error a refused message gets.
type refusal struct{ code, msg, detail string }

func (r *refusal) encode(b []byte) []byte {
	b, _ = (&pgproto3.ErrorResponse{Severity: "ERROR", SeverityUnlocalized: "ERROR", Code: r.code, Message: r.msg, Detail: r.detail}).Encode(b)
	return b
}

var (
	reservedRefusal = &refusal{code: CodeReservedName,
		msg:    `statement names starting with "` + reservedPrefix + `" are reserved by pgward`,
		detail: "pgward uses them to run the statement text it audited; choose another name."}
	sqlPreparedRefusal = &refusal{code: CodeFeatureNotSupported,
		msg:    "pgward does not bind a statement prepared with SQL PREPARE through the extended protocol",
		detail: "pgward cannot verify what such a statement runs. Run it with SQL EXECUTE, or prepare it with the protocol's Parse (as drivers do)."}
)

// closeVerify and describeVerify are pgward's Close and Describe of
// verifyStmt.
var (
	closeVerify    = appendNamed(nil, 'C', 'S', verifyStmt)
	describeVerify = appendNamed(nil, 'D', 'S', verifyStmt)
)

func appendNamed(b []byte, typ, target byte, name string) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(4+1+len(name)+1))
	b = append(b, target)
	b = append(b, name...)
	return append(b, 0)
}

// refuseMessage sends, in place of the client's message p, a Close and a
// Describe of verifyStmt; the Describe's error is replaced by r. Called
// with mu held.
func (t *tracker) refuseMessage(p pending, r *refusal) {
	t.rewrite = append(append(t.rewrite[:0], closeVerify...), describeVerify...)
	t.push(pending{kind: pendClose, target: 'S', name: verifyStmt, inj: injOwn})
	p.inj, p.refuse = injRefuse, r
	t.push(p)
}

// verifiedBind sends, in place of the client's Bind p of a named
// statement (portal: the Bind's portal name with its NUL; tail: the body
// after the statement name), Close and Parse of verifyStmt with the
// audited text, then the Bind of verifyStmt. Called with mu held.
func (t *tracker) verifiedBind(p pending, portal, tail []byte) {
	si := p.portal.stmt
	b := append(t.rewrite[:0], closeVerify...)
	// Parse
	b = append(b, 'P')
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(verifyStmt)+1+len(si.text)+1+2+4*len(si.decl)))
	b = append(b, verifyStmt...)
	b = append(b, 0)
	b = append(b, si.text...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint16(b, uint16(len(si.decl)))
	for _, o := range si.decl {
		b = binary.BigEndian.AppendUint32(b, o)
	}
	// Bind: the client's portal, verifyStmt, the rest as the client sent it.
	b = append(b, 'B')
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(portal)+len(verifyStmt)+1+len(tail)))
	b = append(b, portal...)
	b = append(b, verifyStmt...)
	b = append(b, 0)
	b = append(b, tail...)
	t.rewrite = b
	t.push(pending{kind: pendClose, target: 'S', name: verifyStmt, inj: injOwn})
	t.push(pending{kind: pendParse, name: verifyStmt, inj: injOwn})
	t.push(p)
}

// Verified portals. A named portal outlives the message that bound it, and
// code running inside the server in the meantime (a function called by
// another statement: CLOSE p, then OPEN of a refcursor holding the name p)
// can replace it with a cursor over another query; an Execute of p would
// then run that query while the audit names the statement bound. So an
// Execute of a named portal after anything that can run code since the
// portal's Bind or its last Execute (a Query, FunctionCall, Bind, Execute,
// or Close of a portal, which can finish a partly run statement and fire
// its triggers) goes upstream behind a guard, in the same write:
//
//	Close('P', guardName), Close('S', guardName)
//	Parse(guardName, guardSQL)
//	Bind(guardName, guardName, <portal>, <audited text>, <recorded creation time>)
//	Execute(guardName), Close('P', guardName)
//	<the client's Execute>
//
// guardSQL fails (division by zero) unless pg_cursors shows a portal of
// that name whose statement is the text pgward audited for it and whose
// creation time is the one recorded after its Bind (below); the server
// then skips the client's Execute, as it skips everything after an error
// until Sync, and the client reads pgward's refusal (34000) in the place of
// its Execute's answer. Nothing runs between the guard and the Execute, and
// the guard is parsed afresh each time, so code in the server cannot have
// replaced it either; names are schema-qualified and operators spelled
// OPERATOR(pg_catalog.=), so no search_path makes it call user code. No
// round trip is added: the guard is pipelined. An Execute that directly
// follows its portal's Bind (or its own last Execute) needs no guard; an
// Execute of a named portal pgward never saw bound, or one it could not
// record (below), is refused.

// guardName names the statement and portal of the guard.
const guardName = reservedPrefix + "portal_check"

// guardSQL returns no row when portal $1 runs the statement text $2 and was
// created at $3, and fails with division by zero otherwise.
const guardSQL = `SELECT WHERE 0 OPERATOR(pg_catalog.=) pg_catalog.int4div(1, (SELECT pg_catalog.count(*)::pg_catalog.int4 FROM pg_catalog.pg_cursors WHERE name OPERATOR(pg_catalog.=) $1 AND statement OPERATOR(pg_catalog.=) $2 AND creation_time OPERATOR(pg_catalog.=) $3))`

// recordSQL reads a portal's creation time (recorded before anything but
// the portal's own Executes ran since its Bind).
const recordSQL = `SELECT creation_time FROM pg_catalog.pg_cursors WHERE name OPERATOR(pg_catalog.=) $1`

// codeDivisionByZero is the error guardSQL fails with.
const codeDivisionByZero = "22012"

var (
	closeGuardPortal = appendNamed(nil, 'C', 'P', guardName)
	closeGuardStmt   = appendNamed(nil, 'C', 'S', guardName)
	executeGuard     = func() []byte {
		b := []byte{'E', 0, 0, 0, byte(4 + len(guardName) + 1 + 4)}
		b = append(b, guardName...)
		return append(b, 0, 0, 0, 0, 0)
	}()
)

// injGuard marks the guard's Execute: its division by zero is replaced by
// portalRefusal, and any error it gets stands in the place of the client's
// Execute.
const injGuard uint8 = injRefuse + 1

func portalRefusal(name string) *refusal {
	return &refusal{code: CodeInvalidCursorName,
		msg: `pgward refused to execute portal "` + name + `": it is no longer the portal this session bound`,
		detail: "Code that ran inside the server since the portal's Bind closed it, or replaced it with a cursor over another query, " +
			"so executing it would not run the statement pgward audited. Bind the statement again."}
}

func unboundPortalRefusal(name string) *refusal {
	if name == "" {
		return &refusal{code: CodeInvalidCursorName,
			msg:    "pgward does not know what the unnamed portal holds: it was not bound since the last simple Query or transaction end",
			detail: "A simple Query replaces the unnamed portal unless it fails before it runs; pgward executes the unnamed portal only after a Bind it saw. Bind the statement again."}
	}
	return &refusal{code: CodeInvalidCursorName,
		msg:    `portal "` + name + `" was not bound in this session`,
		detail: "pgward executes only portals it saw bound (Bind, or SQL DECLARE); code running inside the server may have opened this one."}
}

func unrecordedPortalRefusal(name string) *refusal {
	return &refusal{code: CodeInvalidCursorName,
		msg: `pgward cannot check portal "` + name + `" after other statements ran`,
		detail: "pgward records a portal's identity after its Bind, before anything else runs; it could not for this one (a cursor opened by SQL DECLARE, " +
			"or a portal whose Bind a simple Query or FunctionCall followed before any Sync). Execute it before other statements, use FETCH for a SQL cursor, or Bind the statement again."}
}

var reservedPortalRefusal = &refusal{code: CodeReservedName,
	msg:    `portal names starting with "` + reservedPrefix + `" are reserved by pgward`,
	detail: "pgward uses them to check that a portal still runs the statement it audited; choose another name."}

// guardedExecute sends, in place of the client's Execute p of portal pi
// (body: the Execute's body), the guard and then the Execute. Called with
// mu held.
func (t *tracker) guardedExecute(p pending, pi *portalInfo, body []byte) {
	text := pi.stmtText()
	// Parse: name and text (text), creation time (timestamptz).
	b := appendGuardParse(t.rewrite[:0], guardSQL, 0, 3, 0, 0, 0, 25, 0, 0, 0, 25, 0, 0, 0x04, 0xa0)
	// Bind: the portal's name and the text audited as text, its recorded
	// creation time in binary (NULL, which matches nothing, if none).
	created := 8
	if !pi.recorded {
		created = 0
	}
	b = append(b, 'B')
	b = binary.BigEndian.AppendUint32(b, uint32(4+2*(len(guardName)+1)+2+6+2+4+len(pi.name)+4+len(text)+4+created+2))
	b = append(b, guardName...)
	b = append(b, 0)
	b = append(b, guardName...)
	b = append(b, 0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 3)
	b = binary.BigEndian.AppendUint32(b, uint32(len(pi.name)))
	b = append(b, pi.name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(text)))
	b = append(b, text...)
	if pi.recorded {
		b = append(b, 0, 0, 0, 8)
		b = binary.BigEndian.AppendUint64(b, uint64(pi.created))
	} else {
		b = append(b, 0xff, 0xff, 0xff, 0xff)
	}
	b = append(b, 0, 0)
	b = append(b, executeGuard...)
	b = append(b, closeGuardPortal...)
	// The client's Execute.
	b = append(b, 'E')
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(body)))
	b = append(b, body...)
	t.rewrite = b
	t.pushGuard(injGuard, nil)
	t.push(p)
}

// appendGuardParse appends Close('P') and Close('S') of guardName, then a
// Parse of sql under that name declaring the parameter types in oids (the
// count and the oids, as on the wire).
func appendGuardParse(b []byte, sql string, oids ...byte) []byte {
	b = append(b, closeGuardPortal...)
	b = append(b, closeGuardStmt...)
	b = append(b, 'P')
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(guardName)+1+len(sql)+1+len(oids)))
	b = append(b, guardName...)
	b = append(b, 0)
	b = append(b, sql...)
	b = append(b, 0)
	return append(b, oids...)
}

// pushGuard queues pgward's messages of a guard or a record (inj tells
// which): Close, Close, Parse, Bind, Execute, Close. It returns the id of
// the Execute. Called with mu held.
func (t *tracker) pushGuard(inj uint8, record *portalInfo) int64 {
	own := pending{kind: pendClose, target: 'P', name: guardName, inj: injOwn}
	t.push(own)
	t.push(pending{kind: pendClose, target: 'S', name: guardName, inj: injOwn})
	t.push(pending{kind: pendParse, name: guardName, inj: injOwn})
	t.push(pending{kind: pendBind, name: guardName, inj: injOwn})
	t.push(pending{kind: pendExecute, name: guardName, inj: inj, record: record})
	id := t.lastID
	t.push(own)
	return id
}

// Recording a portal. The guard compares a portal's creation time, too:
// a cursor opened in its place over the same text (with other parameter
// values, or under another search_path) has the same statement, but is
// created by a later message, so with a later statement start time. So
// before anything but a named portal's own Executes can run after its
// Bind, pgward reads its pg_cursors.creation_time and keeps it: before the
// next Bind, Execute of another portal, or portal Close of the segment, or
// else before its Sync, it sends (answers taken out of the stream)
//
//	Close('P', guardName), Close('S', guardName)
//	Parse(guardName, recordSQL), Bind(guardName, guardName, <portal>)
//	Execute(guardName), Close('P', guardName)
//
// A portal whose record is still on its way is not guarded before the
// answer came (a barrier: one round trip, only for a pipelined guard); an
// Execute that needs a guard of a portal without a record (the segment
// failed first; a simple Query or FunctionCall followed its Bind before
// any Sync; a cursor of SQL DECLARE) is refused.

// injRecord marks a record's Execute: its DataRow is the portal's
// creation time.
const injRecord uint8 = injGuard + 1

// recordBefore sends the records of the portals bound in this segment and
// not recorded yet, if the message typ (body) about to be read could run
// code or ends the segment. The message is then read again (t.before).
// Called with mu held.
func (t *tracker) recordBefore(typ byte, body []byte) bool {
	var except []byte // a portal's own Execute runs nothing else
	switch typ {
	case 'B', 'S':
	case 'E':
		except, _, _ = cbytes(body)
		except = nameKey(except)
	case 'C':
		if len(body) < 2 || body[0] != 'P' {
			return false
		}
		except, _, _ = cbytes(body[1:])
		except = nameKey(except)
	case 'Q', 'F':
		// Not in a segment of the extended protocol: a record that failed
		// would make the server skip this message until a Sync that will
		// not come. These portals stay without a record.
		clear(t.unrecorded)
		t.unrecorded = t.unrecorded[:0]
		return false
	default:
		return false
	}
	if typ == 'S' && t.copyIgnoring > 0 && t.copies == t.copyIgnoring-1 {
		return false
	}
	b := t.rewrite[:0]
	kept := t.unrecorded[:0]
	for _, pi := range t.unrecorded {
		if pi.name == string(except) {
			if typ == 'E' {
				kept = append(kept, pi)
			}
			continue
		}
		if t.skipping {
			continue // the server discards it: the segment failed
		}
		b = appendGuardParse(b, recordSQL, 0, 1, 0, 0, 0, 25)
		b = append(b, 'B')
		b = binary.BigEndian.AppendUint32(b, uint32(4+2*(len(guardName)+1)+2+2+4+len(pi.name)+4))
		b = append(b, guardName...)
		b = append(b, 0)
		b = append(b, guardName...)
		b = append(b, 0, 0, 0, 0, 1)
		b = binary.BigEndian.AppendUint32(b, uint32(len(pi.name)))
		b = append(b, pi.name...)
		b = append(b, 0, 1, 0, 1) // the result in binary
		b = append(b, executeGuard...)
		b = append(b, closeGuardPortal...)
		pi.recordID = t.pushGuard(injRecord, pi)
	}
	for i := len(kept); i < len(t.unrecorded); i++ {
		t.unrecorded[i] = nil
	}
	t.unrecorded = kept
	if len(b) == 0 {
		return false
	}
	t.rewrite, t.before = b, true
	return true
}

// recordRow takes a record's DataRow: one binary timestamptz. Called with
// mu held.
func recordRow(pi *portalInfo, body []byte) {
	if len(body) == 2+4+8 && binary.BigEndian.Uint16(body) == 1 && binary.BigEndian.Uint32(body[2:]) == 8 {
		pi.created = int64(binary.BigEndian.Uint64(body[6:]))
		pi.recorded = true
	}
}
