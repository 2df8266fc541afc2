package exporter

import (
	"encoding/hex"
	"strconv"
	"time"
	"unicode/utf16"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// This file encodes the shipper's ExportLogsServiceRequest by hand
// (protowire), record by record straight from the audit lines' bytes: no
// LogRecord structs, no reflection, no allocation per event once the
// buffers have grown. Field numbers are those of opentelemetry-proto
// (collector/logs/v1, logs/v1, common/v1, resource/v1); the test of the
// record decodes what it makes with the generated types.

// Field numbers used.
const (
	pbRequestResourceLogs = 1 // ExportLogsServiceRequest.resource_logs
	pbResourceLogsRes     = 1 // ResourceLogs.resource
	pbResourceLogsScope   = 2 // ResourceLogs.scope_logs
	pbResourceAttrs       = 1 // Resource.attributes
	pbScopeLogsScope      = 1 // ScopeLogs.scope
	pbScopeLogsRecords    = 2 // ScopeLogs.log_records
	pbScopeName           = 1 // InstrumentationScope.name

	pbRecTime      = 1  // LogRecord.time_unix_nano (fixed64)
	pbRecSevNum    = 2  // LogRecord.severity_number
	pbRecSevText   = 3  // LogRecord.severity_text
	pbRecBody      = 5  // LogRecord.body
	pbRecAttrs     = 6  // LogRecord.attributes
	pbRecTraceID   = 9  // LogRecord.trace_id
	pbRecSpanID    = 10 // LogRecord.span_id
	pbRecObserved  = 11 // LogRecord.observed_time_unix_nano (fixed64)
	pbRecEventName = 12 // LogRecord.event_name

	pbKVKey    = 1 // KeyValue.key
	pbKVValue  = 2 // KeyValue.value
	pbAnyStr   = 1 // AnyValue.string_value
	pbAnyBool  = 2 // AnyValue.bool_value
	pbAnyInt   = 3 // AnyValue.int_value
	sevInfo    = 9 // SEVERITY_NUMBER_INFO
	sevWarn    = 13
	pbBytes    = protowire.BytesType
	pbVarint   = protowire.VarintType
	pbFixed64  = protowire.Fixed64Type
	hexTraceID = 32
	hexSpanID  = 16
)

// shipBatch builds one export request. Its buffers are reused: reset, add
// each line, then request.
type shipBatch struct {
	head []byte // encoded Resource and InstrumentationScope fields (fixed per shipper)
	res  []byte // encoded Resource
	recs []byte // the records, each with its ScopeLogs tag and length
	rec  []byte // one record being built
	val  []byte // an unescaped JSON string
	// fields of the line being added
	fields lineFields
	out    []byte // the request
	n      int
}

// newShipBatch encodes the resource (the node and the audit file) once.
func newShipBatch(node, path string) *shipBatch {
	b := &shipBatch{}
	for _, kv := range [...][2]string{
		{"service.name", "pgward"}, {"host.name", node}, {"pgward.node", node}, {"log.file.path", path},
	} {
		b.res = appendKVStr(b.res, pbResourceAttrs, kv[0], []byte(kv[1]))
	}
	scope := protowire.AppendString(protowire.AppendTag(nil, pbScopeName, pbBytes), shipScope)
	b.head = protowire.AppendTag(b.head, pbScopeLogsScope, pbBytes)
	b.head = protowire.AppendBytes(b.head, scope)
	return b
}

func (b *shipBatch) reset() {
	b.recs, b.n = b.recs[:0], 0
}

// request returns the encoded ExportLogsServiceRequest of the lines added,
// valid until the next reset.
func (b *shipBatch) request() []byte {
	sl := len(b.head) + len(b.recs)
	rl := protowire.SizeTag(pbResourceLogsRes) + protowire.SizeBytes(len(b.res)) +
		protowire.SizeTag(pbResourceLogsScope) + protowire.SizeBytes(sl)
	o := b.out[:0]
	o = protowire.AppendTag(o, pbRequestResourceLogs, pbBytes)
	o = protowire.AppendVarint(o, uint64(rl))
	o = protowire.AppendTag(o, pbResourceLogsRes, pbBytes)
	o = protowire.AppendBytes(o, b.res)
	o = protowire.AppendTag(o, pbResourceLogsScope, pbBytes)
	o = protowire.AppendVarint(o, uint64(sl))
	o = append(o, b.head...)
	o = append(o, b.recs...)
	b.out = o
	return o
}

// add appends the log record of one audit line: the line exactly as written
// is the body (so the chain verifies from what arrived), the rest is for
// searching, named by the OpenTelemetry semantic conventions where they
// have a name (database, process, Kubernetes) and pgward.* otherwise.
// It reports false, adding nothing, for a line that is not valid UTF-8 (a
// protobuf string must be).
func (b *shipBatch) add(line []byte, fileStart string, observed time.Time) bool {
	if !utf8.Valid(line) {
		return false
	}
	r := b.rec[:0]
	r = protowire.AppendTag(r, pbRecObserved, pbFixed64)
	r = protowire.AppendFixed64(r, uint64(observed.UnixNano()))
	r = protowire.AppendTag(r, pbRecBody, pbBytes)
	r = protowire.AppendVarint(r, uint64(protowire.SizeTag(pbAnyStr)+protowire.SizeBytes(len(line))))
	r = protowire.AppendTag(r, pbAnyStr, pbBytes)
	r = protowire.AppendBytes(r, line)

	f := &b.fields
	scanLine(line, f)
	// str appends a string attribute, when the field is there and not empty.
	str := func(key string, v jsonField) {
		if !v.ok || len(v.v) == 0 {
			return
		}
		r = appendKVStr(r, pbRecAttrs, key, b.unescaped(v))
	}
	event := b.unescaped(f.event)
	if len(event) > 0 {
		r = protowire.AppendTag(r, pbRecEventName, pbBytes)
		r = protowire.AppendBytes(r, event)
	}
	if f.time.ok {
		if ns, ok := parseLineTime(f.time.v); ok {
			r = protowire.AppendTag(r, pbRecTime, pbFixed64)
			r = protowire.AppendFixed64(r, uint64(ns))
		}
	}
	if len(f.requestID.v) == hexTraceID {
		r = appendHexID(r, pbRecTraceID, f.requestID.v)
	}
	if len(f.spanID.v) == hexSpanID {
		r = appendHexID(r, pbRecSpanID, f.spanID.v)
	}
	seq, _ := spoolSeq(line)
	r = appendKVStr(r, pbRecAttrs, "event.name", event)
	r = appendKVInt(r, pbRecAttrs, "pgward.audit.seq", seq)
	r = appendKVStr(r, pbRecAttrs, "pgward.audit.file_start", []byte(fileStart))
	if len(f.dbService.v) > 0 || len(f.dbName.v) > 0 {
		r = appendKVStr(r, pbRecAttrs, "db.system.name", []byte("postgresql"))
	}
	str("log.record.uid", f.uid)
	str("db.namespace", f.dbName)
	str("db.query.text", f.dbQuery)
	str("db.response.status_code", f.sqlstate)
	str("session.id", f.sid)
	str("pgward.request_id", f.requestID)
	str("pgward.principal", f.principal)
	str("pgward.db_user", f.dbUser)
	str("pgward.db_service", f.dbService)
	str("process.executable.path", f.exe)
	str("process.executable.name", f.comm)
	str("process.owner", f.user)
	str("container.id", f.containerID)
	str("pgward.systemd_unit", f.systemdUnit)
	sev, sevText := uint64(sevInfo), "INFO"
	if v := string(f.success.v); f.success.ok && (v == "true" || v == "false") {
		r = appendKVBool(r, pbRecAttrs, "pgward.success", v == "true")
		if v == "false" {
			sev, sevText = sevWarn, "WARN"
			str("error.type", f.sqlstate)
		}
	}
	if n, ok := parseInt(f.rows.v); f.rows.ok && ok {
		r = appendKVInt(r, pbRecAttrs, "db.response.returned_rows", n)
	}
	if n, ok := parseInt(f.pid.v); f.pid.ok && ok && n != 0 {
		r = appendKVInt(r, pbRecAttrs, "process.pid", n)
	}
	if n, ok := parseInt(f.uid2.v); f.uid2.ok && ok {
		r = appendKVInt(r, pbRecAttrs, "process.user.id", n)
	}
	if f.hasPod {
		r = appendKVStr(r, pbRecAttrs, "k8s.pod.name", b.unescaped(f.podName)) // even when empty
		r = appendKVStr(r, pbRecAttrs, "k8s.namespace.name", b.unescaped(f.podNamespace))
		str("k8s.serviceaccount.name", f.podServiceAccount)
	}
	r = protowire.AppendTag(r, pbRecSevNum, pbVarint)
	r = protowire.AppendVarint(r, sev)
	r = protowire.AppendTag(r, pbRecSevText, pbBytes)
	r = protowire.AppendString(r, sevText)
	b.rec = r

	b.recs = protowire.AppendTag(b.recs, pbScopeLogsRecords, pbBytes)
	b.recs = protowire.AppendBytes(b.recs, r)
	b.n++
	return true
}

// unescaped returns the value of a string field, unescaped into b.val when
// it holds escapes (valid until the next call); empty when it is malformed.
func (b *shipBatch) unescaped(v jsonField) []byte {
	if !v.esc {
		return v.v
	}
	var ok bool
	if b.val, ok = unescapeJSON(b.val[:0], v.v); !ok {
		return nil
	}
	return b.val
}

// appendKVStr appends a KeyValue with a string AnyValue as field num.
func appendKVStr(b []byte, num protowire.Number, key string, v []byte) []byte {
	av := protowire.SizeTag(pbAnyStr) + protowire.SizeBytes(len(v))
	b = appendKVHead(b, num, key, av)
	b = protowire.AppendTag(b, pbAnyStr, pbBytes)
	return protowire.AppendBytes(b, v)
}

func appendKVInt(b []byte, num protowire.Number, key string, v int64) []byte {
	av := protowire.SizeTag(pbAnyInt) + protowire.SizeVarint(uint64(v))
	b = appendKVHead(b, num, key, av)
	b = protowire.AppendTag(b, pbAnyInt, pbVarint)
	return protowire.AppendVarint(b, uint64(v))
}

func appendKVBool(b []byte, num protowire.Number, key string, v bool) []byte {
	b = appendKVHead(b, num, key, protowire.SizeTag(pbAnyBool)+1)
	b = protowire.AppendTag(b, pbAnyBool, pbVarint)
	return protowire.AppendVarint(b, protowire.EncodeBool(v))
}

// appendKVHead appends the KeyValue's tag, length, key and the value's tag
// and length (av bytes of AnyValue follow).
func appendKVHead(b []byte, num protowire.Number, key string, av int) []byte {
	kv := protowire.SizeTag(pbKVKey) + protowire.SizeBytes(len(key)) + protowire.SizeTag(pbKVValue) + protowire.SizeBytes(av)
	b = protowire.AppendTag(b, num, pbBytes)
	b = protowire.AppendVarint(b, uint64(kv))
	b = protowire.AppendTag(b, pbKVKey, pbBytes)
	b = protowire.AppendString(b, key)
	b = protowire.AppendTag(b, pbKVValue, pbBytes)
	return protowire.AppendVarint(b, uint64(av))
}

// appendHexID appends a trace or span id given in hex (not appended when it
// is not hex).
func appendHexID(b []byte, num protowire.Number, h []byte) []byte {
	var id [16]byte
	n := len(h) / 2
	if _, err := hex.Decode(id[:n], h); err != nil {
		return b
	}
	b = protowire.AppendTag(b, num, pbBytes)
	return protowire.AppendBytes(b, id[:n])
}

// unescapeJSON appends the JSON string body s (between its quotes)
// unescaped to dst; false when an escape is malformed.
func unescapeJSON(dst, s []byte) ([]byte, bool) {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '\\' {
			dst = append(dst, c)
			continue
		}
		i++
		if i >= len(s) {
			return dst, false
		}
		switch s[i] {
		case '"', '\\', '/':
			dst = append(dst, s[i])
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			r1, ok := hex4(s[i+1:])
			if !ok {
				return dst, false
			}
			i += 4
			r := rune(r1)
			if utf16.IsSurrogate(r) {
				r = utf8.RuneError
				if i+2 < len(s) && s[i+1] == '\\' && s[i+2] == 'u' {
					if r2, ok := hex4(s[i+3:]); ok {
						if d := utf16.DecodeRune(rune(r1), rune(r2)); d != utf8.RuneError {
							r = d
							i += 6
						}
					}
				}
			}
			dst = utf8.AppendRune(dst, r)
		default:
			return dst, false
		}
	}
	return dst, true
}

