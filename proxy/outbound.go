package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/gateway/tunnel"
	"github.com/straitmesh/strait/proxy/balance"
)

// maxRetryBody is the largest request body buffered so that the request can
// be retried; larger bodies are streamed and never retried.
const maxRetryBody = 64 << 10

// HeaderUpstreamError tells the application why the sidecar answered itself
// (no endpoint, overflow, timeout, upstream unreachable).
const HeaderUpstreamError = "X-Strait-Error"

// outbound owns the local listeners for upstream services and the mTLS
// connection pools toward their endpoints.
type outbound struct {
	creds   *Credentials
	metrics *Metrics
	log     *slog.Logger
	clock   func() time.Time

	mu        sync.Mutex
	upstreams map[string]*upstream

	tmu        sync.RWMutex
	transports map[transportKey]pool
	// pooled are the open mTLS connections of the pools (*pooledConn to
	// its *tls.Conn), re-judged when trust shrinks.
	pooled sync.Map
	// busyGrace: see trustShrank; zero means defaultBusyGrace.
	busyGrace time.Duration
}

// defaultBusyGrace is how long a busy pooled connection whose endpoint no
// longer verifies may finish its request once trust shrinks.
const defaultBusyGrace = 30 * time.Second

// cutUntrustedPooled closes the pools' connections whose endpoint no
// longer verifies, busy or not.
func (o *outbound) cutUntrustedPooled() {
	o.pooled.Range(func(_, v any) bool {
		c := v.(*tls.Conn)
		if _, err := o.creds.StillTrusted(c.ConnectionState().PeerCertificates, svid.RoleServer); err != nil {
			o.metrics.connsClosed.WithLabelValues(string(svid.ReasonOf(err))).Inc()
			go c.Close() // a close_notify may wait on a busy writer
		}
		return true
	})
}

// pooledConn is the connection under a pool's workload mTLS: closing the
// TLS connection closes it, which forgets the connection.
type pooledConn struct {
	net.Conn
	o *outbound
}

func (c *pooledConn) Close() error {
	c.o.pooled.Delete(c)
	return c.Conn.Close()
}

// dialPooled is dialTLS for the pools: the connection is tracked while it
// is open.
func (o *outbound) dialPooled(ctx context.Context, raw func(context.Context) (net.Conn, error), cfg *tls.Config, timeout time.Duration) (*tls.Conn, error) {
	var pc *pooledConn
	tc, err := dialTLS(ctx, func(ctx context.Context) (net.Conn, error) {
		c, err := raw(ctx)
		if err != nil {
			return nil, err
		}
		pc = &pooledConn{Conn: c, o: o}
		return pc, nil
	}, cfg, timeout)
	if err != nil {
		return nil, err
	}
	o.pooled.Store(pc, tc)
	return tc, nil
}

// pool is the connections toward one endpoint: an h1Pool for HTTP/1.1,
// an http.Transport for HTTP/2.
type pool interface {
	http.RoundTripper
	CloseIdleConnections()
}

func newOutbound(creds *Credentials, m *Metrics, log *slog.Logger, clock func() time.Time) *outbound {
	return &outbound{creds: creds, metrics: m, log: log, clock: clock,
		upstreams: map[string]*upstream{}, transports: map[transportKey]pool{}}
}

// upstream is one upstream service's local listener and its live config.
type upstream struct {
	o     *outbound
	name  string
	lb    *balance.Balancer
	state atomic.Pointer[upstreamState]
	proxy *httputil.ReverseProxy
	tcp   sync.Map // open application connections of opaque TCP relays
	tcpUp sync.Map // their mTLS connections to endpoints (*tls.Conn)
}

type upstreamState struct {
	svc       *controlplanev1.Service
	policy    *controlplanev1.TrafficPolicy
	budget    *balance.RetryBudget
	requests  *balance.Limiter
	conns     *balance.Limiter
	retryOn   map[string]bool
	namespace string
}

func (o *outbound) addUpstream(name string) (*upstream, error) {
	lb, err := balance.New(balance.Config{Clock: o.clock})
	if err != nil {
		return nil, err
	}
	u := &upstream{o: o, name: name, lb: lb}
	u.proxy = &httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.Out.URL.Scheme = "https"; pr.Out.URL.Host = name },
		Transport:     u,
		FlushInterval: 0, // streaming responses (no length) still flush at once
		BufferPool:    bufferPool{},
		ErrorHandler:  u.errorHandler,
		ModifyResponse: func(r *http.Response) error {
			// Only this sidecar speaks in its own header.
			r.Header.Del(HeaderUpstreamError)
			return nil
		},
	}
	o.mu.Lock()
	o.upstreams[name] = u
	o.mu.Unlock()
	return u, nil
}

