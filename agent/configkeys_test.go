package agent

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/exporter"
)

// TestConfigKeys holds the key table (ConfigKeys) to the Go types the file
// decodes into and to the reference docs, in both directions.
func TestConfigKeys(t *testing.T) {
	table := map[string]broker.Key{}
	for _, k := range ConfigKeys() {
		p := normPath(k.Path)
		if _, dup := table[p]; dup {
			t.Errorf("%s: two rows in the key table", k.Path)
		}
		table[p] = k
	}

	t.Run("types", func(t *testing.T) {
		types := map[string]reflect.Type{}
		keyTypes(reflect.TypeOf(Config{}), "", types)
		for _, p := range keys(types) {
			if _, ok := table[p]; !ok {
				t.Errorf("%s: a field of Config with no row in the key table (agentKeys in agent/configkeys.go, or broker.Keys)", p)
			}
		}
		for _, p := range keys(table) {
			k := table[p]
			ft, ok := types[p]
			if !ok {
				t.Errorf("%s: in the key table but no field of Config reads it", k.Path)
				continue
			}
			if k.Default != nil && !reflect.TypeOf(k.Default).ConvertibleTo(ft) {
				t.Errorf("%s: default %#v (%T) does not fit the field's type %s", k.Path, k.Default, k.Default, ft)
			}
			if k.Default == nil && k.DefaultDoc == "" {
				t.Errorf("%s: neither Default nor DefaultDoc", k.Path)
			}
			if k.Doc == "" {
				t.Errorf("%s: no Doc", k.Path)
			}
		}
	})

	t.Run("docs", func(t *testing.T) {
		docs := docKeys(t, "../docs/config.md", "")
		for p, row := range docKeys(t, "../docs/vault.md", "secrets.vault") {
			docs[p] = row
		}
		for _, p := range keys(table) {
			k := table[p]
			row, ok := docs[p]
			if !ok {
				t.Errorf("%s: not documented in docs/config.md (or docs/vault.md for secrets.vault)", k.Path)
				continue
			}
			if want := defaultText(k); !containsWord(row.dflt, want) {
				t.Errorf("%s: %s:%d gives the default as %q; the key table says %q", k.Path, row.file, row.line, row.dflt, want)
			}
			for _, c := range k.OneOf {
				if !strings.Contains(row.dflt+row.meaning, "`"+c+"`") {
					t.Errorf("%s: %s:%d does not name the choice `%s`", k.Path, row.file, row.line, c)
				}
			}
		}
		for _, p := range keys(docs) {
			row := docs[p]
			if _, ok := table[p]; !ok {
				t.Errorf("%s:%d: documents %s, which is no key (not in the key table)", row.file, row.line, p)
			}
		}
	})

	// A default quoted anywhere else in the docs ("`metrics.listen`
	// (default `…`)") is the table's.
	t.Run("other docs", func(t *testing.T) {
		files, _ := filepath.Glob("../docs/*.md")
		files = append(files, "../README.md")
		re := regexp.MustCompile("`([a-z][a-z0-9_.<>\\[\\]]*)` \\(default `([^`]*)`")
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for i, line := range strings.Split(string(b), "\n") {
				for _, m := range re.FindAllStringSubmatch(line, -1) {
					k, ok := table[normPath(m[1])]
					if !ok {
						t.Errorf("%s:%d: %s is no key", f, i+1, m[1])
						continue
					}
					if want := defaultText(k); !containsWord("`"+m[2]+"`", want) {
						t.Errorf("%s:%d: gives %s's default as `%s`; the key table says %q", f, i+1, m[1], m[2], want)
					}
				}
			}
		}
	})
}

