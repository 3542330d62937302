package proxy

import (
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the sidecar's golden signals. Labels are bounded: services
// and workload identities of the mesh, never request data.
type Metrics struct {
	requests       *prometheus.CounterVec
	duration       *prometheus.HistogramVec
	retries        *prometheus.CounterVec
	tcpConns       *prometheus.CounterVec
	tcpActive      *prometheus.GaugeVec
	tcpBytes       *prometheus.CounterVec
	handshakeFails *prometheus.CounterVec
	handshakes     *prometheus.CounterVec
	connsClosed    *prometheus.CounterVec
	svidExpiry     prometheus.Gauge
	snapshot       prometheus.Gauge
	cpConnected    prometheus.Gauge

	seriesMu sync.RWMutex
	series   map[seriesKey]*series

	// activity counts requests and connections, for idle detection.
	activity atomic.Uint64
}

// NewMetrics registers the sidecar's metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		series: map[seriesKey]*series{},
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_proxy_requests_total",
			Help: "HTTP requests by direction, source identity, destination service and response class.",
		}, []string{"direction", "source", "destination", "response_class"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "strait_proxy_request_duration_seconds",
			Help:    "HTTP request latency as seen by the sidecar, all attempts included.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"direction", "destination"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_proxy_retries_total",
			Help: "Retries by destination and outcome (sent, budget_exhausted).",
		}, []string{"destination", "outcome"}),
		tcpConns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_proxy_tcp_connections_total",
			Help: "TCP connections accepted, by direction and destination.",
		}, []string{"direction", "destination"}),
		tcpActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "strait_proxy_tcp_connections_active",
			Help: "TCP connections open, by direction and destination.",
		}, []string{"direction", "destination"}),
		tcpBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_proxy_tcp_bytes_total",
			Help: "Bytes relayed on opaque TCP connections, by direction, destination and way (sent to the peer, received from it).",
		}, []string{"direction", "destination", "way"}),
		handshakeFails: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_proxy_tls_handshake_failures_total",
			Help: "TLS handshakes refused or failed, by direction and reason.",
		}, []string{"direction", "reason"}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_proxy_tls_handshakes_total",
			Help: "mTLS handshakes whose peer was verified and authorized, by direction and whether they resumed a TLS session (resumed=\"true\": no certificates or signatures exchanged, still verified).",
		}, []string{"direction", "resumed"}),
		connsClosed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_proxy_connections_revoked_total",
			Help: "Open inbound connections closed because trust or policy no longer allowed them, by reason.",
		}, []string{"reason"}),
		svidExpiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strait_proxy_svid_expiry_timestamp_seconds",
			Help: "When the sidecar's current X.509-SVID expires (Unix seconds).",
		}),
		snapshot: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strait_proxy_snapshot_version",
			Help: "Version of the configuration snapshot in force.",
		}),
		cpConnected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strait_proxy_control_plane_connected",
			Help: "1 while the configuration stream from the control plane is up.",
		}),
	}
	reg.MustRegister(m.requests, m.duration, m.retries, m.tcpConns, m.tcpActive, m.tcpBytes,
		m.handshakeFails, m.handshakes, m.connsClosed, m.svidExpiry, m.snapshot, m.cpConnected)
	return m
}

// responseClass buckets a status code: "2xx" ... "5xx", or "error" when no
// response was received.
func responseClass(code int) string {
	switch {
	case code >= 100 && code < 600:
		return strconv.Itoa(code/100) + "xx"
	default:
		return "error"
	}
}

// seriesKey names one request series; looking it up allocates nothing.
type seriesKey struct {
	direction, source, dest string
	class                   int
}

type series struct {
	requests prometheus.Counter
	duration prometheus.Observer
}

// observeRequest counts one request. The label lookups of client_golang
// cost more than the rest of this, so series are cached per label set
// (bounded: mesh identities × services × 6 classes).
func (m *Metrics) observeRequest(direction, source, dest string, code int, d time.Duration) {
	class := code / 100
	if code < 100 || code >= 600 {
		class = 0
	}
	k := seriesKey{direction, source, dest, class}
	m.seriesMu.RLock()
	ser := m.series[k]
	m.seriesMu.RUnlock()
	if ser == nil {
		ser = &series{
			requests: m.requests.WithLabelValues(direction, source, dest, responseClass(code)),
			duration: m.duration.WithLabelValues(direction, dest),
		}
		m.seriesMu.Lock()
		m.series[k] = ser
		m.seriesMu.Unlock()
	}
	ser.requests.Inc()
	ser.duration.Observe(d.Seconds())
	m.activity.Add(1)
}