// apply installs the services of a snapshot. Services the sidecar has no
// listener for are ignored.
func (o *outbound) apply(services []*controlplanev1.Service) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.tmu.Lock()
	defer o.tmu.Unlock()
	live := map[transportKey]bool{}
	for _, svc := range services {
		u := o.upstreams[svc.GetName()]
		if u == nil {
			continue
		}
		if prev := u.state.Load(); prev != nil && transportSettingsChanged(prev.policy, svc.GetPolicy()) {
			// Pools were built with the old connect timeout and connection
			// cap: new ones are made on demand, idle old ones closed.
			for k, t := range o.transports {
				if k.service == u.name {
					dropPool(t)
					delete(o.transports, k)
				}
			}
		}
		u.apply(svc)
		st := u.state.Load()
		for _, ep := range svc.GetEndpoints() {
			addr := dialAddr(ep.GetTunnel(), st.namespace, ep.GetAddress())
			live[transportKey{u.name, addr, ep.GetSpiffeId(), false}] = true
			live[transportKey{u.name, addr, ep.GetSpiffeId(), true}] = true
		}
	}
	for k, t := range o.transports {
		if !live[k] {
			dropPool(t)
			delete(o.transports, k)
		}
	}
}

// dropPool closes a pool taken out of the transports: its idle
// connections now, those in use when their request ends (an HTTP/2
// transport's after its idle timeout).
func dropPool(t pool) {
	if p, ok := t.(*h1Pool); ok {
		p.retire()
		return
	}
	t.CloseIdleConnections()
}

// lbConfig is the balancer configuration of a traffic policy.
func lbConfig(pol *controlplanev1.TrafficPolicy, clock func() time.Time) balance.Config {
	od := pol.GetOutlierDetection()
	consecutive := int(od.GetConsecutiveErrors())
	if od.GetMaxEjectionPercent() == 0 {
		consecutive = 0 // the policy's "0% may be ejected": ejection off
	}
	return balance.Config{
		Policy: lbPolicy(pol.GetLoadBalancer()),
		Outlier: balance.OutlierConfig{
			ConsecutiveErrors:  consecutive,
			BaseEjectionTime:   od.GetBaseEjectionTime().AsDuration(),
			MaxEjectionPercent: int(od.GetMaxEjectionPercent()),
		},
		Clock:          clock,
		SpillThreshold: int(min(pol.GetFailover().GetSpillThresholdPercent(), 100)),
		SlowStart:      pol.GetFailover().GetSlowStart().AsDuration(),
	}
}

func (u *upstream) apply(svc *controlplanev1.Service) {
	pol := svc.GetPolicy()
	prev := u.state.Load()
	st := &upstreamState{svc: svc, policy: pol, namespace: svc.GetNamespace(), retryOn: map[string]bool{}}
	for _, c := range pol.GetRetries().GetRetryOn() {
		st.retryOn[c] = true
	}
	r := pol.GetRetries()
	if prev != nil && proto.Equal(prev.policy.GetRetries(), r) {
		st.budget = prev.budget
	} else {
		st.budget = balance.NewRetryBudget(balance.RetryBudgetConfig{Percent: int(r.GetBudgetPercent()), MinPerSecond: int(r.GetMinRetriesPerSecond()), Clock: u.o.clock})
	}
	lim := pol.GetConnectionLimits()
	if prev != nil && proto.Equal(prev.policy.GetConnectionLimits(), lim) {
		st.requests, st.conns = prev.requests, prev.conns
	} else {
		st.requests = balance.NewLimiter(int(lim.GetMaxRequests()))
		st.conns = balance.NewLimiter(int(lim.GetMaxConnections()))
	}
	if err := u.lb.SetConfig(lbConfig(pol, u.o.clock)); err != nil {
		u.o.log.Warn("load balancer config refused; keeping the previous one", "service", u.name, "err", err)
	}
	eps := make([]balance.Endpoint, 0, len(svc.GetEndpoints()))
	rank := failoverRanks(svc.GetEndpoints())
	for _, ep := range svc.GetEndpoints() {
		// Failover tier from the control plane, by rank among the tiers
		// this snapshot has (the balancer tells apart MaxPriority+1 of
		// them: a policy's ninth peer must not share the eighth's tier).
		prio := rank[endpointPriority(ep)]
		eps = append(eps, balance.Endpoint{
			Key:      ep.GetInstance(),
			Address:  ep.GetAddress(),
			SPIFFEID: ep.GetSpiffeId(),
			Cluster:  ep.GetCluster(),
			Healthy:  ep.GetHealth() == controlplanev1.Health_HEALTH_HEALTHY,
			Priority: prio,
			Weight:   int(min(ep.GetWeight(), 1<<20)),
		})
		if t := ep.GetTunnel(); t != nil {
			// The route travels with the endpoint: a request that read
			// the previous state and picks from this set still tunnels.
			eps[len(eps)-1].Route = t
		}
	}
	u.lb.Update(eps)
	u.state.Store(st)
}

