package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/exporter"
)

// Config is pgward's whole configuration file (DESIGN.md §4). The broker's
// part (listen, upstreams, principals, grants, limits) is inline.
type Config struct {
	broker.Config `yaml:",inline"`

	Secrets  SecretsConfig        `yaml:"secrets"`
	Identity IdentityConfig       `yaml:"identity"`
	Audit    exporter.AuditConfig `yaml:"audit"`
	Metrics  MetricsConfig        `yaml:"metrics"`
	EBPF     EBPFConfig           `yaml:"ebpf"`
	Shutdown ShutdownConfig       `yaml:"shutdown"`
	// Kubernetes maps callers' containers to their pods (kubernetes.go).
	Kubernetes KubernetesConfig `yaml:"kubernetes"`
	// Admin is the local admin API (admin.go).
	Admin AdminConfig `yaml:"admin"`
}

// SecretsConfig chooses and configures the secrets backend.
type SecretsConfig struct {
	Backend string             `yaml:"backend"` // file | env | vault
	File    secrets.FileConfig `yaml:"file"`
	Env     secrets.EnvConfig  `yaml:"env"`
	Vault   *vault.Config      `yaml:"vault"`
}

// IdentityConfig tunes identity verification.
type IdentityConfig struct {
	// RequireEBPF refuses connections that no eBPF connect record matches.
	RequireEBPF bool `yaml:"require_ebpf"`
}

// MetricsConfig is the HTTP endpoint for /metrics, /healthz and /readyz.
type MetricsConfig struct {
	Listen string `yaml:"listen"` // host:port; empty disables the endpoint
}

// EBPFConfig configures the kernel probes.
type EBPFConfig struct {
	// Enabled is auto (use eBPF when the kernel and privileges allow, else
	// peer credentials only, said once at WARN), true (fail to start without
	// it) or false.
	Enabled string `yaml:"enabled"`
	// Enforce refuses direct connects to guarded endpoints (ECONNREFUSED).
	Enforce bool `yaml:"enforce"`
	// Guard lists more endpoints to guard (host:port or socket file paths),
	// besides every upstream's address.
	Guard []string `yaml:"guard"`
	// Cgroup is where the programs attach; default the cgroup2 root.
	Cgroup string `yaml:"cgroup"`
	// Exempt names the cgroups (v2 paths, or systemd service names under
	// /system.slice) of other pgward agents guarding the same endpoints:
	// their connects are not direct connects. See ebpf_exempt.go.
	Exempt []string `yaml:"exempt"`
}

// ShutdownConfig bounds draining on SIGTERM.
type ShutdownConfig struct {
	Grace time.Duration `yaml:"grace"` // default 30s
}

// DefaultGrace is how long SIGTERM lets sessions finish.
const DefaultGrace = 30 * time.Second

// LoadConfig reads and validates a configuration file. Every problem is
// reported, each with its line number.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return ParseConfig(data, path)
}

// ParseConfig parses and validates configuration text; name prefixes messages.
// The error joins one *Problem per problem, in line order.
func ParseConfig(data []byte, name string) (*Config, error) {
	cfg, problems := parseConfig(data, name)
	if len(problems) > 0 {
		return nil, joinProblems(problems)
	}
	return cfg, nil
}

// CheckConfig is `pgward check-config`: it reports every problem that would
// keep the agent from starting with the file at path — what ParseConfig
// finds, and then what Preflight finds on every value that could be read —
// all at once, each with its line. It changes nothing on the machine.
func CheckConfig(path string) (*Config, error) {
	cfg, _, err := CheckConfigWarnings(path)
	return cfg, err
}

