package exporter

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// NewLogger builds the agent's logger from the environment, as Approzium does:
//
//	PGWARD_LOG_FORMAT  json (default) | text
//	PGWARD_LOG_LEVEL   debug | info (default) | warn | error
//
// JSON is the default because pgward runs under systemd or Kubernetes, whose
// collectors parse it; text is for a terminal. Values are case-insensitive;
// any other value is an error naming the variable and the allowed values.
// env is usually os.Getenv.
func NewLogger(w io.Writer, env func(string) string) (*slog.Logger, error) {
	var level slog.Level
	switch v := strings.ToLower(strings.TrimSpace(env("PGWARD_LOG_LEVEL"))); v {
	case "debug":
		level = slog.LevelDebug
	case "", "info":
		level = slog.LevelInfo
	case "warn", "warning":
		level = slog.LevelWarn
	case "error":
		level = slog.LevelError
	default:
		return nil, fmt.Errorf("PGWARD_LOG_LEVEL=%q: want one of debug, info, warn, error", v)
	}
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: readableDuration}
	switch v := strings.ToLower(strings.TrimSpace(env("PGWARD_LOG_FORMAT"))); v {
	case "", "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("PGWARD_LOG_FORMAT=%q: want one of json, text", v)
	}
}

// readableDuration writes durations as Go duration strings ("1.5s",
// "250ms") rather than slog's JSON default of raw nanoseconds.
func readableDuration(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		return slog.String(a.Key, a.Value.Duration().String())
	}
	return a
}