// endpointPriority is an endpoint's failover priority as the control
// plane gave it; a peer's endpoint is never in the local tier.
func endpointPriority(ep *controlplanev1.Endpoint) uint32 {
	if ep.GetTunnel() != nil && ep.GetPriority() == 0 {
		return 1
	}
	return ep.GetPriority()
}

// failoverRanks maps the priorities of eps to the balancer's: as they are
// while they fit under balance.MaxPriority (a tier keeps its number when
// another comes or goes, which slow start follows), else to dense ones in
// order, the local tier staying 0 and peers' tiers starting at 1.
func failoverRanks(eps []*controlplanev1.Endpoint) map[uint32]int {
	var prios []uint32
	for _, ep := range eps {
		prios = append(prios, endpointPriority(ep))
	}
	slices.Sort(prios)
	prios = slices.Compact(prios)
	rank := make(map[uint32]int, len(prios))
	if len(prios) == 0 || prios[len(prios)-1] <= balance.MaxPriority {
		for _, p := range prios {
			rank[p] = int(p)
		}
		return rank
	}
	off := 0
	if prios[0] > 0 {
		off = 1
	}
	for i, p := range prios {
		rank[p] = i + off
	}
	return rank
}

func transportSettingsChanged(a, b *controlplanev1.TrafficPolicy) bool {
	return !proto.Equal(a.GetConnectTimeout(), b.GetConnectTimeout()) ||
		a.GetConnectionLimits().GetMaxConnections() != b.GetConnectionLimits().GetMaxConnections() ||
		a.GetConnectionLimits().GetMaxPendingRequests() != b.GetConnectionLimits().GetMaxPendingRequests()
}

func lbPolicy(p controlplanev1.LoadBalancer) balance.Policy {
	switch p {
	case controlplanev1.LoadBalancer_LOAD_BALANCER_LEAST_REQUEST:
		return balance.LeastRequest
	case controlplanev1.LoadBalancer_LOAD_BALANCER_ROUND_ROBIN:
		return balance.RoundRobin
	default:
		return balance.P2CEWMA
	}
}

// transportKey names the pool toward one endpoint, by protocol.
type transportKey struct {
	service, addr, id string
	h2                bool
}

// endpointKey is the key of ep (reached through tun, nil for none) in st.
func endpointKey(st *upstreamState, ep balance.Endpoint, tun *controlplanev1.Tunnel, h2 bool) transportKey {
	return transportKey{st.svc.GetName(), dialAddr(tun, st.namespace, ep.Address), ep.SPIFFEID, h2}
}

// String names the endpoint (its TLS sessions' key; the protocol is added
// by ResumingClientTLS).
func (k transportKey) String() string { return k.service + " " + k.addr + " " + k.id }

// dialAddr is what an endpoint is dialled by (a pool's key): its address,
// or for one in a peer cluster its tunnel through this cluster's gateway,
// named by everything the tunnel dialer uses, so that a pool is not kept
// across a change of any of it (the gateway's identity, say).
func dialAddr(t *controlplanev1.Tunnel, namespace, address string) string {
	if t == nil {
		return address
	}
	return "tunnel:" + t.GetGatewayAddress() + "/" + t.GetGatewaySpiffeId() + "/" + t.GetCluster() + "/" + namespace + "/" + strconv.Itoa(int(t.GetPort()))
}

// tunnelOf is the tunnel an endpoint is reached through, nil if none.
func tunnelOf(ep balance.Endpoint) *controlplanev1.Tunnel {
	t, _ := ep.Route.(*controlplanev1.Tunnel)
	return t
}

// transport returns the mTLS connection pool toward one endpoint; it
// verifies that the endpoint presents exactly the identity the control
// plane says it has. HTTP/1.1 requests use an h1Pool of HTTP/1.1
// connections (cheapest per request); HTTP/2 requests (gRPC) use HTTP/2.
func (o *outbound) transport(ep balance.Endpoint, st *upstreamState, h2 bool) (pool, error) {
	tun := tunnelOf(ep)
	key := endpointKey(st, ep, tun, h2)
	o.tmu.RLock()
	t := o.transports[key]
	o.tmu.RUnlock()
	if t != nil {
		return t, nil
	}
	want, err := spiffeid.FromString(ep.SPIFFEID)
	if err != nil {
		return nil, fmt.Errorf("endpoint %s has an invalid SPIFFE ID: %w", ep.Key, err)
	}
	verify := o.serverVerifier(want)
	connectTimeout := st.policy.GetConnectTimeout().AsDuration()
	if connectTimeout <= 0 {
		connectTimeout = time.Second
	}
	maxConns := int(st.policy.GetConnectionLimits().GetMaxConnections())
	raw := o.rawDialer(st, ep, tun, connectTimeout)
	if h2 {
		protos := new(http.Protocols)
		protos.SetHTTP2(true)
		cfg := o.creds.ResumingClientTLS(key.String(), []string{alpnH2}, verify)
		ht := &http.Transport{
			DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return o.dialPooled(ctx, raw, cfg, connectTimeout)
			},
			ForceAttemptHTTP2:  true,
			Protocols:          protos,
			IdleConnTimeout:    90 * time.Second,
			DisableCompression: true,
			MaxConnsPerHost:    maxConns,
		}
		t = ht
	} else {
		cfg := o.creds.ResumingClientTLS(key.String(), []string{alpnHTTP1}, verify)
		p := &h1Pool{
			dial: func(ctx context.Context) (net.Conn, error) {
				return o.dialPooled(ctx, raw, cfg, connectTimeout)
			},
			maxIdle:     256,
			idleTimeout: poolIdleTimeout,
			armedWait:   tun == nil,
		}
		if maxConns > 0 {
			p.sem, p.avail = make(chan struct{}, maxConns), make(chan struct{}, 1)
			p.maxWaiting = int64(st.policy.GetConnectionLimits().GetMaxPendingRequests())
		}
		t = p
	}
	o.tmu.Lock()
	defer o.tmu.Unlock()
	if prev := o.transports[key]; prev != nil {
		return prev, nil
	}
	o.transports[key] = t
	return t, nil
}

