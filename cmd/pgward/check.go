package main

import (
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/pgward/pgward/agent"
)

func cmdCheckConfig(args []string, stdout, stderr io.Writer) int {
	if len(args) != 1 {
		fmt.Fprintln(stderr, "usage: pgward check-config FILE")
		return exitUsage
	}
	cfg, err := agent.LoadConfig(args[0])
	if err != nil {
		var n int
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			n = len(j.Unwrap())
		} else {
			n = 1
		}
		fmt.Fprintf(stderr, "%s: %d problem(s):\n%v\n", args[0], n, err)
		return exitBadInput
	}
	explain(stdout, cfg)
	return exitOK
}

// explain says in plain words what a valid configuration does.
func explain(w io.Writer, cfg *agent.Config) {
	fmt.Fprintf(w, "Clients connect to %s (host=%s port=%d).\n", cfg.Listen.SocketPath(), dirOf(cfg.Listen.SocketPath()), portOf(cfg))
	if cfg.Listen.TCP != "" {
		fmt.Fprintf(w, "Loopback TCP listener on %s (callers identified by eBPF).\n", cfg.Listen.TCP)
	}
	names := keys(cfg.Upstreams)
	fmt.Fprintf(w, "\nUpstreams (%d):\n", len(names))
	for _, n := range names {
		u := cfg.Upstreams[n]
		auth := u.Auth
		if len(auth) == 0 {
			auth = []string{"scram-sha-256"}
		}
		mode := u.TLS.Mode
		if mode == "" {
			mode = "default (disable for socket files, verify-full otherwise)"
		}
		db := u.Database
		if db == "" {
			db = n
		}
		fmt.Fprintf(w, "  dbname=%s → %s database %s, tls %s, auth %s\n", n, u.Address, db, mode, strings.Join(auth, ","))
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
	backend := cfg.Secrets.Backend
	if backend == "" {
		backend = "file"
	}
	fmt.Fprintf(w, "\nSecrets from the %s backend.\n", backend)
	a := cfg.Audit.WithDefaults()
	fmt.Fprintf(w, "Audit to %s (durability %s, parameters %s).\n", a.Path, a.Durability, a.Parameters)
	if k := a.Checkpoint.Key; k != nil {
		kb := k.Backend
		if kb == "" {
			kb = backend
		}
		fmt.Fprintf(w, "Audit checkpoints signed every %d lines or %s with the key %s.%s of the %s backend.\n",
			a.Checkpoint.EveryLines, a.Checkpoint.Every, k.Upstream, k.Role, kb)
	} else {
		fmt.Fprintln(w, "Audit checkpoints off (no audit.checkpoint.key): the audit is unkeyed.")
	}
	if cfg.Metrics.Listen != "" {
		fmt.Fprintf(w, "Metrics at http://%s/metrics.\n", cfg.Metrics.Listen)
	}
	e := cfg.EBPF.Enabled
	if e == "" {
		e = "auto"
	}
	fmt.Fprintf(w, "eBPF %s, enforce %v, require_ebpf %v.\n", e, cfg.EBPF.Enforce, cfg.Identity.RequireEBPF)
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

func portOf(cfg *agent.Config) int {
	if cfg.Listen.Port == 0 {
		return 5432
	}
	return cfg.Listen.Port
}
