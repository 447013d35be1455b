//go:build tools

// Package tools names the command `cargo xtask setup` builds from this module.
package tools

import _ "go.etcd.io/etcd/server/v3"
