package broker

import (
	"strings"
	"testing"
)

const testRID = "4bf92f3577b34da6a3ce929d0e0e4736"

func TestFormatAppName(t *testing.T) {
	long := strings.Repeat("a", 80)
	for _, tc := range []struct {
		name, format, app, principal, want string
	}{
		{"default", DefaultApplicationName, "billing", "me", "billing pgward:me:" + testRID},
		{"no app", DefaultApplicationName, "", "me", "pgward:me:" + testRID},
		{"app cut first", DefaultApplicationName, long, "me",
			strings.Repeat("a", 63-len(" pgward:me:"+testRID)) + " pgward:me:" + testRID},
		{"principal cut after app", DefaultApplicationName, "x", long,
			"pgward:" + strings.Repeat("a", 63-len("pgward::"+testRID)) + ":" + testRID},
		{"non-ASCII made ? byte by byte", DefaultApplicationName, "café\n", "me", "caf??? pgward:me:" + testRID},
		{"pass through", "{app}", "mine", "me", "mine"},
		{"custom", "rid={request_id}", "mine", "me", "rid=" + testRID},
		{"app twice", "{app}/{app} {request_id}", long, "me",
			strings.Repeat("a", 14) + "/" + strings.Repeat("a", 14) + " " + testRID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := formatAppName(tc.format, tc.app, tc.principal, testRID)
			if got != tc.want {
				t.Errorf("formatAppName(%q, %q, %q) = %q, want %q", tc.format, tc.app, tc.principal, got, tc.want)
			}
			if len(got) > maxAppName {
				t.Errorf("%q is %d bytes, over %d", got, len(got), maxAppName)
			}
			if strings.Contains(tc.format, "{request_id}") && !strings.Contains(got, testRID) {
				t.Errorf("%q lost the request_id", got)
			}
		})
	}
}

func TestCheckAppNameFormat(t *testing.T) {
	for f, ok := range map[string]bool{
		"":                                       true,
		DefaultApplicationName:                   true,
		"{app}":                                  true,
		"{app} {user}":                           false,
		"{app":                                   false,
		strings.Repeat("x", 32) + "{request_id}": false,
		"é {request_id}":                         false,
	} {
		if err := checkAppNameFormat(f); (err == nil) != ok {
			t.Errorf("checkAppNameFormat(%q) = %v, want ok %v", f, err, ok)
		}
	}
}
