// Command testreport runs one step of `make test` and keeps the tally.
//
//	go run ./.ci/testreport -state FILE -step NAME -- go test -json ...
//	go run ./.ci/testreport -state FILE -step NAME -- any other command
//	go run ./.ci/testreport -state FILE -summary
//
// With `go test -json` it prints a line per package as it finishes (time,
// passed, failed, skipped), the output of every failed test, each skipped
// test with its reason, and every 30 s what is still running. Any other
// command is one check, passed or failed by its exit status, and its output
// goes through. -summary prints the totals and, last, the plain line
// "N passed, N failed, N skipped"; it exits 1 when anything failed or, under
// CI=true, when anything was skipped.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

type tally struct {
	Passed, Failed, Skipped int
	Failures                []string
	Skips                   []string
	Steps                   []string
}

type event struct {
	Action  string
	Package string
	Test    string
	Output  string
	Elapsed float64
}

func main() {
	state := flag.String("state", "", "file keeping the tally across steps")
	step := flag.String("step", "", "name of this step")
	summary := flag.Bool("summary", false, "print the totals and exit non-zero on failures (and skips under CI=true)")
	flag.Parse()
	if *state == "" {
		fmt.Fprintln(os.Stderr, "testreport: -state is required")
		os.Exit(2)
	}
	var t tally
	if b, err := os.ReadFile(*state); err == nil {
		_ = json.Unmarshal(b, &t)
	}
	if *summary {
		os.Exit(printSummary(&t))
	}
	args := flag.Args()
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "testreport: a command is required after --")
		os.Exit(2)
	}
	start := time.Now()
	fmt.Printf("==> %s: %s\n", *step, strings.Join(args, " "))
	var ok bool
	if slices.Contains(args, "-json") {
		ok = runJSON(&t, *step, args)
	} else {
		ok = runPlain(&t, *step, args)
	}
	verdict := "ok"
	if !ok {
		verdict = "FAILED"
	}
	line := fmt.Sprintf("%s: %s in %s", *step, verdict, time.Since(start).Round(time.Second))
	t.Steps = append(t.Steps, line)
	fmt.Println("<== " + line)
	b, _ := json.Marshal(&t)
	if err := os.WriteFile(*state, b, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}

func runPlain(t *tally, step string, args []string) bool {
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		t.Failed++
		t.Failures = append(t.Failures, fmt.Sprintf("%s (%v)", step, err))
		return false
	}
	t.Passed++
	return true
}

type pkgState struct {
	start                 time.Time
	passed, failed, skips int
	running               map[string]time.Time
	output                map[string][]string // per test, kept until it ends
}

