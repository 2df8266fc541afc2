package exporter

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"
)

// VerifyOptions are what VerifyAudit checks besides the chain.
type VerifyOptions struct {
	// Key is the node's checkpoint public key.
	Key ed25519.PublicKey
	// Anchors are checkpoints held outside the audit files (from the log
	// stream): each must be found in the files, or the files were cut.
	Anchors []Checkpoint
}

// VerifyReport says which lines of a set of audit files are proven by a
// checkpoint signed with the key, which are not and why, and every problem
// found. Unlike VerifyFiles it reads on after a break, so that later
// checkpoints still prove what follows it.
type VerifyReport struct {
	Files       []FileReport
	Problems    []string // failures: broken chain, bad checkpoints, anchors not found
	Notes       []string // anchors that matched
	Lines       int      // lines read
	Unproven    int      // lines not proven by a good checkpoint
	Checkpoints int      // good checkpoints
}

// OK is true when every line is proven and nothing failed.
func (r *VerifyReport) OK() bool { return len(r.Problems) == 0 && r.Unproven == 0 }

// FileReport is one file's lines in ranges.
type FileReport struct {
	Path   string
	Lines  int
	Ranges []LineRange
}

// LineRange is a run of lines of one file (1-based, inclusive) that are
// proven, or not, for one reason.
type LineRange struct {
	First, Last int
	Proven      bool
	// Why: for a proven range, the last checkpoint proving it; otherwise
	// the reason it is not proven.
	Why string
	// Checkpoints is how many checkpoints a proven range was merged from.
	Checkpoints int
}

// pos is a line in the file list.
type pos struct{ file, line int }

type verifier struct {
	opts     VerifyOptions
	rep      *VerifyReport
	paths    []string
	start    pos // first line not yet proven or reported
	lastSeq  int64
	cps      map[string]pos // "headseq/headhash" → checkpoint line
	haveGood bool
	badLast  bool      // a checkpoint failed after the last good one
	first    time.Time // time of the first line of the first file
}

// VerifyAudit verifies audit files given oldest first (as VerifyFiles does)
// and, with opts.Key, their checkpoints and anchors. The error is for I/O
// only; what the files show is in the report.
func VerifyAudit(paths []string, opts VerifyOptions) (*VerifyReport, error) {
	return verifyAudit(paths, func(i int) (io.ReadCloser, error) { return os.Open(paths[i]) }, opts)
}

// verifyAudit is VerifyAudit over files named paths that open opens.
func verifyAudit(paths []string, open func(i int) (io.ReadCloser, error), opts VerifyOptions) (*VerifyReport, error) {
	v := &verifier{opts: opts, rep: &VerifyReport{}, paths: paths, start: pos{0, 1}, cps: map[string]pos{}}
	var prev [sha256.Size]byte
	havePrev := false
	for i, p := range paths {
		f, err := open(i)
		if err != nil {
			return nil, err
		}
		v.rep.Files = append(v.rep.Files, FileReport{Path: p})
		err = v.file(i, f, &prev, &havePrev)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
	}
	last := len(paths) - 1
	if last >= 0 {
		why := "after the last checkpoint"
		if v.badLast {
			why = "after the last checkpoint that verifies"
		}
		if !v.haveGood {
			why = "no checkpoint signed with this key proves them"
		}
		v.unproven(pos{last, v.rep.Files[last].Lines}, why)
	}
	v.anchors()
	for _, f := range v.rep.Files {
		for _, r := range f.Ranges {
			if !r.Proven {
				v.rep.Unproven += r.Last - r.First + 1
			}
		}
	}
	return v.rep, nil
}

func (v *verifier) problem(i, line int, format string, args ...any) {
	v.rep.Problems = append(v.rep.Problems, fmt.Sprintf("%s:%d: ", v.paths[i], line)+fmt.Sprintf(format, args...))
}

