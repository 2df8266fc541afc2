package secrets

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/testenv"
)

func indent(pem []byte) string {
	return "      " + strings.ReplaceAll(strings.TrimSpace(string(pem)), "\n", "\n      ")
}

// A client certificate in the file backend, inline or from files: parsed,
// handed out with the credential, rotated when its files change, and never
// printed with its key.
func TestFileClientCert(t *testing.T) {
	ca, err := testenv.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	certA, keyA, _ := ca.IssueClient("inline_role")
	certB, keyB, _ := ca.IssueClient("file_role")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "b.crt"), certB, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "b.key"), keyB, 0o640); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "secrets.yaml")
	body := "orders:\n  inline_role:\n    cert: |\n" + indent(certA) + "\n    key: |\n" + indent(keyA) +
		"\n  file_role: { cert_file: b.crt, key_file: " + filepath.Join(dir, "b.key") + " }\n"
	writeSecrets(t, path, body, 0o600)
	if _, err := NewFile(FileConfig{Path: path}, nil); err == nil || !strings.Contains(err.Error(), "orders.file_role: key_file") || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("group-readable key file accepted: %v", err)
	}
	if err := os.Chmod(filepath.Join(dir, "b.key"), 0o600); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	f, err := NewFile(FileConfig{Path: path}, slog.New(slog.NewJSONHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for role, want := range map[string][]byte{"inline_role": keyA, "file_role": keyB} {
		c, err := f.Fetch(ctx, "orders", role)
		if err != nil {
			t.Fatal(err)
		}
		if c.Cert == nil || c.Cert.CommonName != role || !c.Password.Empty() {
			t.Fatalf("%s: credential %v", role, c)
		}
		slog.New(slog.NewJSONHandler(&logs, nil)).Info("x", "cred", c, "cert", c.Cert)
		j, _ := json.Marshal(c)
		out := fmt.Sprintf("%v %+v %#v %s", c, c, c.Cert, c.Cert) + string(j) + logs.String()
		keyBody := strings.Split(string(want), "\n")[1]
		if strings.Contains(out, keyBody) {
			t.Fatalf("%s: the private key was printed", role)
		}
		if !strings.Contains(out, "CN=") {
			t.Fatalf("%s: the certificate's public facts are not printed: %s", role, out)
		}
	}

	// Rotation: a new certificate in the same files is picked up.
	certC, keyC, _ := ca.IssueClient("file_role")
	time.Sleep(10 * time.Millisecond) // a new mtime
	if err := os.WriteFile(filepath.Join(dir, "b.crt"), certC, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "b.key"), keyC, 0o600); err != nil {
		t.Fatal(err)
	}
	now := time.Now().Add(2 * time.Second)
	f.now = func() time.Time { return now }
	c, err := f.Fetch(ctx, "orders", "file_role")
	if err != nil {
		t.Fatal(err)
	}
	want, _ := ParseClientCert(certC, keyC)
	if c.Cert.Serial != want.Serial {
		t.Fatalf("after rotation: serial %s, want %s", c.Cert.Serial, want.Serial)
	}

	// Bad entries name the key.
	for _, tc := range []struct{ body, want string }{
		{"orders:\n  r: { cert_file: b.crt }\n", "orders.r: cert_file and key_file go together"},
		{"orders:\n  r: { cert: x, key: y, cert_file: b.crt, key_file: b.key }\n", "not both"},
		{"orders:\n  r: { cert: \"not pem\", key: \"not pem\" }\n", "orders.r: client certificate and key"},
		{"orders:\n  r: { user: u }\n", "orders.r: password is empty"},
	} {
		writeSecrets(t, path, tc.body, 0o600)
		if _, err := NewFile(FileConfig{Path: path}, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.body, err, tc.want)
		}
	}
}