// The defaults LoadConfig applies are the table's; a Config built in Go is
// left alone; absent sections stay absent.
func TestConfigWithDefaults(t *testing.T) {
	in := &Config{}
	in.Upstreams = map[string]broker.UpstreamConfig{
		"orders": {Address: "db:5432"},
		"local":  {Address: "/run/pg/.s.PGSQL.5432", Secrets: "env", Reuse: &broker.ReuseConfig{}},
	}
	in.Secrets.Backend = "vault"
	in.Secrets.Vault = &vault.Config{Roles: map[string]map[string]vault.RoleConfig{"orders": {"r": {KV: &vault.KVConfig{Path: "p"}}}}}
	in.Audit.Checkpoint.Key = &exporter.CheckpointKeyRef{Upstream: "pgward", Role: "cp"}
	out := in.WithDefaults()

	if in.Upstreams["orders"].Secrets != "" || in.Upstreams["orders"].Database != "" || in.Audit.Checkpoint.Key.Backend != "" ||
		in.Secrets.Vault.Roles["orders"]["r"].KV.Mount != "" || in.Upstreams["local"].Reuse.MaxIdle != 0 || in.Listen.Port != 0 {
		t.Fatalf("WithDefaults changed its receiver: %+v", in)
	}
	o, l := out.Upstreams["orders"], out.Upstreams["local"]
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"listen.port", out.Listen.Port, broker.DefaultPort},
		{"listen.unix_dir", out.Listen.UnixDir, broker.DefaultUnixDir},
		{"listen.login_timeout", out.Listen.LoginTimeout, broker.DefaultLoginTimeout},
		{"limits.buffer_memory", out.Limits.BufferMemory, int64(broker.DefaultBufferMemory)},
		{"upstreams.orders.secrets", o.Secrets, "vault"},
		{"upstreams.local.secrets", l.Secrets, "env"},
		{"upstreams.orders.database", o.Database, "orders"},
		{"upstreams.orders.tls.mode", o.TLS.Mode, "verify-full"},
		{"upstreams.local.tls.mode", l.TLS.Mode, "disable"},
		{"upstreams.orders.auth", strings.Join(o.Auth, ","), "scram-sha-256"},
		{"upstreams.orders.connect_timeout", o.ConnectTimeout, broker.DefaultConnectTimeout},
		{"upstreams.orders.application_name", o.ApplicationName, broker.DefaultApplicationName},
		{"upstreams.orders.reuse", o.Reuse == nil, true},
		{"upstreams.local.reuse.max_idle", l.Reuse.MaxIdle, broker.DefaultReuseMaxIdle},
		{"upstreams.local.reuse.idle_timeout", l.Reuse.IdleTimeout, broker.DefaultReuseIdleTimeout},
		{"secrets.env.prefix", out.Secrets.Env.Prefix, "PGWARD_SECRET_"},
		{"secrets.vault.timeout", out.Secrets.Vault.Timeout, 5 * time.Second},
		{"secrets.vault.roles.orders.r.kv.mount", out.Secrets.Vault.Roles["orders"]["r"].KV.Mount, "secret"},
		{"secrets.vault.roles.orders.r.kv.field", out.Secrets.Vault.Roles["orders"]["r"].KV.Field, "password"},
		{"secrets.vault.auth.jwt_file", out.Secrets.Vault.Auth.JWTFile, ""},
		{"audit.durability", out.Audit.Durability, exporter.DurabilityWrite},
		{"audit.max_files", out.Audit.MaxFiles, exporter.DefaultAuditMaxFiles},
		{"audit.checkpoint.every", out.Audit.Checkpoint.Every, exporter.DefaultCheckpointEvery},
		{"audit.checkpoint.key.backend", out.Audit.Checkpoint.Key.Backend, "vault"},
		{"metrics.listen", out.Metrics.Listen, ""},
		{"ebpf.enabled", out.EBPF.Enabled, "auto"},
		{"shutdown.grace", out.Shutdown.Grace, DefaultGrace},
		{"kubernetes.lookup_wait", out.Kubernetes.LookupWait, DefaultLookupWait},
	} {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %#v, want %#v", c.name, c.got, c.want)
		}
	}
	// What the exporter falls back to for a Config built in Go is what the
	// table applies.
	if got, want := out.Audit, out.Audit.WithDefaults(); !reflect.DeepEqual(got, want) {
		t.Errorf("audit defaults differ from the exporter's:\n table    %+v\n exporter %+v", got, want)
	}
	// Applying twice changes nothing.
	if again := out.WithDefaults(); !reflect.DeepEqual(again, out) {
		t.Errorf("WithDefaults is not idempotent")
	}
}

