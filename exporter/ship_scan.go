package exporter

import "bytes"

// jsonField is one value of an audit line as scanLine found it: a string's
// bytes between its quotes (esc: with escapes, see unescapeJSON), or the raw
// token of a number, bool or null.
type jsonField struct {
	v   []byte
	esc bool
	ok  bool
}

// lineFields are the fields of an audit line the shipper makes attributes
// of: top-level ones, those of its process object and of process.pod.
type lineFields struct {
	event, time, uid, sid, requestID, spanID, dbName, dbService, dbQuery,
	dbUser, principal, sqlstate, success, rows jsonField
	pid, uid2, user, comm, exe, containerID, systemdUnit jsonField // process.*
	hasPod                                               bool
	podNamespace, podName, podServiceAccount             jsonField // process.pod.*
}

// field returns where the value of key goes at the level (0 the line, 1
// process, 2 process.pod); nil when it is not one the shipper reads.
func (f *lineFields) field(level int, key []byte) *jsonField {
	switch level {
	case 0:
		switch string(key) {
		case "event":
			return &f.event
		case "time":
			return &f.time
		case "uid":
			return &f.uid
		case "sid":
			return &f.sid
		case "request_id":
			return &f.requestID
		case "span_id":
			return &f.spanID
		case "db_name":
			return &f.dbName
		case "db_service":
			return &f.dbService
		case "db_query":
			return &f.dbQuery
		case "db_user":
			return &f.dbUser
		case "principal":
			return &f.principal
		case "sqlstate":
			return &f.sqlstate
		case "success":
			return &f.success
		case "rows":
			return &f.rows
		}
	case 1:
		switch string(key) {
		case "pid":
			return &f.pid
		case "uid":
			return &f.uid2
		case "user":
			return &f.user
		case "comm":
			return &f.comm
		case "exe":
			return &f.exe
		case "container_id":
			return &f.containerID
		case "systemd_unit":
			return &f.systemdUnit
		}
	case 2:
		switch string(key) {
		case "namespace":
			return &f.podNamespace
		case "name":
			return &f.podName
		case "service_account":
			return &f.podServiceAccount
		}
	}
	return nil
}

// scanLine reads the fields of an audit line in one pass over it (a line
// is one JSON object; the first of a key repeated wins). It reports false
// for a line that is not such an object; what it read until then is kept.
func scanLine(line []byte, f *lineFields) bool {
	*f = lineFields{}
	i := skipSpace(line, 0)
	if i >= len(line) || line[i] != '{' {
		return false
	}
	_, ok := scanObject(line, i, 0, f)
	return ok
}

// scanObject reads the object at line[i] ('{') of the level and returns the
// index after it.
func scanObject(line []byte, i, level int, f *lineFields) (int, bool) {
	i = skipSpace(line, i+1)
	if i < len(line) && line[i] == '}' {
		return i + 1, true
	}
	for i < len(line) {
		if line[i] != '"' {
			return i, false
		}
		key, kesc, end, ok := scanString(line, i)
		if !ok {
			return i, false
		}
		i = skipSpace(line, end)
		if i >= len(line) || line[i] != ':' {
			return i, false
		}
		i = skipSpace(line, i+1)
		if i >= len(line) {
			return i, false
		}
		var dst *jsonField
		if !kesc && level < 3 {
			dst = f.field(level, key)
		}
		switch c := line[i]; {
		case c == '"':
			v, esc, end, ok := scanString(line, i)
			if !ok {
				return i, false
			}
			if dst != nil && !dst.ok {
				*dst = jsonField{v: v, esc: esc, ok: true}
			}
			i = end
		case c == '{':
			next := -1
			switch {
			case level == 0 && !kesc && string(key) == "process":
				next = 1
			case level == 1 && !kesc && string(key) == "pod":
				next, f.hasPod = 2, true
			}
			var ok bool
			if next > 0 {
				i, ok = scanObject(line, i, next, f)
			} else {
				i, ok = skipContainer(line, i)
			}
			if !ok {
				return i, false
			}
		case c == '[':
			var ok bool
			if i, ok = skipContainer(line, i); !ok {
				return i, false
			}
		default:
			j := i
			for j < len(line) && line[j] != ',' && line[j] != '}' && line[j] != ']' && line[j] != ' ' {
				j++
			}
			if dst != nil && !dst.ok {
				*dst = jsonField{v: line[i:j], ok: true}
			}
			i = j
		}
		i = skipSpace(line, i)
		if i >= len(line) {
			return i, false
		}
		switch line[i] {
		case ',':
			i = skipSpace(line, i+1)
		case '}':
			return i + 1, true
		default:
			return i, false
		}
	}
	return i, false
}

// scanString returns the bytes of the string at line[i] ('"') between its
// quotes, whether it holds escapes, and the index after its closing quote.
func scanString(line []byte, i int) (v []byte, esc bool, end int, ok bool) {
	j := i + 1
	for {
		k := bytes.IndexByte(line[j:], '"')
		if k < 0 {
			return nil, false, len(line), false
		}
		k += j
		// Escaped when an odd number of backslashes precede it.
		n := 0
		for b := k - 1; b > i && line[b] == '\\'; b-- {
			n++
		}
		if n%2 == 0 {
			v = line[i+1 : k]
			return v, bytes.IndexByte(v, '\\') >= 0, k + 1, true
		}
		j = k + 1
	}
}

// skipContainer returns the index after the object or array at line[i].
func skipContainer(line []byte, i int) (int, bool) {
	depth := 0
	for i < len(line) {
		switch line[i] {
		case '"':
			_, _, end, ok := scanString(line, i)
			if !ok {
				return i, false
			}
			i = end
			continue
		case '{', '[':
			depth++
		case '}', ']':
			depth--
			if depth == 0 {
				return i + 1, true
			}
		}
		i++
	}
	return i, false
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}
