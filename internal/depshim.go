//go:build depshim

package internal

import (
	_ "github.com/prometheus/client_golang/prometheus"
	_ "go.etcd.io/bbolt"
	_ "golang.org/x/net/http2"
	_ "sigs.k8s.io/yaml"
)