// dialTLS opens a raw connection with raw and runs the workload mTLS
// handshake over it, all within timeout.
func dialTLS(ctx context.Context, raw func(context.Context) (net.Conn, error), cfg *tls.Config, timeout time.Duration) (*tls.Conn, error) {
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := raw(cctx)
	if err != nil {
		return nil, connectFailed(ctx, err, timeout)
	}
	sessions, resuming := cfg.ClientSessionCache.(endpointSessions)
	if resuming {
		cfg = cfg.Clone()
		sessions = sessions.bound().on(instanceOf(c))
		cfg.ClientSessionCache = sessions
		resuming = sessions.held()
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(cctx); err != nil {
		c.Close()
		if !resuming || cctx.Err() != nil {
			return nil, connectFailed(ctx, err, timeout)
		}
		// The session offered may hold a peer chain this side no longer
		// takes (a refusal by the peer comes after the handshake, in TLS
		// 1.3): forget it, and do a full handshake.
		sessions.drop()
		if c, err = raw(cctx); err != nil {
			return nil, connectFailed(ctx, err, timeout)
		}
		cfg.ClientSessionCache = sessions.on(instanceOf(c)).full()
		tc = tls.Client(c, cfg)
		if err := tc.HandshakeContext(cctx); err != nil {
			c.Close()
			return nil, connectFailed(ctx, err, timeout)
		}
	}
	return tc, nil
}

// tunnelledConn is the connection to this cluster's gateway that a
// tunnelled endpoint's mTLS runs on, with the tag its far gateway named
// the endpoint instance by in the reply (tunnel.Reply.Endpoint).
type tunnelledConn struct {
	*net.TCPConn
	instance string
}

// instanceOf returns the instance tag of a tunnelled connection (under
// the pool's tracking), or "".
func instanceOf(c net.Conn) string {
	if pc, ok := c.(*pooledConn); ok {
		c = pc.Conn
	}
	if tc, ok := c.(*tunnelledConn); ok {
		return tc.instance
	}
	return ""
}

// connectError is a failure to open an mTLS connection to an endpoint
// (the dial, a gateway's reply, the handshake) within the connect timeout:
// a connect-failure, whatever the cause, and the endpoint's failure.
type connectError struct {
	err     error
	timeout time.Duration
}

func (e *connectError) Error() string {
	if errors.Is(e.err, context.DeadlineExceeded) {
		return fmt.Sprintf("connect: no mTLS connection within the connect timeout (%s)", e.timeout)
	}
	return "connect: " + e.err.Error()
}

func (e *connectError) Unwrap() error { return e.err }

// connectFailed makes err a connectError, unless ctx (the request, or its
// attempt) ended first: that is the request's own timeout or cancellation.
func connectFailed(ctx context.Context, err error, timeout time.Duration) error {
	// By the clock too: a socket deadline set to ctx's may fire before
	// ctx's own timer.
	if dl, ok := ctx.Deadline(); ctx.Err() != nil || ok && !time.Now().Before(dl) {
		return err
	}
	return &connectError{err: err, timeout: timeout}
}

// rawDialer returns how to reach an endpoint's inbound listener: plain TCP,
// or for an endpoint in a peer cluster, mTLS to this cluster's gateway
// (which must present its own identity) and a tunnel header naming the
// target. The workload mTLS then runs inside, end to end: the gateways
// relay it without opening it.
func (o *outbound) rawDialer(st *upstreamState, ep balance.Endpoint, tun *controlplanev1.Tunnel, timeout time.Duration) func(context.Context) (net.Conn, error) {
	nd := &net.Dialer{Timeout: timeout}
	if tun == nil {
		addr := ep.Address
		return func(ctx context.Context) (net.Conn, error) { return nd.DialContext(ctx, "tcp", addr) }
	}
	name, _, _ := strings.Cut(st.svc.GetName(), ".")
	hdr := tunnel.Header{Kind: tunnel.KindData, Cluster: tun.GetCluster(), Namespace: st.namespace, Service: name, Port: uint16(tun.GetPort())}
	gw := tun.GetGatewayAddress()
	return func(ctx context.Context) (net.Conn, error) {
		gwID, err := spiffeid.FromString(tun.GetGatewaySpiffeId())
		if err != nil {
			return nil, fmt.Errorf("gateway of endpoint %s has an invalid SPIFFE ID: %w", ep.Key, err)
		}
		if err := hdr.Validate(); err != nil {
			return nil, fmt.Errorf("endpoint %s: %w", ep.Key, err)
		}
		d := &tls.Dialer{NetDialer: nd, Config: o.creds.ClientTLS([]string{tunnel.ALPNEntryRaw}, o.serverVerifier(gwID))}
		c, err := d.DialContext(ctx, "tcp", gw)
		if err != nil {
			return nil, fmt.Errorf("gateway %s: %w", gw, err)
		}
		if dl, ok := ctx.Deadline(); ok {
			c.SetDeadline(dl)
		}
		if err := tunnel.WriteHeader(c, hdr); err != nil {
			c.Close()
			return nil, fmt.Errorf("gateway %s: %w", gw, err)
		}
		r, err := tunnel.ReadReply(c)
		if err == nil {
			err = r.Err()
		}
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("through gateway %s to %s: %w", gw, hdr, err)
		}
		c.SetDeadline(time.Time{})
		// After the reply the workload mTLS runs on the TCP connection
		// itself (tunnel.ALPNEntryRaw): the gateway relays it unopened.
		nc := c.(*tls.Conn).NetConn()
		if tcp, ok := nc.(*net.TCPConn); ok && r.Endpoint != "" {
			return &tunnelledConn{TCPConn: tcp, instance: r.Endpoint}, nil
		}
		return nc, nil
	}
}