func runJSON(t *tally, step string, args []string) bool {
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		return false
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		return false
	}
	var mu sync.Mutex
	pkgs := map[string]*pkgState{}
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(30 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				mu.Lock()
				var parts []string
				for _, name := range sortedKeys(pkgs) {
					p := pkgs[name]
					s := fmt.Sprintf("%s %s", short(name), time.Since(p.start).Round(time.Second))
					if tn, since := longest(p.running); tn != "" {
						s += fmt.Sprintf(" (%s %s)", tn, time.Since(since).Round(time.Second))
					}
					parts = append(parts, s)
				}
				mu.Unlock()
				if len(parts) > 0 {
					fmt.Printf("    still running: %s\n", strings.Join(parts, ", "))
				}
			}
		}
	}()
	ok := true
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) != nil || e.Action == "" {
			fmt.Println(sc.Text()) // build errors and the like
			continue
		}
		mu.Lock()
		p := pkgs[e.Package]
		if p == nil && e.Package != "" {
			p = &pkgState{start: time.Now(), running: map[string]time.Time{}, output: map[string][]string{}}
			pkgs[e.Package] = p
		}
		if p == nil {
			mu.Unlock()
			if e.Output != "" {
				fmt.Print(e.Output)
			}
			continue
		}
		switch {
		case e.Action == "run" && e.Test != "":
			p.running[e.Test] = time.Now()
		case e.Action == "output":
			if e.Test != "" {
				if len(p.output[e.Test]) < 2000 {
					p.output[e.Test] = append(p.output[e.Test], e.Output)
				}
			} else if strings.HasPrefix(e.Output, "FAIL") || strings.Contains(e.Output, "panic:") || strings.HasPrefix(e.Output, "# ") {
				p.output[""] = append(p.output[""], e.Output)
			}
		case e.Test != "" && (e.Action == "pass" || e.Action == "fail" || e.Action == "skip"):
			delete(p.running, e.Test)
			name := short(e.Package) + "." + e.Test
			switch e.Action {
			case "pass":
				p.passed++
			case "fail":
				p.failed++
				t.Failures = append(t.Failures, name)
				fmt.Printf("--- FAIL %s (%.1fs)\n", name, e.Elapsed)
				for _, l := range p.output[e.Test] {
					fmt.Print("    " + l)
				}
			case "skip":
				p.skips++
				reason := skipReason(p.output[e.Test])
				t.Skips = append(t.Skips, name+": "+reason)
				fmt.Printf("--- SKIP %s: %s\n", name, reason)
			}
			delete(p.output, e.Test)
		case e.Test == "" && (e.Action == "pass" || e.Action == "fail" || e.Action == "skip"):
			verdict := "ok  "
			if e.Action == "skip" {
				verdict = "--  " // no test files
			}
			if e.Action == "fail" {
				verdict = "FAIL"
				ok = false
				if p.failed == 0 {
					// The package failed outside any test: a build
					// error, a panic in TestMain, a timeout.
					t.Failures = append(t.Failures, short(e.Package)+" (package)")
					p.failed++
					for _, l := range p.output[""] {
						fmt.Print("    " + l)
					}
				}
			}
			fmt.Printf("%s %-28s %7.1fs  %d passed, %d failed, %d skipped\n", verdict, short(e.Package), e.Elapsed, p.passed, p.failed, p.skips)
			t.Passed += p.passed
			t.Failed += p.failed
			t.Skipped += p.skips
			delete(pkgs, e.Package)
		}
		mu.Unlock()
	}
	close(done)
	if err := cmd.Wait(); err != nil {
		if ok {
			// go test failed without saying which package: count it.
			t.Failed++
			t.Failures = append(t.Failures, fmt.Sprintf("%s (%v)", step, err))
		}
		ok = false
	}
	for name, p := range pkgs { // packages that never finished
		t.Failed++
		t.Failures = append(t.Failures, short(name)+" (did not finish)")
		_ = p
		ok = false
	}
	return ok
}

// skipReason is what the skipped test said (t.Skip's message), wherever
// go test put it around the "--- SKIP" line.
func skipReason(out []string) string {
	var all []string
	for _, l := range out {
		if s := strings.TrimSpace(l); s != "" && !strings.HasPrefix(s, "=== ") && !strings.HasPrefix(s, "--- SKIP") {
			all = append(all, s)
		}
	}
	return strings.Join(all, " ")
}

func printSummary(t *tally) int {
	w := io.Writer(os.Stdout)
	fmt.Fprintln(w, "\n== make test summary")
	for _, s := range t.Steps {
		fmt.Fprintln(w, "  "+s)
	}
	if len(t.Skips) > 0 {
		fmt.Fprintln(w, "skipped:")
		for _, s := range t.Skips {
			fmt.Fprintln(w, "  "+s)
		}
	}
	if len(t.Failures) > 0 {
		fmt.Fprintln(w, "failed:")
		for _, s := range t.Failures {
			fmt.Fprintln(w, "  "+s)
		}
	}
	code := 0
	if t.Failed > 0 {
		code = 1
	}
	if os.Getenv("CI") == "true" && t.Skipped > 0 {
		fmt.Fprintf(w, "CI=true: %d test(s) skipped; under CI nothing may skip\n", t.Skipped)
		code = 1
	}
	fmt.Fprintf(w, "%d passed, %d failed, %d skipped\n", t.Passed, t.Failed, t.Skipped)
	return code
}

func short(pkg string) string {
	return strings.TrimPrefix(pkg, "github.com/pgward/pgward/")
}

func longest(m map[string]time.Time) (string, time.Time) {
	var name string
	var since time.Time
	for n, s := range m {
		if name == "" || s.Before(since) {
			name, since = n, s
		}
	}
	return name, since
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