// CheckConfigWarnings is CheckConfig that also returns, for a file the
// agent would start with, what the agent would log at WARN about it when
// it starts (configwarn.go), each as "file:line: key: what". They do not
// keep the agent from starting.
func CheckConfigWarnings(path string) (*Config, []string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read config: %w", err)
	}
	cfg, problems := parseConfig(data, path)
	var root yaml.Node
	warns := newWarnRecorder()
	if cfg != nil {
		_ = yaml.Unmarshal(data, &root)
		problems = append(problems, toProblems(preflight(cfg, slog.New(warns)), &root, path, problems)...)
	}
	if len(problems) > 0 {
		return nil, nil, joinProblems(problems)
	}
	return cfg, warns.problems(cfg, &root, path), nil
}

// parseConfig decodes what it can and returns every problem: syntax, unknown
// and duplicate keys, values of the wrong kind, then Validate's checks on
// the values that could be decoded. cfg is nil only when the text is not
// YAML at all.
func parseConfig(data []byte, name string) (*Config, []*Problem) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, []*Problem{syntaxProblem(err, name)}
	}
	if root.Kind == 0 || len(root.Content) == 0 || isNull(root.Content[0]) {
		return nil, []*Problem{{File: name, Msg: "the file is empty"}}
	}
	var problems []*Problem
	tree := cloneNode(&root)
	for _, p := range checkTree(tree.Content[0], reflect.TypeOf(Config{}), "") {
		p.File = name
		problems = append(problems, &p)
	}
	var cfg Config
	if err := tree.Content[0].Decode(&cfg); err != nil {
		// checkTree should have left nothing undecodable; say so plainly if it did.
		problems = append(problems, &Problem{File: name, Msg: strings.TrimPrefix(err.Error(), "yaml: ")})
	}
	problems = append(problems, toProblems(cfg.Validate(), &root, name, problems)...)
	return cfg.WithDefaults(), problems
}

// syntaxProblem turns a YAML syntax error ("yaml: line 3: …") into a Problem.
func syntaxProblem(err error, name string) *Problem {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	p := &Problem{File: name, Msg: "not valid YAML: " + msg}
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if num, text, ok := strings.Cut(rest, ": "); ok {
			if n, err := strconv.Atoi(num); err == nil {
				p.Line, p.Msg = n, "not valid YAML: "+text
			}
		}
	}
	return p
}

// toProblems gives each FieldError in err the line of its key. A problem
// under a key already reported (a value that could not be read, so it is
// missing now) is left out.
func toProblems(err error, root *yaml.Node, name string, have []*Problem) []*Problem {
	var out []*Problem
	var walk func(error)
	walk = func(e error) {
		if e == nil {
			return
		}
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, x := range j.Unwrap() {
				walk(x)
			}
			return
		}
		var fe *broker.FieldError
		if !errors.As(e, &fe) {
			out = append(out, &Problem{File: name, Msg: e.Error()})
			return
		}
		for _, h := range have {
			// The same key, one under it, or one above it already reported
			// (a start-up failure caused by a bad value found earlier).
			if h.Path != "" && (fe.Path == h.Path || strings.HasPrefix(fe.Path, h.Path+".") || strings.HasPrefix(fe.Path, h.Path+"[") ||
				strings.HasPrefix(h.Path, fe.Path+".")) {
				return
			}
		}
		out = append(out, &Problem{File: name, Line: lineOf(root, fe.Path), Path: fe.Path, Msg: fe.Err.Error()})
	}
	walk(err)
	return out
}

func joinProblems(ps []*Problem) error {
	sort.SliceStable(ps, func(i, j int) bool {
		if (ps[i].Line == 0) != (ps[j].Line == 0) {
			return ps[i].Line != 0
		}
		return ps[i].Line < ps[j].Line
	})
	errs := make([]error, len(ps))
	for i, p := range ps {
		errs[i] = p
	}
	return errors.Join(errs...)
}

func cloneNode(n *yaml.Node) *yaml.Node {
	c := *n
	c.Content = make([]*yaml.Node, len(n.Content))
	for i, x := range n.Content {
		c.Content[i] = cloneNode(x)
	}
	return &c
}

