package exporter

import (
	"context"
	"sync"

	"go.opentelemetry.io/otel/trace/noop"

	"github.com/pgward/pgward/broker"
)

// Tests of the audit trail drive the Observer call by call with a
// SessionInfo in hand, the way the broker did before the Observer handed
// back per-request and per-session objects. These helpers map such calls
// onto the Observer's real shape (Begin → Refused/Started → the session's
// Statements, Result, Cancel, End), keeping each session's object by sid
// for the test: only the test binary has them.

type testKey struct {
	o   *Observer
	sid string
}

var testSessions sync.Map // testKey → *session

// sessionOf returns the session observer of s: the one SessionStart made,
// or one as for a session whose start this Observer did not see (its
// statements are audited with ei counted from 1).
func (o *Observer) sessionOf(s *broker.SessionInfo) *session {
	if st, ok := testSessions.Load(testKey{o, s.SessionID}); ok {
		return st.(*session)
	}
	_, span := noop.NewTracerProvider().Tracer("").Start(context.Background(), "")
	st, _ := testSessions.LoadOrStore(testKey{o, s.SessionID}, &session{o: o, s: s, span: span})
	return st.(*session)
}

// SessionStart is Begin then Started (s.Success) or Refused.
func (o *Observer) SessionStart(ctx context.Context, s *broker.SessionInfo) error {
	ctx, ro := o.Begin(ctx, &broker.Request{RequestID: s.RequestID, Start: s.Start})
	ar := &broker.AuthRequest{RequestID: s.RequestID, Failure: s.Refusal}
	if !s.Success {
		if ar.Failure == "" {
			ar.Failure = broker.ReasonUnauthorized // a denial, unless the test says why
		}
		ro.Refused(ctx, ar, s)
		return nil
	}
	so, err := ro.Started(ctx, ar, s)
	if err != nil {
		return err
	}
	testSessions.Store(testKey{o, s.SessionID}, so.(*session))
	return nil
}

func (o *Observer) Query(ctx context.Context, s *broker.SessionInfo, q *broker.QueryEvent) error {
	return o.sessionOf(s).Statements(ctx, []*broker.QueryEvent{q})
}

func (o *Observer) QueryBatch(ctx context.Context, s *broker.SessionInfo, qs []*broker.QueryEvent) error {
	return o.sessionOf(s).Statements(ctx, qs)
}

func (o *Observer) QueryDone(ctx context.Context, s *broker.SessionInfo, q *broker.QueryEvent) {
	o.sessionOf(s).Result(ctx, q)
}

func (o *Observer) RelayBytes(toUpstream bool, n int) {
	(&session{o: o}).Bytes(toUpstream, n)
}

// SessionCancel is a cancel whose key named c.Session.
func (o *Observer) SessionCancel(ctx context.Context, c *broker.CancelEvent) {
	o.sessionOf(c.Session).Cancel(ctx, c)
}

func (o *Observer) SessionEnd(ctx context.Context, s *broker.SessionInfo) {
	o.sessionOf(s).End(ctx)
	testSessions.Delete(testKey{o, s.SessionID})
}
