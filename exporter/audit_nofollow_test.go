package exporter

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The sink opens its file the same way at start, at reopen after a failed
// write and after rotation: never through a symbolic link, so one planted
// at audit.path while pgward runs (say between a rotation's rename and its
// open) is refused rather than followed.
func TestOpenAuditFileNoFollow(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	link := filepath.Join(dir, "audit.jsonl")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	f, err := openAuditFile(link)
	if err == nil {
		f.Close()
		t.Fatal("openAuditFile followed a symbolic link")
	}
	if !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("error %q does not say why", err)
	}
	if _, err := os.Stat(target); err == nil {
		t.Error("the link's target was created")
	}
}
