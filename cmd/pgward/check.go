package main

import (
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/pgward/pgward/agent"
)

// cmdCheckConfig is the systemd unit's ExecStartPre: it exits 0 only when
// the agent would start with the file (and explains what it does, and
// prints on stderr, as "warning: file:line: key.path: what", whatever the
// agent would log at WARN about it when it starts), 1 with every problem,
// each as "file:line: key.path: what is expected", and 2 on a usage error.
func cmdCheckConfig(args []string, stdout, stderr io.Writer) int {
	v := newVerb("check-config", "FILE", `Check a configuration file as the agent does when it starts — keys, values,
policy, the files it names (secrets, CA, audit directory), the metrics
address — and report every problem at once, each with its line. What the
agent would warn about at start (auth [trust], deprecated keys, no audit
checkpoint key, a client certificate about to expire) is printed as a
warning and does not change the exit code. Exit 0: the agent would start;
1: it would not; 2: usage.`, 1, 1)
	pos, code, ok := v.parse(args, stdout, stderr)
	if !ok {
		return code
	}
	cfg, warnings, err := agent.CheckConfigWarnings(pos[0])
	if err != nil {
		n := 1
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			n = len(j.Unwrap())
		}
		fmt.Fprintf(stderr, "%s: %d problem(s); the agent would not start:\n%v\n", pos[0], n, err)
		return exitFailure
	}
	for _, w := range warnings {
		fmt.Fprintf(stderr, "warning: %s\n", w)
	}
	explain(stdout, cfg)
	return exitOK
}

// explain says in plain words what a valid configuration does. cfg has
// its defaults applied (agent.CheckConfig returns it so), so every value
// printed is the one the agent uses.
func explain(w io.Writer, cfg *agent.Config) {
	fmt.Fprintf(w, "Clients connect to %s (host=%s port=%d).\n", cfg.Listen.SocketPath(), dirOf(cfg.Listen.SocketPath()), cfg.Listen.Port)
	if cfg.Listen.TCP != "" {
		fmt.Fprintf(w, "Loopback TCP listener on %s (callers identified by eBPF).\n", cfg.Listen.TCP)
	}
	names := keys(cfg.Upstreams)
	fmt.Fprintf(w, "\nUpstreams (%d):\n", len(names))
	for _, n := range names {
		u := cfg.Upstreams[n]
		fmt.Fprintf(w, "  dbname=%s → %s database %s, tls %s, auth %s, secrets from %s\n", n, u.Address, u.Database, u.TLS.Mode, strings.Join(u.Auth, ","), u.Secrets)
	}
	fmt.Fprintf(w, "\nPrincipals and what they may use:\n")
	for _, p := range keys(cfg.Principals) {
		var uses []string
		for _, g := range cfg.Grants {
			if g.Principal == p {
				uses = append(uses, fmt.Sprintf("%s on %s", strings.Join(g.Roles, ","), g.Upstream))
			}
		}
		if len(uses) == 0 {
			uses = []string{"nothing (no grant)"}
		}
		fmt.Fprintf(w, "  %s: %s\n", p, strings.Join(uses, "; "))
	}
	fmt.Fprintf(w, "\nSecrets from the %s backend.\n", cfg.Secrets.Backend)
	a := cfg.Audit
	fmt.Fprintf(w, "Audit to %s (durability %s, parameters %s).\n", a.Path, a.Durability, a.Parameters)
	if k := a.Checkpoint.Key; k != nil {
		fmt.Fprintf(w, "Audit checkpoints signed every %d lines or %s with the key %s.%s of the %s backend.\n",
			a.Checkpoint.EveryLines, a.Checkpoint.Every, k.Upstream, k.Role, k.Backend)
	} else {
		fmt.Fprintln(w, "Audit checkpoints off (no audit.checkpoint.key): the audit is unkeyed.")
	}
	fmt.Fprintf(w, "Admin API (pgward sessions) on %s, root only.\n", cfg.AdminSocket())
	if cfg.Metrics.Listen != "" {
		fmt.Fprintf(w, "Metrics at http://%s/metrics.\n", cfg.Metrics.Listen)
	} else {
		fmt.Fprintln(w, "No metrics endpoint (metrics.listen is not set).")
	}
	fmt.Fprintf(w, "eBPF %s, enforce %v, require_ebpf %v.\n", cfg.EBPF.Enabled, cfg.EBPF.Enforce, cfg.Identity.RequireEBPF)
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func dirOf(p string) string {
	if i := strings.LastIndexByte(p, '/'); i > 0 {
		return p[:i]
	}
	return "/"
}
