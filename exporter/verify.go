package exporter

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// ZeroHash is the prev_hash of the first line of a fresh chain.
var ZeroHash = strings.Repeat("0", 64)

// ChainError is the first place an audit file breaks its chain.
type ChainError struct {
	File string // set by VerifyFiles
	Line int    // 1-based line number within the file
	Kind string // "malformed", "seq", "hash", "truncated", "link"
	Msg  string
}

func (e *ChainError) Error() string {
	if e.File != "" {
		return fmt.Sprintf("%s:%d: %s: %s", e.File, e.Line, e.Kind, e.Msg)
	}
	return fmt.Sprintf("line %d: %s: %s", e.Line, e.Kind, e.Msg)
}

// Verify reads one audit file and checks that seq runs 1, 2, 3 … without a
// gap and that every prev_hash is the SHA-256 of the line before it. It
// returns how many lines verified, and a *ChainError for the first gap, edit,
// malformed or truncated line. The first line's prev_hash links to a previous
// file (or is ZeroHash); Verify cannot check it alone — VerifyFiles does.
// An edit of the very last line is not detectable from the file alone
// (nothing hashes it yet); keep the file's last hash elsewhere if that matters.
func Verify(r io.Reader) (n int, err error) {
	n, _, _, err = verifyChain(r)
	return n, err
}

// VerifyFiles verifies rotated audit files given oldest first (e.g.
// audit.jsonl.3, audit.jsonl.2, audit.jsonl.1, audit.jsonl) and that each
// file's first prev_hash is the hash of the previous file's last line. The
// first file's first line must have ZeroHash unless older files were deleted
// by rotation, which cannot be told apart; so it is not checked.
func VerifyFiles(paths ...string) (n int, err error) {
	var last string
	for i, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return n, err
		}
		k, first, end, err := verifyChain(f)
		f.Close()
		n += k
		var ce *ChainError
		if errors.As(err, &ce) {
			ce.File = p
		}
		if err != nil {
			return n, err
		}
		if i > 0 && k > 0 && first != last {
			return n, &ChainError{File: p, Line: 1, Kind: "link",
				Msg: fmt.Sprintf("prev_hash %s is not the hash %s of the last line of %s", first, last, paths[i-1])}
		}
		if k > 0 {
			last = end
		}
	}
	return n, nil
}

// verifyChain returns the number of good lines, the first line's prev_hash,
// and the hash of the last line.
func verifyChain(r io.Reader) (n int, first, last string, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var prev [sha256.Size]byte
	for line := 1; ; line++ {
		b, rerr := br.ReadBytes('\n')
		if len(b) == 0 && rerr == io.EOF {
			return n, first, hex.EncodeToString(prev[:]), nil
		}
		if rerr != nil && rerr != io.EOF {
			return n, first, "", rerr
		}
		if !bytes.HasSuffix(b, []byte{'\n'}) {
			return n, first, "", &ChainError{Line: line, Kind: "truncated", Msg: "last line has no newline (interrupted write)"}
		}
		b = b[:len(b)-1]
		seq, ph, err := chainFields(b)
		if err != nil {
			return n, first, "", &ChainError{Line: line, Kind: "malformed", Msg: err.Error()}
		}
		if seq != int64(line) {
			msg := fmt.Sprintf("seq %d, want %d", seq, line)
			if seq > int64(line) {
				msg += fmt.Sprintf(" (%d events missing)", seq-int64(line))
			}
			return n, first, "", &ChainError{Line: line, Kind: "seq", Msg: msg}
		}
		if line == 1 {
			if _, err := hex.DecodeString(ph); err != nil || len(ph) != 64 {
				return n, first, "", &ChainError{Line: line, Kind: "malformed", Msg: "prev_hash is not 64 hex digits"}
			}
			first = ph
		} else if want := hex.EncodeToString(prev[:]); ph != want {
			return n, first, "", &ChainError{Line: line, Kind: "hash",
				Msg: fmt.Sprintf("prev_hash %s, want %s: line %d was edited, or lines were removed or inserted before this one", ph, want, line-1)}
		}
		prev = sha256.Sum256(b)
		n++
	}
}
