package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/pgward/pgward/exporter"
)

const auditUsage = `usage:
  pgward audit verify [--key PUBLIC_KEY_FILE] [--log LOG_FILE]... [--checkpoint ANCHOR]... FILE...
      check the sequence and hash chain of audit files given oldest first
      (audit.jsonl.2 audit.jsonl.1 audit.jsonl); with --key, also the signed
      checkpoints, and say which lines are proven and which are not
  pgward audit verify --otlp [--key PUBLIC_KEY_FILE] [--checkpoint ANCHOR]... FILE...
      the same for what an OpenTelemetry Collector received from audit.otlp
      (its file exporter's JSON, in any order, with duplicates): per node and
      per audit file
  pgward audit keygen [--out PREFIX]
      write a new ed25519 checkpoint key pair: PREFIX.key (private, mode 0600,
      for the secrets backend) and PREFIX.pub (public, for verify --key)
  pgward audit show [--since D] [--principal P] [--json] [-f] … [FILE]
      show the events of the audit files (rotated ones too), filtered, and
      say where their hash chain does not verify
`

func cmdAudit(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "verify":
			return cmdAuditVerify(args[1:], stdout, stderr)
		case "keygen":
			return cmdAuditKeygen(args[1:], stdout, stderr)
		case "show":
			return cmdAuditShow(args[1:], stdout, stderr)
		case "-h", "--help", "help":
			fmt.Fprint(stdout, auditUsage)
			return exitOK
		}
	}
	fmt.Fprint(stderr, auditUsage)
	return exitUsage
}

// multiFlag collects a repeated flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(s string) error { *m = append(*m, s); return nil }

func cmdAuditVerify(args []string, stdout, stderr io.Writer) int {
	v := newVerb("audit verify", "FILE...", `Check the sequence and hash chain of audit files given oldest first
(audit.jsonl.2 audit.jsonl.1 audit.jsonl); with --key, also the signed
checkpoints, and say which lines are proven and which are not.`, 0, -1)
	fs := v.fs
	keyFile := fs.String("key", "", "the checkpoint public key (PEM, from pgward audit keygen); checks the signed checkpoints")
	var logs, anchors multiFlag
	fs.Var(&logs, "log", "pgward's JSON log: its latest \"audit checkpoint\" line must be in the files (repeatable)")
	fs.Var(&anchors, "checkpoint", "an anchor cp1.… as printed in an \"audit checkpoint\" log line (repeatable)")
	otlp := fs.Bool("otlp", false, "FILE... are what an OpenTelemetry Collector wrote of audit.otlp (file exporter JSON), in any order, with duplicates")
	files, code, ok := v.parse(args, stdout, stderr)
	if !ok {
		return code
	}
	if len(files) == 0 {
		fmt.Fprintln(stderr, "pgward audit verify: no audit file given")
		v.usage(stderr)
		return exitUsage
	}
	if *keyFile == "" && *otlp {
		if len(logs) > 0 || len(anchors) > 0 {
			fmt.Fprintln(stderr, "pgward audit verify: --log and --checkpoint need --key")
			return exitUsage
		}
		return verifyShipped(files, exporter.VerifyOptions{}, stdout, stderr)
	}
	if *keyFile == "" {
		if len(logs) > 0 || len(anchors) > 0 {
			fmt.Fprintln(stderr, "pgward audit verify: --log and --checkpoint need --key")
			return exitUsage
		}
		return verifyChainOnly(files, stdout, stderr)
	}
	data, err := os.ReadFile(*keyFile)
	if err != nil {
		fmt.Fprintf(stderr, "pgward audit verify: %v\n", err)
		return exitFailure
	}
	pub, err := exporter.ParseCheckpointPublicKey(data)
	if err != nil {
		fmt.Fprintf(stderr, "pgward audit verify: --key %s: %v\n", *keyFile, err)
		return exitUsage
	}
	opts := exporter.VerifyOptions{Key: pub}
	for _, a := range anchors {
		cp, err := exporter.ParseAnchor(a)
		if err != nil {
			fmt.Fprintf(stderr, "pgward audit verify: --checkpoint: %v\n", err)
			return exitUsage
		}
		opts.Anchors = append(opts.Anchors, cp)
	}
	for _, l := range logs {
		f, err := os.Open(l)
		if err != nil {
			fmt.Fprintf(stderr, "pgward audit verify: %v\n", err)
			return exitFailure
		}
		cps, err := exporter.ReadLogAnchors(f)
		f.Close()
		if err != nil {
			fmt.Fprintf(stderr, "pgward audit verify: --log %s: %v\n", l, err)
			return exitBadInput
		}
		if len(cps) == 0 {
			fmt.Fprintf(stderr, "pgward audit verify: --log %s has no \"audit checkpoint\" line\n", l)
			return exitBadInput
		}
		opts.Anchors = append(opts.Anchors, cps...)
	}
	if *otlp {
		return verifyShipped(files, opts, stdout, stderr)
	}
	rep, err := exporter.VerifyAudit(files, opts)
	if err != nil {
		fmt.Fprintf(stderr, "pgward audit verify: %v\n", err)
		return exitFailure
	}
	if rep.OK() {
		rep.WriteText(stdout)
		return exitOK
	}
	rep.WriteText(stderr)
	return exitBadInput
}

// verifyChainOnly is verify without a key: the chain alone, as before
// checkpoints existed.
func verifyChainOnly(files []string, stdout, stderr io.Writer) int {
	const note = "note: no --key given, so nothing is keyed: a file cut at a line boundary, extended or re-chained as a whole still passes"
	n, err := exporter.VerifyFiles(files...)
	if err != nil {
		var ce *exporter.ChainError
		if errors.As(err, &ce) {
			fmt.Fprintf(stderr, "audit chain broken after %d good events: %v\n", n, err)
			return exitBadInput
		}
		fmt.Fprintf(stderr, "pgward audit verify: %v\n", err)
		return exitFailure
	}
	fmt.Fprintf(stdout, "ok: %d events, sequence contiguous and hash chain intact\n%s\n", n, note)
	return exitOK
}

func cmdAuditKeygen(args []string, stdout, stderr io.Writer) int {
	v := newVerb("audit keygen", "", `Write a new ed25519 checkpoint key pair: PREFIX.key (private, mode 0600,
for the secrets backend) and PREFIX.pub (public, for verify --key).`, 0, 0)
	out := v.fs.String("out", "pgward-audit", "path prefix of the key files: PREFIX.key and PREFIX.pub")
	if _, code, ok := v.parse(args, stdout, stderr); !ok {
		return code
	}
	priv, pub, err := exporter.GenerateCheckpointKey()
	if err != nil {
		fmt.Fprintf(stderr, "pgward audit keygen: %v\n", err)
		return exitFailure
	}
	privPath, pubPath := *out+".key", *out+".pub"
	// O_EXCL: never overwrite a key that may be in use.
	if err := writeNew(privPath, priv, 0o600); err != nil {
		fmt.Fprintf(stderr, "pgward audit keygen: %v\n", err)
		return exitFailure
	}
	if err := writeNew(pubPath, pub, 0o644); err != nil {
		_ = os.Remove(privPath)
		fmt.Fprintf(stderr, "pgward audit keygen: %v\n", err)
		return exitFailure
	}
	fmt.Fprintf(stdout, "wrote %s (private: put its content in the secrets backend under the name audit.checkpoint.key gives, then delete this file)\n", privPath)
	fmt.Fprintf(stdout, "wrote %s (public: pgward audit verify --key %s FILE...)\n", pubPath, filepath.Base(pubPath))
	return exitOK
}

func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
