package exporter_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/pgward/pgward/testenv"
)

// The example collector configurations of deploy/otelcol are valid for the
// real collector the tests build (testenv/otelcol, which has the components
// they use): `otelcol validate` reads each, resolves its components and
// checks their settings, as the collector does when it starts. The
// Kubernetes example's configuration is the ConfigMap's config.yaml.
func TestDeployCollectorConfigs(t *testing.T) {
	bin, err := testenv.CollectorBinary()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join("..", "deploy", "otelcol")
	names, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, name := range names {
		base := filepath.Base(name)
		t.Run(base, func(t *testing.T) {
			conf := name
			if base == "kubernetes-sidecar.yaml" {
				conf = configMapConfig(t, name)
			}
			cmd := exec.Command(bin, "validate", "--config", conf)
			// The examples read secrets and the node name from the
			// environment.
			cmd.Env = append(os.Environ(), "ELASTIC_API_KEY=test-key", "NODE_NAME=node-a")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("otelcol validate --config %s: %v\n%s", base, err, out)
			}
			checked++
		})
	}
	if checked < 3 {
		t.Fatalf("%d collector configurations validated in %s, want the three examples", checked, dir)
	}
	// A configuration the collector refuses fails: the check can fail.
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	data := mustRead(t, filepath.Join(dir, "otelcol-loki.yaml"))
	data = []byte(strings.Replace(string(data), "send_batch_size:", "send_batch_sise:", 1))
	if err := os.WriteFile(bad, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "validate", "--config", bad).CombinedOutput(); err == nil {
		t.Fatalf("a misspelt key validated:\n%s", out)
	}
}

// configMapConfig writes the config.yaml of the ConfigMap in the
// Kubernetes example to a file and returns its path.
func configMapConfig(t *testing.T, name string) string {
	t.Helper()
	dec := yaml.NewDecoder(strings.NewReader(string(mustRead(t, name))))
	for {
		var doc struct {
			Kind string
			Data map[string]string
		}
		if err := dec.Decode(&doc); err != nil {
			t.Fatalf("%s: no ConfigMap with config.yaml: %v", name, err)
		}
		if c, ok := doc.Data["config.yaml"]; doc.Kind == "ConfigMap" && ok {
			p := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(p, []byte(c), 0o600); err != nil {
				t.Fatal(err)
			}
			return p
		}
	}
}
