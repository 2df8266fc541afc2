package vault

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"

	"github.com/hashicorp/vault/api"

	"github.com/pgward/pgward/broker/secrets"
)

// Error is a failed Vault operation. Its message names the operation, the
// Vault path and what Vault (or the network) said — never a secret or a
// token. It unwraps to one of secrets.ErrUnavailable, ErrDenied or
// ErrNotFound, and to the underlying cause.
type Error struct {
	Op     string // such as "read kv", "issue database credentials", "log in"
	Path   string // the Vault API path, such as secret/data/orders/rw
	Status int    // HTTP status, 0 when there was no answer
	Detail string // what went wrong, from Vault's errors list or the network
	Kind   error  // secrets.ErrUnavailable, ErrDenied or ErrNotFound
	cause  error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("vault ")
	b.WriteString(e.Op)
	if e.Path != "" {
		b.WriteString(" ")
		b.WriteString(e.Path)
	}
	b.WriteString(": ")
	if e.Detail != "" {
		b.WriteString(e.Detail)
		if e.Status != 0 {
			fmt.Fprintf(&b, " (HTTP %d)", e.Status)
		}
		b.WriteString(": ")
	}
	b.WriteString(e.Kind.Error())
	return b.String()
}

// Unwrap returns the kind sentinel and the cause.
func (e *Error) Unwrap() []error {
	if e.cause == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.cause}
}

// classify turns an error from the Vault client into an *Error. The cause is
// kept for errors.Is/As, but the message is built here from parts that
// cannot hold a secret.
func classify(op, path string, err error) *Error {
	var ve *Error
	if errors.As(err, &ve) {
		return ve
	}
	e := &Error{Op: op, Path: path, Kind: secrets.ErrUnavailable, cause: err}
	var re *api.ResponseError
	switch {
	case errors.As(err, &re):
		e.Status = re.StatusCode
		e.Detail = vaultErrors(re)
		switch {
		case re.StatusCode == http.StatusForbidden:
			e.Kind = secrets.ErrDenied
		case re.StatusCode == http.StatusNotFound:
			e.Kind = secrets.ErrNotFound
			if e.Detail == "" {
				e.Detail = "no secret at this path"
			}
		case re.StatusCode == http.StatusBadRequest:
			// Vault answers 400 for an unknown role or lease, and for
			// invalid login credentials.
			e.Kind = secrets.ErrNotFound
			if strings.HasPrefix(op, "log in") {
				e.Kind = secrets.ErrDenied
			}
		}
		if e.Detail == "" {
			e.Detail = strings.ToLower(http.StatusText(re.StatusCode))
		}
	case errors.Is(err, api.ErrSecretNotFound):
		e.Kind = secrets.ErrNotFound
		e.Detail = "no secret at this path"
	case errors.Is(err, context.DeadlineExceeded):
		e.Detail = "timed out"
	case errors.Is(err, context.Canceled):
		e.Detail = "canceled"
	case errors.Is(err, os.ErrNotExist), errors.Is(err, os.ErrPermission):
		e.Detail = "cannot read credential file"
		var pe *os.PathError
		if errors.As(err, &pe) {
			e.Detail += " " + pe.Path + ": " + pe.Err.Error()
		}
	default:
		e.Detail = netDetail(err)
	}
	return e
}

// vaultErrors joins Vault's {"errors":[…]} list. Vault's error strings
// describe the request, not secret values. A raw (non-JSON) body, such as a
// proxy's HTML page, is not repeated.
func vaultErrors(re *api.ResponseError) string {
	if re.RawError {
		return ""
	}
	var parts []string
	for _, s := range re.Errors {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if len(s) > 200 {
			s = s[:200] + "…"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

// netDetail shortens a transport error: net/http's messages quote the URL,
// which holds no secret but is long; keep the innermost reason.
func netDetail(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 && i+2 < len(msg) {
		msg = msg[i+2:]
	}
	if msg == "" {
		return "request failed"
	}
	return msg
}
