package resource

import (
	"github.com/straitmesh/strait/ca/identity"

	"slices"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// Defaults of a TrafficPolicy, filled in by Proto for unset fields.
const (
	defaultConnectTimeout      = 1 * time.Second
	defaultRequestTimeout      = 15 * time.Second
	defaultRetryAttempts       = 2
	defaultRetryBudgetPercent  = 20
	defaultMinRetriesPerSecond = 10
	defaultLoadBalancer        = controlplanev1.LoadBalancer_LOAD_BALANCER_P2C_EWMA
	defaultConsecutiveErrors   = 5
	defaultBaseEjectionTime    = 30 * time.Second
	defaultMaxEjectionPercent  = 50
	defaultConnectionLimit     = 1024
)

// Retry conditions.
var (
	retryConditions      = []string{"connect-failure", "reset", "5xx", "gateway-error", "retriable-4xx"}
	defaultRetryOn       = []string{"connect-failure", "reset", "gateway-error"}
	loadBalancerPolicies = map[string]controlplanev1.LoadBalancer{
		"P2C_EWMA":      controlplanev1.LoadBalancer_LOAD_BALANCER_P2C_EWMA,
		"LEAST_REQUEST": controlplanev1.LoadBalancer_LOAD_BALANCER_LEAST_REQUEST,
		"ROUND_ROBIN":   controlplanev1.LoadBalancer_LOAD_BALANCER_ROUND_ROBIN,
	}
	loadBalancerNames = []string{"P2C_EWMA", "LEAST_REQUEST", "ROUND_ROBIN"}
)

// TrafficPolicy is the client-side policy for calls to one service: kind
// TrafficPolicy. Nil pointers are unset and take the defaults listed in the
// package documentation.
type TrafficPolicy struct {
	Metadata Metadata
	Spec     TrafficPolicySpec
}

// TrafficPolicySpec is a TrafficPolicy's spec.
type TrafficPolicySpec struct {
	// Service is required: the DNS-1123 label of the service, in the
	// policy's namespace.
	Service          string            `json:"service"`
	Timeouts         *Timeouts         `json:"timeouts,omitempty"`
	Retries          *Retries          `json:"retries,omitempty"`
	LoadBalancing    *LoadBalancing    `json:"loadBalancing,omitempty"`
	OutlierDetection *OutlierDetection `json:"outlierDetection,omitempty"`
	ConnectionLimits *ConnectionLimits `json:"connectionLimits,omitempty"`
	Failover         *Failover         `json:"failover,omitempty"`
}

// Failover says how traffic for the service leaves the local cluster.
// Without it, the local cluster comes first, then every peer that exports
// the service, in one tier.
type Failover struct {
	// Peers lists peer clusters in failover order after the local one;
	// peers not listed get none of the service's traffic. Empty means
	// every peer that exports the service.
	Peers []string `json:"peers,omitempty"`
	// Order is "listed" (default) or "rtt": peers by the round-trip time
	// their gateways measure, nearest first (only with Peers empty).
	Order string `json:"order,omitempty"`
	// SpillThreshold is a percentage, 0 to 100: when the healthy share of
	// the local endpoints drops below it, that share of traffic moves to
	// the next tier. 0 (the default) moves traffic only when no local
	// endpoint is healthy.
	SpillThreshold *uint32 `json:"spillThreshold,omitempty" range:"0,100"`
	// SlowStart ramps endpoints that come back up over this long
	// (default 10s; 0 disables).
	SlowStart *Duration `json:"slowStart,omitempty"`
	// Staleness expires the endpoints of a peer not heard from for this
	// long (default 30s).
	Staleness *Duration `json:"staleness,omitempty"`
}

// Timeouts bound connecting and whole requests. Both must be positive.
type Timeouts struct {
	Connect *Duration `json:"connect,omitempty"`
	// Request bounds the whole request, all attempts included.
	Request *Duration `json:"request,omitempty"`
}

// Retries says when and how often to retry.
type Retries struct {
	// Attempts are extra attempts after the first, 0 to 10; 0 disables retries.
	Attempts *uint32 `json:"attempts,omitempty" range:"0,10"`
	// PerTryTimeout bounds each attempt; 0 means none. At most the request
	// timeout.
	PerTryTimeout *Duration `json:"perTryTimeout,omitempty"`
	// RetryOn lists conditions: connect-failure, reset, 5xx, gateway-error,
	// retriable-4xx. If set, it must not be empty.
	RetryOn []string     `json:"retryOn,omitempty"`
	Budget  *RetryBudget `json:"budget,omitempty"`
}

// RetryBudget caps retries at a share of the request rate.
type RetryBudget struct {
	// Percent of the active request rate retries may add, 1 to 100.
	Percent *uint32 `json:"percent,omitempty" range:"1,100"`
	// MinPerSecond retries are always allowed.
	MinPerSecond *uint32 `json:"minPerSecond,omitempty"`
}

// LoadBalancing picks the balancing policy.
type LoadBalancing struct {
	// Policy is P2C_EWMA, LEAST_REQUEST or ROUND_ROBIN; empty means P2C_EWMA.
	Policy string `json:"policy,omitempty"`
}

// OutlierDetection ejects endpoints that fail passively observed requests.
type OutlierDetection struct {
	// ConsecutiveErrors that eject an endpoint, at least 1.
	ConsecutiveErrors *uint32 `json:"consecutiveErrors,omitempty" range:"1,4294967295"`
	// BaseEjectionTime is positive.
	BaseEjectionTime *Duration `json:"baseEjectionTime,omitempty"`
	// MaxEjectionPercent of endpoints may be ejected at once, 0 to 100; 0
	// disables ejection.
	MaxEjectionPercent *uint32 `json:"maxEjectionPercent,omitempty" range:"0,100"`
}

// ConnectionLimits bound what a sidecar opens toward the service. Each is at
// least 1.
type ConnectionLimits struct {
	MaxConnections     *uint32 `json:"maxConnections,omitempty" range:"1,4294967295"`
	MaxPendingRequests *uint32 `json:"maxPendingRequests,omitempty" range:"1,4294967295"`
	MaxRequests        *uint32 `json:"maxRequests,omitempty" range:"1,4294967295"`
}

// Kind returns "TrafficPolicy".
func (*TrafficPolicy) Kind() string { return KindTrafficPolicy }

// ObjectMeta returns the policy's metadata.
func (p *TrafficPolicy) ObjectMeta() Metadata { return p.Metadata }

func (p *TrafficPolicy) meta() *Metadata { return &p.Metadata }
func (p *TrafficPolicy) spec() any       { return &p.Spec }
func (p *TrafficPolicy) service() string { return p.Spec.Service }

func (p *TrafficPolicy) validate(v *validator) {
	s := &p.Spec
	v.dnsLabel("spec.service", s.Service, true)
	requestTimeout := defaultRequestTimeout
	if t := s.Timeouts; t != nil {
		positive(v, "spec.timeouts.connect", t.Connect)
		positive(v, "spec.timeouts.request", t.Request)
		if t.Request != nil {
			requestTimeout = time.Duration(*t.Request)
		}
	}
	if r := s.Retries; r != nil {
		if r.RetryOn != nil && len(r.RetryOn) == 0 {
			v.add("spec.retries.retryOn", "must list at least one condition (set attempts: 0 to disable retries)")
		}
		for i, c := range r.RetryOn {
			p := index("spec.retries.retryOn", i)
			if v.enum(p, c, retryConditions) && slices.Index(r.RetryOn, c) < i {
				v.add(p, "duplicate condition %s", quote(c))
			}
		}
		if r.PerTryTimeout != nil && time.Duration(*r.PerTryTimeout) > requestTimeout {
			v.add("spec.retries.perTryTimeout", "must not exceed the request timeout (%s), got %s", requestTimeout, r.PerTryTimeout)
		}
	}
	if lb := s.LoadBalancing; lb != nil && lb.Policy != "" {
		v.enum("spec.loadBalancing.policy", lb.Policy, loadBalancerNames)
	}
	if o := s.OutlierDetection; o != nil {
		positive(v, "spec.outlierDetection.baseEjectionTime", o.BaseEjectionTime)
	}
	if f := s.Failover; f != nil {
		for i, c := range f.Peers {
			p := index("spec.failover.peers", i)
			if err := identity.ValidateClusterName(c); err != nil {
				v.add(p, "%v", err)
			} else if slices.Index(f.Peers, c) < i {
				v.add(p, "cluster %s listed twice", quote(c))
			}
		}
		if f.Order != "" && v.enum("spec.failover.order", f.Order, []string{"listed", "rtt"}) && f.Order == "rtt" && len(f.Peers) > 0 {
			v.add("spec.failover.order", "rtt orders every exporting peer: leave peers empty, or use order listed")
		}
		if f.SlowStart != nil && *f.SlowStart < 0 {
			v.add("spec.failover.slowStart", "must not be negative, got %s", f.SlowStart)
		}
		positive(v, "spec.failover.staleness", f.Staleness)
	}
}

func positive(v *validator, path string, d *Duration) {
	if d != nil && *d <= 0 {
		v.add(path, "must be positive, got %s", d)
	}
}

// Failover defaults.
const (
	DefaultSlowStart = 10 * time.Second
	DefaultStaleness = 30 * time.Second
)

// DefaultTrafficPolicy returns the policy of a service that has no
// TrafficPolicy: every field at its default.
func DefaultTrafficPolicy() *controlplanev1.TrafficPolicy {
	return (&TrafficPolicy{}).Proto()
}

// Proto returns the effective policy: the spec with defaults filled in for
// unset fields (see the package documentation). A zero per-try timeout is
// left unset on the wire, meaning none.
func (p *TrafficPolicy) Proto() *controlplanev1.TrafficPolicy {
	var s TrafficPolicySpec
	if p != nil {
		s = p.Spec
	}
	out := &controlplanev1.TrafficPolicy{
		ConnectTimeout: durationpb.New(defaultConnectTimeout),
		RequestTimeout: durationpb.New(defaultRequestTimeout),
		Retries: &controlplanev1.RetryPolicy{
			Attempts:            defaultRetryAttempts,
			RetryOn:             slices.Clone(defaultRetryOn),
			BudgetPercent:       defaultRetryBudgetPercent,
			MinRetriesPerSecond: defaultMinRetriesPerSecond,
		},
		LoadBalancer: defaultLoadBalancer,
		OutlierDetection: &controlplanev1.OutlierDetection{
			ConsecutiveErrors:  defaultConsecutiveErrors,
			BaseEjectionTime:   durationpb.New(defaultBaseEjectionTime),
			MaxEjectionPercent: defaultMaxEjectionPercent,
		},
		ConnectionLimits: &controlplanev1.ConnectionLimits{
			MaxConnections:     defaultConnectionLimit,
			MaxPendingRequests: defaultConnectionLimit,
			MaxRequests:        defaultConnectionLimit,
		},
		Failover: &controlplanev1.Failover{
			SlowStart: durationpb.New(DefaultSlowStart),
			Staleness: durationpb.New(DefaultStaleness),
		},
	}
	if t := s.Timeouts; t != nil {
		setDuration(&out.ConnectTimeout, t.Connect)
		setDuration(&out.RequestTimeout, t.Request)
	}
	if r := s.Retries; r != nil {
		setUint(&out.Retries.Attempts, r.Attempts)
		setDuration(&out.Retries.PerTryTimeout, r.PerTryTimeout)
		if r.RetryOn != nil {
			out.Retries.RetryOn = slices.Clone(r.RetryOn)
		}
		if b := r.Budget; b != nil {
			setUint(&out.Retries.BudgetPercent, b.Percent)
			setUint(&out.Retries.MinRetriesPerSecond, b.MinPerSecond)
		}
	}
	if lb := s.LoadBalancing; lb != nil {
		if v, ok := loadBalancerPolicies[lb.Policy]; ok {
			out.LoadBalancer = v
		}
	}
	if f := s.Failover; f != nil {
		out.Failover.Peers = slices.Clone(f.Peers)
		out.Failover.ByRtt = f.Order == "rtt"
		setUint(&out.Failover.SpillThresholdPercent, f.SpillThreshold)
		setDuration(&out.Failover.SlowStart, f.SlowStart)
		setDuration(&out.Failover.Staleness, f.Staleness)
	}
	if o := s.OutlierDetection; o != nil {
		setUint(&out.OutlierDetection.ConsecutiveErrors, o.ConsecutiveErrors)
		setDuration(&out.OutlierDetection.BaseEjectionTime, o.BaseEjectionTime)
		setUint(&out.OutlierDetection.MaxEjectionPercent, o.MaxEjectionPercent)
	}
	if c := s.ConnectionLimits; c != nil {
		setUint(&out.ConnectionLimits.MaxConnections, c.MaxConnections)
		setUint(&out.ConnectionLimits.MaxPendingRequests, c.MaxPendingRequests)
		setUint(&out.ConnectionLimits.MaxRequests, c.MaxRequests)
	}
	return out
}

// setDuration sets *dst from d if d is set; a zero duration is left unset.
func setDuration(dst **durationpb.Duration, d *Duration) {
	switch {
	case d == nil:
	case *d == 0:
		*dst = nil
	default:
		*dst = durationpb.New(time.Duration(*d))
	}
}

func setUint(dst *uint32, v *uint32) {
	if v != nil {
		*dst = *v
	}
}
