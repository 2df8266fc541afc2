package exporter

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
)

// ShippedNode is the audit trail of one node as it arrived at a collector:
// its files, reassembled from the records' bodies, in chain order.
type ShippedNode struct {
	Node       string
	Files      []*ShippedFile
	Records    int // log records read for this node
	Duplicates int // records whose body arrived before
}

// ShippedFile is one audit file reassembled from what arrived: the distinct
// lines, ordered by seq. Start (its first line's prev_hash) names it.
type ShippedFile struct {
	Start string
	Lines [][]byte
	// Conflicts are seqs that arrived with two different lines (an edit
	// somewhere between the node and here, or two chains mixed up).
	Conflicts []int64
}

// Name is how reports name the file: node/after-<first 12 hex of Start>.
func (f *ShippedFile) name(node string) string {
	return node + "/after-" + f.Start[:min(12, len(f.Start))]
}

// The OTLP JSON of the collector's file exporter (one
// ExportLogsServiceRequest per line), as much as reassembly needs.
type shippedJSON struct {
	ResourceLogs []struct {
		Resource struct {
			Attributes []shippedKV `json:"attributes"`
		} `json:"resource"`
		ScopeLogs []struct {
			LogRecords []struct {
				Body       shippedValue `json:"body"`
				Attributes []shippedKV  `json:"attributes"`
			} `json:"logRecords"`
		} `json:"scopeLogs"`
	} `json:"resourceLogs"`
}

type shippedKV struct {
	Key   string       `json:"key"`
	Value shippedValue `json:"value"`
}

type shippedValue struct {
	String string `json:"stringValue"`
}

func shippedAttr(kvs []shippedKV, key string) string {
	for _, kv := range kvs {
		if kv.Key == key {
			return kv.Value.String
		}
	}
	return ""
}