// Preflight checks what the agent checks when it starts, beyond the file's
// own consistency: the upstreams' TLS files, the secrets backends (the file
// backend's file exists, is private and parses), the audit log's directory
// and file, the metrics address. It calls the same functions New does, so
// `pgward check-config` and the agent cannot disagree; it changes nothing.
// Every problem is a *broker.FieldError naming its key.
func Preflight(cfg *Config) error { return preflight(cfg, nil) }

// preflight is Preflight, with log for what opening the secrets backends
// says at WARN (as at start).
func preflight(cfg *Config, log *slog.Logger) error {
	cfg = cfg.WithDefaults()
	var errs []error
	errs = append(errs, broker.CheckUpstreams(cfg.Config))
	if err := exporter.CheckAudit(cfg.Audit); err != nil {
		errs = append(errs, asField("audit.path", err))
	}
	for _, b := range cfg.usedBackends() {
		// A backend whose keys are missing or wrong is reported by Validate.
		switch {
		case b == "file" && cfg.Secrets.File.Path != "":
		case b == "vault" && cfg.Secrets.Vault != nil && cfg.Secrets.Vault.Validate() == nil:
		default:
			continue
		}
		blog := log
		if blog != nil {
			blog = log.With(backendAttr, b)
		}
		src, err := openBackend(b, cfg, blog)
		if err != nil {
			path := "secrets." + b
			if b == "file" {
				path = "secrets.file.path"
			}
			errs = append(errs, asField(path, err))
			continue
		}
		if c, ok := src.(interface{ Close() error }); ok {
			c.Close()
		}
	}
	if cfg.Audit.Checkpoint.Key != nil {
		// Fetched at start as New does: the backend opened, the key read.
		r := &router{route: map[string]secrets.Source{}, backends: map[string]secrets.Source{}}
		if _, err := checkpointKey(context.Background(), cfg, r, nil); err != nil {
			errs = append(errs, asField("audit.checkpoint.key", err))
		}
		r.Close()
	}
	return errors.Join(errs...)
}

// usedBackends lists the secrets backends the configuration uses: those of
// its upstreams and of the audit checkpoint key, defaults applied.
func (c *Config) usedBackends() []string {
	d := c.WithDefaults()
	used := map[string]bool{}
	for _, u := range d.Upstreams {
		used[u.Secrets] = true
	}
	if k := d.Audit.Checkpoint.Key; k != nil {
		used[k.Backend] = true
	}
	return keys(used)
}

// asField names the key a start-up error is about, unless it already does.
func asField(path string, err error) error {
	var fe *broker.FieldError
	if errors.As(err, &fe) {
		return err
	}
	return &broker.FieldError{Path: path, Err: err}
}

