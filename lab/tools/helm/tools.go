//go:build tools

// Package tools names the command `cargo xtask setup` builds from this module.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
