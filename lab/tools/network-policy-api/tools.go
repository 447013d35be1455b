//go:build tools

// Package tools names the package of the module `cargo xtask setup` reads
// the CRD manifests from, so `go mod tidy` keeps it in go.mod and go.sum.
package tools

import _ "sigs.k8s.io/network-policy-api/apis/v1alpha2"
