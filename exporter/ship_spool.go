package exporter

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"syscall"
)

// shipCursor is how far delivery got, persisted in ShipConfig.StatePath
// after every acknowledged batch (write to a temporary file, rename).
//
// Rotation renames files (path → path.1 → path.2 …), so a file is named by
// its place in the chain, not by its name: Start is the prev_hash of its
// first line (for the first file ever, 64 zeros), which is the hash of the
// last line of the file before it. Inode is a hint for telling apart two
// chains that both start at zeros.
type shipCursor struct {
	Start  string `json:"start"`  // hex chain hash the file begins after
	Inode  uint64 `json:"inode"`  // of that file
	Offset int64  `json:"offset"` // bytes delivered (always at a line end)
	Seq    int64  `json:"seq"`    // seq of the last delivered line in the file; 0 none
	Last   string `json:"last"`   // hex SHA-256 of the last delivered line (= Start when Seq is 0)
}

var zeroHash = hex.EncodeToString(make([]byte, sha256.Size))

// spoolSpan is what the shipper knows of a rotated audit file, keyed by its
// start: how many lines it holds (its last seq) and the hash of its last
// line, which is the start of the file after it. Recorded when the file is
// rotated (or first seen rotated: rotated files do not change), it lets the
// shipper count the events of a file deleted by someone else before it was
// delivered, and step over it to the next file.
type spoolSpan struct {
	Lines int64  `json:"lines"`
	End   string `json:"end"`
}

// shipState is the state file: the cursor and the spans of the rotated files
// from the cursor's file on.
type shipState struct {
	shipCursor
	Files map[string]spoolSpan `json:"files,omitempty"`
}

func loadCursor(path string) (shipState, bool, error) {
	var c shipState
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return c, false, nil
	}
	if err != nil {
		return c, false, err
	}
	if err := json.Unmarshal(b, &c); err != nil || len(c.Start) != 64 || len(c.Last) != 64 || c.Offset < 0 {
		return shipState{}, false, fmt.Errorf("delivery cursor %s is damaged; shipping from the oldest audit file", path)
	}
	return c, true, nil
}