// dropPools starts every upstream on new pools and drops the old ones:
// idle connections close now, busy ones once they are idle. An HTTP/1.1
// pool closes them as they come back (dropPool); an HTTP/2 transport is
// swept for idle ones over the grace busy connections get, which it
// returns.
func (o *outbound) dropPools() time.Duration {
	o.tmu.Lock()
	old := o.transports
	o.transports = map[transportKey]pool{}
	o.tmu.Unlock()
	grace := o.busyGrace
	if grace <= 0 {
		grace = defaultBusyGrace
	}
	for _, t := range old {
		dropPool(t)
		if _, h1 := t.(*h1Pool); !h1 {
			for _, d := range []time.Duration{grace / 30, grace / 3, grace} {
				time.AfterFunc(d, t.CloseIdleConnections)
			}
		}
	}
	return grace
}

// svidMoved replaces every pool after the sidecar's SVID moved to another
// issuer (a root rotation re-signed the intermediate): pooled connections
// present the chain it had when they were opened, and the upstream
// sidecars close those at once when the old root is retired, with the
// requests in flight on them. New requests open connections presenting
// the current chain (dropPools).
func (o *outbound) svidMoved() { o.dropPools() }

// trustShrank reacts to a root leaving the bundle: every pooled upstream
// connection was verified against the old trust, so the pools are dropped
// (dropPools), those whose endpoint no longer verifies are cut after
// busyGrace even if their request has not ended, and opaque TCP relays
// whose endpoint no longer verifies are cut.
func (o *outbound) trustShrank() {
	// The cut catches connections that never go idle (a stream, or an
	// endpoint under a revoked root keeping its session open). It covers
	// every pooled connection, also those of pools dropped before (an
	// SVID re-issue, a snapshot without the endpoint): there may be no
	// pool left now.
	time.AfterFunc(o.dropPools(), o.cutUntrustedPooled)
	o.mu.Lock()
	ups := make([]*upstream, 0, len(o.upstreams))
	for _, u := range o.upstreams {
		ups = append(ups, u)
	}
	o.mu.Unlock()
	for _, u := range ups {
		u.tcpUp.Range(func(k, _ any) bool {
			c := k.(*tls.Conn)
			cs := c.ConnectionState()
			if _, err := o.creds.StillTrusted(cs.PeerCertificates, svid.RoleServer); err != nil {
				o.metrics.connsClosed.WithLabelValues(string(svid.ReasonOf(err))).Inc()
				c.Close()
			}
			return true
		})
	}
}

