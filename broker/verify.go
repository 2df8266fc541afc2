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
