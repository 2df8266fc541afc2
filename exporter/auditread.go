package exporter

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Reading the audit trail back (`pgward audit show`, issue 19): the active
// file and its rotated predecessors (gzip-compressed or not), oldest first,
// filtered, with the chain of everything read checked on the way; and
// following the active file as it grows and rotates.
//
// Speed: a filter's fields are first looked for as bytes in the line (the
// JSON pgward writes is compact and its field order fixed), and only the
// lines that have them all are decoded and checked exactly.

// AuditFiles returns the audit files of path oldest first: path.N … path.1
// (each as written by rotation, or compressed to path.K.gz) and path. Only
// files that exist are listed; path itself is listed even when missing
// (it is the one followed).
func AuditFiles(path string) ([]string, error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	type rot struct {
		n    int
		name string
	}
	var rots []rot
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), base+".")
		if !ok {
			continue
		}
		rest = strings.TrimSuffix(rest, ".gz")
		n, err := strconv.Atoi(rest)
		if err != nil || n <= 0 {
			continue
		}
		rots = append(rots, rot{n, filepath.Join(dir, e.Name())})
	}
	sort.Slice(rots, func(i, j int) bool { return rots[i].n > rots[j].n })
	out := make([]string, 0, len(rots)+1)
	for _, r := range rots {
		out = append(out, r.name)
	}
	return append(out, path), nil
}

// AuditFilter selects events. Zero fields match everything; every field
// given must match.
type AuditFilter struct {
	Since, Until time.Time // Until is exclusive
	Principal    string
	UID          *uint32 // the process's uid
	PID          *int32  // the process's pid
	SID          string
	RequestID    string
	Events       []string // event names (db.session.query, admin.sessions.end …)
	Failed       bool     // only events with success false

	needles [][]byte
	ready   bool
}

func (f *AuditFilter) prepare() {
	if f.ready {
		return
	}
	f.ready = true
	str := func(key, v string) []byte {
		b := appendKey(nil, key)
		return appendJSONString(b[1:], v) // appendKey starts with a comma here
	}
	if f.Principal != "" {
		f.needles = append(f.needles, str("principal", f.Principal))
	}
	if f.SID != "" {
		f.needles = append(f.needles, str("sid", f.SID))
	}
	if f.RequestID != "" {
		f.needles = append(f.needles, str("request_id", f.RequestID))
	}
	if f.UID != nil {
		f.needles = append(f.needles, []byte(`"uid":`+strconv.FormatUint(uint64(*f.UID), 10)+`,`))
	}
	if f.PID != nil {
		f.needles = append(f.needles, []byte(`"pid":`+strconv.FormatInt(int64(*f.PID), 10)+`,`))
	}
	if f.Failed {
		f.needles = append(f.needles, []byte(`"success":false`))
	}
}

// AuditEvent is what `audit show` reads of an event.
type AuditEvent struct {
	Event     string    `json:"event"`
	Code      string    `json:"code"`
	Time      time.Time `json:"time"`
	SID       string    `json:"sid"`
	RequestID string    `json:"request_id"`
	Service   string    `json:"db_service"`
	URI       string    `json:"db_uri"`
	User      string    `json:"db_user"`
	Principal string    `json:"principal"`
	Process   *struct {
		PID         int32  `json:"pid"`
		UID         uint32 `json:"uid"`
		User        string `json:"user"`
		Comm        string `json:"comm"`
		Exe         string `json:"exe"`
		SystemdUnit string `json:"systemd_unit"`
		Pod         *struct {
			Namespace string `json:"namespace"`
			Name      string `json:"name"`
		} `json:"pod"`
	} `json:"process"`
	Success    *bool    `json:"success"`
	Error      string   `json:"error"`
	SQLState   string   `json:"sqlstate"`
	Query      string   `json:"db_query"`
	QueryIndex int64    `json:"query_index"`
	Reason     string   `json:"reason"`
	Rows       *int64   `json:"rows"`
	Tag        string   `json:"command_tag"`
	DurationMS *float64 `json:"duration_ms"`
	Queries    int64    `json:"queries"`
	Blocked    bool     `json:"blocked"`
	Sessions   int64    `json:"sessions"`
	TargetPID  int32    `json:"target_pid"`
}

