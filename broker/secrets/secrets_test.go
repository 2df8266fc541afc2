package secrets

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const canary = "canary-hunter2-Zq9"

func TestSecretNeverPrints(t *testing.T) {
	s := NewSecret(canary)
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("x", "secret", s, "cred", Credential{Password: s})
	j, _ := json.Marshal(Credential{Password: s})
	out := fmt.Sprintf("%v %+v %#v %s %q %x", s, s, s, s, s, s) + fmt.Sprint(Credential{Password: s}) + string(j) + logs.String()
	if strings.Contains(out, canary) {
		t.Fatalf("secret printed: %s", out)
	}
	if s.Reveal() != canary {
		t.Fatal("Reveal lost the value")
	}
}

func writeSecrets(t *testing.T, path, body string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path+".tmp", []byte(body), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path+".tmp", mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
}

func TestFileBackend(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "secrets.yaml")
	writeSecrets(t, path, "orders:\n  orders_rw: { password: "+canary+" }\n  other: { user: real_login, password: p2 }\n", 0o644)
	if _, err := NewFile(FileConfig{Path: path}, nil); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable file accepted: %v", err)
	}
	writeSecrets(t, path, "orders:\n  orders_rw: { password: "+canary+" }\n  other: { user: real_login, password: p2 }\n", 0o600)
	var logs bytes.Buffer
	f, err := NewFile(FileConfig{Path: path}, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	f.now = func() time.Time { return now }
	ctx := context.Background()
	c, err := f.Fetch(ctx, "orders", "orders_rw")
	if err != nil || c.Password.Reveal() != canary || c.User != "" {
		t.Fatalf("fetch: %+v %v", c, err)
	}
	c, _ = f.Fetch(ctx, "orders", "other")
	if c.User != "real_login" {
		t.Fatalf("user: %q", c.User)
	}
	if _, err := f.Fetch(ctx, "orders", "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing role: %v", err)
	}

	// A change is picked up after the check interval.
	writeSecrets(t, path, "orders:\n  orders_rw: { password: newpass }\n", 0o600)
	now = now.Add(2 * time.Second)
	if c, _ := f.Fetch(ctx, "orders", "orders_rw"); c.Password.Reveal() != "newpass" {
		t.Fatal("changed file not reloaded")
	}
	// An invalid change keeps the last good content, and says so without the value.
	writeSecrets(t, path, "orders:\n  orders_rw: { password: "+canary+", bogus: 1 }\n", 0o600)
	now = now.Add(2 * time.Second)
	if c, _ := f.Fetch(ctx, "orders", "orders_rw"); c.Password.Reveal() != "newpass" {
		t.Fatal("invalid file replaced good content")
	}
	if !strings.Contains(logs.String(), "invalid") || strings.Contains(logs.String(), canary) {
		t.Fatalf("log: %s", logs.String())
	}
	// A malformed value is reported without quoting it.
	writeSecrets(t, path, "orders:\n  orders_rw: [ "+canary+" ]\n", 0o600)
	if err := f.Reload(); err == nil || strings.Contains(err.Error(), canary) {
		t.Fatalf("reload error: %v", err)
	}
}

func TestEnvBackend(t *testing.T) {
	e := NewEnv(EnvConfig{})
	env := map[string]string{"PGWARD_SECRET_ORDERS_ORDERS_RW": canary}
	e.lookup = func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	if got := e.VarName("orders", "orders-rw"); got != "PGWARD_SECRET_ORDERS_ORDERS_RW" {
		t.Fatalf("var name %q", got)
	}
	c, err := e.Fetch(context.Background(), "orders", "orders_rw")
	if err != nil || c.Password.Reveal() != canary {
		t.Fatalf("%v %v", c, err)
	}
	if _, err := e.Fetch(context.Background(), "orders", "x"); !errors.Is(err, ErrNotFound) || strings.Contains(err.Error(), canary) {
		t.Fatalf("missing: %v", err)
	}
}
