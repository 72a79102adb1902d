// Package crds pins the prometheus-operator API types whose CRDs
// scripts/build-k8s-tools generates with controller-gen (the tool the
// prometheus-operator project generates them with), for the chart tests'
// ServiceMonitor and PrometheusRule objects.
package crds

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
