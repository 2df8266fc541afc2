package exporter

import (
	"encoding/base64"
	"encoding/binary"
	"math"
	"strconv"
	"time"

	"github.com/pgward/pgward/broker"
)

// ParamMode says how much of a statement's bound parameters the audit trail keeps.
type ParamMode string

// The parameter modes (config key audit.parameters).
const (
	// ParamsRedacted keeps each parameter's type (OID and name), format and
	// length, never its value. The default.
	ParamsRedacted ParamMode = "redacted"
	// ParamsFull keeps values: text-format values as sent, binary values
	// decoded to their text form for common types, base64 otherwise.
	ParamsFull ParamMode = "full"
	// ParamsNone leaves db_query_parameters out.
	ParamsNone ParamMode = "none"
)

// Postgres type OIDs decoded in binary format (pg_type.dat).
const (
	oidBool        = 16
	oidBytea       = 17
	oidChar        = 18
	oidName        = 19
	oidInt8        = 20
	oidInt2        = 21
	oidInt4        = 23
	oidText        = 25
	oidOID         = 26
	oidJSON        = 114
	oidXML         = 142
	oidCIDR        = 650
	oidFloat4      = 700
	oidFloat8      = 701
	oidUnknown     = 705
	oidInet        = 869
	oidBpchar      = 1042
	oidVarchar     = 1043
	oidDate        = 1082
	oidTime        = 1083
	oidTimestamp   = 1114
	oidTimestamptz = 1184
	oidInterval    = 1186
	oidNumeric     = 1700
	oidUUID        = 2950
	oidJSONB       = 3802
)

// typeName names the common built-in types; "" for others (the OID still says).
func typeName(oid uint32) string {
	switch oid {
	case oidBool:
		return "bool"
	case oidBytea:
		return "bytea"
	case oidChar:
		return "char"
	case oidName:
		return "name"
	case oidInt8:
		return "int8"
	case oidInt2:
		return "int2"
	case oidInt4:
		return "int4"
	case oidText:
		return "text"
	case oidOID:
		return "oid"
	case oidJSON:
		return "json"
	case oidXML:
		return "xml"
	case oidCIDR:
		return "cidr"
	case oidFloat4:
		return "float4"
	case oidFloat8:
		return "float8"
	case oidUnknown:
		return "unknown"
	case oidInet:
		return "inet"
	case oidBpchar:
		return "bpchar"
	case oidVarchar:
		return "varchar"
	case oidDate:
		return "date"
	case oidTime:
		return "time"
	case oidTimestamp:
		return "timestamp"
	case oidTimestamptz:
		return "timestamptz"
	case oidInterval:
		return "interval"
	case oidNumeric:
		return "numeric"
	case oidUUID:
		return "uuid"
	case oidJSONB:
		return "jsonb"
	}
	return ""
}

const redactedValue = "[REDACTED]"

// appendParam appends one element of db_query_parameters: an object with
// "oid", "type" (when known), "format", and then by mode "length" (redacted),
// or "value" (full: a string, or null for SQL NULL) — or "base64" for a binary
// value of a type not decoded here. A parameter marked secret (a password
// bound to CREATE/ALTER ROLE … PASSWORD $n) gets "value":"[REDACTED]" in
// every mode.
func appendParam(buf []byte, p broker.Param, mode ParamMode, secret bool) []byte {
	buf = append(buf, '{')
	buf = appendUintField(buf, "oid", uint64(p.OID))
	buf = appendStringFieldOmit(buf, "type", typeName(p.OID))
	if p.Format == 1 {
		buf = appendStringField(buf, "format", "binary")
	} else {
		buf = appendStringField(buf, "format", "text")
	}
	switch {
	case secret:
		buf = appendStringField(buf, "value", redactedValue)
	case mode != ParamsFull:
		if p.Value == nil {
			buf = appendIntField(buf, "length", -1)
		} else {
			buf = appendIntField(buf, "length", int64(len(p.Value)))
		}
	case p.Value == nil:
		buf = append(appendKey(buf, "value"), "null"...)
	case p.Format != 1:
		buf = appendJSONBytes(appendKey(buf, "value"), p.Value)
	default:
		buf = appendBinaryValue(buf, p.OID, p.Value)
	}
	return append(buf, '}')
}

// appendBinaryValue appends "value":"<text form>" for a binary value it can
// decode, else "base64":"…".
func appendBinaryValue(buf []byte, oid uint32, v []byte) []byte {
	mark := len(buf)
	buf = appendKey(buf, "value")
	var scratch [64]byte
	text, ok := decodeBinary(scratch[:0], oid, v)
	if ok {
		return appendJSONBytes(buf, text)
	}
	if oid == oidText || oid == oidVarchar || oid == oidBpchar || oid == oidName ||
		oid == oidJSON || oid == oidXML || oid == oidUnknown || oid == oidChar {
		// Binary text types are the bytes themselves; the escaper replaces invalid UTF-8.
		return appendJSONBytes(buf, v)
	}
	if oid == oidJSONB && len(v) >= 1 && v[0] == 1 {
		return appendJSONBytes(buf, v[1:])
	}
	buf = buf[:mark]
	buf = appendKey(buf, "base64")
	buf = append(buf, '"')
	buf = base64.StdEncoding.AppendEncode(buf, v)
	return append(buf, '"')
}

// pgEpoch is 2000-01-01 00:00:00 UTC in Unix seconds.
const pgEpoch = 946684800

// decodeBinary appends the Postgres text form of a binary value of a
// fixed-format type to dst. It reports false when the type is not one it
// decodes or the value is malformed for its type.
func decodeBinary(dst []byte, oid uint32, v []byte) ([]byte, bool) {
	switch oid {
	case oidBool:
		if len(v) != 1 || v[0] > 1 {
			return dst, false
		}
		if v[0] == 1 {
			return append(dst, 't'), true
		}
		return append(dst, 'f'), true
	case oidInt2:
		if len(v) != 2 {
			return dst, false
		}
		return strconv.AppendInt(dst, int64(int16(binary.BigEndian.Uint16(v))), 10), true
	case oidInt4:
		if len(v) != 4 {
			return dst, false
		}
		return strconv.AppendInt(dst, int64(int32(binary.BigEndian.Uint32(v))), 10), true
	case oidInt8:
		if len(v) != 8 {
			return dst, false
		}
		return strconv.AppendInt(dst, int64(binary.BigEndian.Uint64(v)), 10), true
	case oidOID:
		if len(v) != 4 {
			return dst, false
		}
		return strconv.AppendUint(dst, uint64(binary.BigEndian.Uint32(v)), 10), true
	case oidFloat4:
		if len(v) != 4 {
			return dst, false
		}
		return appendFloat(dst, float64(math.Float32frombits(binary.BigEndian.Uint32(v))), 32), true
	case oidFloat8:
		if len(v) != 8 {
			return dst, false
		}
		return appendFloat(dst, math.Float64frombits(binary.BigEndian.Uint64(v)), 64), true
	case oidBytea:
		dst = append(dst, '\\', 'x')
		for _, b := range v {
			dst = append(dst, hexDigits[b>>4], hexDigits[b&0xf])
		}
		return dst, true
	case oidUUID:
		if len(v) != 16 {
			return dst, false
		}
		for i, b := range v {
			if i == 4 || i == 6 || i == 8 || i == 10 {
				dst = append(dst, '-')
			}
			dst = append(dst, hexDigits[b>>4], hexDigits[b&0xf])
		}
		return dst, true
	case oidDate:
		if len(v) != 4 {
			return dst, false
		}
		days := int32(binary.BigEndian.Uint32(v))
		switch days {
		case math.MaxInt32:
			return append(dst, "infinity"...), true
		case math.MinInt32:
			return append(dst, "-infinity"...), true
		}
		t := time.Unix(pgEpoch+int64(days)*86400, 0).UTC()
		return appendPGDate(dst, t, true), true
	case oidTime:
		if len(v) != 8 {
			return dst, false
		}
		us := int64(binary.BigEndian.Uint64(v))
		if us < 0 || us > 24*3600*1e6 {
			return dst, false
		}
		return appendPGClock(dst, us/1e6, us%1e6), true
	case oidTimestamp, oidTimestamptz:
		if len(v) != 8 {
			return dst, false
		}
		us := int64(binary.BigEndian.Uint64(v))
		switch us {
		case math.MaxInt64:
			return append(dst, "infinity"...), true
		case math.MinInt64:
			return append(dst, "-infinity"...), true
		}
		secs, frac := us/1e6, us%1e6
		if frac < 0 {
			secs, frac = secs-1, frac+1e6
		}
		t := time.Unix(pgEpoch+secs, 0).UTC()
		dst = appendPGDate(dst, t, false)
		dst = append(dst, ' ')
		dst = appendPGClock(dst, int64(t.Hour()*3600+t.Minute()*60+t.Second()), frac)
		if oid == oidTimestamptz {
			dst = append(dst, '+', '0', '0')
		}
		if t.Year() < 1 {
			dst = append(dst, " BC"...)
		}
		return dst, true
	case oidNumeric:
		return decodeNumeric(dst, v)
	}
	return dst, false
}

func appendFloat(dst []byte, f float64, bits int) []byte {
	switch {
	case math.IsNaN(f):
		return append(dst, "NaN"...)
	case math.IsInf(f, 1):
		return append(dst, "Infinity"...)
	case math.IsInf(f, -1):
		return append(dst, "-Infinity"...)
	}
	return strconv.AppendFloat(dst, f, 'g', -1, bits)
}

// appendPGDate appends YYYY-MM-DD in Postgres' ISO style: years before 1 AD
// are written as positive years followed by " BC" (when bc is set).
func appendPGDate(dst []byte, t time.Time, bc bool) []byte {
	y := t.Year()
	if y < 1 {
		y = 1 - y
	}
	dst = appendPadded(dst, int64(y), 4)
	dst = append(dst, '-')
	dst = appendPadded(dst, int64(t.Month()), 2)
	dst = append(dst, '-')
	dst = appendPadded(dst, int64(t.Day()), 2)
	if bc && t.Year() < 1 {
		dst = append(dst, " BC"...)
	}
	return dst
}

// appendPGClock appends HH:MM:SS[.ffffff] with trailing zeros of the
// fraction trimmed, as Postgres prints times.
func appendPGClock(dst []byte, secs, micros int64) []byte {
	dst = appendPadded(dst, secs/3600, 2)
	dst = append(dst, ':')
	dst = appendPadded(dst, secs/60%60, 2)
	dst = append(dst, ':')
	dst = appendPadded(dst, secs%60, 2)
	if micros > 0 {
		dst = append(dst, '.')
		n := len(dst)
		dst = appendPadded(dst, micros, 6)
		for len(dst) > n && dst[len(dst)-1] == '0' {
			dst = dst[:len(dst)-1]
		}
	}
	return dst
}

func appendPadded(dst []byte, v int64, width int) []byte {
	var tmp [20]byte
	s := strconv.AppendInt(tmp[:0], v, 10)
	for i := len(s); i < width; i++ {
		dst = append(dst, '0')
	}
	return append(dst, s...)
}

// Numeric sign words (src/backend/utils/adt/numeric.c).
const (
	numericPos  = 0x0000
	numericNeg  = 0x4000
	numericNaN  = 0xC000
	numericPInf = 0xD000
	numericNInf = 0xF000
)

// decodeNumeric decodes the binary numeric format: ndigits, weight, sign,
// dscale (int16 each), then ndigits base-10000 digits; text as numeric_out
// prints it.
func decodeNumeric(dst []byte, v []byte) ([]byte, bool) {
	if len(v) < 8 {
		return dst, false
	}
	ndigits := int(int16(binary.BigEndian.Uint16(v[0:])))
	weight := int(int16(binary.BigEndian.Uint16(v[2:])))
	sign := binary.BigEndian.Uint16(v[4:])
	dscale := int(int16(binary.BigEndian.Uint16(v[6:])))
	if ndigits < 0 || dscale < 0 || dscale > 0x3FFF || len(v) != 8+2*ndigits {
		return dst, false
	}
	digit := func(i int) int {
		if i < 0 || i >= ndigits {
			return 0
		}
		return int(binary.BigEndian.Uint16(v[8+2*i:]))
	}
	for i := range ndigits {
		if digit(i) > 9999 {
			return dst, false
		}
	}
	// A value whose integer part would start with zero groups (no digits
	// but a weight, or a zero first digit with weight > 0) is not a numeric
	// Postgres or a driver writes: it would print as a run of leading zeros
	// (up to 131072 of them). Not decoded; audited as base64 with the OID.
	if weight > 0 && (ndigits == 0 || digit(0) == 0) {
		return dst, false
	}
	switch sign {
	case numericNaN:
		return append(dst, "NaN"...), true
	case numericPInf:
		return append(dst, "Infinity"...), true
	case numericNInf:
		return append(dst, "-Infinity"...), true
	case numericNeg:
		dst = append(dst, '-')
	case numericPos:
	default:
		return dst, false
	}
	if weight < 0 {
		dst = append(dst, '0')
	} else {
		dst = strconv.AppendInt(dst, int64(digit(0)), 10)
		for d := 1; d <= weight; d++ {
			dst = appendPadded(dst, int64(digit(d)), 4)
		}
	}
	if dscale > 0 {
		dst = append(dst, '.')
		end := len(dst) + dscale
		for d := weight + 1; len(dst) < end; d++ {
			dst = appendPadded(dst, int64(digit(d)), 4)
		}
		dst = dst[:end]
	}
	return dst, true
}
