package exporter

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
)

// The hash chain of the audit file format. Every line ends with "seq" and
// "prev_hash", the hex SHA-256 of the line before it (without its newline);
// the file sink seals each event with them as it stores it, and
// `pgward audit verify` checks them. See FileSink for how the chain runs
// across rotated files and what a failed write does to it.

// Chain is a hash chain over the lines a sink stores, sealed the way the
// file sink seals its lines: a sink that keeps its own record can seal with
// a Chain and gets lines `pgward audit verify` accepts. The zero Chain
// starts a fresh one (seq 1, prev_hash ZeroHash).
type Chain struct {
	Seq  int64             // seq of the last line sealed
	Prev [sha256.Size]byte // SHA-256 of that line
}

// Seal appends the complete line of e (its body, seq, prev_hash and the
// closing brace; no newline) to dst and moves the chain on past it.
func (c *Chain) Seal(dst []byte, e Event) []byte {
	start := len(dst)
	dst = appendChainFields(append(dst, e.Body...), c.Seq+1, &c.Prev)
	c.Seq++
	c.Prev = sha256.Sum256(dst[start:])
	return dst
}

// appendChainFields closes an event body with its chain fields:
// ,"seq":seq,"prev_hash":"<hex prev>"}.
func appendChainFields(body []byte, seq int64, prev *[sha256.Size]byte) []byte {
	line := appendIntField(body, "seq", seq)
	line = appendKey(line, "prev_hash")
	line = append(line, '"')
	line = hex.AppendEncode(line, prev[:])
	return append(line, '"', '}')
}

// chainFields reads seq and prev_hash of an audit line.
func chainFields(line []byte) (seq int64, prev string, err error) {
	var v struct {
		Seq      *int64  `json:"seq"`
		PrevHash *string `json:"prev_hash"`
	}
	if err := json.Unmarshal(line, &v); err != nil {
		return 0, "", err
	}
	if v.Seq == nil || v.PrevHash == nil {
		return 0, "", errors.New("no seq or prev_hash")
	}
	return *v.Seq, *v.PrevHash, nil
}