// serverVerifier checks an upstream's chain against current trust and that
// it is exactly the workload expected.
func (o *outbound) serverVerifier(want spiffeid.ID) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		id, _, err := o.creds.Verifier().Verify(cs.PeerCertificates, svid.RoleServer)
		if err != nil {
			o.metrics.handshakeFails.WithLabelValues("outbound", string(svid.ReasonOf(err))).Inc()
			return err
		}
		if id != want {
			o.metrics.handshakeFails.WithLabelValues("outbound", "wrong_identity").Inc()
			return fmt.Errorf("upstream presented %s, want %s", id, want)
		}
		o.metrics.handshakes.WithLabelValues("outbound", strconv.FormatBool(cs.DidResume)).Inc()
		return nil
	}
}

// ServeHTTP proxies one application request to the upstream service.
func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	st := u.state.Load()
	rec := &statusRecorder{ResponseWriter: w}
	defer func() {
		u.o.metrics.observeRequest("outbound", u.selfID(), u.name, rec.code(), time.Since(start))
	}()
	if st == nil {
		sidecarError(rec, http.StatusServiceUnavailable, "no configuration for "+u.name+" yet")
		return
	}
	if !st.requests.TryAcquire() {
		sidecarError(rec, http.StatusServiceUnavailable, "overflow: connection limits of "+u.name+" reached")
		return
	}
	defer st.requests.Release()
	st.budget.Request()
	ctx := r.Context()
	timeout := st.policy.GetRequestTimeout().AsDuration()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
		r = r.WithContext(ctx)
		// Reading the body counts too: a client that stalls sending it
		// does not hold a request slot (or an upstream connection) past
		// the timeout. A writer that cannot bound its reads is left be.
		dl, _ := ctx.Deadline() // the context's own, so that the body's read fails no sooner
		_ = http.NewResponseController(w).SetReadDeadline(dl)
	}
	if st.policy.GetRetries().GetAttempts() > 0 && r.Body != nil && r.Body != http.NoBody && r.ContentLength >= 0 && r.ContentLength <= maxRetryBody {
		body, err := io.ReadAll(io.LimitReader(r.Body, maxRetryBody+1))
		if errors.Is(err, os.ErrDeadlineExceeded) {
			sidecarError(rec, http.StatusRequestTimeout, fmt.Sprintf("the request body did not arrive within the request timeout of %s", timeout))
			return
		}
		if err != nil || int64(len(body)) != r.ContentLength {
			sidecarError(rec, http.StatusBadRequest, "reading the request body failed")
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	} else if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		r.GetBody = func() (io.ReadCloser, error) { return http.NoBody, nil }
	}
	u.proxy.ServeHTTP(rec, r)
}

func (u *upstream) selfID() string {
	if s := u.o.creds.SVID(); s != nil {
		return s.ID.String()
	}
	return ""
}

func sidecarError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set(HeaderUpstreamError, msg)
	http.Error(w, msg, code)
}

func (u *upstream) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	code, msg := u.errorStatus(err)
	if dl, ok := r.Context().Deadline(); ok && code == http.StatusBadGateway && !time.Now().Before(dl) {
		// The request's time ran out, whatever failed as it did (net/http
		// does not let a body's read error be told apart).
		code = http.StatusGatewayTimeout
	}
	sidecarError(w, code, msg)
}

// errorStatus is the status and message a failed request is answered
// with.
func (u *upstream) errorStatus(err error) (int, string) {
	code := http.StatusBadGateway
	var ce *connectError
	switch {
	case errors.As(err, &ce):
		code = http.StatusServiceUnavailable // the endpoint could not be reached
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		code = http.StatusGatewayTimeout
	case errors.Is(err, balance.ErrNoEndpoints), errors.Is(err, balance.ErrNoHealthyEndpoints), errors.Is(err, errOverflow):
		code = http.StatusServiceUnavailable
	case errors.Is(err, context.Canceled):
		code = 499 // client went away; nothing is written to it anyway
	}
	var refused *tunnel.ReplyError
	if errors.As(err, &refused) {
		switch refused.Code {
		case tunnel.CodeNoEndpoints, tunnel.CodeDialFailed, tunnel.CodeUnavailable, tunnel.CodeLimit:
			code = http.StatusServiceUnavailable
		default:
			code = http.StatusBadGateway
		}
	}
	msg := err.Error()
	if strings.Contains(msg, "remote error: tls: bad certificate") {
		msg = u.name + " refused this workload's identity (not allowed by its AuthorizationPolicy, or not trusted): " + msg
	}
	u.o.log.Debug("upstream request failed", "service", u.name, "err", err)
	return code, msg
}

