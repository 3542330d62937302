package gateway

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Directions of a stream, as metric label values.
const (
	dirInbound  = "inbound"  // opened by a peer gateway, relayed to a local endpoint
	dirOutbound = "outbound" // from a local sidecar (or OpenControl), relayed to a peer
)

// Hops a handshake may fail on, as metric label values.
const (
	hopPeerInbound  = "peer_inbound"
	hopPeerOutbound = "peer_outbound"
	hopEntry        = "entry"
)

// metrics are the gateway's series. Labels are bounded: directions, reply
// codes, reasons, and linked peers (a peer's series go when it does).
type metrics struct {
	streams       *prometheus.CounterVec
	activeStreams *prometheus.GaugeVec
	bytes         *prometheus.CounterVec
	duration      *prometheus.HistogramVec
	peerConns     *prometheus.GaugeVec
	entryConns    prometheus.Gauge
	handshakeFail *prometheus.CounterVec
	refusals      *prometheus.CounterVec
	bulkWrites    *prometheus.CounterVec

	// Series used on every stream, looked up once.
	active   map[string]prometheus.Gauge
	sent     map[string]prometheus.Counter // to the peer
	received map[string]prometheus.Counter // from the peer
	turns    map[string]prometheus.Counter // bulk writes by outcome (see streamWriter)
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		streams: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_gateway_streams_total",
			Help: "Tunnel streams by direction (inbound from a peer, outbound to a peer) and result (the reply code).",
		}, []string{"direction", "result"}),
		activeStreams: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "strait_gateway_streams_active",
			Help: "Tunnel streams open, by direction.",
		}, []string{"direction"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_gateway_stream_bytes_total",
			Help: "Bytes relayed on tunnel streams, by direction and way (sent to the peer gateway, received from it).",
		}, []string{"direction", "way"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "strait_gateway_stream_duration_seconds",
			Help:    "How long relayed tunnel streams lasted, by direction.",
			Buckets: []float64{.001, .01, .1, 1, 10, 60, 600, 3600},
		}, []string{"direction"}),
		peerConns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "strait_gateway_peer_connections",
			Help: "QUIC connections to peer gateways, by peer cluster and direction (accepted, dialed).",
		}, []string{"peer", "direction"}),
		entryConns: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strait_gateway_entry_connections",
			Help: "Entry connections from local sidecars open.",
		}),
		handshakeFail: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_gateway_handshake_failures_total",
			Help: "Handshakes refused or failed, by hop (peer_inbound, peer_outbound, entry) and reason.",
		}, []string{"hop", "reason"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_gateway_refusals_total",
			Help: "Connections refused or closed after their handshake, by reason (too_many_conns, entry_limit, join_limit, unlinked, untrusted).",
		}, []string{"reason"}),
		bulkWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strait_gateway_bulk_writes_total",
			Help: "Bulk writes to tunnel streams that took their connection's turn, by outcome: run (sent as one run, each quarter MiB of it within 10ms), overran (a slow reader or path: gave the turn back and finished round robin; the stream then takes no turn for a while).",
		}, []string{"outcome"}),
		active:   map[string]prometheus.Gauge{},
		sent:     map[string]prometheus.Counter{},
		received: map[string]prometheus.Counter{},
		turns:    map[string]prometheus.Counter{},
	}
	for _, c := range []prometheus.Collector{m.streams, m.activeStreams, m.bytes, m.duration, m.peerConns, m.entryConns, m.handshakeFail, m.refusals, m.bulkWrites} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for _, d := range []string{dirInbound, dirOutbound} {
		m.active[d] = m.activeStreams.WithLabelValues(d)
		m.sent[d] = m.bytes.WithLabelValues(d, "sent")
		m.received[d] = m.bytes.WithLabelValues(d, "received")
	}
	for _, o := range []string{turnRun, turnOverran} {
		m.turns[o] = m.bulkWrites.WithLabelValues(o)
	}
	return m, nil
}