// A loaded file comes back with its defaults applied, so that check-config
// explains, and the agent runs, the values in the key table.
func TestLoadConfigAppliesDefaults(t *testing.T) {
	cfg, err := ParseConfig([]byte("upstreams: {orders: {address: /x/.s.PGSQL.5432}}\nsecrets: {file: {path: /s}}\naudit: {path: /a}\n"), "d.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen.Port != 5432 || cfg.Secrets.Backend != "file" || cfg.Upstreams["orders"].Secrets != "file" ||
		cfg.Upstreams["orders"].TLS.Mode != "disable" || cfg.EBPF.Enabled != "auto" || cfg.Shutdown.Grace != 30*time.Second {
		t.Fatalf("defaults not applied: %+v", cfg)
	}
}

type docRow struct {
	file          string
	line          int
	dflt, meaning string
}

// docKeys reads the key tables of a reference doc: a table whose header
// starts "| key | default |" (or "| selector | default |") under a heading
// "## `section`" documents section.<key> for each `key` in its first
// column. prefix is the section of a heading without one.
func docKeys(t *testing.T, file, prefix string) map[string]docRow {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]docRow{}
	section, inTable := prefix, false
	headRe := regexp.MustCompile("^#+ `([^`]+)`")
	tickRe := regexp.MustCompile("`([^`]+)`")
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			section, inTable = prefix, false
			if m := headRe.FindStringSubmatch(line); m != nil {
				section = m[1]
			}
			continue
		}
		if !strings.HasPrefix(line, "|") {
			inTable = false
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		if len(cells) >= 3 && (cells[0] == "key" || cells[0] == "selector") && cells[1] == "default" {
			if section == "" {
				t.Errorf("%s:%d: a key table under a heading that names no section", file, n)
			}
			inTable = true
			continue
		}
		if !inTable || strings.HasPrefix(cells[0], "---") || len(cells) < 3 {
			continue
		}
		for _, m := range tickRe.FindAllStringSubmatch(cells[0], -1) {
			p := normPath(strings.ReplaceAll(section, "[]", "") + "." + m[1])
			out[p] = docRow{file: file, line: n, dflt: cells[1], meaning: strings.Join(cells[2:], "|")}
		}
	}
	// Grants are a list: the table writes grants[].x as grants.x.
	for p, r := range out {
		if rest, ok := strings.CutPrefix(p, "grants."); ok {
			delete(out, p)
			out["grants[]."+rest] = r
		}
	}
	return out
}

// defaultText is how the docs write a key's default.
func defaultText(k broker.Key) string {
	if k.DefaultDoc != "" {
		return k.DefaultDoc
	}
	switch v := k.Default.(type) {
	case time.Duration:
		s := v.String()
		for _, z := range []string{"m0s", "h0m"} {
			if strings.HasSuffix(s, z) {
				s = strings.TrimSuffix(s, z[1:])
			}
		}
		return s
	case []string:
		return "[" + strings.Join(v, ", ") + "]"
	}
	if s := fmt.Sprint(k.Default); s != "" {
		return s
	}
	return `""`
}

// containsWord reports whether text contains w not as part of a longer
// word or number ("5s" is not in "15s").
func containsWord(text, w string) bool {
	isWord := func(b byte) bool {
		return b == '_' || b == '.' || b >= '0' && b <= '9' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z'
	}
	for i := 0; ; {
		j := strings.Index(text[i:], w)
		if j < 0 {
			return false
		}
		j += i
		end := j + len(w)
		if (j == 0 || !isWord(text[j-1]) || !isWord(w[0])) && (end == len(text) || !isWord(text[end]) || !isWord(w[len(w)-1])) {
			return true
		}
		i = j + 1
	}
}