// RoundTrip sends one request to the service: it picks an endpoint, and
// retries on another one when the policy, the budget and the body allow.
func (u *upstream) RoundTrip(req *http.Request) (*http.Response, error) {
	st := u.state.Load()
	if req.GetBody != nil && req.ContentLength > 0 {
		// ReverseProxy wraps the body; the buffered one is handed over
		// unwrapped so net/http sends headers and body in one write.
		if body, err := req.GetBody(); err == nil {
			req.Body = body
		}
	}
	retries := st.policy.GetRetries()
	perTry := retries.GetPerTryTimeout().AsDuration()
	var tried []string
	for attempt := 0; ; attempt++ {
		pick, err := u.lb.Pick(tried...)
		if err != nil {
			return nil, err
		}
		tried = append(tried, pick.Endpoint.Key)
		resp, cause, err := u.attempt(req, st, pick, perTry)
		if cause == "" {
			return resp, err
		}
		last := attempt >= int(retries.GetAttempts()) || req.Context().Err() != nil || req.GetBody == nil
		// A request that never reached an endpoint (connect failure) costs
		// no backend anything: retrying it elsewhere is outside the budget,
		// which is what lets traffic fail over when endpoints die at once.
		if !last && cause != "connect-failure" && !st.budget.TryRetry() {
			u.o.metrics.retries.WithLabelValues(u.name, "budget_exhausted").Inc()
			last = true
		}
		if last {
			return resp, err
		}
		if resp != nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
		}
		body, gerr := req.GetBody()
		if gerr != nil {
			return nil, gerr
		}
		req = req.Clone(req.Context())
		req.Body = body
		u.o.metrics.retries.WithLabelValues(u.name, "sent").Inc()
	}
}

// attempt sends req to one endpoint. It returns the retry condition that
// matched ("" if the result is final).
func (u *upstream) attempt(req *http.Request, st *upstreamState, pick *balance.Pick, perTry time.Duration) (*http.Response, string, error) {
	start := time.Now()
	t, err := u.o.transport(pick.Endpoint, st, req.ProtoMajor == 2)
	if err != nil {
		pick.Done(0, balance.Failure)
		return nil, "", err
	}
	ctx, cancel := context.WithCancel(req.Context())
	out := req.WithContext(ctx)
	target := *req.URL
	target.Host = pick.Endpoint.Address
	out.URL = &target
	var timedOut atomic.Bool
	if perTry > 0 {
		timer := time.AfterFunc(perTry, func() { timedOut.Store(true); cancel() })
		defer timer.Stop()
	}
	resp, err := t.RoundTrip(out)
	latency := time.Since(start)
	if err != nil {
		cancel()
		if req.Context().Err() != nil {
			pick.Done(latency, balance.LocalError)
			return nil, "", err
		}
		pick.Done(latency, balance.Failure)
		cause := classifyError(err, timedOut.Load())
		if timedOut.Load() {
			err = fmt.Errorf("per-try timeout of %s: %w", perTry, context.DeadlineExceeded)
		}
		// A connect failure or a per-try timeout is what a gateway reports
		// as 502/504, and a reset as 5xx: the policy's conditions cover them.
		gatewayish := cause == "connect-failure" || cause == "per-try-timeout"
		if st.retryOn[cause] || (cause == "reset" || gatewayish) && st.retryOn["5xx"] || gatewayish && st.retryOn["gateway-error"] {
			return nil, cause, err
		}
		return nil, "", err
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: cancel}
	outcome := balance.Success
	if resp.StatusCode >= 500 {
		outcome = balance.Failure
	}
	pick.Done(latency, outcome)
	switch c := resp.StatusCode; {
	case c >= 500 && st.retryOn["5xx"]:
		return resp, "5xx", nil
	case (c == 502 || c == 503 || c == 504) && st.retryOn["gateway-error"]:
		return resp, "gateway-error", nil
	case c == 409 && st.retryOn["retriable-4xx"]:
		return resp, "retriable-4xx", nil
	}
	return resp, "", nil
}

func classifyError(err error, timedOut bool) string {
	var op *net.OpError
	var ce *connectError
	switch {
	case timedOut:
		return "per-try-timeout"
	case errors.As(err, &ce), errors.As(err, &op) && op.Op == "dial", errors.Is(err, syscall.ECONNREFUSED):
		return "connect-failure"
	case isTLSError(err):
		return "connect-failure"
	default:
		return "reset"
	}
}

