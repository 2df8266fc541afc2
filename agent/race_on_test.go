//go:build race

package agent

// raceEnabled: the race detector's shadow memory is sized to the peak heap
// and not given back, so RSS cannot show a leak in a -race build.
const raceEnabled = true
