package broker

import (
	"reflect"
	"testing"
)

func TestPolicyAuthorize(t *testing.T) {
	principals := map[string]Principal{
		"billing":  {Match: Selectors{UID: []uint32{1001}, SystemdUnit: StringList{"billing.service"}}},
		"reports":  {Match: Selectors{GID: []uint32{2000}}},
		"psql":     {Match: Selectors{Exe: StringList{"/usr/bin/psql*"}}},
		"ops":      {Match: Selectors{User: StringList{"alice", "bob"}, Comm: StringList{"psql"}}},
		"web":      {Match: Selectors{Cgroup: StringList{"/system.slice/web-*.scope"}}},
		"k8s-api":  {Match: Selectors{K8sNamespace: StringList{"shop"}, K8sLabels: map[string]string{"app": "api"}}},
		"ctr":      {Match: Selectors{ContainerID: StringList{"0123456789ab"}}},
		"anything": {Match: Selectors{UID: []uint32{1001, 2002}}},
	}
	grants := []Grant{
		{Principal: "billing", Upstream: "orders", Roles: []string{"orders_rw"}},
		{Principal: "reports", Upstream: "orders", Roles: []string{"orders_ro"}},
		{Principal: "psql", Upstream: "orders", Roles: []string{"orders_ro"}},
		{Principal: "ops", Upstream: "orders", Roles: []string{"*"}},
		{Principal: "web", Upstream: "shop", Roles: []string{"web"}},
		{Principal: "k8s-api", Upstream: "shop", Roles: []string{"api"}},
		{Principal: "ctr", Upstream: "shop", Roles: []string{"ctr"}},
	}
	p := NewPolicy(principals, grants)
	billing := Identity{UID: 1001, GID: 1001, SystemdUnit: "billing.service", Exe: "/usr/bin/billing"}
	tests := []struct {
		name           string
		id             Identity
		upstream, role string
		claim          string
		want           Decision
	}{
		{"uid and unit", billing, "orders", "orders_rw", "",
			Decision{Allowed: true, Principal: "billing", Matched: []string{"anything", "billing"}}},
		{"uid without unit", Identity{UID: 1001}, "orders", "orders_rw", "",
			Decision{Matched: []string{"anything"}}},
		{"wrong role", billing, "orders", "orders_ro", "",
			Decision{Matched: []string{"anything", "billing"}}},
		{"wrong upstream", billing, "shop", "orders_rw", "",
			Decision{Matched: []string{"anything", "billing"}}},
		{"gid", Identity{UID: 5, GID: 2000}, "orders", "orders_ro", "",
			Decision{Allowed: true, Principal: "reports", Matched: []string{"reports"}}},
		{"exe glob", Identity{UID: 5, Exe: "/usr/bin/psql"}, "orders", "orders_ro", "",
			Decision{Allowed: true, Principal: "psql", Matched: []string{"psql"}}},
		{"exe unknown never matches", Identity{UID: 5}, "orders", "orders_ro", "",
			Decision{}},
		{"user and comm wildcard role", Identity{UID: 7, User: "bob", Comm: "psql"}, "orders", "anything_at_all", "",
			Decision{Allowed: true, Principal: "ops", Matched: []string{"ops"}}},
		{"user without comm", Identity{UID: 7, User: "bob", Comm: "bash"}, "orders", "x", "",
			Decision{}},
		{"cgroup glob", Identity{Cgroup: "/system.slice/web-1.scope"}, "shop", "web", "",
			Decision{Allowed: true, Principal: "web", Matched: []string{"web"}}},
		{"pod labels", Identity{Pod: &Pod{Namespace: "shop", Labels: map[string]string{"app": "api", "x": "y"}}}, "shop", "api", "",
			Decision{Allowed: true, Principal: "k8s-api", Matched: []string{"k8s-api"}}},
		{"pod wrong label", Identity{Pod: &Pod{Namespace: "shop", Labels: map[string]string{"app": "web"}}}, "shop", "api", "",
			Decision{}},
		{"no pod", Identity{}, "shop", "api", "", Decision{}},
		{"container short id", Identity{ContainerID: "0123456789abcdef"}, "shop", "ctr", "",
			Decision{Allowed: true, Principal: "ctr", Matched: []string{"ctr"}}},
		{"claim matches", billing, "orders", "orders_rw", "billing",
			Decision{Allowed: true, Principal: "billing", Matched: []string{"anything", "billing"}, ClaimAttempted: true}},
		{"claim restricts to a principal without the grant", billing, "orders", "orders_rw", "anything",
			Decision{Matched: []string{"anything", "billing"}, ClaimAttempted: true}},
		{"claim not matching", Identity{UID: 2002}, "orders", "orders_rw", "billing",
			Decision{Matched: []string{"anything"}, ClaimAttempted: true, ClaimFailed: true}},
		{"claim undefined", billing, "orders", "orders_rw", "nope",
			Decision{Matched: []string{"anything", "billing"}, ClaimAttempted: true, ClaimFailed: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := p.Authorize(tt.id, tt.upstream, tt.role, tt.claim)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Authorize = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	good := Config{
		Upstreams:  map[string]UpstreamConfig{"orders": {Address: "db:5432", TLS: TLSConfig{Mode: "verify-full", CAFile: "/ca.pem"}}},
		Principals: map[string]Principal{"b": {Match: Selectors{UID: []uint32{1}}}},
		Grants:     []Grant{{Principal: "b", Upstream: "orders", Roles: []string{"r"}}},
	}
	if err := good.Validate(); err != nil {
		t.Fatalf("good config: %v", err)
	}
	bad := Config{
		Listen: ListenConfig{UnixDir: "rel", Mode: "999", TCP: "10.0.0.1:5432"},
		Upstreams: map[string]UpstreamConfig{
			"a": {Address: "nohostport", Auth: []string{"none"}}, // trust is a method now (certauth.go)
			"b": {Address: "db:5432", TLS: TLSConfig{Mode: "maybe"}},
			"c": {Address: "db:5432"}, // verify-full default without CA
		},
		Principals: map[string]Principal{"empty": {}},
		Grants:     []Grant{{Principal: "ghost", Upstream: "nope"}},
	}
	err := bad.Validate()
	if err == nil {
		t.Fatal("bad config validated")
	}
	for _, want := range []string{
		"listen.unix_dir", "listen.mode", "listen.tcp", "upstreams.a.address", "upstreams.a.auth[0]",
		"upstreams.b.tls.mode", "upstreams.c.tls.ca_file", "principals.empty.match",
		"grants[0].principal", "grants[0].upstream", "grants[0].roles",
	} {
		if !containsLine(err.Error(), want+":") {
			t.Errorf("missing problem %q in:\n%v", want, err)
		}
	}
}

func containsLine(s, prefix string) bool {
	for len(s) > 0 {
		line := s
		if i := indexByte(s, '\n'); i >= 0 {
			line, s = s[:i], s[i+1:]
		} else {
			s = ""
		}
		if len(line) >= len(prefix) && line[:len(prefix)] == prefix {
			return true
		}
	}
	return false
}

func indexByte(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == c {
			return i
		}
	}
	return -1
}
