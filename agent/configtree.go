package agent

import (
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/pgward/pgward/broker"
)

// A Problem is one thing wrong with a configuration file: where it is (line
// 0 when no line is known), the key path and what is expected. Its Error is
// "file:line: key.path: message".
type Problem struct {
	File string
	Line int
	Path string
	Msg  string
}

func (p *Problem) Error() string {
	var b strings.Builder
	b.WriteString(p.File)
	if p.Line > 0 {
		b.WriteString(":" + strconv.Itoa(p.Line))
	}
	b.WriteString(": ")
	if p.Path != "" {
		b.WriteString(p.Path + ": ")
	}
	b.WriteString(p.Msg)
	return b.String()
}

// checkTree walks the YAML tree against the Go type the file decodes into
// and reports every unknown key (with the nearest known one), every
// duplicate key and every value of the wrong kind, in words a reader of
// docs/config.md knows rather than Go type names. It removes what it reports
// from the tree, so that decoding the rest yields every valid value and the
// checks that follow (Validate, Preflight) still run on them.
func checkTree(n *yaml.Node, t reflect.Type, path string) []Problem {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.AliasNode {
		return nil // decoded as written; yaml reports what is wrong with its target
	}
	if isNull(n) {
		return nil
	}
	if t == stringListType {
		if n.Kind == yaml.ScalarNode {
			return nil
		}
		if n.Kind == yaml.SequenceNode {
			var out []Problem
			keep := n.Content[:0]
			for i, c := range n.Content {
				if c.Kind != yaml.ScalarNode {
					out = append(out, Problem{Line: c.Line, Path: fmt.Sprintf("%s[%d]", path, i), Msg: "want a string"})
					continue
				}
				keep = append(keep, c)
			}
			n.Content = keep
			return out
		}
		return []Problem{{Line: n.Line, Path: path, Msg: "want a string or a list of strings"}}
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return []Problem{{Line: n.Line, Path: path, Msg: "want a mapping of keys (" + strings.Join(structKeys(t), ", ") + ")"}}
		}
		fields := map[string]reflect.Type{}
		collectFields(t, fields)
		return checkMapping(n, path, func(key string) (reflect.Type, string) {
			if ft, ok := fields[key]; ok {
				return ft, ""
			}
			return nil, suggest(key, fields)
		})
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			return []Problem{{Line: n.Line, Path: path, Msg: "want a mapping"}}
		}
		return checkMapping(n, path, func(string) (reflect.Type, string) { return t.Elem(), "" })
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return []Problem{{Line: n.Line, Path: path, Msg: "want a list (" + want(t.Elem()) + " each)"}}
		}
		var out []Problem
		keep := n.Content[:0]
		for i, c := range n.Content {
			p := checkTree(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i))
			if len(p) > 0 && c.Kind == yaml.ScalarNode {
				out = append(out, p...)
				continue // a bad scalar element would fail the whole decode
			}
			out = append(out, p...)
			keep = append(keep, c)
		}
		n.Content = keep
		return out
	}
	// Scalars.
	if n.Kind != yaml.ScalarNode {
		return []Problem{{Line: n.Line, Path: path, Msg: "want " + want(t)}}
	}
	if !scalarFits(n, t) {
		return []Problem{{Line: n.Line, Path: path, Msg: fmt.Sprintf("want %s, not %q", want(t), n.Value)}}
	}
	return nil
}

// checkMapping checks the keys of a mapping node: duplicates and unknown
// keys are reported and dropped, values are checked against their type and
// dropped when they could not be decoded.
func checkMapping(n *yaml.Node, path string, field func(string) (reflect.Type, string)) []Problem {
	var out []Problem
	seen := map[string]int{}
	keep := n.Content[:0]
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			out = append(out, Problem{Line: k.Line, Path: path, Msg: "want a plain key"})
			continue
		}
		if k.Tag == "!!merge" {
			keep = append(keep, k, v)
			continue
		}
		p := join(path, k.Value)
		if first, dup := seen[k.Value]; dup {
			out = append(out, Problem{Line: k.Line, Path: p, Msg: fmt.Sprintf("duplicate key (first at line %d); remove one", first)})
			continue
		}
		seen[k.Value] = k.Line
		ft, hint := field(k.Value)
		if ft == nil {
			msg := "unknown key"
			if hint != "" {
				msg += "; did you mean " + hint + "?"
			}
			out = append(out, Problem{Line: k.Line, Path: p, Msg: msg})
			continue
		}
		probs := checkTree(v, ft, p)
		out = append(out, probs...)
		if len(probs) > 0 && !isContainer(ft) {
			continue // drop a value that cannot be decoded
		}
		if len(probs) > 0 && v.Kind != wantKind(ft) {
			continue
		}
		keep = append(keep, k, v)
	}
	n.Content = keep
	return out
}

var (
	durationType   = reflect.TypeOf(time.Duration(0))
	stringListType = reflect.TypeOf(broker.StringList(nil))
)

func isContainer(t reflect.Type) bool {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct, reflect.Map, reflect.Slice:
		return t != stringListType
	}
	return false
}

func wantKind(t reflect.Type) yaml.Kind {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct, reflect.Map:
		return yaml.MappingNode
	case reflect.Slice:
		return yaml.SequenceNode
	}
	return yaml.ScalarNode
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

// want says what a value of type t looks like in the file.
func want(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == durationType {
		return "a duration such as 30s"
	}
	if t == stringListType {
		return "a string or a list of strings"
	}
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "a whole number"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number, 0 or more"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Struct, reflect.Map:
		return "a mapping"
	case reflect.Slice:
		return "a list"
	}
	return "a value"
}

// scalarFits says whether yaml.v3 will decode the scalar into t.
func scalarFits(n *yaml.Node, t reflect.Type) bool {
	if t == durationType {
		_, err := time.ParseDuration(n.Value)
		return err == nil
	}
	var v = reflect.New(t)
	return n.Decode(v.Interface()) == nil
}

// collectFields maps the YAML keys of struct t (and of its inline fields)
// to their types.
func collectFields(t reflect.Type, out map[string]reflect.Type) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		switch name, ok := yamlName(f); {
		case !ok:
		case name == "": // inline
			collectFields(f.Type, out)
		default:
			out[name] = f.Type
		}
	}
}

func structKeys(t reflect.Type) []string {
	m := map[string]reflect.Type{}
	collectFields(t, m)
	return keys(m)
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// suggest returns the known key nearest to key, when it is near enough to
// be a typo.
func suggest(key string, known map[string]reflect.Type) string {
	best, bestD := "", 1<<30
	for _, k := range keys(known) {
		if d := editDistance(key, k); d < bestD {
			best, bestD = k, d
		}
	}
	if bestD <= 2 || (bestD <= 3 && len(key) > 8) {
		return best
	}
	return ""
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			c := prev[j-1]
			if a[i-1] != b[j-1] {
				c++
			}
			cur[j] = min(c, prev[j]+1, cur[j-1]+1)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
