package broker

import (
	"testing"
)

// RFC 7677 §3's example exchange, and the cache: the second login with the
// same (password, salt, iterations) derives nothing.
func TestSCRAMRFC7677(t *testing.T) {
	cache := newScramKeyCache()
	for i := range 2 {
		sc, err := newSCRAMClient(cache, "pencil", false, nil, false)
		if err != nil {
			t.Fatal(err)
		}
		sc.clientNonce = []byte("rOprNGfwEbeRWgbNEkqO")
		sc.clientFirst = []byte("n=user,r=rOprNGfwEbeRWgbNEkqO")
		misses := cache.misses
		final, err := sc.final([]byte("r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"))
		if err != nil {
			t.Fatal(err)
		}
		want := "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
		if string(final) != want {
			t.Fatalf("client-final\n got %s\nwant %s", final, want)
		}
		if err := sc.verify([]byte("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")); err != nil {
			t.Fatal(err)
		}
		if err := sc.verify([]byte("v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")); err == nil {
			t.Fatal("a wrong server signature verified")
		}
		if i == 1 && cache.misses != misses {
			t.Error("second login derived the keys again")
		}
	}
}

func TestSCRAMRefusesBadServerFirst(t *testing.T) {
	for _, sf := range []string{
		"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", // nonce not ours
		"r=NONCEx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",         // no iterations
		"r=NONCEx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999",  // too many
		"r=NONCEx,s=,i=4096",                              // no salt
		"r=NONCE,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",       // nonce not extended
	} {
		sc, _ := newSCRAMClient(nil, "pencil", false, nil, false)
		sc.clientNonce = []byte("NONCE")
		if _, err := sc.final([]byte(sf)); err == nil {
			t.Errorf("server-first %q accepted", sf)
		}
	}
}

func BenchmarkSCRAMLogin(b *testing.B) {
	b.Run("cached", func(b *testing.B) {
		cache := newScramKeyCache()
		for b.Loop() {
			sc, _ := newSCRAMClient(cache, "pencil", false, nil, false)
			if _, err := sc.final(append(append([]byte("r="), sc.clientNonce...), "xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"...)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("uncached", func(b *testing.B) {
		for b.Loop() {
			sc, _ := newSCRAMClient(nil, "pencil", false, nil, false)
			if _, err := sc.final(append(append([]byte("r="), sc.clientNonce...), "xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"...)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// The derived keys belong to the upstream that used them: another upstream
// (or the same one rebuilt by a reload) derives its own.
func TestSCRAMCachePerUpstream(t *testing.T) {
	a, err := newUpstream("a", UpstreamConfig{Address: "/run/pg/.s.PGSQL.5432"})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := newUpstream("a", UpstreamConfig{Address: "/run/pg/.s.PGSQL.5432"})
	salt := []byte("0123456789abcdef")
	for _, c := range []*scramKeyCache{a.scram, a.scram, b.scram} {
		if _, err := c.keys([]byte("pencil"), salt, 4096); err != nil {
			t.Fatal(err)
		}
	}
	if a.scram.misses != 1 || a.scram.hits != 1 || b.scram.misses != 1 || b.scram.hits != 0 {
		t.Fatalf("a: %d misses %d hits; b: %d misses %d hits", a.scram.misses, a.scram.hits, b.scram.misses, b.scram.hits)
	}
}
