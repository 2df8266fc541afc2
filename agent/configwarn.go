package agent

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"

	"gopkg.in/yaml.v3"

	"github.com/pgward/pgward/broker"
)

// What the agent says at WARN about its configuration when it starts is
// also what `pgward check-config` prints as warnings: the broker's
// (broker.Config.Warnings: deprecated keys, upstreams with auth [trust]),
// the agent's own (startWarnings), and what the secrets backends say at
// WARN when they are opened (a client certificate that expires soon, a
// Vault login that failed), recorded from the same code path.

// uncheckpointedWarning is said at start, and by check-config, when
// audit.checkpoint.key is not set.
const uncheckpointedWarning = "the audit trail is unkeyed, so a file cut at a line boundary, extended or re-chained still verifies"

// startWarnings are the warnings New logs about cfg itself, as
// *broker.FieldError.
func (c *Config) startWarnings() []error {
	out := c.Config.Warnings()
	if c.Audit.Checkpoint.Key == nil {
		out = append(out, &broker.FieldError{Path: "audit.checkpoint.key",
			Err: errors.New("is not set, so audit checkpoints are off: " + uncheckpointedWarning)})
	}
	return out
}

// backendAttr names the secrets backend on what preflight records.
const backendAttr = "secrets_backend"

// warnRecorder is a slog.Handler that keeps the WARN and ERROR records,
// as "message (key=value, …)", with the secrets backend they came from.
type warnRecorder struct {
	mu    *sync.Mutex
	recs  *[]recordedWarn
	attrs []slog.Attr
}

type recordedWarn struct{ backend, text string }

func newWarnRecorder() *warnRecorder {
	return &warnRecorder{mu: &sync.Mutex{}, recs: &[]recordedWarn{}}
}

func (h *warnRecorder) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }

func (h *warnRecorder) Handle(_ context.Context, r slog.Record) error {
	var backend string
	var kv []string
	add := func(a slog.Attr) bool {
		if a.Key == backendAttr {
			backend = a.Value.String()
			return true
		}
		kv = append(kv, a.Key+"="+a.Value.String())
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	text := r.Message
	if len(kv) > 0 {
		text += " (" + strings.Join(kv, ", ") + ")"
	}
	h.mu.Lock()
	*h.recs = append(*h.recs, recordedWarn{backend, text})
	h.mu.Unlock()
	return nil
}

func (h *warnRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	return &warnRecorder{mu: h.mu, recs: h.recs, attrs: append(slices.Clone(h.attrs), as...)}
}

func (h *warnRecorder) WithGroup(string) slog.Handler { return h }

// problems returns cfg's start warnings and what was recorded, with the
// lines of their keys in root, in file order.
func (h *warnRecorder) problems(cfg *Config, root *yaml.Node, name string) []string {
	ps := toProblems(errors.Join(cfg.startWarnings()...), root, name, nil)
	h.mu.Lock()
	for _, r := range *h.recs {
		path := "secrets"
		if r.backend != "" {
			path += "." + r.backend
		}
		ps = append(ps, &Problem{File: name, Line: lineOf(root, path), Path: path, Msg: r.text})
	}
	h.mu.Unlock()
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Line < ps[j].Line })
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.Error()
	}
	return out
}
