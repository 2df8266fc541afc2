package secrets

import (
	"fmt"
	"io"
	"regexp"
)

func readAll(r io.Reader, limit int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("larger than %d bytes", limit)
	}
	return data, nil
}

// yaml errors may quote a scalar ("cannot unmarshal !!str `hunter2` into …");
// drop quoted values so a password cannot end up in a log line.
var quoted = regexp.MustCompile("`[^`]*`")

func sanitizeYAMLError(err error) string {
	return quoted.ReplaceAllString(err.Error(), "`…`")
}