// ReadShipped reads what a collector wrote of pgward's audit records: the
// OpenTelemetry Collector file exporter's JSON lines (OTLP JSON, one export
// request per line), or records pulled from a store in that shape, in any
// order and with duplicates. Records that are not pgward audit lines (other
// logs, traces) are skipped. The node is the resource's pgward.node (else
// host.name); the file is the record's pgward.audit.file_start, else the
// line's own chain fields decide.
//
// A collector killed while writing leaves a torn request (and, restarted,
// appends the next on the same line): what follows the tear is read, the
// torn part is counted in torn (its records, acknowledged or not, are lost
// by the collector; they show as gaps).
func ReadShipped(r io.Reader) (nodes []*ShippedNode, torn int, err error) {
	type key struct{ node, start string }
	type fileAcc struct {
		bySeq map[int64][]byte
		conf  map[int64]bool
	}
	byNode := map[string]*ShippedNode{}
	files := map[key]*fileAcc{}
	seen := map[string]bool{}
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 256<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 || !bytes.Contains(line, []byte(`"resourceLogs"`)) {
			continue
		}
		var req shippedJSON
		if err := json.Unmarshal(line, &req); err != nil {
			torn++
			i := bytes.LastIndex(line, []byte(`{"resourceLogs":`))
			if i <= 0 || json.Unmarshal(line[i:], &req) != nil {
				continue
			}
		}
		for _, rl := range req.ResourceLogs {
			node := shippedAttr(rl.Resource.Attributes, "pgward.node")
			if node == "" {
				node = shippedAttr(rl.Resource.Attributes, "host.name")
			}
			for _, sl := range rl.ScopeLogs {
				for _, lr := range sl.LogRecords {
					body := lr.Body.String
					seq, prev, err := chainFields([]byte(body))
					if err != nil {
						continue // not an audit line
					}
					start := shippedAttr(lr.Attributes, "pgward.audit.file_start")
					if start == "" && seq == 1 {
						start = prev
					}
					nd := byNode[node]
					if nd == nil {
						nd = &ShippedNode{Node: node}
						byNode[node] = nd
					}
					nd.Records++
					if seen[node+"\x00"+body] {
						nd.Duplicates++
						continue
					}
					seen[node+"\x00"+body] = true
					k := key{node, start}
					fa := files[k]
					if fa == nil {
						fa = &fileAcc{bySeq: map[int64][]byte{}, conf: map[int64]bool{}}
						files[k] = fa
					}
					if _, dup := fa.bySeq[seq]; dup {
						fa.conf[seq] = true
						continue
					}
					fa.bySeq[seq] = []byte(body)
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, torn, err
	}
	// Reassemble each file by seq, then order each node's files: a file
	// follows the one whose last line's hash is its Start.
	for k, fa := range files {
		f := &ShippedFile{Start: k.start}
		seqs := make([]int64, 0, len(fa.bySeq))
		for s := range fa.bySeq {
			seqs = append(seqs, s)
		}
		slices.Sort(seqs)
		for _, s := range seqs {
			f.Lines = append(f.Lines, fa.bySeq[s])
		}
		for s := range fa.conf {
			f.Conflicts = append(f.Conflicts, s)
		}
		slices.Sort(f.Conflicts)
		byNode[k.node].Files = append(byNode[k.node].Files, f)
	}
	out := make([]*ShippedNode, 0, len(byNode))
	for _, nd := range byNode {
		nd.Files = chainOrder(nd.Files)
		out = append(out, nd)
	}
	slices.SortFunc(out, func(a, b *ShippedNode) int { return strings.Compare(a.Node, b.Node) })
	return out, torn, nil
}

// chainOrder puts files in chain order: each after the file whose last line
// hashes to its Start; files whose predecessor did not arrive start a run
// (runs ordered by the time of their first line).
func chainOrder(fs []*ShippedFile) []*ShippedFile {
	byStart := map[string]*ShippedFile{}
	lastHash := map[*ShippedFile]string{}
	for _, f := range fs {
		byStart[f.Start] = f
		if len(f.Lines) > 0 {
			lastHash[f] = hashHex(f.Lines[len(f.Lines)-1])
		}
	}
	hasPred := map[*ShippedFile]bool{}
	for _, f := range fs {
		if g := byStart[lastHash[f]]; g != nil && g != f {
			hasPred[g] = true
		}
	}
	var heads []*ShippedFile
	for _, f := range fs {
		if !hasPred[f] {
			heads = append(heads, f)
		}
	}
	slices.SortFunc(heads, func(a, b *ShippedFile) int {
		ta, _ := lineTime(a.Lines[0])
		tb, _ := lineTime(b.Lines[0])
		return ta.Compare(tb)
	})
	var out []*ShippedFile
	done := map[*ShippedFile]bool{}
	for _, h := range heads {
		for f := h; f != nil && !done[f]; f = byStart[lastHash[f]] {
			done[f] = true
			out = append(out, f)
		}
	}
	for _, f := range fs { // a cycle (cannot happen with SHA-256) or leftovers
		if !done[f] {
			out = append(out, f)
		}
	}
	return out
}

// ShippedReport is the verification of one node's shipped trail.
type ShippedReport struct {
	Node *ShippedNode
	// Audit is the chain and checkpoint check of the reassembled files
	// (named node/after-<start>), as VerifyAudit reports files on disk.
	Audit *VerifyReport
}

// VerifyShipped verifies each node's reassembled trail with VerifyAudit:
// with opts.Key, lines are proven by the signed checkpoints that arrived;
// without, the report lists chain problems (a missing seq is a gap: the
// line did not arrive) and every line as unproven by a key.
func VerifyShipped(nodes []*ShippedNode, opts VerifyOptions) ([]*ShippedReport, error) {
	var out []*ShippedReport
	for _, nd := range nodes {
		names := make([]string, len(nd.Files))
		for i, f := range nd.Files {
			names[i] = f.name(nd.Node)
		}
		rep, err := verifyAudit(names, func(i int) (io.ReadCloser, error) {
			var b bytes.Buffer
			for _, l := range nd.Files[i].Lines {
				b.Write(l)
				b.WriteByte('\n')
			}
			return io.NopCloser(&b), nil
		}, opts)
		if err != nil {
			return nil, err
		}
		for i, f := range nd.Files {
			for _, s := range f.Conflicts {
				rep.Problems = append(rep.Problems, fmt.Sprintf("%s: seq %d arrived as two different lines", names[i], s))
			}
		}
		out = append(out, &ShippedReport{Node: nd, Audit: rep})
	}
	return out, nil
}

// WriteText prints the report: the node, what arrived, then the files'
// ranges as VerifyReport.WriteText does.
func (r *ShippedReport) WriteText(w io.Writer) {
	fmt.Fprintf(w, "node %s: %d records, %d duplicates, %d files\n", r.Node.Node, r.Node.Records, r.Node.Duplicates, len(r.Node.Files))
	r.Audit.WriteText(w)
}
