package broker

import "testing"

func TestRoleChange(t *testing.T) {
	for _, tc := range []struct {
		text string
		want bool
	}{
		{"select 1", false},
		{"SET ROLE other", true},
		{"set role = 'other'", true},
		{"SeT LoCaL RoLe other", true},
		{"set session role other", true},
		{"SET SESSION AUTHORIZATION bob", true},
		{"set local session authorization default", true},
		{"set session_authorization = bob", true},
		{`SET "role" TO other`, true},
		{`set "ROLE" to other`, true},
		{"RESET ROLE", true},
		{"reset session authorization", true},
		{"DISCARD ALL", true},
		{"discard plans", false},
		{"/* set role x */ select 1", false},
		{"/* outer /* nested */ still comment */ SET ROLE x", true},
		{"-- set role x\nselect 1", false},
		{"select 1; set role x", true},
		{"begin; set local role x; insert into t values (1); commit", true},
		{"select 'set role x'", false},
		{"update t set role = 'x'", false},
		{"select set_config('role', 'x', false)", true},
		{"SELECT pg_catalog.SET_CONFIG('ROLE', 'x', false)", true},
		{"select set_config('session_authorization', 'x', false)", true},
		{"select set_config('search_path', 'x', false)", false},
		{"select set_config('search_path'::text, 'x', false)", false},
		{"select set_config('ro'\n'le', 'x', false)", true},
		{"select set_config('ro' || 'le', 'x', false)", true},
		{"select set_config($1, $2, false)", true},
		{"select set_config(E'\\x72ole', 'x', false)", true},
		{"select set_config(U&'\\0072ole', 'x', false)", true},
		{"select set_config($$role$$, 'x', false)", true},
		{"select set_config($q$search_path$q$, 'x', false)", false},
		{"select set_config(setting_name => 'role', new_value => 'x', is_local => false)", true},
		{"create function f() returns int language sql set role = x as 'select 1'", true},
		{"alter function f() set role to x", true},
		{"do $$ begin set role x; end $$", false}, // a body: not seen (documented)
		{"select 'role'", false},
	} {
		if got := roleChange(tc.text); got != tc.want {
			t.Errorf("roleChange(%q) = %v, want %v", tc.text, got, tc.want)
		}
	}
}

func FuzzRoleChange(f *testing.F) {
	for _, s := range []string{"set role x", "select set_config('role','x',false)", "/* /* */ set role", "$a$ $a", "E'\\", "U&\"x\"", "'a'\n'b'"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		_ = roleChange(s)
	})
}

// BenchmarkRoleChange is what flagging costs per audited statement: the
// common case (no role word) and a statement that needs the lexer.
func BenchmarkRoleChange(b *testing.B) {
	for _, bc := range []struct{ name, text string }{
		{"plain", "SELECT id, total FROM orders WHERE customer_id = $1 AND status = $2"},
		{"set_config", "select set_config('search_path', 'app, public', false)"},
		{"set_role", "/* app */ SET ROLE reporting"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				roleChange(bc.text)
			}
		})
	}
}
