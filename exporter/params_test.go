package exporter

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"

	"github.com/pgward/pgward/broker"
)

func be16(v int16) []byte  { return binary.BigEndian.AppendUint16(nil, uint16(v)) }
func be32(v int32) []byte  { return binary.BigEndian.AppendUint32(nil, uint32(v)) }
func be64(v int64) []byte  { return binary.BigEndian.AppendUint64(nil, uint64(v)) }
func f64(v float64) []byte { return binary.BigEndian.AppendUint64(nil, math.Float64bits(v)) }

// numericBytes builds the binary numeric format by hand.
func numericBytes(weight int16, sign uint16, dscale int16, digits ...int16) []byte {
	b := be16(int16(len(digits)))
	b = append(b, be16(weight)...)
	b = binary.BigEndian.AppendUint16(b, sign)
	b = append(b, be16(dscale)...)
	for _, d := range digits {
		b = append(b, be16(d)...)
	}
	return b
}

func TestAppendParam(t *testing.T) {
	tests := []struct {
		name   string
		p      broker.Param
		mode   ParamMode
		secret bool
		want   string
	}{
		{"text full", broker.Param{OID: oidText, Value: []byte("alice")}, ParamsFull, false,
			`{"oid":25,"type":"text","format":"text","value":"alice"}`},
		{"text redacted", broker.Param{OID: oidText, Value: []byte("alice")}, ParamsRedacted, false,
			`{"oid":25,"type":"text","format":"text","length":5}`},
		{"null full", broker.Param{OID: oidInt4, Value: nil}, ParamsFull, false,
			`{"oid":23,"type":"int4","format":"text","value":null}`},
		{"null redacted", broker.Param{OID: oidInt4, Value: nil}, ParamsRedacted, false,
			`{"oid":23,"type":"int4","format":"text","length":-1}`},
		{"unspecified oid", broker.Param{OID: 0, Value: []byte("42")}, ParamsFull, false,
			`{"oid":0,"format":"text","value":"42"}`},
		{"secret full", broker.Param{OID: oidText, Value: []byte("hunter2")}, ParamsFull, true,
			`{"oid":25,"type":"text","format":"text","value":"[REDACTED]"}`},
		{"secret redacted hides length", broker.Param{OID: oidText, Value: []byte("hunter2")}, ParamsRedacted, true,
			`{"oid":25,"type":"text","format":"text","value":"[REDACTED]"}`},
		{"int4 binary", broker.Param{OID: oidInt4, Format: 1, Value: be32(-42)}, ParamsFull, false,
			`{"oid":23,"type":"int4","format":"binary","value":"-42"}`},
		{"int4 binary redacted", broker.Param{OID: oidInt4, Format: 1, Value: be32(-42)}, ParamsRedacted, false,
			`{"oid":23,"type":"int4","format":"binary","length":4}`},
		{"int4 binary wrong length", broker.Param{OID: oidInt4, Format: 1, Value: []byte{1, 2}}, ParamsFull, false,
			`{"oid":23,"type":"int4","format":"binary","base64":"AQI="}`},
		{"unknown binary", broker.Param{OID: 600, Format: 1, Value: []byte{0, 1, 2}}, ParamsFull, false,
			`{"oid":600,"format":"binary","base64":"AAEC"}`},
		{"text binary invalid utf8", broker.Param{OID: oidVarchar, Format: 1, Value: []byte("a\xffb")}, ParamsFull, false,
			`{"oid":1043,"type":"varchar","format":"binary","value":"a\ufffdb"}`},
		{"jsonb binary", broker.Param{OID: oidJSONB, Format: 1, Value: append([]byte{1}, `{"a":1}`...)}, ParamsFull, false,
			`{"oid":3802,"type":"jsonb","format":"binary","value":"{\"a\":1}"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := string(appendParam(nil, tt.p, tt.mode, tt.secret))
			if got != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestDecodeBinary(t *testing.T) {
	tests := []struct {
		name string
		oid  uint32
		v    []byte
		want string // "" means not decodable
	}{
		{"bool true", oidBool, []byte{1}, "t"},
		{"bool false", oidBool, []byte{0}, "f"},
		{"bool bad", oidBool, []byte{2}, ""},
		{"int2", oidInt2, be16(-32768), "-32768"},
		{"int8", oidInt8, be64(math.MaxInt64), "9223372036854775807"},
		{"oid", oidOID, be32(-1), "4294967295"},
		{"float4", oidFloat4, binary.BigEndian.AppendUint32(nil, math.Float32bits(1.5)), "1.5"},
		{"float8", oidFloat8, f64(0.1), "0.1"},
		{"float8 nan", oidFloat8, f64(math.NaN()), "NaN"},
		{"float8 -inf", oidFloat8, f64(math.Inf(-1)), "-Infinity"},
		{"bytea", oidBytea, []byte{0xde, 0xad, 0x01}, `\xdead01`},
		{"bytea empty", oidBytea, []byte{}, `\x`},
		{"uuid", oidUUID, []byte{0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0},
			"12345678-9abc-def0-1234-56789abcdef0"},
		{"uuid short", oidUUID, []byte{1}, ""},
		{"date epoch", oidDate, be32(0), "2000-01-01"},
		{"date before", oidDate, be32(-1), "1999-12-31"},
		{"date bc", oidDate, be32(-730485), "0001-01-01 BC"},
		{"date inf", oidDate, be32(math.MaxInt32), "infinity"},
		{"time", oidTime, be64(13*3600e6 + 4*60e6 + 5e6 + 120000), "13:04:05.12"},
		{"timestamp epoch", oidTimestamp, be64(0), "2000-01-01 00:00:00"},
		{"timestamp micros", oidTimestamp, be64(-1), "1999-12-31 23:59:59.999999"},
		{"timestamptz", oidTimestamptz, be64(86400e6 + 500000), "2000-01-02 00:00:00.5+00"},
		{"timestamp -inf", oidTimestamp, be64(math.MinInt64), "-infinity"},
		{"numeric 0", oidNumeric, numericBytes(0, numericPos, 0), "0"},
		{"numeric 123.45", oidNumeric, numericBytes(0, numericPos, 2, 123, 4500), "123.45"},
		{"numeric -0.001", oidNumeric, numericBytes(-1, numericNeg, 3, 10), "-0.001"},
		{"numeric 0.00001", oidNumeric, numericBytes(-2, numericPos, 5, 1000), "0.00001"},
		{"numeric 1e20", oidNumeric, numericBytes(5, numericPos, 0, 1), "100000000000000000000"},
		{"numeric 10000.5", oidNumeric, numericBytes(1, numericPos, 1, 1, 0, 5000), "10000.5"},
		{"numeric nan", oidNumeric, numericBytes(0, numericNaN, 0), "NaN"},
		{"numeric bad digit", oidNumeric, numericBytes(0, numericPos, 0, 10000), ""},
		{"numeric bad length", oidNumeric, []byte{0, 2, 0, 0, 0, 0, 0, 0, 0, 1}, ""},
		{"interval", oidInterval, make([]byte, 16), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := decodeBinary(nil, tt.oid, tt.v)
			if tt.want == "" {
				if ok {
					t.Fatalf("decoded %q, want failure", got)
				}
				return
			}
			if !ok || string(got) != tt.want {
				t.Fatalf("got %q (ok %v), want %q", got, ok, tt.want)
			}
		})
	}
}

// TestDecodeBinaryMatchesPgx encodes values with pgx's binary codecs (what a
// real client sends) and checks the decoder's text against the value.
func TestDecodeBinaryMatchesPgx(t *testing.T) {
	m := pgtype.NewMap()
	mustNumeric := func(s string) pgtype.Numeric {
		var n pgtype.Numeric
		if err := n.Scan(s); err != nil {
			t.Fatal(err)
		}
		return n
	}
	ts := time.Date(2024, 2, 29, 13, 14, 15, 123456000, time.UTC)
	tests := []struct {
		oid  uint32
		v    any
		want string
	}{
		{pgtype.NumericOID, mustNumeric("3.14159"), "3.14159"},
		{pgtype.NumericOID, mustNumeric("-123456789012345678901234567890.000001"), "-123456789012345678901234567890.000001"},
		{pgtype.NumericOID, mustNumeric("0.000000012"), "0.000000012"},
		{pgtype.NumericOID, mustNumeric("1000000"), "1000000"},
		{pgtype.Int8OID, int64(-9000000000), "-9000000000"},
		{pgtype.Float8OID, 2.5e-10, "2.5e-10"},
		{pgtype.TimestampOID, ts, "2024-02-29 13:14:15.123456"},
		{pgtype.TimestamptzOID, ts, "2024-02-29 13:14:15.123456+00"},
		{pgtype.DateOID, time.Date(1970, 1, 1, 0, 0, 0, 0, time.UTC), "1970-01-01"},
		{pgtype.UUIDOID, [16]byte{15: 1}, "00000000-0000-0000-0000-000000000001"},
		{pgtype.ByteaOID, []byte("hi"), `\x6869`},
		{pgtype.BoolOID, true, "t"},
	}
	for _, tt := range tests {
		raw, err := m.Encode(tt.oid, pgtype.BinaryFormatCode, tt.v, nil)
		if err != nil {
			t.Fatalf("pgx encode %v: %v", tt.v, err)
		}
		got, ok := decodeBinary(nil, tt.oid, raw)
		if !ok || string(got) != tt.want {
			t.Errorf("oid %d %v: got %q (ok %v), want %q", tt.oid, tt.v, got, ok, tt.want)
		}
	}
}

var numericText = regexp.MustCompile(`^(-?(0|[1-9][0-9]*)(\.[0-9]+)?|NaN|-?Infinity)$`)

func FuzzDecodeParam(f *testing.F) {
	f.Add(uint32(oidInt4), int16(1), be32(7))
	f.Add(uint32(oidNumeric), int16(1), numericBytes(0, numericPos, 2, 123, 4500))
	f.Add(uint32(oidTimestamptz), int16(1), be64(-5))
	f.Add(uint32(oidText), int16(0), []byte("x\xff\""))
	f.Add(uint32(oidUUID), int16(1), make([]byte, 16))
	f.Add(uint32(9999), int16(1), []byte{0})
	f.Fuzz(func(t *testing.T, oid uint32, format int16, value []byte) {
		for _, mode := range []ParamMode{ParamsFull, ParamsRedacted} {
			out := appendParam(nil, broker.Param{OID: oid, Format: format, Value: value}, mode, false)
			var v struct {
				OID    uint32  `json:"oid"`
				Format string  `json:"format"`
				Value  *string `json:"value"`
				Base64 []byte  `json:"base64"`
				Length *int    `json:"length"`
			}
			if err := json.Unmarshal(out, &v); err != nil {
				t.Fatalf("%s: %q is not JSON: %v", mode, out, err)
			}
			if v.OID != oid {
				t.Fatalf("oid %d, want %d", v.OID, oid)
			}
			if mode == ParamsRedacted {
				if v.Value != nil || v.Base64 != nil || v.Length == nil || *v.Length != len(value) {
					t.Fatalf("redacted output %s leaks or lacks length", out)
				}
				continue
			}
			switch {
			case v.Base64 != nil:
				if string(v.Base64) != string(value) {
					t.Fatalf("base64 does not round-trip")
				}
			case v.Value == nil:
				t.Fatalf("no value in %s", out)
			case format != 1:
				if *v.Value != validUTF8PerByte(string(value)) {
					t.Fatalf("text value %q does not round-trip %q", *v.Value, value)
				}
			case oid == oidInt2 && len(value) == 2, oid == oidInt4 && len(value) == 4, oid == oidInt8 && len(value) == 8:
				n, err := strconv.ParseInt(*v.Value, 10, 64)
				var want int64
				for _, b := range value {
					want = want<<8 | int64(b)
				}
				shift := 64 - 8*len(value)
				want = want << shift >> shift // sign-extend
				if err != nil || n != want {
					t.Fatalf("int value %q, want %d (%v)", *v.Value, want, err)
				}
			case oid == oidNumeric:
				if !numericText.MatchString(*v.Value) {
					t.Fatalf("numeric text %q is malformed", *v.Value)
				}
			}
		}
	})
}