// saveCursor replaces the state file atomically. It does not fsync: after a
// crash of pgward the page cache has it, and after a crash of the host an
// older cursor only means events are shipped twice, never skipped.
func saveCursor(path string, c shipCursor, files map[string]spoolSpan) error {
	b, _ := json.Marshal(shipState{shipCursor: c, Files: files})
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// spanOf reads the start and span of the audit file name, if it still is
// the file with inode (a rotation may have put another under the name).
func spanOf(name string, inode uint64) (start string, sp spoolSpan, ok bool) {
	f, err := os.Open(name)
	if err != nil {
		return "", sp, false
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || inodeOf(fi) != inode {
		return "", sp, false
	}
	start = firstPrevHash(f)
	last, _, _, err := lastLineOf(f)
	if start == "" || err != nil || last == nil {
		return "", sp, false
	}
	seq, _, err := chainFields(last)
	if err != nil {
		return "", sp, false
	}
	return start, spoolSpan{Lines: seq, End: hashHex(last)}, true
}

// spoolFile is one audit file as the shipper sees it.
type spoolFile struct {
	index int // 0 = the active path, n = path.n
	name  string
	inode uint64
	size  int64
	start string // hex prev_hash of the first line ("" when unknown)
}

func rotatedName(path string, i int) string {
	if i == 0 {
		return path
	}
	return path + "." + strconv.Itoa(i)
}

func inodeOf(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// listSpool returns the audit files, newest (the active file) first, as far
// as they are numbered without a hole. An empty active file starts after the
// last line of path.1 (or at zeros), as Audit.recover chains it. Each file's
// inode and first line come from one open file, so a rotation while it
// lists cannot pair one file's inode with another's start.
func listSpool(path string) []spoolFile {
	var out []spoolFile
	for i := 0; i < 100000; i++ {
		name := rotatedName(path, i)
		f, err := os.Open(name)
		if err != nil {
			if i == 0 {
				continue
			}
			break
		}
		fi, err := f.Stat()
		if err == nil {
			out = append(out, spoolFile{index: i, name: name, inode: inodeOf(fi), size: fi.Size(), start: firstPrevHash(f)})
		}
		f.Close()
	}
	if len(out) > 0 && out[0].index == 0 && out[0].start == "" {
		if len(out) > 1 && out[1].index == 1 {
			if last, _, _, err := readLastLine(out[1].name); err == nil && last != nil {
				out[0].start = hashHex(last)
			}
		} else {
			out[0].start = zeroHash
		}
	}
	return out
}

func hashHex(line []byte) string {
	s := sha256.Sum256(line)
	return hex.EncodeToString(s[:])
}

// firstPrevHash returns the prev_hash of the file's first line, "" if it
// has no complete line.
func firstPrevHash(f io.ReaderAt) string {
	r := io.NewSectionReader(f, 0, 1<<62)
	buf := make([]byte, 64<<10)
	n, _ := io.ReadFull(r, buf)
	buf = buf[:n]
	for {
		i := bytes.IndexByte(buf, '\n')
		if i >= 0 {
			_, prev, err := chainFields(buf[:i])
			if err != nil {
				return ""
			}
			return prev
		}
		if len(buf) < cap(buf) {
			return "" // no complete line
		}
		// A long first line: read on.
		more := make([]byte, len(buf))
		m, _ := io.ReadFull(r, more)
		if m == 0 {
			return ""
		}
		buf = append(buf, more[:m]...)
	}
}

// lastSeqOf returns the seq of the file's last complete line (0 if none).
func lastSeqOf(name string) int64 {
	last, _, _, err := readLastLine(name)
	if err != nil || last == nil {
		return 0
	}
	seq, _, _ := chainFields(last)
	return seq
}

// spoolReader reads complete lines of one audit file from an offset.
type spoolReader struct {
	f     *os.File
	inode uint64
	cur   shipCursor  // position after the lines handed out
	buf   []byte      // unread bytes from cur.Offset (may end in a partial line), in store
	store []byte      // the read buffer, reused
	eof   bool        // the last read found nothing new
	lines []spoolLine // next's result, reused
	// capped: the last next stopped at maxLines or maxBytes, not at the
	// end of what is written (there is more to read at once).
	capped bool
}

// errSpoolMoved: the name no longer holds the file listed (a rotation).
var errSpoolMoved = errors.New("audit file rotated while opening it")

// openSpool opens the file listed as sf at the cursor c. It fails with
// errSpoolMoved when a rotation put another file under that name since it
// was listed: the caller lists again.
func openSpool(sf spoolFile, c shipCursor) (*spoolReader, error) {
	name := sf.name
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if inodeOf(fi) != sf.inode {
		f.Close()
		return nil, errSpoolMoved
	}
	if c.Offset > fi.Size() {
		f.Close()
		return nil, fmt.Errorf("%s is shorter (%d bytes) than the delivery cursor (%d)", name, fi.Size(), c.Offset)
	}
	c.Inode = inodeOf(fi)
	return &spoolReader{f: f, inode: c.Inode, cur: c}, nil
}

func (r *spoolReader) close() {
	if r != nil && r.f != nil {
		r.f.Close()
		r.f = nil
	}
}

// spoolLine is one audit line handed out, with the cursor after it.
type spoolLine struct {
	line  []byte // without the newline; valid until the next fill
	after shipCursor
}

// next returns up to maxLines complete lines (at most maxBytes, but at least
// one) from the current position. It returns none at the end of what is
// written so far.
func (r *spoolReader) next(maxLines, maxBytes int) ([]spoolLine, error) {
	if err := r.fill(maxBytes); err != nil {
		return nil, err
	}
	out := r.lines[:0]
	c := r.cur
	used, total := 0, 0
	r.capped = true
	for len(out) < maxLines {
		i := bytes.IndexByte(r.buf[used:], '\n')
		if i < 0 {
			r.capped = false
			break
		}
		line := r.buf[used : used+i]
		if len(out) > 0 && total+len(line) > maxBytes {
			break
		}
		seq, err := spoolSeq(line)
		if err != nil {
			return nil, fmt.Errorf("%s at offset %d: not a pgward audit line: %w", r.f.Name(), c.Offset, err)
		}
		c.Offset += int64(i + 1)
		c.Seq = seq
		out = append(out, spoolLine{line: line, after: c})
		used += i + 1
		total += len(line)
	}
	if n := len(out); n > 0 {
		// Only the last line's cursor is ever kept: hash that one.
		out[n-1].after.Last = hashHex(out[n-1].line)
	}
	r.lines = out
	return out, nil
}

// spoolSeq reads the seq of an audit line from its tail, which the writer
// always makes `,"seq":N,"prev_hash":"<64 hex>"}`; anything else goes
// through the JSON decoder.
func spoolSeq(line []byte) (int64, error) {
	const tail = 64 + len(`"}`)
	const ph = `,"prev_hash":"`
	if len(line) > tail+len(ph) && bytes.HasSuffix(line, []byte(`"}`)) &&
		bytes.Equal(line[len(line)-tail-len(ph):len(line)-tail], []byte(ph)) {
		head := line[:len(line)-tail-len(ph)]
		if i := bytes.LastIndex(head, []byte(`,"seq":`)); i >= 0 {
			if n, err := strconv.ParseInt(string(head[i+len(`,"seq":`):]), 10, 64); err == nil {
				return n, nil
			}
		}
	}
	seq, _, err := chainFields(line)
	return seq, err
}

// advance drops the first n bytes of buf: those lines are handed out.
func (r *spoolReader) advance(c shipCursor) {
	r.buf = r.buf[c.Offset-r.cur.Offset:]
	r.cur = c
}

// fill reads what the file has past the buffered bytes, up to about
// maxBytes more, growing the buffer for a line longer than that.
func (r *spoolReader) fill(maxBytes int) error {
	want := maxBytes
	if bytes.IndexByte(r.buf, '\n') < 0 {
		want += len(r.buf) // a long line: read until it is complete
	}
	if len(r.buf) >= want {
		return nil
	}
	// Reuse the buffer: move the unread bytes to its front, grow it only
	// for a line longer than it.
	buf := r.store
	if cap(buf) < want+4096 {
		buf = make([]byte, 0, want+4096)
	}
	buf = buf[:len(r.buf)]
	copy(buf, r.buf)
	r.store = buf
	n, err := r.f.ReadAt(buf[len(buf):cap(buf)], r.cur.Offset+int64(len(r.buf)))
	r.buf = buf[:len(buf)+n]
	r.eof = n == 0
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}
