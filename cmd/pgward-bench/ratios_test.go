package main

import "testing"

func TestRoundRatios(t *testing.T) {
	rs := []result{{tps: 80}, {tps: 120}, {tps: 90}}
	bouncer := []result{{tps: 100}, {tps: 100}, {tps: 60}}
	lo, hi, ok := roundRatios(rs, bouncer)
	// Each round against its own PgBouncer run: 0.8, 1.2, 1.5 — not the
	// ratio of the medians (90/100).
	if !ok || lo != 0.8 || hi != 1.5 {
		t.Errorf("roundRatios = %v, %v, %v; want 0.8, 1.5, true", lo, hi, ok)
	}
	for name, b := range map[string][]result{
		"a round missing":  bouncer[:2],
		"no PgBouncer tps": {{tps: 100}, {tps: 0}, {tps: 60}},
	} {
		if _, _, ok := roundRatios(rs, b); ok {
			t.Errorf("%s: ok, want no ratios", name)
		}
	}
	if _, _, ok := roundRatios(nil, nil); ok {
		t.Error("no rounds: ok, want no ratios")
	}
}
