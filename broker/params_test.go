package broker

import (
	"maps"
	"testing"
)

func TestFilterParams(t *testing.T) {
	for _, tc := range []struct {
		name  string
		in    map[string]string
		out   map[string]string
		claim string
		code  string
	}{
		{"every GUC forwarded",
			map[string]string{"user": "u", "database": "d", "default_transaction_read_only": "on", "statement_timeout": "1ms", "nosuch": "x", "application_name": "a"},
			map[string]string{"default_transaction_read_only": "on", "statement_timeout": "1ms", "nosuch": "x", "application_name": "a"}, "", ""},
		{"replication off is not forwarded", map[string]string{"user": "u", "replication": "false"}, map[string]string{}, "", ""},
		{"replication refused", map[string]string{"user": "u", "replication": "database"}, nil, "", CodeInvalidAuthorization},
		{"role", map[string]string{"user": "u", "role": "x"}, nil, "", CodeInsufficientPriv},
		{"Role any case", map[string]string{"user": "u", "Role": "x"}, nil, "", CodeInsufficientPriv},
		{"session_authorization", map[string]string{"user": "u", "session_authorization": "x"}, nil, "", CodeInsufficientPriv},
		{"claim as parameter", map[string]string{"user": "u", "pgward.principal": "p"}, map[string]string{}, "p", ""},
		{"same claim twice", map[string]string{"user": "u", "pgward.principal": "p", "options": "-c pgward.principal=p"}, map[string]string{}, "p", ""},
		{"two claims", map[string]string{"user": "u", "pgward.principal": "p", "options": "-c pgward.principal=q"}, nil, "", CodeProtocolViolation},
		{"other pgward.*", map[string]string{"user": "u", "pgward.x": "1"}, nil, "", CodeUndefinedObject},
		{"other pgward.* in options", map[string]string{"user": "u", "options": "-c pgward.x=1"}, nil, "", CodeUndefinedObject},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, claim, cerr := filterParams(tc.in)
			if tc.code != "" {
				if cerr == nil || cerr.Code != tc.code {
					t.Fatalf("refusal %v, want %s", cerr, tc.code)
				}
				return
			}
			if cerr != nil {
				t.Fatalf("refused: %v", cerr)
			}
			if !maps.Equal(out, tc.out) || claim != tc.claim {
				t.Errorf("got %v claim %q, want %v claim %q", out, claim, tc.out, tc.claim)
			}
		})
	}
}