// match decides on one line; ev is decoded when every needle is there.
func (f *AuditFilter) match(line []byte, ev *AuditEvent) (bool, error) {
	for _, n := range f.needles {
		if !bytes.Contains(line, n) {
			return false, nil
		}
	}
	if !f.Since.IsZero() || !f.Until.IsZero() {
		if t, ok := lineTime(line); ok && (!f.Since.IsZero() && t.Before(f.Since) || !f.Until.IsZero() && !t.Before(f.Until)) {
			return false, nil
		}
	}
	if len(f.Events) > 0 {
		ok := false
		for _, e := range f.Events {
			if bytes.HasPrefix(line, []byte(`{"event":"`+e+`"`)) {
				ok = true
				break
			}
		}
		if !ok {
			return false, nil
		}
	}
	*ev = AuditEvent{}
	if err := json.Unmarshal(line, ev); err != nil {
		return false, err
	}
	switch {
	case f.Principal != "" && ev.Principal != f.Principal,
		f.SID != "" && ev.SID != f.SID,
		f.RequestID != "" && ev.RequestID != f.RequestID,
		f.UID != nil && (ev.Process == nil || ev.Process.UID != *f.UID),
		f.PID != nil && (ev.Process == nil || ev.Process.PID != *f.PID),
		f.Failed && (ev.Success == nil || *ev.Success),
		!f.Since.IsZero() && ev.Time.Before(f.Since),
		!f.Until.IsZero() && !ev.Time.Before(f.Until):
		return false, nil
	}
	return true, nil
}

// lineTime reads the time field without decoding the line.
func lineTime(line []byte) (time.Time, bool) {
	i := bytes.Index(line, []byte(`"time":"`))
	if i < 0 {
		return time.Time{}, false
	}
	rest := line[i+8:]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, string(rest[:j]))
	return t, err == nil
}

// ChainBreak is a place where what was read does not verify: the event
// at File:Line does not follow the one before it (a gap, an edit, lines
// removed or inserted), or a line is malformed.
type ChainBreak struct {
	File string
	Line int
	Kind string // as ChainError's
	Msg  string
}

func (b ChainBreak) String() string {
	return fmt.Sprintf("%s:%d: %s: %s", b.File, b.Line, b.Kind, b.Msg)
}

// AuditScan reads audit files in order, checks their chain and hands the
// events its Filter matches to Emit.
type AuditScan struct {
	Filter AuditFilter
	// Emit gets each matching line (without its newline; valid only during
	// the call) and its decoded event.
	Emit func(line []byte, ev *AuditEvent) error
	// Polled, when set, is called by Follow after the first read and after
	// each poll (to flush output, report new breaks).
	Polled func()

	Lines   int          // lines read
	Matched int          // lines emitted
	Breaks  []ChainBreak // where the chain does not verify

	prev     [sha256.Size]byte
	havePrev bool // prev is the hash of the line before (in this or the previous file)
	wantSeq  int64
	ev       AuditEvent

	// follow state
	file   string
	line   int
	carry  []byte
	br     *bufio.Reader
	closer io.Closer
	ino    uint64
}

// ReadFiles reads every file whole, oldest first; the last one may end
// in a partial line (being written), which is left for Follow.
func (s *AuditScan) ReadFiles(paths []string) error {
	for i, p := range paths {
		last := i == len(paths)-1
		if err := s.open(p); err != nil {
			if last && errors.Is(err, os.ErrNotExist) {
				continue
			}
			return err
		}
		if err := s.drain(); err != nil {
			return err
		}
		if !last {
			s.finish()
		}
	}
	return nil
}

// open starts reading file p.
func (s *AuditScan) open(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	return s.start(f, p)
}

