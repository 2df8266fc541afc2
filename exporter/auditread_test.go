package exporter

import (
	"bufio"
	"bytes"
	"fmt"
	"testing"
	"time"
)

// FuzzAuditRead: any bytes read as an audit file never panic the reader;
// the fast tail read of seq and prev_hash agrees with the JSON decoder
// whenever both read a line; every line is counted, and a line is emitted
// only when the decoder confirms the filter.
func FuzzAuditRead(f *testing.F) {
	good := `{"event":"db.session.query","code":"PGW02I","time":"2026-12-07T02:00:00Z","uid":"u","sid":"s1","ei":2,"request_id":"r","principal":"billing","process":{"pid":42,"uid":1001},"success":true,"db_query":"select 1","seq":1,"prev_hash":"` + ZeroHash + `"}`
	f.Add([]byte(good+"\n"), "billing")
	f.Add([]byte(good+"\n"+good+"\n"), "")
	f.Add([]byte(`{"seq":1,"prev_hash":"`+ZeroHash+`","seq":2,"prev_hash":"`+ZeroHash+`"}`+"\n"), "x")
	f.Add([]byte(`{"principal":"billing","seq":1e3,"prev_hash":"`+ZeroHash+`"}`+"\n{\n"), "billing")
	f.Add([]byte("\n\n\"principal\":\"billing\"\n"), "billing")
	f.Fuzz(func(t *testing.T, data []byte, principal string) {
		for _, line := range bytes.Split(data, []byte{'\n'}) {
			seq, ph, ok := tailChainFields(line)
			if !ok {
				continue
			}
			if s2, p2, err := chainFields(line); err == nil && (s2 != seq || p2 != ph) {
				t.Fatalf("tail read seq %d %s, decoder %d %s: %q", seq, ph, s2, p2, line)
			}
		}
		uid := uint32(1001)
		s := &AuditScan{Filter: AuditFilter{Principal: principal, UID: &uid, Since: time.Unix(0, 0)}}
		s.Filter.prepare()
		s.Emit = func(line []byte, ev *AuditEvent) error {
			if principal != "" && ev.Principal != principal || ev.Process == nil || ev.Process.UID != uid {
				return fmt.Errorf("emitted a line the filter does not match: %q", line)
			}
			return nil
		}
		s.file, s.wantSeq = "fuzz", 1
		s.br = bufio.NewReaderSize(bytes.NewReader(data), 16)
		if err := s.drain(); err != nil {
			t.Fatal(err)
		}
		s.finish()
		if want := bytes.Count(data, []byte{'\n'}); s.Lines != want {
			t.Fatalf("%d lines read, want %d", s.Lines, want)
		}
	})
}
