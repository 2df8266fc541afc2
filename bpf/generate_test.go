package bpf

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"testing"
)

// TestGeneratedUpToDate fails when connect.c or pgward.h changed after the
// committed objects were generated: run `make generate` (go generate ./bpf/).
// File times do not survive a clone, so go generate records the sources'
// checksum in sum_generated.go.
func TestGeneratedUpToDate(t *testing.T) {
	h := sha256.New()
	for _, name := range []string{"connect.c", "pgward.h"} {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		h.Write(b)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != sourceSHA256 {
		t.Errorf("connect.c and pgward.h have SHA-256 %s, the generated objects were built from %s: run `make generate`", got, sourceSHA256)
	}
	if len(_ConnectBytes) == 0 {
		t.Error("no embedded object")
	}
}