func (v *verifier) file(i int, r io.Reader, prev *[sha256.Size]byte, havePrev *bool) error {
	br := bufio.NewReaderSize(r, 64<<10)
	fr := &v.rep.Files[i]
	want := int64(1)
	for line := 1; ; line++ {
		b, err := br.ReadBytes('\n')
		if len(b) == 0 && err == io.EOF {
			return nil
		}
		if err != nil && err != io.EOF {
			return err
		}
		fr.Lines = line
		v.rep.Lines++
		if !bytes.HasSuffix(b, []byte{'\n'}) {
			v.problem(i, line, "last line has no newline (an interrupted write, or cut inside a line)")
			v.unproven(pos{i, line}, "cut inside a line")
			return nil
		}
		b = b[:len(b)-1]
		seq, ph, err := chainFields(b)
		if err != nil {
			v.problem(i, line, "not an audit event: %v", err)
			v.unproven(pos{i, line}, fmt.Sprintf("the chain breaks at line %d", line))
			*havePrev = false
			continue
		}
		if i == 0 && line == 1 {
			var t struct {
				Time time.Time `json:"time"`
			}
			if json.Unmarshal(b, &t) == nil {
				v.first = t.Time
			}
		}
		broken := false
		if seq != want {
			v.problem(i, line, "seq %d, want %d: lines were removed or inserted", seq, want)
			broken = true
		}
		want = seq + 1
		v.lastSeq = seq
		switch {
		case line == 1 && i == 0:
			// Links to a file not given (or ZeroHash): not checkable.
		case !*havePrev:
		case ph != hex.EncodeToString(prev[:]):
			if line == 1 {
				v.problem(i, line, "prev_hash does not link to the last line of %s", v.paths[i-1])
			} else {
				v.problem(i, line, "prev_hash is not the hash of line %d: a line before was edited, or lines were removed or inserted", line-1)
			}
			broken = true
		}
		if broken {
			// What came before the break cannot be proven by what follows.
			v.unprovenBefore(pos{i, line}, fmt.Sprintf("the chain breaks at %s:%d", v.paths[i], line))
		}
		*prev = sha256.Sum256(b)
		*havePrev = true
		if bytes.HasPrefix(b, []byte(`{"event":"`+EventCheckpoint+`"`)) {
			v.checkpoint(i, line, seq, ph, b)
		}
	}
}

// checkpoint checks a checkpoint line and, if it holds, proves the lines
// before it back to the last break or checkpoint.
func (v *verifier) checkpoint(i, line int, seq int64, ph string, b []byte) {
	v.badLast = true // until it holds
	cp, err := parseCheckpointLine(b)
	if err != nil {
		v.problem(i, line, "checkpoint unreadable: %v", err)
		return
	}
	switch {
	case cp.HeadSeq != seq-1 || cp.HeadHash != ph:
		v.problem(i, line, "checkpoint (seq %d) signs head seq %d hash %.12s… but follows seq %d hash %.12s…: the lines before it were re-chained",
			seq, cp.HeadSeq, cp.HeadHash, seq-1, ph)
		return
	case v.opts.Key == nil:
		return
	case cp.KeyID != KeyID(v.opts.Key):
		v.problem(i, line, "checkpoint (seq %d) was signed by key %s, not by the given key %s", seq, cp.KeyID, KeyID(v.opts.Key))
		return
	case !cp.VerifySignature(v.opts.Key):
		v.problem(i, line, "checkpoint (seq %d): signature does not verify", seq)
		return
	}
	v.cps[anchorKey(cp.Node, cp.HeadSeq, cp.HeadHash)] = pos{i, line}
	v.haveGood, v.badLast = true, false
	v.rep.Checkpoints++
	by := fmt.Sprintf("the checkpoint at line %d (seq %d, %s)", line, seq, cp.Time.Format(time.RFC3339))
	v.mark(pos{i, line - 1}, true, by, i)
	v.start = pos{i, line + 1}
}

func anchorKey(node string, seq int64, hash string) string {
	return fmt.Sprintf("%s/%d/%s", node, seq, hash)
}

// unprovenBefore reports the lines from start up to the line before p.
// A good checkpoint right before p is included: its signature proves the
// lines before it, not its own unsigned fields.
func (v *verifier) unprovenBefore(p pos, why string) {
	end, ok := pos{p.file, p.line - 1}, p.line > 1
	if !ok && p.file > 0 {
		end, ok = pos{p.file - 1, v.rep.Files[p.file-1].Lines}, true
	}
	if ok {
		if v.start.file == end.file && v.start.line == end.line+1 {
			v.start = end
		}
		v.unproven(end, why)
	}
	v.start = p
}

func (v *verifier) unproven(end pos, why string) {
	v.mark(end, false, why, end.file)
	v.start = pos{end.file, end.line + 1}
}