// Validate checks every part of the configuration and reports every problem.
func (c *Config) Validate() error {
	var errs []error
	if err := c.Config.Validate(); err != nil {
		errs = append(errs, err)
	}
	fe := func(path, format string, args ...any) {
		errs = append(errs, &broker.FieldError{Path: path, Err: fmt.Errorf(format, args...)})
	}
	if k := c.Audit.Checkpoint.Key; k != nil {
		if _, ok := c.Upstreams[k.Upstream]; ok {
			fe("audit.checkpoint.key.upstream", "%q is a configured upstream: name the key under an upstream no client can use", k.Upstream)
		}
	}
	used := c.usedBackends()
	if slices.Contains(used, "file") && c.Secrets.File.Path == "" {
		fe("secrets.file.path", "is required for the file backend")
	}
	if c.Secrets.Backend != "" {
		errs = append(errs, broker.CheckChoice("secrets.backend", c.Secrets.Backend, secrets.Backends))
	}
	if slices.Contains(used, "vault") {
		if c.Secrets.Vault == nil {
			fe("secrets.vault", "is required for the vault backend")
		} else {
			errs = append(errs, broker.Under("secrets.vault", c.Secrets.Vault.Validate()))
		}
	}
	c.checkCertSources(fe) // certcheck.go
	// The exporter names its keys (*broker.FieldError at audit.…).
	errs = append(errs, c.Audit.Validate())
	if err := c.Admin.validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Listen.EventLoop && c.Audit.Durability == exporter.DurabilityFsync {
		fe("listen.event_loop", "cannot be combined with audit.durability fsync: the loop would wait for each statement's fsync with every session behind it; use durability write, or leave event_loop off")
	}
	if c.Metrics.Listen != "" {
		// The same resolution net.Listen does when the agent starts.
		if _, err := net.ResolveTCPAddr("tcp", c.Metrics.Listen); err != nil {
			fe("metrics.listen", "want host:port such as 127.0.0.1:9187, not %q", c.Metrics.Listen)
		}
	}
	if c.EBPF.Enabled != "" {
		errs = append(errs, broker.CheckChoice("ebpf.enabled", c.EBPF.Enabled, ebpfModes))
	}
	for i, g := range c.EBPF.Guard {
		if strings.HasPrefix(g, "/") {
			continue
		}
		if _, _, err := net.SplitHostPort(g); err != nil {
			fe(fmt.Sprintf("ebpf.guard[%d]", i), "%q is neither host:port nor a socket file path", g)
		}
	}
	for i, e := range c.EBPF.Exempt {
		if _, err := exemptPath(e); err != nil {
			fe(fmt.Sprintf("ebpf.exempt[%d]", i), "%s", err.Error())
		}
	}
	if len(c.EBPF.Exempt) > 0 && c.EBPF.Enforce {
		fe("ebpf.exempt", "cannot be combined with ebpf.enforce yet: the kernel programs exempt pgward's own cgroup only, so another agent's connects would be refused")
	}
	if c.EBPF.Enforce && c.EBPF.Enabled == "false" {
		fe("ebpf.enforce", "needs eBPF, but ebpf.enabled is false")
	}
	if c.Identity.RequireEBPF && c.EBPF.Enabled == "false" {
		fe("identity.require_ebpf", "needs eBPF, but ebpf.enabled is false")
	}
	if c.Shutdown.Grace < 0 {
		fe("shutdown.grace", "must not be negative")
	}
	errs = append(errs, c.validateKubernetes()...)
	return errors.Join(errs...)
}

var (
	segRe = regexp.MustCompile(`^([^\[]*)((?:\[\d+\])*)$`)
	idxRe = regexp.MustCompile(`\d+`)
)

// lineOf finds the line of a key path like "upstreams.orders.tls.mode" or
// "grants[0].principal"; for a missing key, the line of its nearest parent.
// Names that contain dots (an upstream called "a.b") are matched whole.
func lineOf(root *yaml.Node, path string) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := 0
	segs := strings.Split(path, ".")
	for i := 0; i < len(segs); {
		matched := false
		for end := len(segs); end > i && !matched; end-- {
			m := segRe.FindStringSubmatch(strings.Join(segs[i:end], "."))
			if m == nil {
				continue
			}
			child, l := mapGet(n, m[1])
			if child == nil {
				continue
			}
			line, n, i, matched = l, child, end, true
			for _, s := range idxRe.FindAllString(m[2], -1) {
				k, _ := strconv.Atoi(s)
				if n.Kind != yaml.SequenceNode || k >= len(n.Content) {
					return line
				}
				n = n.Content[k]
				line = n.Line
			}
		}
		if !matched {
			return line
		}
	}
	return line
}

func mapGet(n *yaml.Node, key string) (*yaml.Node, int) {
	if n.Kind != yaml.MappingNode {
		return nil, 0
	}
	for j := 0; j+1 < len(n.Content); j += 2 {
		if n.Content[j].Value == key {
			return n.Content[j+1], n.Content[j].Line
		}
	}
	return nil, 0
}