func hex4(s []byte) (uint16, bool) {
	if len(s) < 4 {
		return 0, false
	}
	var v uint16
	for _, c := range s[:4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c -= 'a' - 10
		case c >= 'A' && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		v = v<<4 | uint16(c)
	}
	return v, true
}

// parseInt parses a JSON integer token without a string conversion.
func parseInt(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 19 {
		n, err := strconv.ParseInt(string(b), 10, 64)
		return n, err == nil
	}
	neg := b[0] == '-'
	if neg {
		b = b[1:]
		if len(b) == 0 {
			return 0, false
		}
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	if neg {
		n = -n
	}
	return n, true
}

// parseLineTime reads the "time" of an audit line, which the writer makes
// RFC 3339 in UTC (2026-12-07T05:06:10.004309079Z), in ns since the epoch;
// any other form goes through time.Parse.
func parseLineTime(b []byte) (int64, bool) {
	d := func(s []byte) (int, bool) {
		n := 0
		for _, c := range s {
			if c < '0' || c > '9' {
				return 0, false
			}
			n = n*10 + int(c-'0')
		}
		return n, true
	}
	if len(b) >= 20 && b[4] == '-' && b[7] == '-' && b[10] == 'T' && b[13] == ':' && b[16] == ':' && b[len(b)-1] == 'Z' {
		y, ok1 := d(b[0:4])
		mo, ok2 := d(b[5:7])
		dd, ok3 := d(b[8:10])
		h, ok4 := d(b[11:13])
		mi, ok5 := d(b[14:16])
		s, ok6 := d(b[17:19])
		frac := b[19 : len(b)-1]
		ns := 0
		ok7 := true
		if len(frac) > 0 {
			if frac[0] != '.' || len(frac) < 2 || len(frac) > 10 {
				ok7 = false
			} else {
				ns, ok7 = d(frac[1:])
				for range 10 - len(frac) {
					ns *= 10
				}
			}
		}
		if ok1 && ok2 && ok3 && ok4 && ok5 && ok6 && ok7 {
			return time.Date(y, time.Month(mo), dd, h, mi, s, ns, time.UTC).UnixNano(), true
		}
	}
	t, err := time.Parse(time.RFC3339Nano, string(b))
	if err != nil {
		return 0, false
	}
	return t.UnixNano(), true
}