// start reads f (named p; a .gz name is decompressed) from its start; it
// takes f.
func (s *AuditScan) start(f *os.File, p string) error {
	var r io.Reader = f
	var c io.Closer = f
	if strings.HasSuffix(p, ".gz") {
		zr, err := gzip.NewReader(f)
		if err != nil {
			f.Close()
			return fmt.Errorf("%s: %w", p, err)
		}
		r, c = zr, multiCloser{zr, f}
	}
	if fi, err := f.Stat(); err == nil {
		s.ino = inode(fi)
	}
	s.file, s.line, s.carry, s.wantSeq = p, 0, s.carry[:0], 1
	s.br = bufio.NewReaderSize(r, 256<<10)
	s.closer = c
	return nil
}

type multiCloser []io.Closer

func (m multiCloser) Close() error {
	var errs []error
	for _, c := range m {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// finish ends the current file: a partial last line is a break.
func (s *AuditScan) finish() {
	if len(s.carry) > 0 {
		s.Breaks = append(s.Breaks, ChainBreak{File: s.file, Line: s.line + 1, Kind: "truncated", Msg: "last line has no newline (interrupted write)"})
		s.carry = s.carry[:0]
	}
	if s.closer != nil {
		s.closer.Close()
		s.closer = nil
	}
}

// Close releases the file being read.
func (s *AuditScan) Close() error {
	if s.closer != nil {
		err := s.closer.Close()
		s.closer = nil
		return err
	}
	return nil
}

// drain reads the current file to its end; an incomplete last line stays
// in carry.
func (s *AuditScan) drain() error {
	for {
		b, err := s.br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			s.carry = append(s.carry, b...)
			continue
		}
		if err == io.EOF {
			s.carry = append(s.carry, b...)
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %w", s.file, err)
		}
		line := b[:len(b)-1]
		if len(s.carry) > 0 {
			s.carry = append(s.carry, line...)
			line = s.carry
		}
		s.line++
		if err := s.handle(line); err != nil {
			return err
		}
		s.carry = s.carry[:0]
	}
}

// handle checks one line's place in the chain and emits it if it matches.
func (s *AuditScan) handle(line []byte) error {
	s.Lines++
	seq, ph, ok := tailChainFields(line)
	var err error
	if !ok {
		seq, ph, err = chainFields(line)
	}
	sum := sha256.Sum256(line)
	switch {
	case err != nil:
		s.Breaks = append(s.Breaks, ChainBreak{File: s.file, Line: s.line, Kind: "malformed", Msg: err.Error()})
		s.havePrev = false
		s.wantSeq = 0
	default:
		if s.wantSeq != 0 && seq != s.wantSeq {
			msg := fmt.Sprintf("seq %d, want %d", seq, s.wantSeq)
			if seq > s.wantSeq {
				msg += fmt.Sprintf(" (%d events missing)", seq-s.wantSeq)
			}
			s.Breaks = append(s.Breaks, ChainBreak{File: s.file, Line: s.line, Kind: "seq", Msg: msg})
		} else if s.havePrev {
			var want [2 * sha256.Size]byte
			hex.Encode(want[:], s.prev[:])
			if ph != string(want[:]) {
				kind, msg := "hash", "prev_hash is not the hash of the line before: that line was edited, or lines were removed or inserted"
				if s.line == 1 {
					kind, msg = "link", "prev_hash is not the hash of the previous file's last line"
				}
				s.Breaks = append(s.Breaks, ChainBreak{File: s.file, Line: s.line, Kind: kind, Msg: msg})
			}
		}
		s.wantSeq = seq + 1
		s.havePrev = true
	}
	s.prev = sum
	ok, err = s.Filter.match(line, &s.ev)
	if err != nil || !ok {
		return nil // a malformed line is reported as a break, never shown
	}
	s.Matched++
	return s.Emit(line, &s.ev)
}

// Scan reads paths (oldest first) and reports what matched through Emit.
func (s *AuditScan) Scan(paths []string) error {
	s.Filter.prepare()
	defer s.Close()
	return s.ReadFiles(paths)
}

// Follow reads paths like Scan, then follows the last one as it grows,
// and across its rotation, polling every interval until stop is closed.
func (s *AuditScan) Follow(paths []string, interval time.Duration, stop <-chan struct{}) error {
	s.Filter.prepare()
	defer s.Close()
	if err := s.ReadFiles(paths); err != nil {
		return err
	}
	active := paths[len(paths)-1]
	s.polled()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return nil
		case <-t.C:
		}
		fi, err := os.Stat(active)
		if err != nil {
			continue // between rotation's rename and the new file
		}
		if s.closer == nil || inode(fi) != s.ino {
			if s.closer != nil {
				// Rotated: finish what was written to the old file, then
				// read the files rotated after it (several rotations may
				// have happened since the last poll).
				if err := s.drain(); err != nil {
					return err
				}
				s.finish()
				if err := s.followRotation(active, s.ino); err != nil {
					return err
				}
				if s.closer == nil {
					continue // no active file yet
				}
			} else if err := s.open(active); err != nil {
				continue
			}
		}
		if err := s.drain(); err != nil {
			return err
		}
		s.polled()
	}
}

