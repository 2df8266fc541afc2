//go:build race

package main

// raceEnabled: the race detector limits live goroutines to 8,128 and its
// shadow memory makes RSS meaningless.
const raceEnabled = true
