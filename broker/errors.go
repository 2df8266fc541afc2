package broker

import (
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// SQLSTATEs pgward sends.
const (
	CodeInvalidAuthorization = "28000" // no grant, identity failure, claim mismatch
	CodeInvalidPassword      = "28P01" // upstream rejected the stored credential
	CodeUnknownDatabase      = "3D000"
	CodeCannotConnect        = "08001" // upstream unreachable, backend unavailable
	CodeConnectionFailure    = "08006"
	CodeProtocolViolation    = "08P01"
	CodeTooManyConnections   = "53300"
	CodeInsufficientPriv     = "42501"
	CodeUndefinedObject      = "42704" // an unknown pgward.* startup parameter
	CodeIOError              = "58030" // audit log unavailable
	CodeAdminShutdown        = "57P01"
	CodeFeatureNotSupported  = "0A000"
	CodeProgramLimitExceeded = "54000" // a message over limits.max_message_bytes
)

// ClientError is a refusal the client sees: an ErrorResponse with our own
// SQLSTATE and message, never internal or upstream text that could hold a secret.
type ClientError struct {
	Code    string
	Message string
	Detail  string
	Hint    string
	Reason  FailureReason // metric label; empty when not an auth failure
}

func (e *ClientError) Error() string { return e.Code + ": " + e.Message }

func refuse(code string, reason FailureReason, msg, hint string) *ClientError {
	return &ClientError{Code: code, Message: msg, Hint: hint, Reason: reason}
}

// sendError writes a FATAL ErrorResponse to c, bounded in time. The caller closes c.
func sendError(c net.Conn, e *ClientError) {
	buf, err := (&pgproto3.ErrorResponse{
		Severity:            "FATAL",
		SeverityUnlocalized: "FATAL",
		Code:                e.Code,
		Message:             e.Message,
		Detail:              e.Detail,
		Hint:                e.Hint,
	}).Encode(nil)
	if err != nil {
		return
	}
	_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, _ = c.Write(buf)
}

// serverError is an ErrorResponse of the upstream server, kept whole so
// that the ones a client may see (see clientErrorFor) reach it as the
// server sent them.
type serverError struct {
	Code, Message, Detail, Hint string
	Fatal                       bool
}

func (e *serverError) Error() string { return "server error (SQLSTATE " + e.Code + ")" }

// newServerError decodes an ErrorResponse body.
func newServerError(body []byte) *serverError {
	var m pgproto3.ErrorResponse
	if err := m.Decode(body); err != nil {
		code, msg := errorFields(body)
		return &serverError{Code: code, Message: msg, Fatal: fatalError(body)}
	}
	sev := m.SeverityUnlocalized
	if sev == "" {
		sev = m.Severity
	}
	return &serverError{Code: m.Code, Message: m.Message, Detail: m.Detail, Hint: m.Hint, Fatal: sev == "FATAL" || sev == "PANIC"}
}

// fatalError reports whether an ErrorResponse body ends the session
// (severity FATAL or PANIC), so the server has told the client why it closes.
func fatalError(body []byte) bool {
	for len(body) > 0 && body[0] != 0 {
		t := body[0]
		v, rest, ok := cbytes(body[1:])
		if !ok {
			return false
		}
		if t == 'V' || t == 'S' {
			return string(v) == "FATAL" || string(v) == "PANIC"
		}
		body = rest
	}
	return false
}

// errorFields returns the SQLSTATE and message of an ErrorResponse body.
func errorFields(body []byte) (code, msg string) {
	for len(body) > 0 && body[0] != 0 {
		t := body[0]
		v, rest, ok := cstring(body[1:])
		if !ok {
			break
		}
		switch t {
		case 'C':
			code = v
		case 'M':
			msg = v
		}
		body = rest
	}
	return code, msg
}

// SQLSTATEs of verified execution (verify.go).
const (
	CodeInvalidSQLStatementName = "26000"
	CodeReservedName            = "42939"
	CodeInvalidCursorName       = "34000" // a portal replaced or closed inside the server
)