// mark records the lines from v.start to end (inclusive), across files.
func (v *verifier) mark(end pos, proven bool, why string, byFile int) {
	for f := v.start.file; f <= end.file; f++ {
		first := 1
		if f == v.start.file {
			first = v.start.line
		}
		last := v.rep.Files[f].Lines
		if f == end.file {
			last = end.line
		}
		if first > last {
			continue
		}
		w := why
		if proven && f != byFile {
			w += " of " + v.paths[byFile]
		}
		fr := &v.rep.Files[f]
		n := len(fr.Ranges)
		// Consecutive proven ranges merge (the checkpoint line between them
		// is proven by the later one).
		if proven && n > 0 && fr.Ranges[n-1].Proven && fr.Ranges[n-1].Last+2 >= first {
			fr.Ranges[n-1].Last, fr.Ranges[n-1].Why = last, w
			fr.Ranges[n-1].Checkpoints++
			continue
		}
		fr.Ranges = append(fr.Ranges, LineRange{First: first, Last: last, Proven: proven, Why: w, Checkpoints: 1})
	}
}

func (v *verifier) anchors() {
	for _, a := range v.opts.Anchors {
		name := fmt.Sprintf("checkpoint seq %d of %s at %s (from outside the audit)", a.HeadSeq+1, a.Node, a.Time.Format(time.RFC3339))
		if v.opts.Key == nil || !a.VerifySignature(v.opts.Key) {
			v.rep.Problems = append(v.rep.Problems, name+": signature does not verify with the given key")
			continue
		}
		if p, ok := v.cps[anchorKey(a.Node, a.HeadSeq, a.HeadHash)]; ok {
			v.rep.Notes = append(v.rep.Notes, fmt.Sprintf("%s: found at %s:%d", name, v.paths[p.file], p.line))
			continue
		}
		msg := name + ": not in the files given"
		switch {
		case !v.first.IsZero() && a.Time.Before(v.first):
			msg += ": it is older than their first line; give the rotated files that hold it"
		case len(v.paths) > 0 && v.lastSeq <= a.HeadSeq:
			msg = fmt.Sprintf("%s: %s ends at seq %d, before it: lines were cut from the end (everything after seq %d is missing)",
				name, v.paths[len(v.paths)-1], v.lastSeq, v.lastSeq)
		default:
			msg += " (lines were cut or replaced, or the file holding it was not given)"
		}
		v.rep.Problems = append(v.rep.Problems, msg)
	}
}

// WriteText prints the report for people.
func (r *VerifyReport) WriteText(w io.Writer) {
	for _, f := range r.Files {
		fmt.Fprintf(w, "%s: %d lines\n", f.Path, f.Lines)
		for _, rg := range f.Ranges {
			lines := fmt.Sprintf("lines %d–%d", rg.First, rg.Last)
			if rg.First == rg.Last {
				lines = fmt.Sprintf("line %d", rg.First)
			}
			switch {
			case rg.Proven && rg.Checkpoints > 1:
				fmt.Fprintf(w, "  %s proven by %d checkpoints, the last %s\n", lines, rg.Checkpoints, rg.Why)
			case rg.Proven:
				fmt.Fprintf(w, "  %s proven by %s\n", lines, rg.Why)
			default:
				fmt.Fprintf(w, "  %s unproven: %s\n", lines, rg.Why)
			}
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "ok: %s\n", n)
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "FAIL: %s\n", p)
	}
	switch {
	case r.OK():
		fmt.Fprintf(w, "ok: all %d lines proven by %d signed checkpoints\n", r.Lines, r.Checkpoints)
	default:
		fmt.Fprintf(w, "FAIL: %d of %d lines unproven, %d problems\n", r.Unproven, r.Lines, len(r.Problems))
	}
}

// ReadLogAnchors reads pgward's JSON log for "audit checkpoint" lines and
// returns the latest checkpoint of each node: the one the audit files must
// still hold.
func ReadLogAnchors(r io.Reader) ([]Checkpoint, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	latest := map[string]Checkpoint{}
	var order []string
	for sc.Scan() {
		if !bytes.Contains(sc.Bytes(), []byte(`"audit checkpoint"`)) {
			continue
		}
		var l struct {
			Msg    string `json:"msg"`
			Anchor string `json:"anchor"`
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.Msg != "audit checkpoint" {
			continue
		}
		cp, err := ParseAnchor(l.Anchor)
		if err != nil {
			return nil, err
		}
		if _, ok := latest[cp.Node]; !ok {
			order = append(order, cp.Node)
		}
		latest[cp.Node] = cp
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	out := make([]Checkpoint, 0, len(order))
	for _, n := range order {
		out = append(out, latest[n])
	}
	return out, nil
}