func isTLSError(err error) bool {
	var se *svid.Error
	var ae tls.AlertError
	var re *tls.RecordHeaderError
	return errors.As(err, &se) || errors.As(err, &ae) || errors.As(err, &re)
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// serveTCP relays one application connection to an endpoint over mTLS,
// trying other endpoints when the connect fails.
func (u *upstream) serveTCP(app net.Conn) {
	u.tcp.Store(app, struct{}{})
	defer u.tcp.Delete(app)
	defer app.Close()
	st := u.state.Load()
	if st == nil {
		return
	}
	if !st.conns.TryAcquire() {
		return
	}
	defer st.conns.Release()
	m := u.o.metrics
	m.tcpConns.WithLabelValues("outbound", u.name).Inc()
	active := m.tcpActive.WithLabelValues("outbound", u.name)
	active.Inc()
	defer active.Dec()
	timeout := st.policy.GetConnectTimeout().AsDuration()
	if timeout <= 0 {
		timeout = time.Second
	}
	var tried []string
	for attempt := 0; attempt <= int(st.policy.GetRetries().GetAttempts()); attempt++ {
		pick, err := u.lb.Pick(tried...)
		if err != nil {
			return
		}
		tried = append(tried, pick.Endpoint.Key)
		want, err := spiffeid.FromString(pick.Endpoint.SPIFFEID)
		if err != nil {
			pick.Done(0, balance.Failure)
			continue
		}
		start := time.Now()
		tun := tunnelOf(pick.Endpoint)
		raw := u.o.rawDialer(st, pick.Endpoint, tun, timeout)
		key := endpointKey(st, pick.Endpoint, tun, false)
		c, err := dialTLS(context.Background(), raw, u.o.creds.ResumingClientTLS(key.String(), []string{alpnTCP}, u.o.serverVerifier(want)), timeout)
		if err != nil {
			pick.Done(time.Since(start), balance.Failure)
			u.o.log.Debug("tcp connect to endpoint failed", "service", u.name, "endpoint", pick.Endpoint.Key, "err", err)
			continue
		}
		pick.Done(time.Since(start), balance.Success)
		u.tcpUp.Store(c, struct{}{})
		relay(c, app, m.tcpBytes.WithLabelValues("outbound", u.name, "sent"), m.tcpBytes.WithLabelValues("outbound", u.name, "received"))
		u.tcpUp.Delete(c)
		return
	}
}

// run serves the upstream's local listener until ctx ends. Each connection
// is handled by the protocol the service speaks at accept time.
func (u *upstream) run(ctx context.Context, ln net.Listener) error {
	// HTTP/1.1 is served by h1Server, HTTP/2 with prior knowledge (gRPC
	// over h2c) by net/http. The protocol is told apart once per
	// connection from its first bytes; a server offering both would peek
	// at every request.
	h2c := new(http.Protocols)
	h2c.SetUnencryptedHTTP2(true)
	h2 := &http.Server{Handler: u, Protocols: h2c, ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 5 * time.Minute, ErrorLog: slogErrorLog(u.o.log)}
	h1 := &h1Server{handler: u, fast: u.serveFast, log: u.o.log, headerTimeout: 30 * time.Second, idleTimeout: 5 * time.Minute}
	h2ln := newChanListener(ln.Addr())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer h2ln.Close()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if st := u.state.Load(); st != nil && st.svc.GetProtocol() == controlplanev1.Protocol_PROTOCOL_TCP {
				go u.serveTCP(c)
				continue
			}
			go func() {
				// Not waited for: h1 refuses connections after its
				// shutdown, and h2ln after it closed.
				pc, isH2 := sniffH2C(c)
				if !isH2 {
					h1.serveBuffered(c, pc.lr, pc.r)
				} else if pc.lr.n = 1<<63 - 1; !h2ln.push(pc) {
					c.Close()
				}
			}()
		}
	}()
	go func() { <-ctx.Done(); ln.Close() }()
	errc := make(chan error, 1)
	go func() { errc <- serveUntil(ctx, h2, h2ln) }()
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h1.Shutdown(sctx)
	err := <-errc
	ln.Close()
	u.tcp.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
	wg.Wait()
	return err
}

// h2Preface starts every HTTP/2 connection with prior knowledge.
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// sniffH2C reads the start of a connection and reports whether it is
// HTTP/2 with prior knowledge; the returned conn replays what was read.
func sniffH2C(c net.Conn) (*peekedConn, bool) {
	lr := &h1Reader{c: c, n: 1 << 20}
	br := bufio.NewReaderSize(lr, 4096)
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	want := 1
	for {
		// Decide as soon as the bytes stop matching the preface: a short
		// HTTP/1.0 request must not wait for more.
		_, err := br.Peek(want)
		b, _ := br.Peek(br.Buffered()) // everything read so far, no blocking
		if len(b) > len(h2Preface) {
			b = b[:len(h2Preface)]
		}
		if !strings.HasPrefix(h2Preface, string(b)) {
			return &peekedConn{Conn: c, r: br, lr: lr}, false
		}
		if len(b) == len(h2Preface) {
			return &peekedConn{Conn: c, r: br, lr: lr}, true
		}
		if err != nil {
			return &peekedConn{Conn: c, r: br, lr: lr}, false
		}
		want = len(b) + 1
	}
}

// peekedConn is a connection whose first bytes sit in a bufio.Reader.
type peekedConn struct {
	net.Conn
	r  *bufio.Reader
	lr *h1Reader // what r reads from; it limits nothing once handed to net/http
}

func (p *peekedConn) Read(b []byte) (int, error) { return p.r.Read(b) }

// chanListener hands accepted connections to an http.Server.
type chanListener struct {
	addr   net.Addr
	conns  chan net.Conn
	once   sync.Once
	closed chan struct{}
}

func newChanListener(addr net.Addr) *chanListener {
	return &chanListener{addr: addr, conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *chanListener) push(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.closed:
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }
