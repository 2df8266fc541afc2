package exporter

import (
	"strconv"
	"sync"
	"unicode/utf8"
	"unsafe"
)

// This file holds the append-style JSON encoder of the audit trail. It uses
// no reflection and allocates nothing beyond growing the caller's buffer.

const hexDigits = "0123456789abcdef"

// linePool recycles the buffers audit lines are built in (*[]byte); the
// zero value is ready.
type linePool struct{ p sync.Pool }

func (lp *linePool) getBuf() *[]byte {
	if b, ok := lp.p.Get().(*[]byte); ok {
		*b = (*b)[:0]
		return b
	}
	b := make([]byte, 0, 2048)
	return &b
}

func (lp *linePool) putBuf(b *[]byte) {
	if cap(*b) > 64<<10 {
		return // don't keep the buffer of an outsized statement
	}
	lp.p.Put(b)
}

// appendJSONString appends s as a JSON string literal. It escapes what RFC 8259
// requires (quote, backslash, C0 controls), replaces invalid UTF-8 with U+FFFD,
// and escapes U+2028 and U+2029 so the line is also valid JavaScript, as
// encoding/json does. strconv.AppendQuote is not used: its \x and \U escapes
// are not JSON.
func appendJSONString(buf []byte, s string) []byte {
	buf = append(buf, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			buf = append(buf, s[start:i]...)
			switch c {
			case '"', '\\':
				buf = append(buf, '\\', c)
			case '\n':
				buf = append(buf, '\\', 'n')
			case '\r':
				buf = append(buf, '\\', 'r')
			case '\t':
				buf = append(buf, '\\', 't')
			case '\b':
				buf = append(buf, '\\', 'b')
			case '\f':
				buf = append(buf, '\\', 'f')
			default:
				buf = append(buf, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			buf = append(buf, s[start:i]...)
			buf = append(buf, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			buf = append(buf, s[start:i]...)
			buf = append(buf, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	buf = append(buf, s[start:]...)
	return append(buf, '"')
}

// appendJSONBytes is appendJSONString for a byte slice, without copying it.
func appendJSONBytes(buf []byte, b []byte) []byte {
	// The string does not outlive the call and b is not modified during it.
	return appendJSONString(buf, unsafe.String(unsafe.SliceData(b), len(b)))
}

// appendKey appends `,"key":` — or `"key":` right after an opening brace.
func appendKey(buf []byte, key string) []byte {
	if n := len(buf); n > 0 && buf[n-1] != '{' && buf[n-1] != '[' {
		buf = append(buf, ',')
	}
	buf = append(buf, '"')
	buf = append(buf, key...) // keys are constants that need no escaping
	return append(buf, '"', ':')
}

func appendStringField(buf []byte, key, v string) []byte {
	return appendJSONString(appendKey(buf, key), v)
}

// appendStringFieldOmit appends the field only when v is not empty.
func appendStringFieldOmit(buf []byte, key, v string) []byte {
	if v == "" {
		return buf
	}
	return appendStringField(buf, key, v)
}

func appendIntField(buf []byte, key string, v int64) []byte {
	return strconv.AppendInt(appendKey(buf, key), v, 10)
}

func appendUintField(buf []byte, key string, v uint64) []byte {
	return strconv.AppendUint(appendKey(buf, key), v, 10)
}

func appendBoolField(buf []byte, key string, v bool) []byte {
	return strconv.AppendBool(appendKey(buf, key), v)
}
