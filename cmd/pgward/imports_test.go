package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/pgward/pgward"

// importRules is DESIGN.md §2 ("Imports point one way: cmd → agent →
// {broker, exporter, bpf}, exporter → broker; broker never imports a
// package of ours, Prometheus, OTel SDK or cilium/ebpf"): for each folder
// of ours (with its subfolders), the folders its code may import. Tests
// may import testenv besides. testenv is imported by tests and, for `pgward
// demo` (and the bench harness), by cmd (§2: "for tests and the demo").
var importRules = []importRule{
	// broker makes no spans (exporter does, from its Observer calls):
	// no OpenTelemetry package at all.
	{dir: "broker", may: []string{"broker"},
		notDeps: []string{"github.com/prometheus/", "go.opentelemetry.io/", "github.com/cilium/ebpf"}},
	{dir: "bpf"},
	{dir: "exporter", may: []string{"exporter", "broker"}},
	{dir: "agent", may: []string{"agent", "broker", "exporter", "bpf"}},
	{dir: "testenv", may: []string{"testenv"}},
	{dir: "cmd", may: []string{"agent", "broker", "exporter", "testenv"}},
}

type importRule struct {
	dir     string
	may     []string
	notDeps []string // import path prefixes its code must not depend on, even indirectly
}

type listedPackage struct {
	ImportPath                         string
	Imports, TestImports, XTestImports []string
	Deps                               []string
	Error                              *struct{ Err string }
}

// TestImportDirections fails when an import breaks the layering of
// DESIGN.md §2, read from `go list -json ./...` of the module.
func TestImportDirections(t *testing.T) {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	cmd := exec.Command(goBin, "list", "-e", "-json", "./...")
	cmd.Dir = "../.."
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.String())
	}
	pkgs, err := decodePackages(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if len(pkgs) < 6 {
		t.Fatalf("go list found %d packages of the module", len(pkgs))
	}
	for _, e := range checkImports(pkgs) {
		t.Error(e)
	}
}

// The rules catch what they are meant to.
func TestImportRulesCatch(t *testing.T) {
	for _, c := range []struct {
		name string
		pkg  listedPackage
		want string
	}{
		{"broker imports exporter", listedPackage{ImportPath: module + "/broker", Imports: []string{module + "/exporter"}}, "broker imports " + module + "/exporter"},
		{"exporter imports agent", listedPackage{ImportPath: module + "/exporter", Imports: []string{module + "/agent"}}, "exporter imports"},
		{"agent imports testenv", listedPackage{ImportPath: module + "/agent", Imports: []string{module + "/testenv"}}, "agent imports"},
		{"broker depends on prometheus", listedPackage{ImportPath: module + "/broker/secrets", Deps: []string{"github.com/prometheus/client_golang/prometheus"}}, "depends on github.com/prometheus/client_golang/prometheus"},
		{"broker test imports agent", listedPackage{ImportPath: module + "/broker", XTestImports: []string{module + "/agent"}}, "tests import"},
		{"a folder no rule covers", listedPackage{ImportPath: module + "/newdir"}, "no import rule"},
		{"go list error", listedPackage{ImportPath: module + "/broker", Error: &struct{ Err string }{"import cycle not allowed"}}, "import cycle"},
	} {
		errs := checkImports([]listedPackage{c.pkg})
		if len(errs) != 1 || !strings.Contains(errs[0].Error(), c.want) {
			t.Errorf("%s: got %v, want one error with %q", c.name, errs, c.want)
		}
	}
	ok := listedPackage{ImportPath: module + "/agent", Imports: []string{module + "/broker/secrets", "fmt"}, TestImports: []string{module + "/testenv/faultpg"}}
	if errs := checkImports([]listedPackage{ok}); len(errs) != 0 {
		t.Errorf("allowed imports refused: %v", errs)
	}
}

func decodePackages(r io.Reader) ([]listedPackage, error) {
	var pkgs []listedPackage
	dec := json.NewDecoder(r)
	for {
		var p listedPackage
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			return pkgs, nil
		} else if err != nil {
			return nil, fmt.Errorf("decode go list output: %w", err)
		}
		pkgs = append(pkgs, p)
	}
}

// ours is the folder path of an import path of the module ("broker/secrets"),
// ok false for other modules and the standard library.
func ours(path string) (string, bool) {
	rest, ok := strings.CutPrefix(path, module+"/")
	return rest, ok
}

func within(dir, parent string) bool { return dir == parent || strings.HasPrefix(dir, parent+"/") }

func checkImports(pkgs []listedPackage) []error {
	var errs []error
	for _, p := range pkgs {
		dir, ok := ours(p.ImportPath)
		if !ok {
			continue
		}
		if p.Error != nil {
			errs = append(errs, fmt.Errorf("%s: %s", dir, p.Error.Err))
			continue
		}
		i := slices.IndexFunc(importRules, func(r importRule) bool { return within(dir, r.dir) })
		if i < 0 {
			errs = append(errs, fmt.Errorf("%s: no import rule covers this folder (add it to importRules and DESIGN.md §2)", dir))
			continue
		}
		rule := importRules[i]
		allowed := func(imp string, tests bool) bool {
			d, ok := ours(imp)
			if !ok {
				return true
			}
			for _, m := range rule.may {
				if within(d, m) {
					return true
				}
			}
			return tests && within(d, "testenv")
		}
		for _, imp := range p.Imports {
			if !allowed(imp, false) {
				errs = append(errs, fmt.Errorf("%s imports %s: DESIGN.md §2 lets %s import only %v", dir, imp, rule.dir, rule.may))
			}
		}
		for _, imp := range slices.Concat(p.TestImports, p.XTestImports) {
			if d, _ := ours(imp); within(d, rule.dir) && d != "" {
				continue // a package's tests may use its own subpackages (and itself, as package_test)
			}
			if !allowed(imp, true) {
				errs = append(errs, fmt.Errorf("%s: its tests import %s: DESIGN.md §2 lets %s import only %v (and tests testenv)", dir, imp, rule.dir, rule.may))
			}
		}
		for _, d := range p.Deps {
			for _, bad := range rule.notDeps {
				if strings.HasPrefix(d, bad) {
					errs = append(errs, fmt.Errorf("%s depends on %s: DESIGN.md §2 keeps %s free of %s", dir, d, rule.dir, bad))
				}
			}
		}
	}
	return errs
}
