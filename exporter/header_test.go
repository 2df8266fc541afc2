package exporter

import (
	"regexp"
	"testing"
	"time"

	"github.com/pgward/pgward/broker"
)

// The header encoded once per session must be byte for byte what header
// writes field by field, escaping included.
func TestSessionHeaderMatchesHeader(t *testing.T) {
	s := &broker.SessionInfo{
		RequestID: "4bf92f3577b34da6a3ce929d0e0e4736", SessionID: "sid-\"1\"", Upstream: "orders",
		Database: "orders_db", URI: "/run/pg/.s.PGSQL.5432", User: "app\\user", Principal: "k8s.shop/api",
		Identity: broker.Identity{PID: 42, UID: 1000, GID: 1000, User: "app", Comm: "psql\n", Exe: "/usr/bin/psql",
			Cgroup: "/system.slice/app.service", SystemdUnit: "app.service", StartTime: 7, CgroupID: 9, NSPID: 3,
			Pod: &broker.Pod{Namespace: "shop", Name: "api-0", ServiceAccount: "api", Labels: map[string]string{"b": "2", "a": "1"}}},
	}
	h := newSessionHeader(s)
	now := time.Date(2026, 11, 22, 4, 0, 0, 123, time.UTC)
	uid := regexp.MustCompile(`"uid":"[0-9a-f-]{36}"`)
	for _, ei := range []int64{1, 12345} {
		want := uid.ReplaceAll(header(nil, now, EventQuery, CodeQuery, s, ei, s.RequestID, &s.Identity), []byte(`"uid":"U"`))
		got := uid.ReplaceAll(h.header(nil, now, EventQuery, CodeQuery, s, ei), []byte(`"uid":"U"`))
		if string(got) != string(want) {
			t.Fatalf("cached header\n got %s\nwant %s", got, want)
		}
		var nilH *sessionHeader
		if got := uid.ReplaceAll(nilH.header(nil, now, EventQuery, CodeQuery, s, ei), []byte(`"uid":"U"`)); string(got) != string(want) {
			t.Fatalf("nil sessionHeader\n got %s\nwant %s", got, want)
		}
	}
}
