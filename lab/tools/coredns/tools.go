//go:build tools

// Package tools names the command `cargo xtask setup` builds from this
// module, so `go mod tidy` keeps its dependencies in go.sum.
package tools

import _ "github.com/coredns/coredns"
