// Command otelcol is the smallest OpenTelemetry Collector pgward's tests
// need: the OTLP receiver (gRPC and HTTP) and the file exporter, built from
// the collector's own releases (core and contrib at one version, v0.161.0);
// and what deploy/otelcol's example configurations use, so a test can
// validate them with this binary: the otlphttp exporter, the batch,
// memory_limiter and resource processors and the file_storage extension.
// It lives in its own Go module so pgward's go.mod does not carry the
// collector's dependency tree; `make otelcol` builds it into bin/otelcol and
// testenv.StartCollector runs it.
package main

import (
	"log"

	"github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter"
	"github.com/open-telemetry/opentelemetry-collector-contrib/extension/storage/filestorage"
	"github.com/open-telemetry/opentelemetry-collector-contrib/processor/resourceprocessor"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/envprovider"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/exporter/otlphttpexporter"
	"go.opentelemetry.io/collector/extension"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/processor"
	"go.opentelemetry.io/collector/processor/batchprocessor"
	"go.opentelemetry.io/collector/processor/memorylimiterprocessor"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"
)

func factories() (otelcol.Factories, error) {
	recv := otlpreceiver.NewFactory()
	f := otelcol.Factories{
		Receivers:  map[component.Type]receiver.Factory{recv.Type(): recv},
		Exporters:  map[component.Type]exporter.Factory{},
		Processors: map[component.Type]processor.Factory{},
		Extensions: map[component.Type]extension.Factory{},
		Telemetry:  otelconftelemetry.NewFactory(),
	}
	for _, e := range []exporter.Factory{fileexporter.NewFactory(), otlphttpexporter.NewFactory()} {
		f.Exporters[e.Type()] = e
	}
	for _, p := range []processor.Factory{batchprocessor.NewFactory(), memorylimiterprocessor.NewFactory(), resourceprocessor.NewFactory()} {
		f.Processors[p.Type()] = p
	}
	for _, e := range []extension.Factory{filestorage.NewFactory()} {
		f.Extensions[e.Type()] = e
	}
	return f, nil
}

func main() {
	set := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{Command: "otelcol", Description: "pgward test collector", Version: "0.161.0"},
		Factories: factories,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				// env: the examples read secrets as ${env:…}.
				ProviderFactories: []confmap.ProviderFactory{fileprovider.NewFactory(), envprovider.NewFactory()},
				DefaultScheme:     "file",
			},
		},
	}
	if err := otelcol.NewCommand(set).Execute(); err != nil {
		log.Fatal(err)
	}
}