func (s *AuditScan) polled() {
	if s.Polled != nil {
		s.Polled()
	}
}

// followRotation goes on from the file with inode ino (followed until it
// was rotated): it reads whole the rotated files newer than it, then
// starts on the active file. The writer may rotate again meanwhile, which
// renames every file: the files are opened (pinned) between two listings
// of name → inode, and opened again when the two differ. When the followed
// file is gone too (rotated out), only the active file is started: the
// chain check then reports the gap.
func (s *AuditScan) followRotation(active string, ino uint64) error {
	type pinned struct {
		name string
		f    *os.File
		ino  uint64
	}
	inodes := func() (map[string]uint64, []string, error) {
		files, err := AuditFiles(active)
		if err != nil {
			return nil, nil, err
		}
		m := map[string]uint64{}
		for _, f := range files {
			if fi, err := os.Stat(f); err == nil {
				m[f] = inode(fi)
			}
		}
		return m, files, nil
	}
	for attempt := 0; ; attempt++ {
		before, names, err := inodes()
		if err != nil {
			return err
		}
		var open []pinned
		for _, n := range names {
			if f, err := os.Open(n); err == nil {
				fi, _ := f.Stat()
				open = append(open, pinned{n, f, inode(fi)})
			}
		}
		after, _, err := inodes()
		stable := err == nil && len(before) == len(after)
		for n, i := range before {
			stable = stable && after[n] == i
		}
		for _, p := range open {
			stable = stable && before[p.name] == p.ino
		}
		if !stable && attempt < 20 {
			for _, p := range open {
				p.f.Close()
			}
			continue
		}
		from := -1
		for i, p := range open {
			if p.ino == ino {
				from = i
			}
		}
		var rerr error
		for i, p := range open {
			last := p.name == active
			if !last && (i <= from || from < 0) || rerr != nil {
				p.f.Close()
				continue
			}
			if rerr = s.start(p.f, p.name); rerr != nil || last {
				continue // the active file is followed from here
			}
			rerr = s.drain()
			s.finish()
		}
		return rerr
	}
}

func inode(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// tailChainFields reads seq and prev_hash from the end of a line, where
// pgward writes them (…,"seq":N,"prev_hash":"<64 hex>"}), without decoding
// the rest; ok is false for any other shape (then chainFields decides).
func tailChainFields(line []byte) (seq int64, prev string, ok bool) {
	const ph = `,"prev_hash":"`
	n := len(line)
	if n < len(ph)+64+2 || line[n-1] != '}' || line[n-2] != '"' {
		return 0, "", false
	}
	hash := line[n-66 : n-2]
	if !bytes.Equal(line[n-66-len(ph):n-66], []byte(ph)) {
		return 0, "", false
	}
	for _, c := range hash {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return 0, "", false
		}
	}
	head := line[:n-66-len(ph)]
	i := bytes.LastIndex(head, []byte(`,"seq":`))
	if i < 0 {
		return 0, "", false
	}
	num := head[i+7:]
	if len(num) == 0 || len(num) > 1 && num[0] == '0' {
		return 0, "", false
	}
	for _, c := range num {
		if c < '0' || c > '9' {
			return 0, "", false
		}
	}
	v, err := strconv.ParseInt(string(num), 10, 64)
	if err != nil {
		return 0, "", false
	}
	return v, string(hash), true
}
