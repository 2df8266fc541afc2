package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
)

// A verb's command line: every verb takes -h/--help (usage on stdout, exit
// 0), refuses unknown flags and a wrong number of arguments (a message and
// its usage on stderr, exit 2), and accepts flags before or after its
// arguments ("--" ends the flags).
type verb struct {
	name    string // "check-config", "audit verify"
	args    string // "FILE", "FILE...", ""
	summary string
	minArgs int
	maxArgs int // -1: no limit
	fs      *flag.FlagSet
}

func newVerb(name, args, summary string, minArgs, maxArgs int) *verb {
	fs := flag.NewFlagSet("pgward "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return &verb{name: name, args: args, summary: summary, minArgs: minArgs, maxArgs: maxArgs, fs: fs}
}

func (v *verb) usage(w io.Writer) {
	line := "pgward " + v.name
	hasFlags := false
	v.fs.VisitAll(func(*flag.Flag) { hasFlags = true })
	if hasFlags {
		line += " [flags]"
	}
	if v.args != "" {
		line += " " + v.args
	}
	fmt.Fprintf(w, "usage: %s\n\n%s\n", line, v.summary)
	if hasFlags {
		fmt.Fprintln(w, "\nFlags:")
		v.fs.SetOutput(w)
		v.fs.PrintDefaults()
		v.fs.SetOutput(io.Discard)
	}
}

// parse parses args. When it returns ok false the verb is done and code is
// its exit code.
func (v *verb) parse(args []string, stdout, stderr io.Writer) (pos []string, code int, ok bool) {
	for {
		if err := v.fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				v.usage(stdout)
				return nil, exitOK, false
			}
			fmt.Fprintf(stderr, "pgward %s: %v\n", v.name, err)
			v.usage(stderr)
			return nil, exitUsage, false
		}
		rest := v.fs.Args()
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			pos = append(pos, rest...)
			break
		}
		if len(rest) == 0 {
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	switch {
	case len(pos) < v.minArgs:
		fmt.Fprintf(stderr, "pgward %s: missing %s\n", v.name, v.args)
	case v.maxArgs >= 0 && len(pos) > v.maxArgs:
		fmt.Fprintf(stderr, "pgward %s: unexpected argument %q\n", v.name, pos[v.maxArgs])
	default:
		return pos, exitOK, true
	}
	v.usage(stderr)
	return nil, exitUsage, false
}

func cmdVersion(args []string, stdout, stderr io.Writer) int {
	v := newVerb("version", "", "Print pgward's version, the Go version it was built with and the versions of its main dependencies.", 0, 0)
	if _, code, ok := v.parse(args, stdout, stderr); !ok {
		return code
	}
	fmt.Fprintln(stdout, "pgward", version)
	fmt.Fprintf(stdout, "go %s %s/%s\n", strings.TrimPrefix(runtime.Version(), "go"), runtime.GOOS, runtime.GOARCH)
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return exitOK
	}
	main := map[string]bool{
		"github.com/jackc/pgx/v5":             true,
		"github.com/cilium/ebpf":              true,
		"github.com/prometheus/client_golang": true,
		"go.opentelemetry.io/otel":            true,
		"go.opentelemetry.io/otel/sdk":        true,
		"github.com/hashicorp/vault/api":      true,
		"k8s.io/client-go":                    true,
		"gopkg.in/yaml.v3":                    true,
		"google.golang.org/grpc":              true,
		"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc": true,
	}
	for _, d := range bi.Deps {
		if main[d.Path] {
			if d.Replace != nil {
				d = d.Replace
			}
			fmt.Fprintf(stdout, "%s %s\n", d.Path, d.Version)
		}
	}
	return exitOK
}

// checkAgentPid makes sure pid runs a pgward binary before reload signals
// it: a mistyped pid must not SIGHUP (by default: kill) another process.
func checkAgentPid(pid int) error {
	exe, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe")
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("no process with pid %d", pid)
	}
	if err != nil {
		return fmt.Errorf("cannot tell what pid %d runs: %w", pid, err)
	}
	exe = strings.TrimSuffix(exe, " (deleted)") // the binary was upgraded
	if strings.HasPrefix(filepath.Base(exe), "pgward") {
		return nil
	}
	if self, err := os.Executable(); err == nil {
		a, err1 := os.Stat(self)
		b, err2 := os.Stat(exe)
		if err1 == nil && err2 == nil && os.SameFile(a, b) {
			return nil
		}
	}
	return fmt.Errorf("pid %d runs %s, not a pgward agent", pid, exe)
}
