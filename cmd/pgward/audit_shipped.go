package main

import (
	"fmt"
	"io"
	"os"

	"github.com/pgward/pgward/exporter"
)

// verifyShipped is `pgward audit verify --otlp`: the collector's output
// files are read together (records of one node may be in any of them),
// each node's audit files are reassembled and verified. Without a key it
// checks the chain only (exit 0 when no line is missing or altered); with
// one, every line must be proven by a signed checkpoint that arrived.
func verifyShipped(files []string, opts exporter.VerifyOptions, stdout, stderr io.Writer) int {
	var readers []io.Reader
	for _, p := range files {
		f, err := os.Open(p)
		if err != nil {
			fmt.Fprintf(stderr, "pgward audit verify: %v\n", err)
			return exitFailure
		}
		defer f.Close()
		readers = append(readers, f, newlineReader{})
	}
	nodes, torn, err := exporter.ReadShipped(io.MultiReader(readers...))
	if err != nil {
		fmt.Fprintf(stderr, "pgward audit verify --otlp: %v\n", err)
		return exitBadInput
	}
	if len(nodes) == 0 {
		fmt.Fprintln(stderr, "pgward audit verify --otlp: no pgward audit record in the files")
		return exitBadInput
	}
	if torn > 0 {
		fmt.Fprintf(stdout, "note: %d torn export requests (a collector killed while writing); what they held is missing unless it arrived again\n", torn)
	}
	reps, err := exporter.VerifyShipped(nodes, opts)
	if err != nil {
		fmt.Fprintf(stderr, "pgward audit verify --otlp: %v\n", err)
		return exitFailure
	}
	code := exitOK
	for _, r := range reps {
		ok := r.Audit.OK()
		if opts.Key == nil {
			ok = len(r.Audit.Problems) == 0
		}
		w := stdout
		if !ok {
			w, code = stderr, exitBadInput
		}
		if opts.Key == nil {
			fmt.Fprintf(w, "node %s: %d records, %d duplicates, %d files, %d lines\n", r.Node.Node, r.Node.Records, r.Node.Duplicates, len(r.Node.Files), r.Audit.Lines)
			for _, p := range r.Audit.Problems {
				fmt.Fprintf(w, "  %s\n", p)
			}
			if ok {
				fmt.Fprintln(w, "  ok: sequence contiguous and hash chain intact in every file and across them")
			}
			continue
		}
		r.WriteText(w)
	}
	if opts.Key == nil {
		fmt.Fprintln(stdout, "note: no --key given, so nothing is keyed: a file cut at a line boundary, extended or re-chained as a whole still passes")
	}
	return code
}

// newlineReader separates files that do not end in a newline.
type newlineReader struct{}

func (newlineReader) Read(p []byte) (int, error) { return copy(p, "\n"), io.EOF }
