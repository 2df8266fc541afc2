package broker

import (
	"strings"
	"testing"
)

func TestParseSQLEffects(t *testing.T) {
	long := strings.Repeat("x", 70)
	for _, tc := range []struct {
		sql  string
		want []sqlEffect
	}{
		{"SELECT 1", nil},
		{"select 'prepare s1 as x'", nil},
		{"PREPARE s1 AS SELECT 1", []sqlEffect{{effPrepare, "s1"}}},
		{"prepare S1 (int, text) as select $1", []sqlEffect{{effPrepare, "s1"}}},
		{`PREPARE "S1" AS SELECT 1`, []sqlEffect{{effPrepare, "S1"}}},
		{`PREPARE "a""b" AS SELECT 1`, []sqlEffect{{effPrepare, `a"b`}}},
		{"/* c /* nested */ */ -- x\n PREPARE s2 AS SELECT ';'; DEALLOCATE s1", []sqlEffect{{effPrepare, "s2"}, {effDeallocate, "s1"}}},
		{"SELECT $$; PREPARE x AS SELECT 1$$; DEALLOCATE PREPARE s3", []sqlEffect{{effDeallocate, "s3"}}},
		{"SELECT $tag$ $$ ; $tag$; deallocate all", []sqlEffect{{effDeallocAll, ""}}},
		{"SELECT E'\\'; PREPARE no AS SELECT 1'; DISCARD ALL", []sqlEffect{{effDiscardAll, ""}}},
		{"DISCARD PLANS", nil},
		{"DECLARE c1 CURSOR FOR SELECT 1; CLOSE c1; CLOSE ALL", []sqlEffect{{effDeclare, "c1"}, {effClose, "c1"}, {effCloseAll, ""}}},
		{"PREPARE " + long + " AS SELECT 1", []sqlEffect{{effPrepare, long[:63]}}},
		{"SELECT 1; SELECT 2", nil},
	} {
		e := parseSQLEffects([]byte(tc.sql))
		var got []sqlEffect
		if e != nil {
			got = e.list
			if e.src != tc.sql {
				t.Errorf("%q: src %q", tc.sql, e.src)
			}
		}
		if len(got) != len(tc.want) {
			t.Errorf("%q: %+v, want %+v", tc.sql, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("%q: %+v, want %+v", tc.sql, got, tc.want)
			}
		}
	}
}

// FuzzSQLEffects: any query text is read without panicking, in one pass.
func FuzzSQLEffects(f *testing.F) {
	for _, s := range []string{"PREPARE s1 AS SELECT 1", "SELECT $a$;$a$; DEALLOCATE x", "/* /* */", "E'\\", `"`, "$", "(((", "declare c cursor for select 1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e := parseSQLEffects([]byte(s))
		if e != nil && len(e.list) > strings.Count(s, ";")+1 {
			t.Fatalf("%d effects from %d statements", len(e.list), strings.Count(s, ";")+1)
		}
	})
}
