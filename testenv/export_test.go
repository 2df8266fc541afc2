package testenv

// SetCollectorPort replaces how StartCollector picks a receiver's port for
// the rest of the test.
func SetCollectorPort(t interface{ Cleanup(func()) }, pick func() (int, error)) {
	old := collectorPort
	collectorPort = pick
	t.Cleanup(func() { collectorPort = old })
}

// FreePort is freePort.
var FreePort = freePort
